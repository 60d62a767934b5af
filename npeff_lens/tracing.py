"""Causal tracing, which finds where a model's hidden states carry a fact by corrupting the subject and restoring
one module's clean output.

It follows Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1.

For a factual prompt (``"Lyon is a city in the country of"``), its subject (``"Lyon"``) and its answer
(``" France"``, of which the first token is measured), three kinds of run are compared:

- the clean run: ``p_clean``, the probability of the answer's first token;
- the corrupted run: Gaussian noise is added to the input embeddings of the subject's tokens; ``p_corrupted`` is
  the probability averaged over ``n_samples`` noise draws;
- the restored runs: the corrupted run with one module's clean output put back at one token position (the last
  subject token, or every position in turn); ``p_restored``, averaged over the same noise draws.

The indirect effect of a (kind, layer, position) is ``p_restored - p_corrupted``; averaged over facts it is the
paper's "average indirect effect" (its Fig. 2). Kinds are ``"hidden"`` (the decoder layer's output: the residual
stream after the layer), ``"mlp"`` (the MLP block's output) and ``"attn"`` (the attention block's output).

The noise's standard deviation is ``noise`` (3 in the paper) times the standard deviation of the input
embeddings, measured over every entry of the subject tokens' embedding vectors of the traced prompts (the paper
measures it over its whole set of subjects; pass ``embedding_std`` to fix it). Each fact's noise draws come from a
generator seeded by ``(seed, fact index)`` and are shared by its corrupted run and all its restored runs (as the
paper's code does), so the effects compare like with like and a trace is reproducible bit for bit on a device.

Modules are found on the adapter's underlying model: TransformerLens hook points (``blocks.{i}.hook_resid_post``,
``hook_mlp_out``, ``hook_attn_out``, ``hook_embed``) for the ``hooked`` and ``bridge`` backends; for ``hf`` and
``nnsight`` the input embedding (``get_input_embeddings``), the list of decoder layers (``model.layers``,
``transformer.h``, ``gpt_neox.layers``, ...) and, in each, its MLP (``mlp``, ``feed_forward``, ...) and attention
(``self_attn``, ``attn``, ``attention``, ...). Outputs are read and patched by forward hooks; a module that returns
a tuple (HF attention returns ``(output, weights)``) has its first element patched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .io import progress

__all__ = [
    "KINDS",
    "POSITION_GROUPS",
    "CausalTrace",
    "TraceModules",
    "causal_trace",
    "embedding_std",
    "known_facts",
    "restored_probability",
    "subject_token_positions",
    "trace_modules",
]

KINDS = ("hidden", "mlp", "attn")
# The paper's token groups (its Fig. 2), for traces over every position.
POSITION_GROUPS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)

_LAYER_LISTS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "layers",
    "h",
    "blocks",
)
_MODULE_NAMES = {
    "mlp": ("mlp", "feed_forward", "ffn", "mlp_block"),
    "attn": ("self_attn", "attn", "attention", "self_attention"),
}
_TL_HOOKS = {"hidden": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


# --------------------------------------------------------------------------------------------------
# Where the modules are.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceModules:
    """The modules causal tracing reads and patches on one model.

    ``embedding``: the module whose output is the token embeddings (the noise is added to it);
    ``sites[(kind, layer)]``: the module whose output is that kind's output at that layer; ``names``: their
    paths (TransformerLens hook names or module paths), for messages; ``n_layers``: the number of decoder layers.
    """

    embedding: nn.Module
    sites: dict[tuple[str, int], nn.Module]
    names: dict[tuple[str, int] | str, str]
    n_layers: int

    def kinds(self) -> tuple[str, ...]:
        """The kinds found at every layer."""
        return tuple(k for k in KINDS if all((k, i) in self.sites for i in range(self.n_layers)))


def trace_modules(adapter) -> TraceModules:
    """The embedding, decoder-layer, MLP and attention modules of an adapted causal language model.

    Input: a :class:`~npeff_lens.models.ModelAdapter` of a causal LM (any backend). Output: a :class:`TraceModules`.
    A classifier, or a model whose layers cannot be found, is a ValueError that says what is supported.

    Example::

        mods = trace_modules(load_model("tiny-llama"))
        mods.names[("mlp", 0)]  # 'model.layers.0.mlp'

    Notes: the kinds are those of Meng et al. 2022, §2.1 (hidden states, MLP and attention outputs).
    """
    if adapter.is_classifier:
        raise ValueError(
            "causal tracing measures the probability of an answer's next token: it needs a causal language model, "
            "not a classifier"
        )
    if adapter.backend in ("hooked", "bridge"):
        return _tl_modules(adapter)
    return _hf_modules(adapter)


def _tl_modules(adapter) -> TraceModules:
    hooks = adapter.model.hook_dict
    n = int(adapter.model.cfg.n_layers)
    if "hook_embed" not in hooks:
        raise ValueError(f"the {adapter.backend} model has no hook_embed hook point: its embeddings cannot be noised")
    sites, names = {}, {"embedding": "hook_embed"}
    for i in range(n):
        for kind, suffix in _TL_HOOKS.items():
            name = f"blocks.{i}.{suffix}"
            if name in hooks:
                sites[(kind, i)], names[(kind, i)] = hooks[name], name
    return TraceModules(hooks["hook_embed"], sites, names, n)


def _hf_modules(adapter) -> TraceModules:
    root = adapter.module
    embedding = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Module):
        raise ValueError(_unsupported(adapter, "it has no input embedding module (get_input_embeddings)"))
    path = next((p for p in _LAYER_LISTS if isinstance(_submodule(root, p), nn.ModuleList)), None)
    if path is None:
        raise ValueError(_unsupported(adapter, "its list of decoder layers was not found"))
    layers = root.get_submodule(path)
    embedding_name = next((n for n, m in root.named_modules() if m is embedding), "input embeddings")
    sites, names = {}, {"embedding": embedding_name}
    for i, layer in enumerate(layers):
        sites[("hidden", i)], names[("hidden", i)] = layer, f"{path}.{i}"
        children = dict(layer.named_children())
        for kind, candidates in _MODULE_NAMES.items():
            child = next((c for c in candidates if c in children), None)
            if child is not None:
                sites[(kind, i)], names[(kind, i)] = children[child], f"{path}.{i}.{child}"
    return TraceModules(embedding, sites, names, len(layers))


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _unsupported(adapter, why: str) -> str:
    return (
        f"cannot trace {type(adapter.module).__name__}: {why}. Supported: HuggingFace causal LMs whose decoder "
        f"layers are one of {', '.join(_LAYER_LISTS)} with an MLP child named {'/'.join(_MODULE_NAMES['mlp'])} and "
        f"an attention child named {'/'.join(_MODULE_NAMES['attn'])} (Llama, SmolLM2, GPT-2, GPT-NeoX, Gemma, ...), "
        "through the hf or nnsight backend, and TransformerLens models (hooked, bridge) by their hook points"
    )


def _check_kinds(kinds, modules: TraceModules) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown or len(set(kinds)) < len(kinds):
        raise ValueError(f"kinds must be distinct names among {', '.join(KINDS)}; got {kinds!r}")
    missing = [k for k in kinds if k not in modules.kinds()]
    if missing:
        raise ValueError(
            f"the model has no {'/'.join(missing)} module at every layer (found: {', '.join(modules.kinds())})"
        )
    return kinds


# --------------------------------------------------------------------------------------------------
# Tokens: the subject's positions, the answer's token.
# --------------------------------------------------------------------------------------------------


def subject_token_positions(tokenizer, prompt: str, subject: str) -> list[int]:
    """Positions of the tokens of ``prompt`` that overlap the first occurrence of ``subject`` in it.

    Inputs: a HuggingFace tokenizer, the prompt, the subject substring. Output: token positions in the prompt's
    tokenisation with special tokens (as :meth:`~npeff_lens.models.ModelAdapter.tokenize` gives it), increasing.
    A fast tokenizer's offset mapping decides which tokens overlap the subject's characters; a slow tokenizer
    counts the tokens of the text before the subject (its trailing spaces left out) and through it, and is an error
    where those are not the prompt's first tokens (a token that straddles the subject's end). A subject not in the
    prompt is a ValueError.

    Example::

        subject_token_positions(tok, "The country of Lisbon is", "Lisbon")  # [5, 6]: 'ĠLis', 'bon'

    Notes: the paper (Meng et al. 2022) corrupts exactly these tokens' embeddings.
    """
    if not subject:
        raise ValueError(f"the subject is empty (prompt {prompt!r})")
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"the subject {subject!r} is not in the prompt {prompt!r}")
    end = start + len(subject)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt)["input_ids"]
    shift = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), None)
    # the space before a word is its first token's (BPE 'ĠLyon', SentencePiece '▁Lyon'): the head ends before it
    before = prompt[:start].rstrip()
    head = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    through = tokenizer(prompt[:end], add_special_tokens=False)["input_ids"]
    if shift is None or plain[: len(head)] != head or plain[: len(through)] != through or len(through) <= len(head):
        raise ValueError(
            f"cannot tell which tokens of {prompt!r} are the subject {subject!r}: this slow tokenizer merges text "
            "across the subject's boundaries; use a fast tokenizer (it reports each token's characters)"
        )
    return list(range(shift + len(head), shift + len(through)))


@dataclass
class _Fact:
    index: int
    prompt: str
    subject: str
    answer: str
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask: [1, T]
    subject_positions: list[int]
    answer_token: int
    tokens: list[str]

    @property
    def n_tokens(self) -> int:
        return int(self.batch["input_ids"].shape[1])


def _fact(adapter, index: int, prompt: str, subject: str, answer: str) -> _Fact:
    where = f"fact {index}"
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: the prompt is empty")
    try:
        positions = subject_token_positions(adapter.tokenizer, prompt, subject)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    batch = adapter.tokenize([prompt])
    n = int(batch["input_ids"].shape[1])
    if not positions or positions[-1] >= n:
        raise ValueError(f"{where}: the subject {subject!r} has no token of its own in {prompt!r}")
    answer_tokens = [-1] if answer is None else adapter.continuation_token_ids(prompt, answer) if answer else []
    if not answer_tokens:  # None: no answer is measured (the embeddings' scale only)
        raise ValueError(f"{where}: the answer {answer!r} has no token after {prompt!r}")
    ids = batch["input_ids"][0].tolist()
    return _Fact(
        index, prompt, subject, answer, batch, positions, answer_tokens[0], adapter.tokenizer.convert_ids_to_tokens(ids)
    )


def _facts(adapter, prompts, subjects, answers) -> list[_Fact]:
    prompts, subjects, answers = ([x] if isinstance(x, str) else list(x) for x in (prompts, subjects, answers))
    if not prompts:
        raise ValueError("no prompts to trace")
    if not len(prompts) == len(subjects) == len(answers):
        raise ValueError(
            f"one subject and one answer per prompt: got {len(prompts)} prompts, {len(subjects)} subjects and "
            f"{len(answers)} answers"
        )
    if adapter.tokenizer is None:
        raise ValueError("this adapter has no tokenizer; pass one to npeff_lens.adapt(model, tokenizer)")
    return [_fact(adapter, i, p, s, a) for i, (p, s, a) in enumerate(zip(prompts, subjects, answers))]


class _Stop(Exception):
    """Raised by a hook once it has what it reads: nothing after it needs computing."""


def _subject_embeddings(adapter, modules: TraceModules, fact: _Fact) -> torch.Tensor:
    """The input embeddings of the fact's subject tokens ``[n_subject, d]``, read at the embedding module's output
    (a forward stopped there: TransformerLens's ``hook_embed`` is not callable on token ids)."""
    found = []

    def read(module, args, output):
        found.append(output[0, fact.subject_positions].detach().float())
        raise _Stop

    handle = modules.embedding.register_forward_hook(read)
    try:
        with torch.no_grad():
            adapter.prediction_logits(fact.batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not found:
        raise ValueError(f"the embedding module {modules.names['embedding']} did not run in the forward pass")
    return found[0]


def _embedding_std(adapter, modules: TraceModules, facts: Sequence[_Fact]) -> float:
    values = torch.cat([_subject_embeddings(adapter, modules, f).flatten() for f in facts])
    return float(values.std()) if values.numel() > 1 else 0.0


def embedding_std(adapter, prompts: Sequence[str], subjects: Sequence[str]) -> float:
    """The standard deviation of the input embeddings over the subjects' tokens: over every entry of the embedding
    vectors of every subject token of every prompt (the scale :func:`causal_trace` multiplies by ``noise``).

    Inputs: an adapter, prompts and their subject substrings. Output: a float.

    Example::

        std = embedding_std(adapter, ds["text"][:1000], ds["subject"][:1000])
        causal_trace(adapter, prompts, subjects, answers, embedding_std=std)

    Notes: Meng et al. 2022 measure it over all their subjects (``collect_embedding_std`` in their code).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    modules = trace_modules(adapter)
    with _evaluating(adapter.module):
        return _embedding_std(adapter, modules, _facts(adapter, prompts, subjects, [None] * len(prompts)))


# --------------------------------------------------------------------------------------------------
# The runs: clean outputs cached, corrupted rows batched, clean outputs restored by forward hooks.
# --------------------------------------------------------------------------------------------------

# A restoration: each site whose clean output is put back, with the token positions where it is.
_Job = tuple[tuple[tuple[str, int], tuple[int, ...]], ...]


class _Patcher:
    """Forward hooks that add the noise to the subject's embeddings, record clean outputs, or restore them."""

    def __init__(self, modules: TraceModules, sites: Sequence[tuple[str, int]]):
        self.modules, self.sites = modules, list(sites)
        self.noise: torch.Tensor | None = None  # [rows, n_subject, d]
        self.subject_positions: torch.Tensor | None = None
        self.recording = False
        self.width = 0  # of the embeddings, as the last forward saw them
        self.clean: dict[tuple[str, int], torch.Tensor] = {}  # site -> [T, d]
        self.masks: dict[tuple[str, int], torch.Tensor] = {}  # site -> [rows, T] bool
        self.handles = []

    def __enter__(self):
        self.handles.append(self.modules.embedding.register_forward_hook(self._noise))
        for site in self.sites:
            self.handles.append(self.modules.sites[site].register_forward_hook(self._site_hook(site)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _noise(self, module, args, output):
        self.width = output.shape[-1]
        if self.noise is None:
            return None
        out = output.clone()
        out[:, self.subject_positions] += self.noise.to(device=out.device, dtype=out.dtype)
        return out

    def _site_hook(self, site):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            if not isinstance(first, torch.Tensor) or first.ndim != 3:
                raise ValueError(
                    f"{self.modules.names[site]} returns {type(first).__name__} "
                    f"{tuple(getattr(first, 'shape', ()))}, not per-token outputs [batch, pos, d]: it cannot be patched"
                )
            if self.recording:
                self.clean[site] = first[0].detach().clone()
                return None
            mask = self.masks.get(site)
            if mask is None:
                return None
            patched = torch.where(mask[:, :, None], self.clean[site].to(first.dtype)[None], first)
            return (patched, *output[1:]) if isinstance(output, tuple) else patched

        return hook


def _probabilities(adapter, batch: dict[str, torch.Tensor], answer_token: int) -> torch.Tensor:
    logits = adapter.prediction_logits(batch)
    return torch.softmax(logits.float(), dim=-1)[:, answer_token].cpu()


def _noise_draws(fact: _Fact, seed: int, n_samples: int, d: int, std: float) -> torch.Tensor:
    state = int(np.random.SeedSequence([seed, fact.index]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(state)
    return torch.randn(n_samples, len(fact.subject_positions), d, generator=generator) * std


def _trace_fact(
    adapter, modules, fact: _Fact, jobs: Sequence[_Job], *, noise_std: float, n_samples: int, seed: int, batch_size: int
) -> tuple[float, torch.Tensor]:
    """``(p_clean, p [job])``: the clean probability and each job's probability averaged over the noise draws."""
    sites = sorted({site for job in jobs for site, _ in job})
    with _Patcher(modules, sites) as patcher, torch.no_grad():
        patcher.recording = True
        p_clean = float(_probabilities(adapter, fact.batch, fact.answer_token)[0])
        patcher.recording = False
        noise = _noise_draws(fact, seed, n_samples, patcher.width, noise_std)
        patcher.subject_positions = torch.tensor(fact.subject_positions, device=adapter.device)
        n_rows, T = len(jobs) * n_samples, fact.n_tokens
        probs = torch.empty(n_rows)
        for lo in range(0, n_rows, batch_size):
            hi = min(lo + batch_size, n_rows)
            rows = torch.arange(lo, hi)
            patcher.noise = noise[rows % n_samples].to(adapter.device)
            masks: dict[tuple[str, int], torch.Tensor] = {}
            for j in range(lo // n_samples, (hi - 1) // n_samples + 1):
                a, b = max(j * n_samples, lo) - lo, min((j + 1) * n_samples, hi) - lo
                for site, positions in jobs[j]:
                    mask = masks.setdefault(site, torch.zeros(hi - lo, T, dtype=torch.bool))
                    mask[a:b, list(positions)] = True
            patcher.masks = {site: mask.to(adapter.device) for site, mask in masks.items()}
            batch = {key: value.expand(hi - lo, -1) for key, value in fact.batch.items()}
            probs[lo:hi] = _probabilities(adapter, batch, fact.answer_token)
            patcher.noise, patcher.masks = None, {}
    return p_clean, probs.view(len(jobs), n_samples).mean(dim=1)


def _window(kind: str, layer: int, window: int, n_layers: int, position: int) -> _Job:
    if kind == "hidden":  # as the paper's code: a window of layers for MLP and attention outputs only
        return (((kind, layer), (position,)),)
    span = range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
    return tuple(((kind, i), (position,)) for i in span)


@contextmanager
def _evaluating(module: nn.Module):
    """The module in eval mode (no dropout: the runs must differ by the noise alone), its mode restored after."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def _check_options(noise, n_samples, positions, window, batch_size, embedding_std=None) -> None:
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0; got {noise!r}")
    if embedding_std is not None and not (math.isfinite(embedding_std) and embedding_std >= 0):
        raise ValueError(f"embedding_std must be a finite number >= 0; got {embedding_std!r}")
    for name, value in (("n_samples", n_samples), ("window", window), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if positions not in ("last_subject", "all"):
        raise ValueError(f"positions must be 'last_subject' or 'all'; got {positions!r}")


# --------------------------------------------------------------------------------------------------
# The public entry points.
# --------------------------------------------------------------------------------------------------


@dataclass
class CausalTrace:
    """The result of :func:`causal_trace`.

    Per fact ``i``: ``p_clean[i]``, ``p_corrupted[i]`` (tensors ``[fact]``) and ``p_restored[i]``, a tensor
    ``[kind, layer]`` (``positions="last_subject"``: restored at the last subject token) or ``[kind, layer,
    position]`` (``positions="all"``: restored at each token of the prompt in turn); ``subject_positions[i]`` and
    ``tokens[i]`` (the prompt's tokens), ``answer_tokens[i]`` (the measured token's id). Kinds are in ``kinds``'
    order. ``noise_std``: the noise's standard deviation, ``noise * embedding_std``.

    Example::

        trace = causal_trace(adapter, prompts, subjects, answers)
        trace.average_indirect_effect()[trace.kinds.index("mlp")]  # [layer]

    Notes: Meng et al. 2022, §2.1 and Fig. 2 (average indirect effects).
    """

    prompts: list[str]
    subjects: list[str]
    answers: list[str]
    answer_tokens: list[int]
    tokens: list[list[str]]
    subject_positions: list[list[int]]
    p_clean: torch.Tensor
    p_corrupted: torch.Tensor
    p_restored: list[torch.Tensor]
    kinds: tuple[str, ...]
    positions: str
    window: int
    noise: float
    embedding_std: float
    n_samples: int
    seed: int
    module_names: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.p_restored[0].shape[1])

    @property
    def noise_std(self) -> float:
        return self.noise * self.embedding_std

    @property
    def indirect_effects(self) -> list[torch.Tensor]:
        """Per fact, ``p_restored - p_corrupted`` (same shape as ``p_restored[i]``)."""
        return [r - c for r, c in zip(self.p_restored, self.p_corrupted)]

    @property
    def total_effects(self) -> torch.Tensor:
        """``p_clean - p_corrupted`` per fact: what the corruption took away."""
        return self.p_clean - self.p_corrupted

    def position_groups(self, i: int) -> list[list[int]]:
        """Fact ``i``'s token positions in each of :data:`POSITION_GROUPS` (a group may be empty)."""
        subject, n = self.subject_positions[i], len(self.tokens[i])
        first, last = subject[0], subject[-1]
        return [
            [first],
            subject[1:-1],
            [last],
            [last + 1] if last + 1 < n else [],
            list(range(last + 2, n - 1)),
            [n - 1],
        ]

    def average_indirect_effect(self) -> torch.Tensor:
        """The indirect effect averaged over the facts: ``[kind, layer]`` for ``positions="last_subject"``;
        ``[kind, layer, group]`` over :data:`POSITION_GROUPS` for ``positions="all"`` (each fact's mean over the
        group's positions, averaged over the facts that have the group; NaN where none has it)."""
        effects = self.indirect_effects
        if self.positions != "all":
            return torch.stack(effects).mean(dim=0)
        per_fact = []
        for i, effect in enumerate(effects):
            groups = [
                effect[..., g].mean(dim=-1) if g else torch.full(effect.shape[:2], math.nan)
                for g in self.position_groups(i)
            ]
            per_fact.append(torch.stack(groups, dim=-1))
        return torch.stack(per_fact).nanmean(dim=0)

    def to_dict(self) -> dict:
        """JSON-ready: the settings, the average indirect effect per kind and every fact's numbers."""
        average = self.average_indirect_effect()
        facts = []
        for i, effect in enumerate(self.indirect_effects):
            facts.append(
                {
                    "prompt": self.prompts[i],
                    "subject": self.subjects[i],
                    "answer": self.answers[i],
                    "answer_token": self.answer_tokens[i],
                    "tokens": self.tokens[i],
                    "subject_positions": self.subject_positions[i],
                    "p_clean": float(self.p_clean[i]),
                    "p_corrupted": float(self.p_corrupted[i]),
                    "indirect_effect": {k: effect[j].tolist() for j, k in enumerate(self.kinds)},
                }
            )
        return {
            "kinds": list(self.kinds),
            "n_layers": self.n_layers,
            "positions": self.positions,
            "window": self.window,
            "noise": self.noise,
            "embedding_std": self.embedding_std,
            "noise_std": self.noise_std,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "n_facts": len(self.prompts),
            "position_groups": list(POSITION_GROUPS) if self.positions == "all" else None,
            "modules": {k: self.module_names.get((k, 0)) for k in self.kinds},
            "average_p_clean": float(self.p_clean.mean()),
            "average_p_corrupted": float(self.p_corrupted.mean()),
            "average_indirect_effect": {k: average[j].tolist() for j, k in enumerate(self.kinds)},
            "facts": facts,
        }


def causal_trace(
    adapter,
    prompts: Sequence[str],
    subjects: Sequence[str],
    answers: Sequence[str],
    *,
    noise: float = 3.0,
    n_samples: int = 10,
    kinds: Sequence[str] = ("mlp", "attn"),
    positions: str = "last_subject",
    window: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    embedding_std: float | None = None,
    show_progress: bool = False,
) -> CausalTrace:
    """Causal tracing of factual prompts: the indirect effect of each layer's module outputs on the answer.

    Inputs: an adapted causal LM; per fact its prompt, the subject substring of the prompt (its tokens' embeddings
    are noised) and the answer (its first token after the prompt is measured). ``noise``: the noise's standard
    deviation in units of ``embedding_std`` (default: measured over the subjects' token embeddings, see
    :func:`embedding_std`); ``n_samples``: noise draws per fact; ``kinds``: of ``"hidden"``, ``"mlp"``,
    ``"attn"``; ``positions``: restore at the last subject token (``"last_subject"``) or at each token in turn
    (``"all"``); ``window``: MLP and attention outputs are restored over this many consecutive layers around each
    layer (the paper's MLP and attention figures use 10); ``seed``: the noise draws (fact ``i`` draws from
    ``(seed, i)``); ``batch_size``: rows (noise draws times restorations) per forward pass.

    Output: a :class:`CausalTrace` (per-fact probabilities and effects, the subject positions, and
    :meth:`CausalTrace.average_indirect_effect`).

    Example::

        adapter = load_model("smollm2-135m")
        trace = causal_trace(adapter, ["Lyon is a city in the country of"], ["Lyon"], [" France"])
        trace.indirect_effects[0]  # [kind, layer]

    Notes: Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1 (noise 3σ, Fig. 2).
    """
    _check_options(noise, n_samples, positions, window, batch_size, embedding_std)
    modules = trace_modules(adapter)
    kinds = _check_kinds(kinds, modules)
    facts = _facts(adapter, prompts, subjects, answers)
    n = modules.n_layers
    p_clean, p_corrupted, p_restored = [], [], []
    with _evaluating(adapter.module):
        std = _embedding_std(adapter, modules, facts) if embedding_std is None else float(embedding_std)
        for fact in progress(facts, enabled=show_progress, desc="causal trace", unit="fact"):
            spots = range(fact.n_tokens) if positions == "all" else [fact.subject_positions[-1]]
            jobs = [()] + [_window(k, layer, window, n, p) for k in kinds for layer in range(n) for p in spots]
            clean, p = _trace_fact(
                adapter,
                modules,
                fact,
                jobs,
                noise_std=noise * std,
                n_samples=n_samples,
                seed=seed,
                batch_size=batch_size,
            )
            p_clean.append(clean)
            p_corrupted.append(float(p[0]))
            restored = p[1:].view(len(kinds), n, len(spots))
            p_restored.append(restored if positions == "all" else restored[..., 0])
    return CausalTrace(
        prompts=[f.prompt for f in facts],
        subjects=[f.subject for f in facts],
        answers=[f.answer for f in facts],
        answer_tokens=[f.answer_token for f in facts],
        tokens=[f.tokens for f in facts],
        subject_positions=[f.subject_positions for f in facts],
        p_clean=torch.tensor(p_clean, dtype=torch.float64),
        p_corrupted=torch.tensor(p_corrupted, dtype=torch.float64),
        p_restored=[r.double() for r in p_restored],
        kinds=kinds,
        positions=positions,
        window=window,
        noise=float(noise),
        embedding_std=std,
        n_samples=n_samples,
        seed=seed,
        module_names=dict(modules.names),
    )


def restored_probability(
    adapter,
    prompt: str,
    subject: str,
    answer: str,
    restore: Sequence[tuple[str, int, Sequence[int] | None]],
    *,
    noise: float = 3.0,
    n_samples: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    embedding_std: float | None = None,
) -> dict[str, float]:
    """One corrupted run of one fact with any set of module outputs restored at once.

    Inputs: as :func:`causal_trace` for one fact; ``restore``: ``(kind, layer, positions)`` triples, each putting
    that module's clean output back at those token positions (``None``: every position). Output: ``{"p_clean",
    "p_corrupted", "p_restored"}``, with the same noise draws as ``causal_trace`` gives fact 0 under ``seed``.

    Example::

        every = [(k, layer, None) for k in ("hidden",) for layer in range(trace_modules(adapter).n_layers)]
        restored_probability(adapter, "Lyon is a city in the country of", "Lyon", " France", every)
        # p_restored == p_clean: the residual stream is clean again

    Notes: the building block of Meng et al. 2022's causal trace (``trace_with_patch`` in their code).
    """
    _check_options(noise, n_samples, "all", 1, batch_size, embedding_std)
    modules = trace_modules(adapter)
    (fact,) = _facts(adapter, [prompt], [subject], [answer])
    job = []
    for kind, layer, positions in restore:
        if (kind, layer) not in modules.sites:
            raise ValueError(
                f"no {kind!r} module at layer {layer!r} (the model has {modules.n_layers} layers; "
                f"kinds {', '.join(modules.kinds())})"
            )
        spots = tuple(range(fact.n_tokens)) if positions is None else tuple(int(p) for p in positions)
        if any(not 0 <= p < fact.n_tokens for p in spots):
            raise ValueError(f"positions {spots} outside the prompt's {fact.n_tokens} tokens")
        job.append(((kind, layer), spots))
    with _evaluating(adapter.module):
        std = _embedding_std(adapter, modules, [fact]) if embedding_std is None else float(embedding_std)
        clean, p = _trace_fact(
            adapter,
            modules,
            fact,
            [(), tuple(job)],
            noise_std=noise * std,
            n_samples=n_samples,
            seed=seed,
            batch_size=batch_size,
        )
    return {"p_clean": clean, "p_corrupted": float(p[0]), "p_restored": float(p[1])}


def known_facts(adapter, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 32) -> list[bool]:
    """Whether the model's top next-token prediction after each prompt is its answer's first token.

    Inputs: an adapted causal LM, prompts and answers. Output: one bool per prompt.

    Example::

        keep = known_facts(adapter, ds["text"], [" " + t for t in ds["target"]])

    Notes: Meng et al. 2022 trace only such "known facts" (their §2.1 data set).
    """
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"one answer per prompt: got {len(prompts)} prompts and {len(answers)} answers")
    known = []
    with _evaluating(adapter.module), torch.no_grad():
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo : lo + batch_size]
            top = adapter.prediction_logits(adapter.tokenize(chunk)).argmax(dim=-1).tolist()
            for prompt, answer, predicted in zip(chunk, answers[lo : lo + batch_size], top):
                tokens = adapter.continuation_token_ids(prompt, answer) if answer else []
                known.append(bool(tokens) and tokens[0] == predicted)
    return known
