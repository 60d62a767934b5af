"""Reading a model's per-token activations at one hook, and the code that the activation-space baselines share.

The TopK SAE of :mod:`.sae`, the SNMF of :mod:`.snmf` and activation steering
(:func:`npeff_lens.selectivity.steered`) all build on it.

- Hook points: TransformerLens hook names (``blocks.5.hook_resid_pre``, ``blocks.5.mlp.hook_post``,
  ``blocks.5.attn.hook_z``) for the ``hooked`` and ``bridge`` backends, module paths (``model.layers.5``: the
  module's output; ``model.layers.5.self_attn.o_proj:input``: its input) for ``hf`` and ``nnsight``.
  :func:`resolve_hook` also takes ``attn:L`` (the attention output before its output projection: ``hook_z``, or
  the out-projection's input) and ``mlp:L`` (the MLP's hidden activations: ``mlp.hook_post``, or the
  down-projection's input) for any backend; :func:`hook_module` finds the module a hook reads.
- :func:`activations` reads them through our model adapters: padding is dropped, the forward stops at the hook.
  :func:`as_activations` checks precomputed ones (an :class:`Activations`, or a tensor and its token bookkeeping).
- Constant tokens: in a causal model position ``p``'s activation depends on tokens ``0..p`` only, so the leading
  tokens that every prompt shares (:func:`constant_prefix`: the BOS and the template's text before ``{text}``) have
  the same activation in every example and say nothing about it. :func:`without_constant_prefix` leaves them out;
  the estimators do so by default (``constant_tokens="drop"``), recording the prefix at fit so that new prompts
  lose the same positions. Only for causal models (:func:`is_causal`); a bidirectional encoder keeps every token.
- :class:`ActivationEstimator`: what the estimators share once fitted: coefficients of new prompts, each example's
  token range, which components are alive, and what they save beside their own tensors (through
  :class:`npeff_lens.saving.SavedFormat`: checksummed tensors, a JSON file written last).

transformer-lens is never imported here: the TL backends' adapters hold the model.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..analysis import active
from ..errors import NotFittedError
from ..io import progress
from ..models.adapter import HFAdapter

__all__ = [
    "CONSTANT_TOKENS",
    "INPUT_SUFFIX",
    "Activations",
    "ActivationEstimator",
    "activations",
    "as_activations",
    "attention_output_hook",
    "check_positive_int",
    "constant_prefix",
    "default_hook",
    "hook_module",
    "hook_names",
    "is_causal",
    "mlp_hidden_hook",
    "n_layers",
    "resolve_hook",
    "without_constant_prefix",
]

INPUT_SUFFIX = ":input"  # a module path + this suffix: the module's input (its first positional argument)
CONSTANT_TOKENS = ("drop", "keep")  # an estimator's choice for the prompts' common prefix (see constant_prefix)


@dataclass
class Activations:
    """Per-token activations of a set of prompts at one hook, padding removed.

    ``acts [n_tokens, d]`` (float32, CPU), ``example_index [n_tokens]`` (which prompt each row comes
    from, non-decreasing), ``token_ids [n_tokens]`` and ``positions [n_tokens]`` (the token and its
    position within its prompt), ``n_examples`` prompts in all. ``causal``: whether the model that produced
    them is causal (:func:`is_causal`; ``None``: unknown), which makes a common token prefix constant.
    """

    acts: torch.Tensor
    example_index: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    hook: str | None
    n_examples: int
    causal: bool | None = None

    def __len__(self) -> int:
        return self.acts.shape[0]

    @property
    def d(self) -> int:
        return self.acts.shape[1]


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the hook point needs computing."""


def _is_tl(adapter) -> bool:
    return getattr(adapter, "backend", None) in ("hooked", "bridge")


def is_causal(adapter) -> bool:
    """Whether each position's activations depend only on the tokens up to it: TransformerLens models with
    causal attention (``cfg.attention_dir``), HF models that are decoders (``config.is_decoder``, or a
    ``*ForCausalLM`` / ``*LMHeadModel`` class) and not encoder-decoders. Anything else (a BERT classifier, an
    encoder) is taken as bidirectional: there a shared prefix's activations depend on the rest of the prompt."""
    if _is_tl(adapter):
        return getattr(adapter.model.cfg, "attention_dir", "causal") == "causal"
    config = getattr(adapter.module, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    names = [type(adapter.module).__name__, *(getattr(config, "architectures", None) or [])]
    return bool(getattr(config, "is_decoder", False)) or any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


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
        return f"blocks.{n_layers(adapter) // 2}.hook_resid_pre"
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


def n_layers(adapter) -> int:
    """The number of transformer blocks: ``cfg.n_layers`` (hooked/bridge), else the length of the layer list."""
    if _is_tl(adapter):
        return int(adapter.model.cfg.n_layers)
    return len(_layer_list(adapter)[1])


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
    count = n_layers(adapter)
    if not (isinstance(layer, int) and 0 <= layer < count):
        raise ValueError(f"layer {layer!r} does not exist: the model has {count} layers (0 to {count - 1})")
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
        raise ValueError(
            f"layer {layer} ({base}) has no attention block with a linear output projection "
            f"(its parts: {', '.join(children) or 'none'}): pass the hook explicitly"
        )
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
                f"{tuple(mask.shape)}: read per-token activations at a per-token hook point"
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
    causal = is_causal(adapter)
    return Activations(acts, torch.cat(examples), torch.cat(tokens), torch.cat(positions), hook, len(prompts), causal)


def as_activations(acts, example_index=None, token_ids=None, n_examples=None, hook=None) -> Activations:
    """``acts`` as a checked :class:`Activations`: one already, or ``acts [n_tokens, d]`` with ``example_index``
    (default: every token its own example) and ``token_ids`` (default: -1) ``[n_tokens]``. Tokens end up grouped
    by example (a stable sort, so each example keeps its token order; no copy when already grouped)."""
    if isinstance(acts, Activations):
        if example_index is not None or token_ids is not None:
            raise ValueError("pass either an Activations object or acts with example_index/token_ids, not both")
        x, ex, ids, pos = acts.acts, acts.example_index, acts.token_ids, acts.positions
        hook, n_examples, causal = acts.hook if hook is None else hook, acts.n_examples, acts.causal
    else:
        x = torch.as_tensor(acts)
        if x.ndim != 2:
            raise ValueError(f"acts must be [n_tokens, d]; got shape {tuple(x.shape)}")
        n = x.shape[0]
        ex = torch.arange(n) if example_index is None else torch.as_tensor(example_index).long().reshape(-1)
        ids = torch.full((n,), -1, dtype=torch.long) if token_ids is None else torch.as_tensor(token_ids).long()
        ids, pos, causal = ids.reshape(-1), None, None
        if ex.shape[0] != n or ids.shape[0] != n:
            raise ValueError(f"example_index and token_ids need one entry per token ({n})")
    if x.shape[0] == 0:
        raise ValueError("no tokens to fit on")
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
    return Activations(x.float(), ex, ids, _positions(ex) if pos is None else pos, hook, m, causal)


def _positions(sorted_example_index: torch.Tensor) -> torch.Tensor:
    """Position of each token within its example, for tokens grouped by example."""
    n = sorted_example_index.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = sorted_example_index[1:] != sorted_example_index[:-1]
    starts = torch.cummax(torch.where(first, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    return torch.arange(n) - starts


def constant_prefix(data: Activations) -> torch.Tensor:
    """The token ids ``[P]`` that every example starts with (the longest common prefix of the examples' token
    sequences: the BOS and the template's text before ``{text}``). For a causal model the activations at these
    positions are the same in every example. Empty unless ``data.causal`` and every token id is known."""
    ex, ids = data.example_index, data.token_ids
    counts = torch.bincount(ex, minlength=data.n_examples)
    if data.causal is not True or len(data) == 0 or bool((ids < 0).any()) or int(counts.min()) == 0:
        return torch.zeros(0, dtype=torch.long)
    rank, length = _positions(ex), int(counts.min())
    first = ids[: int(counts[int(ex[0])])]  # the first example's tokens (grouped by example)
    inside = rank < length
    differ = inside & (ids != first[rank.clamp(max=length - 1)])
    if bool(differ.any()):
        length = min(length, int(rank[differ].min()))
    return first[:length].clone().long()


def without_constant_prefix(data: Activations, prefix: torch.Tensor) -> Activations:
    """``data`` without each example's leading tokens that equal ``prefix`` (its common prefix with it: positions
    ``< P_e``), keeping at least each example's last token. ``prefix`` comes from :func:`constant_prefix` at
    fit, so new prompts lose exactly the positions whose activations the fitted prompts all shared."""
    prefix = torch.as_tensor(prefix).long().reshape(-1)
    if prefix.numel() == 0 or len(data) == 0:
        return data
    ex, ids, rank = data.example_index, data.token_ids, _positions(data.example_index)
    counts = torch.bincount(ex, minlength=data.n_examples)
    match = (rank < prefix.numel()) & (ids == prefix[rank.clamp(max=prefix.numel() - 1)])
    shared = counts.clone()  # per example: the rank of its first token off the prefix
    shared.scatter_reduce_(0, ex[~match], rank[~match], "amin", include_self=True)
    cut = torch.minimum(shared, (counts - 1).clamp_min(0))
    keep = rank >= cut[ex]
    if bool(keep.all()):
        return data
    return Activations(
        data.acts[keep], ex[keep], ids[keep], data.positions[keep], data.hook, data.n_examples, data.causal
    )


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    """A ValueError naming ``name`` unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


# --------------------------------------------------------------------------------------------------
# A fitted estimator
# --------------------------------------------------------------------------------------------------


class ActivationEstimator:
    """Base of the activation-space estimators: per-example coefficients are the max over an example's tokens.
    A subclass sets ``_fitted_attribute`` (present once fitted) and has ``hook``, ``k_top``, ``d_in_``,
    ``constant_tokens``, ``read_activations`` and ``transform_activations``.

    ``constant_tokens="drop"`` (the default): the prompts' common token prefix (:func:`constant_prefix`, recorded
    at fit as ``constant_prefix_``) is left out of the fitted tokens, the coefficients and the token views, and
    new prompts lose the same positions; ``"keep"``: every token is read."""

    _fitted_attribute: ClassVar[str]

    @staticmethod
    def _check_constant_tokens(value) -> None:
        if value not in CONSTANT_TOKENS:
            raise ValueError(f"constant_tokens must be one of {', '.join(CONSTANT_TOKENS)}; got {value!r}")

    @staticmethod
    def _saved_params(meta: dict) -> dict:
        """The saved parameters; an estimator saved before ``constant_tokens`` existed kept every token."""
        return {"constant_tokens": "keep", **meta["params"]}

    def _fitted_tokens(self, data: Activations) -> Activations:
        """The tokens to fit on: with ``constant_tokens="drop"``, ``data`` without its constant prefix, which is
        recorded (``constant_prefix_``) for new prompts."""
        drop = self.constant_tokens == "drop"
        self.constant_prefix_ = constant_prefix(data) if drop else torch.zeros(0, dtype=torch.long)
        return without_constant_prefix(data, self.constant_prefix_)

    def _fit_prompts(self, adapter, prompts: Sequence[str]):
        """Read the activations of ``prompts`` through ``adapter`` and fit on them, timing both."""
        t0 = time.perf_counter()
        acts = self.read_activations(adapter, prompts)
        self.model_name_ = getattr(adapter, "name", None)
        t_read = time.perf_counter() - t0
        self.fit_activations(acts)
        self.timings_["activations"] = t_read
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def transform(self, adapter, prompts: Sequence[str]) -> torch.Tensor:
        """Coefficients ``[len(prompts), n_components]`` of new prompts (the fitted state is unchanged)."""
        return self.transform_activations(self.read_activations(adapter, prompts))

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_attribute):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(...) or load(...) first")

    def _new_activations(self, acts, example_index, n_examples) -> Activations:
        """:func:`as_activations` of new data, checked against the fitted width."""
        self._check_fitted()
        data = as_activations(acts, example_index, None, n_examples, self.hook)
        if data.d != self.d_in_:
            raise ValueError(f"activations have d={data.d}; this {type(self).__name__} was fitted on d={self.d_in_}")
        return without_constant_prefix(data, self.constant_prefix_)

    def _set_example_statistics(self, coefficients: torch.Tensor, example_index: torch.Tensor) -> None:
        """``coefficients_``, each example's token range, and the components active on at least ``k_top``
        examples (``alive_``; the others are ``dead_latents_``)."""
        if example_index.numel() > 1 and bool((example_index[1:] < example_index[:-1]).any()):
            raise ValueError("example_index must be non-decreasing (tokens grouped by example)")
        self.coefficients_ = coefficients
        bounds = torch.searchsorted(example_index, torch.arange(coefficients.shape[0] + 1))
        self._starts, self._ends = bounds[:-1], bounds[1:]
        self.n_active_examples_ = active(coefficients).sum(0)  # the one meaning of "active" (analysis.active)
        self.alive_ = self.n_active_examples_ >= self.k_top
        self.dead_latents_ = torch.nonzero(~self.alive_).flatten()

    def _saved(self, tensors: dict, meta: dict) -> tuple[dict, dict]:
        """``(tensors, meta)`` to save: these plus the token bookkeeping, the parameters and the fit's record."""
        tensors = {
            **tensors,
            "example_index": self.example_index_,
            "token_ids": self.token_ids_,
            "positions": self.positions_,
            "constant_prefix": self.constant_prefix_,
        }
        fit = {"fit_seconds": getattr(self, "fit_seconds_", None), "timings": getattr(self, "timings_", {})}
        meta = {"params": self.get_params(), "model_name": self.model_name_, "d_in": self.d_in_, **meta, **fit}
        return tensors, meta

    def _restore(self, tensors: dict, meta: dict) -> None:
        """Set what :meth:`_saved` added back from a load."""
        self.example_index_, self.token_ids_ = tensors["example_index"], tensors["token_ids"]
        self.positions_, self.model_name_, self.d_in_ = tensors["positions"], meta.get("model_name"), int(meta["d_in"])
        self.fit_seconds_, self.timings_ = meta.get("fit_seconds"), meta.get("timings", {})
        self.constant_prefix_ = tensors.get("constant_prefix", torch.zeros(0, dtype=torch.long)).long()

    def token_range(self, example: int) -> tuple[int, int]:
        """``(start, end)`` of one example's rows among the fitted tokens."""
        self._check_fitted()
        m, e = self.coefficients_.shape[0], int(example)
        if not 0 <= e < m:
            raise IndexError(f"example index {e} out of range for {m} examples")
        return int(self._starts[e]), int(self._ends[e])
