"""TopK sparse autoencoders on activations: the activation-SAE baseline of §5.2 and Appendix H.

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

- :func:`activations` reads per-token activations through our model adapters: TransformerLens hook
  names (``blocks.5.hook_resid_pre``, ``blocks.5.mlp.hook_post``, ``blocks.5.attn.hook_z``) for the
  ``hooked`` and ``bridge`` backends, module paths (``model.layers.5``: the module's output;
  ``model.layers.5.self_attn.o_proj:input``: its input) for ``hf`` and ``nnsight``. Padding is dropped;
  the forward stops at the hook. :func:`resolve_hook` also takes ``attn:L`` (the attention output before
  its output projection: ``hook_z``, or the out-projection's input) and ``mlp:L`` (the MLP's hidden
  activations: ``mlp.hook_post``, or the down-projection's input) for any backend.
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
import difflib
import functools
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_write, progress, read_json, write_json

__all__ = [
    "SAE_LENS_INSTALL",
    "Activations",
    "TopKSAEBaseline",
    "activations",
    "attention_output_hook",
    "hook_names",
    "mlp_hidden_hook",
    "resolve_hook",
    "unit_normalise",
]

SAE_LENS_INSTALL = "pip install 'sae-lens>=6.54,<7'"
META_FILENAME = "npeff_sae.json"
CODES_FILENAME = "npeff_sae_codes.safetensors"
FORMAT_VERSION = 1
NORMALISATION = "unit_l2_per_token"
INPUT_SUFFIX = ":input"  # a module path + this suffix: the module's input (its first positional argument)


def _sae_lens():
    """The sae-lens module; a missing install is an ImportError whose message is the install command."""
    try:
        import sae_lens
    except ImportError:
        raise ImportError(SAE_LENS_INSTALL) from None
    return sae_lens


# --------------------------------------------------------------------------------------------------
# Reading activations
# --------------------------------------------------------------------------------------------------


@dataclass
class Activations:
    """Per-token activations of a set of prompts at one hook, padding removed.

    ``acts [n_tokens, d]`` (float32, CPU), ``example_index [n_tokens]`` (which prompt each row comes
    from, non-decreasing), ``token_ids [n_tokens]`` and ``positions [n_tokens]`` (the token and its
    position within its prompt), ``n_examples`` prompts in all.
    """

    acts: torch.Tensor
    example_index: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    hook: str | None
    n_examples: int

    def __len__(self) -> int:
        return self.acts.shape[0]

    @property
    def d(self) -> int:
        return self.acts.shape[1]


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the hook point needs computing."""


def _is_tl(adapter) -> bool:
    return getattr(adapter, "backend", None) in ("hooked", "bridge")


def hook_names(adapter) -> list[str]:
    """The hook points :func:`activations` accepts for this adapter: TransformerLens hook names
    (aliases included) for ``hooked``/``bridge``, module paths for ``hf``/``nnsight``."""
    if _is_tl(adapter):
        return list(adapter.model.hook_dict)
    return [name for name, _ in adapter.module.named_modules() if name]


def default_hook(adapter) -> str:
    """The residual stream entering the middle layer: ``blocks.{L//2}.hook_resid_pre`` (hooked/bridge), or
    the output of decoder layer ``L//2 - 1`` for hf/nnsight (the first layer's input when ``L < 2``)."""
    if _is_tl(adapter):
        n_layers = adapter.model.cfg.n_layers
        return f"blocks.{n_layers // 2}.hook_resid_pre"
    path, layers = _layer_list(adapter)
    return f"{path}.{max(0, len(layers) // 2 - 1)}"


def hook_module(adapter, hook: str) -> tuple[torch.nn.Module, bool]:
    """``(module, reads_input)`` of a hook: the module whose output (or, with the ``:input`` suffix, whose
    first input) is the activation. A name that does not exist is a ValueError naming the closest ones."""
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"hook must be a non-empty hook name or module path; got {hook!r}")
    name, reads_input = (hook[: -len(INPUT_SUFFIX)], True) if hook.endswith(INPUT_SUFFIX) else (hook, False)
    names = hook_names(adapter)
    if name in names:
        module = adapter.model.hook_dict[name] if _is_tl(adapter) else adapter.module.get_submodule(name)
        return module, reads_input
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5) or names[:5]
    kind = "TransformerLens hook names" if _is_tl(adapter) else f"module paths, optionally with {INPUT_SUFFIX}"
    raise ValueError(f"{adapter.backend} model has no hook {hook!r} ({kind}); closest valid names: {', '.join(close)}")


def _layer_list(adapter) -> tuple[str, torch.nn.ModuleList]:
    """The path and the ``ModuleList`` of an HF model's layers (the longest list of modules)."""
    layers = [n for n, m in adapter.module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not layers:
        raise ValueError("cannot find the model's list of layers: pass the hook explicitly")
    path = max(layers, key=lambda n: len(adapter.module.get_submodule(n)))
    return path, adapter.module.get_submodule(path)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D


_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out", "wo", "out_proj")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_ATTN_OUT_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "o", "wo")


def _projection_in(block: torch.nn.Module, names: tuple[str, ...]) -> str | None:
    """The dotted name (within ``block``) of its output projection: a linear child with one of ``names``, else
    its last linear descendant."""
    linear = [n for n, m in block.named_modules() if n and _is_linear(m)]
    for n in linear:
        if n.rsplit(".", 1)[-1] in names and "." not in n:
            return n
    return linear[-1] if linear else None


def _tl_layer_hook(adapter, layer: int, suffix: str, what: str) -> str:
    n_layers = adapter.model.cfg.n_layers
    if not (isinstance(layer, int) and 0 <= layer < n_layers):
        raise ValueError(f"layer {layer!r} does not exist: the model has {n_layers} layers (0 to {n_layers - 1})")
    hook = f"blocks.{layer}.{suffix}"
    if hook not in adapter.model.hook_dict:
        raise ValueError(f"layer {layer} has no {what}: the model has no hook {hook!r}")
    return hook


def _hf_layer(adapter, layer: int) -> tuple[str, torch.nn.Module]:
    path, layers = _layer_list(adapter)
    if not (isinstance(layer, int) and 0 <= layer < len(layers)):
        raise ValueError(f"layer {layer!r} does not exist: the model has {len(layers)} layers (0 to {len(layers) - 1})")
    return f"{path}.{layer}", layers[layer]


def mlp_hidden_hook(adapter, layer: int) -> str:
    """The hook of layer ``layer``'s MLP hidden activations (the input of its down/out projection, after the
    non-linearity and any gate): ``blocks.L.mlp.hook_post`` for hooked/bridge, ``<layer>.<mlp>.<down>:input``
    for hf/nnsight (``model.layers.L.mlp.down_proj:input``; BERT: ``<layer>.output.dense:input``). A layer
    without an MLP is a one-line ValueError."""
    if _is_tl(adapter):
        return _tl_layer_hook(adapter, layer, "mlp.hook_post", "MLP")
    base, block = _hf_layer(adapter, layer)
    children = dict(block.named_children())
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    if mlp is None and "intermediate" in children and "output" in children:  # BERT: intermediate -> output.dense
        down = _projection_in(children["output"], ("dense",))
        if down is not None:
            return f"{base}.output.{down}{INPUT_SUFFIX}"
    down = _projection_in(children[mlp], _DOWN_NAMES) if mlp is not None else None
    if down is None:
        raise ValueError(
            f"layer {layer} ({base}) has no MLP with a linear output projection (its parts: "
            f"{', '.join(children) or 'none'}): pass the hook of the MLP's hidden activations explicitly"
        )
    return f"{base}.{mlp}.{down}{INPUT_SUFFIX}"


def attention_output_hook(adapter, layer: int) -> str:
    """The hook of layer ``layer``'s attention output before its output projection (heads concatenated):
    ``blocks.L.attn.hook_z`` for hooked/bridge, ``<layer>.<attn>.<out>:input`` for hf/nnsight
    (``model.layers.L.self_attn.o_proj:input``, GPT-2 ``transformer.h.L.attn.c_proj:input``)."""
    if _is_tl(adapter):
        return _tl_layer_hook(adapter, layer, "attn.hook_z", "attention")
    base, block = _hf_layer(adapter, layer)
    children = dict(block.named_children())
    attn = next((n for n in _ATTN_NAMES if n in children), None)
    out = None
    if attn is not None:
        sub = dict(children[attn].named_children())
        if "output" in sub and "dense" in dict(sub["output"].named_children()):  # BERT: attention.output.dense
            out = "output.dense"
        else:
            out = _projection_in(children[attn], _ATTN_OUT_NAMES)
    if out is None:
        raise ValueError(f"layer {layer} ({base}) has no attention block with a linear output projection "
                         f"(its parts: {', '.join(children) or 'none'}): pass the hook explicitly")  # fmt: skip
    return f"{base}.{attn}.{out}{INPUT_SUFFIX}"


def resolve_hook(adapter, hook: str) -> str:
    """``hook`` with the shortcuts ``attn:L`` (:func:`attention_output_hook`) and ``mlp:L``
    (:func:`mlp_hidden_hook`) resolved for this adapter; any other value is returned as given."""
    kind, _, layer = hook.partition(":")
    if kind in ("attn", "mlp") and layer.lstrip("-").isdigit():
        return (attention_output_hook if kind == "attn" else mlp_hidden_hook)(adapter, int(layer))
    return hook


def _forward(adapter, enc: dict[str, torch.Tensor]) -> None:
    if getattr(adapter, "backend", None) in ("hf", "nnsight"):
        # A plain forward of the wrapped HF module (for nnsight: without a trace); HFAdapter's
        # forward adds the position ids the adapter always uses.
        from ..models.adapter import HFAdapter

        HFAdapter.forward_logits(adapter, enc["input_ids"], enc["attention_mask"])
    else:
        adapter.forward_logits(enc["input_ids"], enc["attention_mask"])


def _capture(adapter, module: torch.nn.Module, reads_input: bool, enc: dict[str, torch.Tensor], hook: str):
    captured: list[torch.Tensor] = []

    def fn(_module, inputs, output=None):
        value = inputs if reads_input else output
        out = value[0] if isinstance(value, (tuple, list)) else value
        captured.append(out.detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(fn) if reads_input else module.register_forward_hook(fn)
    try:
        with torch.no_grad():
            _forward(adapter, enc)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"hook {hook!r} did not fire during the forward pass (is it enabled in this model?)")
    return captured[0]


def activations(
    adapter,
    prompts: Sequence[str],
    hook: str,
    *,
    batch_size: int = 8,
    max_length: int | None = 256,
    show_progress: bool = True,
) -> Activations:
    """Per-token activations of ``prompts`` at ``hook``, padding tokens excluded.

    ``hook``: a TransformerLens hook name for ``hooked``/``bridge`` adapters (``blocks.5.hook_resid_pre``),
    a module path for ``hf``/``nnsight`` (``model.layers.5``: the module's output, its first element
    when it returns a tuple; ``model.layers.5.mlp.down_proj:input``: the module's first input), or a
    shortcut of :func:`resolve_hook` (``attn:5``, ``mlp:5``). Trailing dimensions beyond ``[batch, pos]``
    are flattened (``attn.hook_z`` gives ``n_heads * d_head``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to read activations from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    hook = resolve_hook(adapter, hook)
    module, reads_input = hook_module(adapter, hook)
    rows, examples, tokens, positions = [], [], [], []
    bar = progress(range(0, len(prompts), batch_size), enabled=show_progress, desc=f"activations {hook}", unit="batch")
    for start in bar:
        enc = adapter.tokenize(prompts[start : start + batch_size], max_length)
        mask = enc["attention_mask"].bool()
        x = _capture(adapter, module, reads_input, enc, hook)
        if tuple(x.shape[:2]) != tuple(mask.shape):
            raise ValueError(
                f"activations at {hook!r} have shape {tuple(x.shape)}, not [batch, pos, ...] = "
                f"{tuple(mask.shape)}: only per-token hook points can train an SAE"
            )
        rows.append(x[mask].reshape(int(mask.sum()), -1).float().cpu())
        ex = torch.arange(start, start + mask.shape[0], device=mask.device)[:, None].expand_as(mask)
        pos = torch.arange(mask.shape[1], device=mask.device)[None, :].expand_as(mask)
        examples.append(ex[mask].cpu())
        tokens.append(enc["input_ids"][mask].cpu())
        positions.append(pos[mask].cpu())
    acts = torch.cat(rows)
    if acts.shape[0] == 0:
        raise ValueError("the prompts have no tokens")
    return Activations(acts, torch.cat(examples), torch.cat(tokens), torch.cat(positions), hook, len(prompts))


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


@contextlib.contextmanager
def _quiet_trainer(quiet: bool):
    """sae-lens's trainer opens its own tqdm bar; with ``quiet`` it is opened disabled."""
    if not quiet:
        yield
        return
    from sae_lens.training import sae_trainer

    original = sae_trainer.tqdm
    sae_trainer.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        sae_trainer.tqdm = original


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


# --------------------------------------------------------------------------------------------------
# The baseline
# --------------------------------------------------------------------------------------------------


class TopKSAEBaseline:
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

    After ``fit``: ``sae_`` (sae-lens ``TopKSAE``), ``coefficients_ [m, n_latents]`` (each latent's max
    activation over each example's tokens), ``example_index_``, ``token_ids_``, ``positions_``
    ``[n_tokens]`` and the per-token TopK codes ``code_latents_``/``code_values_ [n_tokens, k]``,
    ``n_active_examples_``, ``dead_latents_``, ``alive_``, ``fit_seconds_`` (whole fit) and ``timings_``.
    """

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
    ):
        _check_positive_int("n_latents", n_latents)
        _check_positive_int("k", k)
        if k > n_latents:
            raise ValueError(f"k ({k}) must not exceed n_latents ({n_latents})")
        for name, value in (
            ("batch_size", batch_size),
            ("n_epochs", n_epochs),
            ("k_top", k_top),
            ("activation_batch_size", activation_batch_size),
        ):
            _check_positive_int(name, value)
        for name, value in (("total_tokens", total_tokens), ("dead_feature_window", dead_feature_window)):
            if value is not None:
                _check_positive_int(name, value)
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
        self.show_progress = show_progress
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
        }

    def __repr__(self):
        return f"TopKSAEBaseline(n_latents={self.n_latents}, k={self.k}, hook={self.hook!r}, seed={self.seed})"

    # --- fitting ----------------------------------------------------------------------------------
    def fit(self, adapter, prompts: Sequence[str]) -> TopKSAEBaseline:
        """Read activations of ``prompts`` at ``self.hook`` through ``adapter`` and fit on them."""
        if self.hook is None:
            raise ValueError("TopKSAEBaseline.fit needs hook=... (a hook name or module path); see hook_names(adapter)")
        _sae_lens()
        t0 = time.perf_counter()
        self.hook = resolve_hook(adapter, self.hook)  # "attn:3" -> the adapter's own hook name, as saved
        acts = self.read_activations(adapter, prompts)
        self.model_name_ = getattr(adapter, "name", None)
        t_read = time.perf_counter() - t0
        self.fit_activations(acts)
        self.timings_["activations"] = t_read
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    @classmethod
    def from_sae_lens(cls, directory, *, hook: str | None = None, k: int | None = None, device: str = "cpu",
                      k_top: int = 16, activation_batch_size: int = 8, max_length: int | None = 256,
                      show_progress: bool = True) -> TopKSAEBaseline:  # fmt: skip
        """An SAE the user already has, in sae-lens's saved format (``SAE.load_from_disk``: ``cfg.json`` +
        ``sae_weights.safetensors``; any architecture), to be read like a trained one: :meth:`fit` then only
        reads the activations at its hook (``hook``, else the one it records) and encodes them, without training.
        It reads the raw activations (its own normalisation, if any, applies); per token the ``k`` largest latent
        values are kept (default: the SAE's own k for a TopK SAE, else 64), exact for a TopK SAE."""
        sae_lens = _sae_lens()
        directory = Path(directory)
        if not (directory / "cfg.json").is_file():
            raise FileNotFoundError(f"{directory} holds no sae-lens SAE (no cfg.json): save one with sae.save_model")
        sae = sae_lens.SAE.load_from_disk(directory, device=device).eval()
        hook = hook or getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if not hook:
            raise ValueError(f"the SAE in {directory} records no hook name: pass --sae-hook")
        d_sae = int(sae.cfg.d_sae)
        self = cls(d_sae, min(d_sae, int(k or getattr(sae.cfg, "k", None) or 64)), hook=hook, device=device,
                   k_top=k_top, activation_batch_size=activation_batch_size, max_length=max_length,
                   show_progress=show_progress)  # fmt: skip
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
        data = _as_activations(acts, example_index, token_ids, n_examples, self.hook)
        if self.hook is None:
            self.hook = data.hook
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

    def transform(self, adapter, prompts: Sequence[str]) -> torch.Tensor:
        """Coefficients ``[len(prompts), n_latents]`` of new prompts (the fitted state is unchanged)."""
        return self.transform_activations(self.read_activations(adapter, prompts))

    def transform_activations(self, acts, example_index=None, *, n_examples=None) -> torch.Tensor:
        self._check_fitted()
        data = _as_activations(acts, example_index, None, n_examples, self.hook)
        if data.d != self.d_in_:
            raise ValueError(f"activations have d={data.d}; this SAE was trained on d={self.d_in_}")
        return self._encode_all(data)[0]

    # --- reading the decomposition ----------------------------------------------------------------
    def _set_statistics(self) -> None:
        order = self.example_index_
        if order.numel() > 1 and bool((order[1:] < order[:-1]).any()):
            raise ValueError("example_index must be non-decreasing (tokens grouped by example)")
        m = self.coefficients_.shape[0]
        bounds = torch.searchsorted(order, torch.arange(m + 1))
        self._starts, self._ends = bounds[:-1], bounds[1:]
        self.n_active_examples_ = (self.coefficients_ > 0).sum(0)
        self.alive_ = self.n_active_examples_ >= self.k_top
        self.dead_latents_ = torch.nonzero(~self.alive_).flatten()

    def _check_fitted(self) -> None:
        if not hasattr(self, "sae_"):
            raise RuntimeError("this TopKSAEBaseline is not fitted yet; call fit(...) or load(...) first")

    def _check_example(self, example: int) -> int:
        m = self.coefficients_.shape[0]
        example = int(example)
        if not 0 <= example < m:
            raise IndexError(f"example index {example} out of range for {m} examples")
        return example

    def token_activations(self, example: int) -> torch.Tensor:
        """Latent activations ``[T, n_latents]`` on the tokens of one example (dense; ≤ k non-zeros a row)."""
        self._check_fitted()
        e = self._check_example(example)
        s, t = int(self._starts[e]), int(self._ends[e])
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
            e = self._check_example(example)
            s, t = int(self._starts[e]), int(self._ends[e])
            on = ((self.code_latents_[s:t] == int(latent)) & (self.code_values_[s:t] > 0)).any(-1)
            out.append(frozenset(self.token_ids_[s:t][on].tolist()))
        return out

    def top_examples(self, k: int | None = None) -> torch.Tensor:
        """``[n_latents, k]`` example indices by decreasing coefficient (``analysis.top_examples``)."""
        from ..analysis import top_examples

        self._check_fitted()
        return top_examples(self.coefficients_, k or self.k_top)

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
        from safetensors.torch import save

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".npeff_sae_", dir=directory) as tmp:
            for path in self.sae_.save_model(tmp):
                os.replace(path, directory / Path(path).name)  # same file system: atomic
        tensors = {
            "coefficients": self.coefficients_,
            "example_index": self.example_index_,
            "token_ids": self.token_ids_,
            "positions": self.positions_,
            "code_latents": self.code_latents_,
            "code_values": self.code_values_,
        }
        atomic_write(directory / CODES_FILENAME, save({k: v.contiguous() for k, v in tensors.items()}))
        meta = {
            "format": "npeff_lens.TopKSAEBaseline",
            "format_version": FORMAT_VERSION,
            "params": self.get_params(),
            "normalisation": "none" if self.pretrained_ else NORMALISATION,
            "pretrained": self.pretrained_,
            "model_name": self.model_name_,
            "d_in": self.d_in_,
            "n_tokens": self.n_tokens_,
            "dead_latents": self.dead_latents_,
            "fit_seconds": getattr(self, "fit_seconds_", None),
            "timings": getattr(self, "timings_", {}),
        }
        write_json(directory / META_FILENAME, meta)
        return directory

    @classmethod
    def load(cls, directory, *, device: str | None = None) -> TopKSAEBaseline:
        sae_lens = _sae_lens()
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / META_FILENAME).exists():
            raise FileNotFoundError(f"{directory} holds no {META_FILENAME}; is it a TopKSAEBaseline.save directory?")
        meta = read_json(directory / META_FILENAME)
        if meta.get("format_version") != FORMAT_VERSION or meta.get("normalisation") not in (NORMALISATION, "none"):
            raise ValueError(f"{directory / META_FILENAME}: unsupported format {meta.get('format_version')!r}")
        params = dict(meta["params"])
        if device is not None:
            params["device"] = device
        self = cls(**params)
        self.model_name_ = meta.get("model_name")
        self.pretrained_ = meta.get("pretrained")
        self.sae_ = sae_lens.SAE.load_from_disk(directory, device=self.device).eval()
        tensors = load_file(directory / CODES_FILENAME)
        self.coefficients_, self.example_index_ = tensors["coefficients"], tensors["example_index"]
        self.token_ids_, self.positions_ = tensors["token_ids"], tensors["positions"]
        self.code_latents_, self.code_values_ = tensors["code_latents"], tensors["code_values"]
        self.d_in_, self.n_tokens_ = int(meta["d_in"]), int(meta["n_tokens"])
        self.fit_seconds_, self.timings_ = meta.get("fit_seconds"), meta.get("timings", {})
        self._set_statistics()
        return self


def _as_activations(acts, example_index, token_ids, n_examples, hook) -> Activations:
    """Validates the inputs of ``fit_activations``/``transform_activations``; tokens end up grouped by
    example (a stable sort, so each example keeps its token order; no copy when already grouped)."""
    if isinstance(acts, Activations):
        if example_index is not None or token_ids is not None:
            raise ValueError("pass either an Activations object or acts with example_index/token_ids, not both")
        x, ex, ids, pos = acts.acts, acts.example_index, acts.token_ids, acts.positions
        hook, n_examples = acts.hook if hook is None else hook, acts.n_examples
    else:
        x = torch.as_tensor(acts)
        if x.ndim != 2:
            raise ValueError(f"acts must be [n_tokens, d]; got shape {tuple(x.shape)}")
        n = x.shape[0]
        ex = torch.arange(n) if example_index is None else torch.as_tensor(example_index).long().reshape(-1)
        ids = torch.full((n,), -1, dtype=torch.long) if token_ids is None else torch.as_tensor(token_ids).long()
        ids, pos = ids.reshape(-1), None
        if ex.shape[0] != n or ids.shape[0] != n:
            raise ValueError(f"example_index and token_ids need one entry per token ({n})")
    if x.shape[0] == 0:
        raise ValueError("no tokens to fit the SAE on")
    if int(ex.min()) < 0:
        raise ValueError("example_index must be non-negative")
    m = n_examples if n_examples is not None else int(ex.max()) + 1
    if m <= int(ex.max()):
        raise ValueError(f"n_examples={m} but example_index reaches {int(ex.max())}")
    if bool((ex[1:] < ex[:-1]).any()):
        order = torch.sort(ex, stable=True).indices
        x, ex, ids, pos = x[order], ex[order], ids[order], None
    if not bool(torch.isfinite(x).all()):
        raise ValueError("activations contain NaN/inf")
    return Activations(x.float(), ex, ids, _positions(ex) if pos is None else pos, hook, m)


def _positions(sorted_example_index: torch.Tensor) -> torch.Tensor:
    """Position of each token within its example, for tokens grouped by example."""
    n = sorted_example_index.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = sorted_example_index[1:] != sorted_example_index[:-1]
    starts = torch.cummax(torch.where(first, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    return torch.arange(n) - starts
