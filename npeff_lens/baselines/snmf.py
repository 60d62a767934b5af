"""Semi-non-negative matrix factorisation (SNMF) of MLP activations, the activation-space cousin of NPEFF with
non-negative coefficients and additive parts.

The method is Shafran, Geiger and Geva, 2025 (arXiv 2506.10920).

The hidden activations of one MLP (the input of its down/out projection), one column per token,
``A [d_mlp, tokens]``, are factorised as ``A ≈ Z Y`` with mixed-sign features ``Z [d_mlp, k]`` (each a
combination of neurons; optionally sparse by winner-take-all masking) and per-token coefficients
``Y [k, tokens] ≥ 0``. Read like the SAE's latents (§5.2): a feature's coefficient on an example is its largest
per-token coefficient over the example's tokens; its top examples are the examples with the largest
coefficients. In code the token axis comes first: ``acts [n_tokens, d]`` ≈ ``token_coefficients_ [n_tokens, k]
@ features_ [k, d]`` (``features_ = Zᵀ`` with unit-norm rows, ``token_coefficients_ = Yᵀ``).

The solver is the multiplicative update of Ding, Li and Jordan (2010, "Convex and semi-nonnegative matrix
factorizations", Theorem 1), written here in torch (:func:`semi_nmf`): the mixed-sign factor by least squares,
the non-negative one by ``G ← G ⊙ sqrt(((XᵀF)⁺ + G(FᵀF)⁻) / ((XᵀF)⁻ + G(FᵀF)⁺))``, which keeps it ≥ 0 and
does not increase the error (their theorem; masking ``F`` by winner-take-all voids that guarantee).
PyPI's ``overcomplete`` (0.3.0) ships a Semi-NMF and checks out on the factor:
its multiplicative update keeps the codes (per-token, our ``Y``) non-negative (its class docstring says the
dictionary; the code says the codes). It is not used because (1) installing it pulls ``torchvision``, ``timm``,
``opencv-python`` and ``scikit-image`` (``import overcomplete`` imports torchvision for its vision models), and
torchvision pins its own torch; (2) it has no winner-take-all sparsity of the features; (3) its initialisation
draws from the global RNG, so a fit is not reproducible from a seed; (4) its ``encode`` starts new tokens from
random codes rather than the least-squares warm start used here. The update itself is ten lines.

The activations are read through the adapters with :func:`npeff_lens.baselines.activations.activations` at
:func:`npeff_lens.baselines.activations.mlp_hidden_hook` (``blocks.L.mlp.hook_post`` for hooked/bridge,
``model.layers.L.mlp.down_proj:input`` for hf/nnsight).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io import progress
from ..saving import SavedFormat
from .activations import (
    ActivationEstimator,
    Activations,
    activations,
    as_activations,
    check_positive_int,
    mlp_hidden_hook,
    n_layers,
)

__all__ = ["SNMFBaseline", "semi_nmf", "encode", "winner_take_all", "default_layer"]

SAVED = SavedFormat(
    "npeff_lens.SNMFBaseline",
    "npeff_snmf.safetensors",
    "npeff_snmf.json",
    version=1,
    key="format",
    what="a saved npeff_lens.SNMFBaseline",
)


def _pos(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() + x) / 2


def _neg(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() - x) / 2


def winner_take_all(features: torch.Tensor, sparsity: float | None) -> torch.Tensor:
    """``features [d, k]`` with, per feature (column), only the ``ceil(sparsity * d)`` entries of largest
    magnitude kept (the others 0); ``sparsity=None`` (or 1) keeps all."""
    if sparsity is None or sparsity >= 1:
        return features
    keep = max(1, math.ceil(sparsity * features.shape[0]))
    idx = features.abs().topk(keep, dim=0).indices
    return torch.zeros_like(features).scatter_(0, idx, features.gather(0, idx))


def _least_squares_features(acts: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``F = Xᵀ… = actsᵀ G (GᵀG)⁻¹`` ``[d, k]`` (Ding et al.'s F update; a tiny ridge keeps an empty column finite)."""
    gtg = (g.T @ g).double()
    ridge = 1e-9 * float(gtg.diagonal().mean().clamp_min(1e-30))
    rhs = (acts.T @ g).double()  # [d, k]
    f = torch.linalg.solve(gtg + ridge * torch.eye(gtg.shape[0], dtype=gtg.dtype), rhs.T).T
    return f.to(acts.dtype)


def _update_coefficients(acts: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Ding et al.'s multiplicative update of the non-negative factor ``G [n, k]`` with ``F [d, k]`` fixed."""
    af, ftf = acts @ f, f.T @ f  # XᵀF [n, k], FᵀF [k, k]
    num = _pos(af) + g @ _neg(ftf)
    den = _neg(af) + g @ _pos(ftf)
    return g * torch.sqrt(num / (den + eps))


def _initial_coefficients(acts: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Ding et al.'s start, with one k-means assignment: each token to the nearest (cosine) of ``k`` random
    tokens, ``G = indicator + 0.2``."""
    n = acts.shape[0]
    centres = acts[torch.randperm(n, generator=gen)[:k]]
    unit = acts / acts.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cu = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = torch.full((n, k), 0.2, dtype=acts.dtype)
    g[torch.arange(n), (unit @ cu.T).argmax(1)] += 1.0
    return g


def _relative_error(acts: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> float:
    """``‖acts − G Fᵀ‖_F / ‖acts‖_F`` without forming ``G Fᵀ``."""
    a2 = float(acts.double().square().sum())
    cross = float(((acts @ f).double() * g.double()).sum())
    model = float(((g.T @ g).double() * (f.T @ f).double()).sum())
    return math.sqrt(max(a2 - 2 * cross + model, 0.0) / max(a2, 1e-300))


def semi_nmf(
    acts: torch.Tensor,
    n_features: int,
    *,
    n_iter: int = 200,
    sparsity: float | None = None,
    seed: int = 0,
    n_init: int = 1,
    eps: float = 1e-12,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Semi-NMF ``acts [n, d] ≈ G [n, k] @ Fᵀ [k, d]`` with ``G ≥ 0`` and ``F`` of any sign (Ding, Li and
    Jordan, 2010), ``k = n_features``. A numerical solver: alternately the least-squares ``F`` (then, with
    ``sparsity``, :func:`winner_take_all` on each of its columns) and the multiplicative ``G`` update, for
    ``n_iter`` rounds, from ``n_init`` seeded starts; the fit with the lowest error is kept (with sparse features
    a start lands in a poor local minimum now and then, and its error shows it). Returns
    ``(G [n, k], F [d, k], errors)``: the kept fit's relative error every 10 rounds and at the end.
    Deterministic for a seed."""
    x = torch.as_tensor(acts).float()
    if x.ndim != 2 or x.shape[0] < n_features:
        raise ValueError(f"semi_nmf needs acts [n, d] with n >= n_features={n_features}; got {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    bar = progress(total=n_init * n_iter, enabled=show_progress, desc="SNMF", unit="iter")
    for _ in range(n_init):
        g = _initial_coefficients(x, n_features, gen)
        errors = []
        f = winner_take_all(_least_squares_features(x, g), sparsity)
        for it in range(n_iter):
            g = _update_coefficients(x, f, g, eps)
            f = winner_take_all(_least_squares_features(x, g), sparsity)
            if it % 10 == 9:
                errors.append(_relative_error(x, f, g))
            bar.update(1)
        errors.append(_relative_error(x, f, g))
        if best is None or errors[-1] < best[2][-1]:
            best = (g, f, errors)
    bar.close()
    return best


@torch.no_grad()
def encode(acts: torch.Tensor, features: torch.Tensor, *, n_iter: int = 100, eps: float = 1e-12) -> torch.Tensor:
    """Coefficients ``G [n, k] ≥ 0`` of ``acts [n, d]`` for fixed ``features [k, d]``: the non-negative part
    of the least-squares solution (plus a small floor, since a multiplicative update keeps zeros at zero),
    refined by ``n_iter`` multiplicative updates."""
    x, f = torch.as_tensor(acts).float(), features.float().T  # F [d, k]
    ftf = (f.T @ f).double()
    ls = torch.linalg.solve(
        ftf + 1e-9 * float(ftf.diagonal().mean()) * torch.eye(ftf.shape[0], dtype=ftf.dtype), (x @ f).double().T
    ).T.float()
    g = ls.clamp_min(0) + 1e-3 * ls.abs().mean().clamp_min(1e-12)
    for _ in range(n_iter):
        g = _update_coefficients(x, f, g, eps)
    return g


def default_layer(adapter) -> int:
    """The middle layer, ``n_layers // 2``."""
    return n_layers(adapter) // 2


class SNMFBaseline(ActivationEstimator):
    """SNMF of one MLP's hidden activations, read as a decomposition (Shafran et al., 2025).

    Sizes: ``n_features`` features, ``n_iter`` rounds of the Ding et al. updates from each of ``n_init``
    starts (the lowest error is kept) on at most ``max_tokens`` tokens (a seeded random subset; ``None``: all);
    the remaining tokens' coefficients come from :func:`encode` (``encode_iter`` updates). ``sparsity``: fraction
    of the ``d_mlp`` neurons each feature keeps (winner-take-all; ``None``: dense). ``layer`` (default the middle
    one) names the MLP, or ``hook`` gives the hook directly. ``k_top``: top examples per feature, also the
    dead-feature threshold. ``constant_tokens``: ``"drop"`` leaves the prompts' common token prefix out of the
    factorised tokens and the coefficients (the same activations in every example of a causal model;
    ``constant_prefix_`` records it), ``"keep"`` reads every token
    (:class:`~npeff_lens.baselines.activations.ActivationEstimator`).

    After ``fit``: ``features_ [n_features, d]`` (unit rows), ``token_coefficients_ [n_tokens, n_features] ≥ 0``
    (scaled so that ``acts ≈ token_coefficients_ @ features_``), ``coefficients_ [m, n_features]`` (per example
    the max over its tokens), ``example_index_``, ``token_ids_``, ``positions_``, ``n_active_examples_``,
    ``alive_``, ``dead_latents_`` (features non-zero on fewer than ``k_top`` examples; named as the SAE's),
    ``reconstruction_err_`` (relative, on the fitted tokens), ``errors_``, ``fit_seconds_``, ``timings_``.
    """

    _fitted_attribute = "features_"

    def __init__(
        self,
        n_features: int,
        *,
        layer: int | None = None,
        hook: str | None = None,
        sparsity: float | None = None,
        n_iter: int = 200,
        n_init: int = 3,
        encode_iter: int = 100,
        max_tokens: int | None = None,
        seed: int = 0,
        k_top: int = 16,
        activation_batch_size: int = 8,
        max_length: int | None = 256,
        show_progress: bool = True,
        constant_tokens: str = "drop",
    ):
        self._check_constant_tokens(constant_tokens)
        for name, value in (
            ("n_features", n_features),
            ("n_iter", n_iter),
            ("n_init", n_init),
            ("k_top", k_top),
            ("activation_batch_size", activation_batch_size),
        ):
            check_positive_int(name, value)
        check_positive_int("encode_iter", encode_iter, minimum=0)
        if max_tokens is not None:
            check_positive_int("max_tokens", max_tokens)
        if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0 < sparsity <= 1):
            raise ValueError(f"sparsity must be in (0, 1] (the fraction of neurons a feature keeps); got {sparsity!r}")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise ValueError(f"layer must be an integer >= 0; got {layer!r}")
        self.n_features, self.layer, self.hook, self.sparsity = n_features, layer, hook, sparsity
        self.n_iter, self.n_init, self.encode_iter = n_iter, n_init, encode_iter
        self.max_tokens, self.seed = max_tokens, seed
        self.k_top, self.activation_batch_size, self.max_length = k_top, activation_batch_size, max_length
        self.show_progress, self.constant_tokens = show_progress, constant_tokens
        self.model_name_: str | None = None

    def get_params(self) -> dict:
        names = (
            "n_features",
            "layer",
            "hook",
            "sparsity",
            "n_iter",
            "n_init",
            "encode_iter",
            "max_tokens",
            "seed",
            "k_top",
            "activation_batch_size",
            "max_length",
            "constant_tokens",
        )
        return {k: getattr(self, k) for k in names}

    def __repr__(self):
        return f"SNMFBaseline(n_features={self.n_features}, hook={self.hook!r}, sparsity={self.sparsity})"

    # --- fitting ----------------------------------------------------------------------------------
    def resolve_hook(self, adapter) -> str:
        """``hook``, else the MLP hidden activations of ``layer`` (default: the middle layer)."""
        if self.hook is None:
            if self.layer is None:
                self.layer = default_layer(adapter)
            self.hook = mlp_hidden_hook(adapter, self.layer)
        return self.hook

    def read_activations(self, adapter, prompts: Sequence[str]) -> Activations:
        return activations(
            adapter,
            prompts,
            self.resolve_hook(adapter),
            batch_size=self.activation_batch_size,
            max_length=self.max_length,
            show_progress=self.show_progress,
        )

    def fit(self, adapter, prompts: Sequence[str]) -> SNMFBaseline:
        """Read the MLP activations of ``prompts`` through ``adapter`` and factorise them."""
        return self._fit_prompts(adapter, prompts)

    def fit_activations(self, acts, example_index=None, token_ids=None, *, n_examples=None) -> SNMFBaseline:
        """Fit on precomputed activations: an :class:`~npeff_lens.baselines.activations.Activations`, or
        ``acts [n_tokens, d]`` with ``example_index``/``token_ids [n_tokens]``."""
        t0 = time.perf_counter()
        data = as_activations(acts, example_index, token_ids, n_examples, self.hook)
        if self.hook is None:
            self.hook = data.hook
        data = self._fitted_tokens(data)
        n = len(data)
        if n < self.n_features:
            raise ValueError(f"{n} tokens cannot be factorised into {self.n_features} features")
        subset = None
        if self.max_tokens is not None and n > self.max_tokens:
            gen = torch.Generator().manual_seed(int(self.seed) + 1)
            subset = torch.randperm(n, generator=gen)[: self.max_tokens].sort().values
        fit_acts = data.acts if subset is None else data.acts[subset]
        g, f, errors = semi_nmf(
            fit_acts,
            self.n_features,
            n_iter=self.n_iter,
            sparsity=self.sparsity,
            seed=self.seed,
            n_init=self.n_init,
            show_progress=self.show_progress,
        )
        t1 = time.perf_counter()
        norms = f.norm(dim=0).clamp_min(1e-12)  # unit features; coefficients carry the scale
        self.features_ = (f / norms).T.contiguous()
        if subset is None:
            self.token_coefficients_ = (g * norms).contiguous()
        else:
            self.token_coefficients_ = self._encode_chunks(data.acts)
        self.errors_, self.reconstruction_err_ = errors, errors[-1]
        self.example_index_, self.token_ids_, self.positions_ = data.example_index, data.token_ids, data.positions
        self.n_examples_, self.d_in_ = data.n_examples, data.d
        self._set_statistics()
        self.timings_ = {"factorise": t1 - t0, "encode": time.perf_counter() - t1}
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _encode_chunks(self, acts: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        parts = [
            encode(acts[i : i + chunk], self.features_, n_iter=self.encode_iter) for i in range(0, acts.shape[0], chunk)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.n_features)

    def transform_activations(self, acts, example_index=None, *, n_examples=None) -> torch.Tensor:
        data = self._new_activations(acts, example_index, n_examples)
        return _per_example_max(self._encode_chunks(data.acts), data.example_index, data.n_examples)

    # --- reading the decomposition ----------------------------------------------------------------
    def _set_statistics(self, coefficients: torch.Tensor | None = None) -> None:
        if coefficients is None:
            coefficients = _per_example_max(self.token_coefficients_, self.example_index_, self.n_examples_)
        self._set_example_statistics(coefficients, self.example_index_)

    def token_activations(self, example: int) -> torch.Tensor:
        """Per-token coefficients ``[T, n_features]`` of one example (the report's token highlighting)."""
        s, t = self.token_range(example)
        return self.token_coefficients_[s:t].float()

    def summary(self) -> dict:
        self._check_fitted()
        return {
            "hook": self.hook,
            "n_features": self.n_features,
            "sparsity": self.sparsity,
            "n_examples": int(self.n_examples_),
            "n_tokens": int(self.token_coefficients_.shape[0]),
            "d_in": int(self.d_in_),
            "reconstruction_err": self.reconstruction_err_,
            "n_dead": int(self.dead_latents_.numel()),
            "fit_seconds": getattr(self, "fit_seconds_", None),
        }

    # --- persistence ------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """``npeff_snmf.safetensors`` (features, coefficients, per-token coefficients, token bookkeeping) and
        ``npeff_snmf.json`` (parameters and fitted scalars; written last)."""
        self._check_fitted()
        tensors = {
            "features": self.features_,
            "coefficients": self.coefficients_,
            "token_coefficients": self.token_coefficients_,
        }
        meta = {"n_examples": self.n_examples_, "reconstruction_err": self.reconstruction_err_, "errors": self.errors_}
        return SAVED.save(directory, *self._saved(tensors, meta))

    @classmethod
    def load(cls, directory) -> SNMFBaseline:
        meta, t = SAVED.load(directory)
        self = cls(**cls._saved_params(meta))
        self._restore(t, meta)
        self.features_, self.token_coefficients_ = t["features"], t["token_coefficients"].float()
        self.n_examples_, self.reconstruction_err_, self.errors_ = (
            meta["n_examples"],
            meta["reconstruction_err"],
            meta.get("errors", []),
        )
        self._set_statistics(t["coefficients"])
        return self


def _per_example_max(token_coefficients: torch.Tensor, example_index: torch.Tensor, m: int) -> torch.Tensor:
    """``[m, k]``: per example, the max of each column over its tokens (0 for an example without tokens)."""
    out = torch.zeros(m, token_coefficients.shape[1])
    idx = example_index[:, None].expand_as(token_coefficients)
    return out.scatter_reduce_(0, idx, token_coefficients.float(), "amax", include_self=True)
