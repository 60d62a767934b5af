"""TopK sparse autoencoders on activations, the activation-space baseline NPEFF is compared with.

The paper's set-up is §5.2 and App. H.

Where NPEFF decomposes per-example Fisher information in parameter space, an activation SAE learns a
sparse dictionary over per-token activations at one hook point of the model: each token's activation
``x`` (normalised to unit L2 norm, App. H.1) is encoded as ``z = TopK(W_enc (x - b_dec) + b_enc)``
(Gao et al., 2024: only the k largest pre-activations survive, ReLU'd) and reconstructed as
``W_dec z + b_dec``. An SAE *component* (latent) is then read like an NPEFF component (§5.2): its
coefficient on an example is the latent's maximum activation over the example's tokens (non-negative),
its top examples are the examples with the largest coefficients, and a latent that is non-zero on fewer
than ``k_top`` (16) examples is "dead" and left out of the tuning statistics. The token-group tuning
of §5.2 (≥ 95 % of the top examples active on the same set of tokens) needs, per latent and example,
the set of tokens where the latent is non-zero: :meth:`TopKSAEBaseline.active_token_sets`.

Pieces:

- :func:`~npeff_lens.baselines.activations.activations` reads the per-token activations at the hook through our
  model adapters (hook names and the ``attn:L``/``mlp:L`` shortcuts: :mod:`npeff_lens.baselines.activations`).
- :class:`TopKSAEBaseline` trains the SAE with sae-lens (``TopKTrainingSAE`` + ``SAETrainer`` fed
  with shuffled batches of our activations; its AuxK loss revives dead latents, and
  ``rescale_acts_by_decoder_norm`` plays the role of App. H's unit-norm decoder constraint), keeps
  the inference ``TopKSAE``, and computes coefficients, per-token codes and dead latents. ``save``
  writes the SAE in sae-lens's own format (``sae_lens.SAE.load_from_disk(dir)`` opens it) beside
  ``npeff_sae.json`` and the coefficients.

sae-lens (and transformer-lens for the TL backends) are imported only when needed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import torch

from .. import analysis
from ..errors import SettingError
from ..io import progress
from ..saving import SavedFormat
from .activations import (
    ActivationEstimator,
    Activations,
    activations,
    as_activations,
    check_positive_int,
    resolve_hook,
)

__all__ = ["SAE_LENS_INSTALL", "TopKSAEBaseline", "unit_normalise"]

SAE_LENS_INSTALL = "pip install 'sae-lens>=6.54,<7'"
# Beside sae-lens's cfg.json and sae_weights.safetensors: the fit's parameters, and its coefficients and codes.
SAVED = SavedFormat(
    "npeff_lens.TopKSAEBaseline",
    "npeff_sae_codes.safetensors",
    "npeff_sae.json",
    version=1,
    key="format",
    what="a saved npeff_lens.TopKSAEBaseline",
)
NORMALISATION = "unit_l2_per_token"


def _sae_lens():
    """The sae-lens module; a missing install is an ImportError whose message is the install command."""
    try:
        import sae_lens
    except ImportError:
        raise ImportError(SAE_LENS_INSTALL) from None
    return sae_lens


def unit_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row scaled to unit L2 norm (App. H.1); all-zero rows stay zero."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


# --------------------------------------------------------------------------------------------------
# Training data for sae-lens
# --------------------------------------------------------------------------------------------------


def _shuffled_batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of unit-normalised batches of ``batch_size`` rows: epoch after epoch, each a
    fresh seeded permutation; a batch may straddle two epochs, so every batch is full."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=gen)])
        idx, pending = pending[:batch_size], pending[batch_size:]
        yield unit_normalise(acts[idx])


def _quiet_trainer(quiet: bool):
    """With ``quiet``, sae-lens's training bar is opened disabled. sae-lens 6.54 has no option for it:
    ``SAETrainer.fit`` opens ``tqdm(total=..., initial=..., desc="Training SAE")`` without ``disable``
    (``sae_lens/training/sae_trainer.py``), ``SAETrainerConfig`` has no progress or verbosity field, and tqdm reads
    ``TQDM_DISABLE`` once, at import. So the trainer module's ``tqdm`` is patched for the duration of the fit."""
    if not quiet:
        return contextlib.nullcontext()
    from sae_lens.training import sae_trainer

    return mock.patch.object(sae_trainer, "tqdm", functools.partial(sae_trainer.tqdm, disable=True))


# --------------------------------------------------------------------------------------------------
# The baseline
# --------------------------------------------------------------------------------------------------


class TopKSAEBaseline(ActivationEstimator):
    """A TopK SAE on per-token activations at one hook, read as a decomposition (§5.2, App. H).

    Sizes: ``n_latents`` (the paper: 8192) latents, ``k`` active per token (16-128). Training: Adam at
    ``lr`` (1e-3, App. H.1) on batches of ``batch_size`` (4096, App. H.1) unit-norm tokens, for
    ``total_tokens`` tokens (default ``n_epochs`` passes over the data). The paper trains on 210M
    tokens; the defaults are sized for a CPU: one pass costs about 1.4 ms a token on 2 cores at
    d=576 with 4096 latents (about 7 minutes for 300k tokens, plus 1 for encoding); raise ``n_epochs`` or
    ``total_tokens`` where compute allows. ``dead_feature_window`` (steps without firing before
    the AuxK loss takes a latent as dead; default a tenth of the run, at most 1000) and
    ``aux_loss_coefficient`` are sae-lens's. ``k_top``: top examples per latent (16), also the
    dead-latent threshold. ``activation_batch_size`` and ``max_length`` apply when reading activations.
    ``constant_tokens``: ``"drop"`` leaves the prompts' common token prefix out of training, coefficients and codes
    (its activations are the same in every example of a causal model; ``constant_prefix_`` records it), ``"keep"``
    reads every token (:class:`~npeff_lens.baselines.activations.ActivationEstimator`).

    After ``fit``: ``sae_`` (sae-lens ``TopKSAE``), ``coefficients_ [m, n_latents]`` (each latent's max
    activation over each example's tokens), ``example_index_``, ``token_ids_``, ``positions_``
    ``[n_tokens]`` and the per-token TopK codes ``code_latents_``/``code_values_ [n_tokens, k]``,
    ``n_active_examples_``, ``dead_latents_``, ``alive_``, ``fit_seconds_`` (whole fit) and ``timings_``.
    """

    _fitted_attribute = "sae_"

    def __init__(
        self,
        n_latents: int,
        k: int = 32,
        *,
        hook: str | None = None,
        seed: int = 0,
        lr: float = 1e-3,
        batch_size: int = 4096,
        n_epochs: int = 1,
        total_tokens: int | None = None,
        k_top: int = 16,
        aux_loss_coefficient: float = 1.0,
        dead_feature_window: int | None = None,
        device: str = "cpu",
        activation_batch_size: int = 8,
        max_length: int | None = 256,
        show_progress: bool = True,
        constant_tokens: str = "drop",
    ):
        check_positive_int("n_latents", n_latents)
        self._check_constant_tokens(constant_tokens)
        check_positive_int("k", k)
        if k > n_latents:
            raise ValueError(f"k ({k}) must not exceed n_latents ({n_latents})")
        for name, value in (
            ("batch_size", batch_size),
            ("n_epochs", n_epochs),
            ("k_top", k_top),
            ("activation_batch_size", activation_batch_size),
        ):
            check_positive_int(name, value)
        for name, value in (("total_tokens", total_tokens), ("dead_feature_window", dead_feature_window)):
            if value is not None:
                check_positive_int(name, value)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
        if not (math.isfinite(aux_loss_coefficient) and aux_loss_coefficient >= 0):
            raise ValueError(f"aux_loss_coefficient must be finite and >= 0; got {aux_loss_coefficient!r}")
        self.n_latents, self.k, self.hook, self.seed = n_latents, k, hook, seed
        self.pretrained_: str | None = None  # the folder of a user's SAE (from_sae_lens): read, never trained
        self.lr, self.batch_size, self.n_epochs, self.total_tokens = float(lr), batch_size, n_epochs, total_tokens
        self.k_top, self.aux_loss_coefficient, self.dead_feature_window = (
            k_top,
            aux_loss_coefficient,
            dead_feature_window,
        )
        self.device, self.activation_batch_size, self.max_length = device, activation_batch_size, max_length
        self.show_progress, self.constant_tokens = show_progress, constant_tokens
        self.model_name_: str | None = None

    # --- parameters, as saved ---------------------------------------------------------------------
    def get_params(self) -> dict:
        return {
            "n_latents": self.n_latents,
            "k": self.k,
            "hook": self.hook,
            "seed": self.seed,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "n_epochs": self.n_epochs,
            "total_tokens": self.total_tokens,
            "k_top": self.k_top,
            "aux_loss_coefficient": self.aux_loss_coefficient,
            "dead_feature_window": self.dead_feature_window,
            "device": self.device,
            "activation_batch_size": self.activation_batch_size,
            "max_length": self.max_length,
            "constant_tokens": self.constant_tokens,
        }

    def __repr__(self):
        return f"TopKSAEBaseline(n_latents={self.n_latents}, k={self.k}, hook={self.hook!r}, seed={self.seed})"

    # --- fitting ----------------------------------------------------------------------------------
    def fit(self, adapter, prompts: Sequence[str]) -> TopKSAEBaseline:
        """Read activations of ``prompts`` at ``self.hook`` through ``adapter`` and fit on them."""
        if self.hook is None:
            raise ValueError("TopKSAEBaseline.fit needs hook=... (a hook name or module path); see hook_names(adapter)")
        _sae_lens()
        self.hook = resolve_hook(adapter, self.hook)  # "attn:3" -> the adapter's own hook name, as saved
        return self._fit_prompts(adapter, prompts)

    @classmethod
    def from_sae_lens(
        cls,
        directory,
        *,
        hook: str | None = None,
        k: int | None = None,
        device: str = "cpu",
        k_top: int = 16,
        activation_batch_size: int = 8,
        max_length: int | None = 256,
        show_progress: bool = True,
        constant_tokens: str = "drop",
    ) -> TopKSAEBaseline:
        """An SAE the user already has, in sae-lens's saved format (``SAE.load_from_disk``: ``cfg.json`` +
        ``sae_weights.safetensors``; any architecture), to be read like a trained one: :meth:`fit` then only
        reads the activations at its hook (``hook``, else the one it records) and encodes them, without training.
        It reads the raw activations (its own normalisation, if any, applies); per token the ``k`` largest latent
        values are kept (default: the SAE's own k for a TopK SAE, else 64), exact for a TopK SAE. Activations whose
        width is not the SAE's ``d_in`` are a one-line ValueError naming both and the hook."""
        sae_lens = _sae_lens()
        directory = Path(directory)
        if not (directory / "cfg.json").is_file():
            raise FileNotFoundError(f"{directory} holds no sae-lens SAE (no cfg.json): save one with sae.save_model")
        sae = sae_lens.SAE.load_from_disk(directory, device=device).eval()
        hook = hook or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if not hook:
            where = str(directory).replace("{", "{{").replace("}", "}}")  # the template's braces are its settings
            raise SettingError(f"the SAE in {where} records no hook name: pass {{sae_hook}}", sae_hook="hook=...")
        d_sae = int(sae.cfg.d_sae)
        self = cls(
            d_sae,
            min(d_sae, int(k or getattr(sae.cfg, "k", None) or 64)),
            hook=hook,
            device=device,
            k_top=k_top,
            activation_batch_size=activation_batch_size,
            max_length=max_length,
            show_progress=show_progress,
            constant_tokens=constant_tokens,
        )
        self.sae_, self.pretrained_ = sae, str(directory.resolve())
        return self

    def read_activations(self, adapter, prompts: Sequence[str]) -> Activations:
        return activations(
            adapter,
            prompts,
            self.hook,
            batch_size=self.activation_batch_size,
            max_length=self.max_length,
            show_progress=self.show_progress,
        )

    def fit_activations(self, acts, example_index=None, token_ids=None, *, n_examples=None) -> TopKSAEBaseline:
        """Fit on precomputed activations: an :class:`Activations`, or ``acts [n_tokens, d]`` with
        ``example_index``/``token_ids [n_tokens]`` (defaults: every token its own example, ids -1)."""
        _sae_lens()  # imported before the clock starts (a few seconds: it imports transformer-lens)
        t0 = time.perf_counter()
        data = as_activations(acts, example_index, token_ids, n_examples, self.hook)
        if self.hook is None:
            self.hook = data.hook
        if self.pretrained_:
            self.check_width(data.d)
        data = self._fitted_tokens(data)
        t1 = time.perf_counter()
        if not self.pretrained_:  # a user's SAE (from_sae_lens) is read, not trained
            self.sae_ = self._train(data.acts)
        t2 = time.perf_counter()
        self.example_index_, self.token_ids_, self.positions_ = data.example_index, data.token_ids, data.positions
        self.coefficients_, self.code_latents_, self.code_values_ = self._encode_all(data)
        self._set_statistics()
        self.d_in_ = data.d
        self.n_tokens_ = len(data)
        self.timings_ = {"train": t2 - t1, "encode": time.perf_counter() - t2}
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def check_width(self, d: int) -> None:
        """A ValueError naming both widths and the hook unless activations of width ``d`` fit the SAE's ``d_in``."""
        d_in = int(self.sae_.cfg.d_in)
        if int(d) != d_in:
            where = f"the SAE in {self.pretrained_}" if self.pretrained_ else "this SAE"
            raise ValueError(
                f"{where} reads activations of width {d_in}, but hook {self.hook!r} gives width {d}: "
                "choose the hook the SAE was trained at"
            )

    def _training_schedule(self, n_tokens: int) -> tuple[int, int, int]:
        batch = min(self.batch_size, n_tokens)
        total = self.total_tokens if self.total_tokens is not None else self.n_epochs * n_tokens
        total = max(total, batch)
        steps = math.ceil(total / batch)
        window = self.dead_feature_window or max(1, min(1000, steps // 10))
        return batch, total, window

    def _train(self, acts: torch.Tensor):
        """sae-lens trains; we only feed it seeded, shuffled, unit-normalised batches."""
        sae_lens = _sae_lens()
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.sae import SAEMetadata

        batch, total, window = self._training_schedule(acts.shape[0])
        torch.manual_seed(self.seed)
        sae = sae_lens.TopKTrainingSAE(
            sae_lens.TopKTrainingSAEConfig(
                d_in=acts.shape[1],
                d_sae=self.n_latents,
                k=self.k,
                aux_loss_coefficient=self.aux_loss_coefficient,
                device=self.device,
                metadata=SAEMetadata(hook_name=self.hook, model_name=self.model_name_),
            )
        )
        trainer_cfg = SAETrainerConfig(
            total_training_samples=total,
            train_batch_size_samples=batch,
            lr=self.lr,
            lr_end=self.lr,
            device=self.device,
            logger=sae_lens.LoggingConfig(log_to_wandb=False),
            dead_feature_window=window,
            feature_sampling_window=math.ceil(total / batch) + 1,  # one window: l0 over the whole run
        )
        data = _shuffled_batches(acts, batch, self.seed)
        with _quiet_trainer(not self.show_progress):
            trained = sae_lens.SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data).fit()
        # sae-lens's own conversion to the inference TopKSAE (decoder norms folded in).
        with tempfile.TemporaryDirectory(prefix="npeff_sae_") as tmp:
            trained.save_inference_model(tmp)
            inference = sae_lens.SAE.load_from_disk(tmp, device=self.device)
        return inference.eval()

    # --- encoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, acts: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Latent activations ``[n_tokens, n_latents]`` of raw activations (unit-normalised here)."""
        self._check_fitted()
        out = [self._encode_chunk(acts[i : i + chunk]).cpu() for i in range(0, acts.shape[0], chunk)]
        return torch.cat(out) if out else torch.zeros(0, self.n_latents)

    def _encode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        if self.pretrained_:  # the user's SAE reads the activations as they are
            return self.sae_.encode(x.to(self.device, dtype=self.sae_.W_dec.dtype))
        return self.sae_.encode(unit_normalise(x).to(self.device))

    @torch.no_grad()
    def _encode_all(self, data: Activations, chunk: int = 4096):
        """Per-example max coefficients ``[m, n_latents]`` and per-token TopK codes ``[n_tokens, k]``."""
        acts, example_index = data.acts, data.example_index
        coefficients = torch.zeros(data.n_examples, self.n_latents)
        latents = torch.empty(acts.shape[0], self.k, dtype=torch.int32)
        values = torch.empty(acts.shape[0], self.k)
        bar = progress(range(0, acts.shape[0], chunk), enabled=self.show_progress, desc="SAE encode", unit="chunk")
        for i in bar:
            z = self._encode_chunk(acts[i : i + chunk]).float().cpu()
            coefficients.scatter_reduce_(
                0, example_index[i : i + chunk, None].expand_as(z), z, "amax", include_self=True
            )
            top = z.topk(self.k, dim=-1)  # TopK leaves at most k non-zeros per token
            latents[i : i + chunk] = top.indices.to(torch.int32)
            values[i : i + chunk] = top.values
        return coefficients, latents, values

    def transform_activations(self, acts, example_index=None, *, n_examples=None) -> torch.Tensor:
        return self._encode_all(self._new_activations(acts, example_index, n_examples))[0]

    # --- reading the decomposition ----------------------------------------------------------------
    def _set_statistics(self) -> None:
        self._set_example_statistics(self.coefficients_, self.example_index_)

    def token_activations(self, example: int) -> torch.Tensor:
        """Latent activations ``[T, n_latents]`` on the tokens of one example (dense; ≤ k non-zeros a row)."""
        s, t = self.token_range(example)
        out = torch.zeros(t - s, self.n_latents)
        out.scatter_(1, self.code_latents_[s:t].long(), self.code_values_[s:t])
        return out

    def active_token_sets(self, latent: int, example_indices) -> list[frozenset[int]]:
        """Per example, the set of token ids at which ``latent`` is non-zero (§5.2's token tuning)."""
        self._check_fitted()
        if not 0 <= int(latent) < self.n_latents:
            raise IndexError(f"latent {latent} out of range for {self.n_latents} latents")
        out = []
        for example in torch.as_tensor(example_indices).reshape(-1).tolist():
            s, t = self.token_range(example)
            on = ((self.code_latents_[s:t] == int(latent)) & (self.code_values_[s:t] > 0)).any(-1)
            out.append(frozenset(self.token_ids_[s:t][on].tolist()))
        return out

    def top_examples(self, k: int | None = None) -> torch.Tensor:
        """``[n_latents, k]`` example indices by decreasing coefficient (``analysis.top_examples``)."""
        self._check_fitted()
        return analysis.top_examples(self.coefficients_, k or self.k_top)

    def summary(self) -> dict:
        self._check_fitted()
        return {
            "hook": self.hook,
            "n_latents": self.n_latents,
            "k": self.k,
            "n_examples": int(self.coefficients_.shape[0]),
            "n_tokens": int(self.n_tokens_),
            "d_in": int(self.d_in_),
            "n_dead": int(self.dead_latents_.numel()),
            "dead_threshold_examples": self.k_top,
            "fit_seconds": getattr(self, "fit_seconds_", None),
            "timings": getattr(self, "timings_", {}),
        }

    # --- persistence ------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """The SAE in sae-lens's format (``cfg.json``, ``sae_weights.safetensors``), plus
        ``npeff_sae.json`` and the coefficients and codes (``npeff_sae_codes.safetensors``)."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".npeff_sae_", dir=directory) as tmp:
            for path in self.sae_.save_model(tmp):
                os.replace(path, directory / Path(path).name)  # same file system: atomic
        tensors = {
            "coefficients": self.coefficients_,
            "code_latents": self.code_latents_,
            "code_values": self.code_values_,
        }
        meta = {
            "normalisation": "none" if self.pretrained_ else NORMALISATION,
            "pretrained": self.pretrained_,
            "n_tokens": self.n_tokens_,
            "dead_latents": self.dead_latents_,
        }
        return SAVED.save(directory, *self._saved(tensors, meta))

    @classmethod
    def load(cls, directory, *, device: str | None = None) -> TopKSAEBaseline:
        sae_lens = _sae_lens()
        meta, tensors = SAVED.load(directory)
        if meta.get("normalisation") not in (NORMALISATION, "none"):
            raise ValueError(f"{directory}: unsupported normalisation {meta.get('normalisation')!r}")
        params = cls._saved_params(meta)
        if device is not None:
            params["device"] = device
        self = cls(**params)
        self._restore(tensors, meta)
        self.pretrained_ = meta.get("pretrained")
        self.sae_ = sae_lens.SAE.load_from_disk(directory, device=self.device).eval()
        self.coefficients_, self.n_tokens_ = tensors["coefficients"], int(meta["n_tokens"])
        self.code_latents_, self.code_values_ = tensors["code_latents"], tensors["code_values"]
        self._set_statistics()
        return self
