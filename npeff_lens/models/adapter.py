"""The adapter contract: the one interface the rest of npeff_lens uses to talk to a model.

An adapter tokenises prompts, returns the logits at each example's prediction position (the last
real token, whatever the padding side), and lists the parameters NPEFF differentiates, in a fixed
order, named as the underlying model names them. Four backends share it:

- ``hf``: a transformers ``PreTrainedModel`` (causal LM or sequence classifier);
- ``bridge``: a TransformerLens ``TransformerBridge`` (names are the wrapped HF model's, i.e. the
  bridge's names with ``._original_component`` removed);
- ``hooked``: a TransformerLens ``HookedTransformer`` (TransformerLens names, e.g. ``blocks.0.attn.W_Q``);
- ``nnsight``: an ``nnsight.NNsight`` wrapper (the wrapped module's names).

Default parameter selection (as in the paper): everything except token embeddings and
normalisation parameters; a tied unembedding is the embedding's parameter and follows it.

The same model gives the same prediction probabilities and the same default parameter count through
every adapter, however it was built: TransformerLens's own tokenizer copy always prepends BOS, so a
TransformerLens model adapted without a tokenizer tokenises with the tokenizer it was made from, as
saved; its untied copy of a tied unembedding and the zero biases it adds where the architecture has
none are left out of the default selection.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

NORM_CLASS_HINTS = ("norm", "layernorm", "rmsnorm")


class ModelAdapter:
    """Base adapter. Subclasses implement :meth:`forward_logits` and may override naming."""

    backend = "base"

    def __init__(self, model, tokenizer=None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(getattr(self.module, "config", None), "_name_or_path", None) or type(model).__name__
        if self.tokenizer is not None and self.tokenizer.pad_token_id is None:
            # Padding is masked; any id works, and eos is the usual choice.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    # --- the wrapped torch module ----------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The ``nn.Module`` whose parameters are differentiated (for nnsight: the wrapped module)."""
        return self.model

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def is_classifier(self) -> bool:
        return False

    @property
    def context_length(self) -> int | None:
        """The most tokens the model takes (its position embeddings), or None where its config does not say."""
        for cfg in (getattr(self.module, "config", None), getattr(self.module, "cfg", None)):
            for key in ("max_position_embeddings", "n_positions", "n_ctx"):
                value = getattr(cfg, key, None)
                if isinstance(value, int) and value > 0:
                    return value
        return None

    def eval(self):
        self.module.eval()
        return self

    # --- tokenisation ----------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` on the model's device.

        ``max_length`` is a safety net: a prompt longer than it loses its last tokens, the template's tail with them,
        with a warning. Prompts made by :meth:`~npeff_lens.tasks.Task.fitted_prompts` fit, their text shortened."""
        if self.tokenizer is None:
            raise ValueError("this adapter has no tokenizer; pass one to npeff_lens.adapt(model, tokenizer)")
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts to tokenise")
        self.tokenizer.padding_side = "right"
        # with a max_length, the tokenizer's "longer than the model's maximum" note is moot: the prompt is cut below
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, verbose=max_length is None)
        if max_length is not None and enc["input_ids"].shape[1] > max_length:
            n = int((enc["attention_mask"].sum(-1) > max_length).sum())
            warnings.warn(
                f"{n} prompt(s) longer than max_length={max_length} tokens lost their last tokens (a template's tail "
                "with them); Task.fitted_prompts shortens the text instead and keeps the template",
                UserWarning,
                stacklevel=2,
            )
            enc = self.tokenizer(
                list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def continuation_token_ids(self, prompt: str, continuation: str) -> list[int]:
        """The tokens ``continuation`` contributes when it follows ``prompt`` (leading space kept)."""
        full = self.tokenizer(prompt + continuation, add_special_tokens=True)["input_ids"]
        head = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if full[: len(head)] != head:  # the boundary merged; fall back to tokenising it alone
            return self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return full[len(head) :]

    # --- logits ----------------------------------------------------------------------------
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` (or ``[batch, classes]`` for a classifier)."""
        raise NotImplementedError

    def prediction_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at each example's prediction position: ``[batch, vocab]`` (``[batch, classes]``)."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.forward_logits(input_ids, mask)
        if self.is_classifier:
            return logits
        return logits[torch.arange(len(input_ids), device=logits.device), last_token_positions(mask)]

    def logits(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prediction_logits(self.tokenize(prompts))

    # --- parameters ------------------------------------------------------------------------
    def all_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """All parameters, deduplicated (a tied weight appears once, under its first name)."""
        seen, out = set(), []
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((self.canonical_name(name), p))
        return out

    def canonical_name(self, name: str) -> str:
        return name

    def default_excluded(self) -> set[int]:
        """ids of parameters left out by default: token embeddings (and what is tied to them) and
        normalisation parameters."""
        excluded = set()
        vocab = self.vocab_size
        for mod in self.module.modules():
            cls = type(mod).__name__.lower()
            if isinstance(mod, nn.Embedding) and (vocab is None or mod.num_embeddings == vocab):
                excluded.add(id(mod.weight))
            elif cls in ("embed",) and hasattr(mod, "W_E"):  # TransformerLens token embedding
                excluded.add(id(mod.W_E))
            elif any(h in cls for h in NORM_CLASS_HINTS):
                excluded.update(id(p) for p in mod.parameters(recurse=False))
        return excluded

    @property
    def vocab_size(self) -> int | None:
        cfg = getattr(self.module, "config", None) or getattr(self.module, "cfg", None)
        return getattr(cfg, "vocab_size", None) or getattr(cfg, "d_vocab", None)

    def named_parameters(
        self, include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None
    ) -> list[tuple[str, nn.Parameter]]:
        """Selected parameters in a fixed order (the module's registration order).

        ``include``/``exclude`` are glob patterns on the names (``"model.layers.*.mlp.*"``). With
        ``include`` given, it selects from all parameters (explicit beats the default); otherwise the
        default selection applies. ``exclude`` then removes matches.
        """
        include = [include] if isinstance(include, str) else include
        exclude = [exclude] if isinstance(exclude, str) else exclude
        params = self.all_named_parameters()
        if include:
            unmatched = [pat for pat in include if not any(fnmatch.fnmatchcase(n, pat) for n, _ in params)]
            chosen = [(n, p) for n, p in params if any(fnmatch.fnmatchcase(n, pat) for pat in include)]
        else:
            skip = self.default_excluded()
            chosen = [(n, p) for n, p in params if id(p) not in skip]
        if exclude:
            chosen = [(n, p) for n, p in chosen if not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)]
        if not chosen:
            raise ValueError(
                f"no parameters selected (include={include}, exclude={exclude}); "
                f"some names: {[n for n, _ in params[:6]]}"
            )
        if include and unmatched:  # a typo beside a pattern that matches would otherwise go unnoticed
            close = difflib.get_close_matches(unmatched[0], [n for n, _ in params], n=2, cutoff=0.6)
            warnings.warn(
                f"the parameter pattern(s) {unmatched} match no parameter of the model, so only the others select "
                f"parameters ({len(chosen)} tensors){'; close names: ' + str(close) if close else ''}",
                UserWarning,
                stacklevel=2,
            )
        return chosen

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, backend={self.backend!r}, device={self.device})"


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for any padding side."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, pos], got shape {tuple(attention_mask.shape)}")
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("an example has no tokens (empty prompt?)")
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (pos + 1)).argmax(-1)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding must not shift positions (HF's default position ids ignore the mask).
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HFAdapter(ModelAdapter):
    backend = "hf"

    @property
    def is_classifier(self) -> bool:
        archs = getattr(self.module.config, "architectures", None) or [type(self.module).__name__]
        return any(a.endswith("ForSequenceClassification") for a in archs) or type(self.module).__name__.endswith(
            "ForSequenceClassification"
        )

    def forward_logits(self, input_ids, attention_mask, **extra):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        if not self.is_classifier and _accepts_position_ids(self.module):
            kwargs["position_ids"] = _position_ids(attention_mask)
        return self.module(**kwargs).logits

    def prediction_logits(self, batch):
        # The unembedding only at the positions needed (HF's logits_to_keep): at ~40 tokens it is a
        # fifth of the forward pass.
        if self.is_classifier or not _accepts(self.module, "logits_to_keep"):
            return super().prediction_logits(batch)
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        last = last_token_positions(mask)
        keep, where = torch.unique(last, return_inverse=True)
        logits = self.forward_logits(input_ids, mask, logits_to_keep=keep)
        return logits[torch.arange(len(input_ids), device=logits.device), where]


def _accepts(module, arg: str) -> bool:
    try:
        return arg in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _accepts_position_ids(module) -> bool:
    return _accepts(module, "position_ids")


class NNsightAdapter(HFAdapter):
    """An ``nnsight.NNsight`` wrapper; the forward runs inside ``model.trace`` and the saved logits
    keep their autograd graph, so gradients flow to the wrapped module's parameters."""

    backend = "nnsight"

    @property
    def module(self):
        return self.model._module

    def forward_logits(self, input_ids, attention_mask, **extra):
        kwargs = {"attention_mask": attention_mask, **extra}
        if not self.is_classifier and _accepts_position_ids(self.module):
            kwargs["position_ids"] = _position_ids(attention_mask)
        with self.model.trace(input_ids, **kwargs):
            out = self.model.output.save()
        return out.logits if hasattr(out, "logits") else out[0]


class BridgeAdapter(ModelAdapter):
    """A TransformerLens ``TransformerBridge``. Parameter names are the wrapped HF model's."""

    backend = "bridge"

    def __init__(self, model, tokenizer=None, name=None):
        tokenizer = tokenizer or tokenizer_as_saved(getattr(model, "tokenizer", None))
        super().__init__(model, tokenizer, name or getattr(model.cfg, "model_name", None))
        self._unused = None

    def canonical_name(self, name):
        return name.replace("._original_component", "")

    @property
    def vocab_size(self):
        return getattr(self.model.cfg, "d_vocab", None)

    def forward_logits(self, input_ids, attention_mask):
        return self.model(input_ids, return_type="logits", attention_mask=attention_mask)

    def default_excluded(self):
        # The bridge keeps parameters that its forward never uses (GPT-2's fused c_attn after the
        # q/k/v split) and adds an unembedding bias that the HF model does not have: leave them out.
        excluded = super().default_excluded()
        if self._unused is None:
            self._unused = _unused_parameters(self)
        excluded |= self._unused
        for name, p in self.model.named_parameters():
            if self.canonical_name(name) == "lm_head.bias" and not p.detach().any():
                excluded.add(id(p))
        return excluded


def _unused_parameters(adapter: ModelAdapter) -> set[int]:
    params = [p for p in adapter.module.parameters() if p.requires_grad]
    ids = torch.tensor([[1, 2, 3]], device=adapter.device)
    logits = adapter.forward_logits(ids, torch.ones_like(ids))
    grads = torch.autograd.grad(logits.float().square().sum(), params, allow_unused=True)
    return {id(p) for p, g in zip(params, grads) if g is None}


class HookedAdapter(ModelAdapter):
    """A TransformerLens ``HookedTransformer`` (TransformerLens parameter names).

    ``tied_embeddings``: whether ``unembed.W_U`` is TransformerLens's copy of a tied embedding (it
    then follows ``embed.W_E`` out of the default selection); ``None`` finds out from the weights.
    ``absent_parameters``: glob patterns of parameters the original model does not have (the zero
    biases TransformerLens adds); ``None`` finds them: a bias that is exactly zero in every block,
    and a zero ``unembed.b_U``. In architectures that carry biases (GPT-2 and the like) attention
    and MLP biases are always kept: there a zero bias is a freshly initialised one.
    """

    backend = "hooked"

    def __init__(self, model, tokenizer=None, name=None, tied_embeddings: bool | None = None, absent_parameters=None):
        tokenizer = tokenizer or tokenizer_as_saved(getattr(model, "tokenizer", None))
        super().__init__(model, tokenizer, name or model.cfg.model_name)
        if str(getattr(model.cfg, "normalization_type", None)).endswith("Pre"):
            warnings.warn(
                "this HookedTransformer was loaded with its normalisation weights folded into the next layers "
                "(from_pretrained's fold_ln=True): probabilities match the original model, but its parameters are "
                "a reparameterisation of the original's, so gradients and Fisher values per parameter differ from "
                "the HuggingFace model's; load it with HookedTransformer.from_pretrained_no_processing to study "
                "the original parameters",
                RuntimeWarning,
                stacklevel=3,
            )
        self.tied_embeddings = _unembedding_is_tied(model) if tied_embeddings is None else tied_embeddings
        self.absent_parameters = (
            _structural_zero_biases(model) if absent_parameters is None else list(absent_parameters)
        )

    def forward_logits(self, input_ids, attention_mask):
        return self.model(input_ids, return_type="logits", attention_mask=attention_mask)

    def default_excluded(self):
        excluded = super().default_excluded()
        if self.tied_embeddings:  # HookedTransformer unties a tied unembedding into W_U; it follows W_E
            excluded.add(id(self.model.unembed.W_U))
        for name, p in self.model.named_parameters():
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.absent_parameters):
                excluded.add(id(p))
        return excluded


# HuggingFace architectures whose attention and MLP layers carry biases: TransformerLens's biases are theirs.
ARCHITECTURES_WITH_BIASES = frozenset(
    {
        "GPT2LMHeadModel",
        "GPTNeoForCausalLM",
        "GPTNeoXForCausalLM",
        "GPTJForCausalLM",
        "OPTForCausalLM",
        "BloomForCausalLM",
        "PhiForCausalLM",
    }
)


def _unembedding_is_tied(model) -> bool:
    """Whether a HookedTransformer's ``W_U`` is its copy of the (transposed) token embedding: equal
    to it, or, after ``fold_ln``/``center_unembed``, equal to it scaled per row and centred (checked
    on the first 2048 tokens, so that a large vocabulary costs no copy of the matrix)."""
    if getattr(model.cfg, "tie_word_embeddings", False):
        return True
    embed, unembed = getattr(model, "embed", None), getattr(model, "unembed", None)
    if embed is None or unembed is None or embed.W_E.T.shape != unembed.W_U.shape:
        return False
    with torch.no_grad():
        if torch.equal(embed.W_E.T, unembed.W_U):
            return True
        w_e, w_u = embed.W_E.T[:, :2048].float(), unembed.W_U[:, :2048].float()
        mean = embed.W_E.T.mean(-1, keepdim=True, dtype=torch.float32)
        for e in (w_e, w_e - mean):
            scale = (w_u * e).sum(-1, keepdim=True) / (e * e).sum(-1, keepdim=True).clamp(min=1e-30)
            if torch.allclose(scale * e, w_u, rtol=1e-4, atol=1e-6 * float(w_u.abs().max())):
                return True
    return False


def _structural_zero_biases(model) -> list[str]:
    """Names of the biases TransformerLens added (zeros) where the original architecture has none."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name == "unembed.b_U":
            groups.setdefault(name, []).append(p)
        elif (
            len(parts) == 4
            and parts[0] == "blocks"
            and parts[2] in ("attn", "mlp")
            and parts[3].lstrip("_")[:2] == "b_"
        ):
            groups.setdefault(f"blocks.*.{parts[2]}.{parts[3]}", []).append(p)
    keep_blocks = getattr(model.cfg, "original_architecture", None) in ARCHITECTURES_WITH_BIASES
    return [
        pattern
        for pattern, params in groups.items()
        if not (keep_blocks and pattern.startswith("blocks.")) and all(not p.detach().any() for p in params)
    ]


def tokenizer_as_saved(tokenizer):
    """The tokenizer a TransformerLens model was made from, as saved.

    TransformerLens replaces a model's tokenizer by a copy reloaded with ``add_bos_token=True``, so
    its tokens start with BOS even where the HuggingFace tokenizer's do not (SmolLM2's, GPT-2's). The
    copy is loaded again without that flag; where that fails the copy is kept, with a warning."""
    if tokenizer is None or not tokenizer.init_kwargs.get("add_bos_token"):
        return tokenizer
    kwargs = copy.deepcopy(tokenizer.init_kwargs)
    source = kwargs.pop("name_or_path", None) or tokenizer.name_or_path
    kwargs.pop("add_bos_token", None)
    try:
        from transformers import AutoTokenizer

        saved = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to reload keeps TransformerLens's copy
        warnings.warn(
            f"tokens start with BOS, as TransformerLens's tokenizer adds it; the tokenizer it was made from "
            f"({source!r}) could not be loaded to check whether the original model's does too "
            f"({type(e).__name__}); pass the HuggingFace tokenizer as npeff_lens.adapt(model, tokenizer) "
            "to tokenise as the original model does",
            RuntimeWarning,
            stacklevel=4,
        )
        return tokenizer
    saved.padding_side = tokenizer.padding_side
    return saved
