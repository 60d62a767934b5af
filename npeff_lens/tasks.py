"""Tasks say what a model's output distribution p(y|x) is for a prompt, and which outputs' gradients form each
example's PEF.

The paper's tasks are in App. E; the PEF's rows are §2.1.

A task turns an example's text into a prompt, gives the log-probabilities of its outcome set
(``log_probs``: a differentiable ``[batch, outcomes]``), and the ``pef_rows``: the scalars per example
whose gradients are the rows of the LRM-PEF ``G(x)`` (§2.1):

- ``LabelTokens``: a categorical over the first token of each label (App. E.1); rows
  ``stop_grad(sqrt p_i) log p_i``, whose gradients are ``sqrt(p_i) ∇ log p_i``.
- ``ClassifierHead``: the model's own classification head; same rows.
- ``NextToken``: the whole next-token vocabulary, with the expectation projection of §2.1.2 / App. B:
  rows ``A q``, ``q_i = stop_grad(sqrt p_i) log p_i``, ``A`` an ``r' x |V|`` seeded random matrix
  with ``E[A^T A] = I``.

The collector differentiates any per-example set of scalars, so other row sets (e.g. gradient
clustering's ``log p(argmax | x)``, ``rows="prediction"``) plug in the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from .errors import SettingError, literal


class Task:
    kind = "task"
    n_outcomes_hint = None

    def __init__(self, template: str = "{text}", rows: str = "fisher"):
        if "{text}" not in template:
            raise ValueError(f"the template must contain '{{text}}' where the example goes; got {template!r}")
        if rows not in ("fisher", "prediction"):
            raise ValueError(
                f"rows must be 'fisher' (LRM-PEF) or 'prediction' (gradient of log p(argmax)); got {rows!r}"
            )
        self.template = template
        self.rows = rows

    # --- prompts ---------------------------------------------------------------------------
    def format(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def prompts(self, texts: Sequence[str]) -> list[str]:
        return [self.format(t) for t in texts]

    def fitted_prompts(
        self, tokenizer, texts: Sequence[str], max_length: int | None, *, prefix: str = ""
    ) -> tuple[list[str], list[int]]:
        """``(prompts, text_tokens_cut)``: ``prefix + format(text)`` per text, in at most ``max_length`` tokens as
        ``tokenizer`` counts them (special tokens such as a BOS included), and how many tokens of each text were
        removed (0: none).

        A prompt too long loses tokens from the end of its *text* (the text tokenised alone), never from the
        template or ``prefix``: the template's tail, where the prediction is read, survives. The kept text is the
        original's beginning up to its kept tokens (their character offsets with a fast tokenizer, else their
        decoding); the prompt is tokenised again and shortened further while it still exceeds ``max_length``
        (decoding and tokenising are not always a round trip). ``max_length=None`` keeps every token. A
        ValueError when ``prefix`` and the template alone exceed ``max_length``."""
        texts = list(texts)
        prompts = [prefix + self.format(t) for t in texts]
        cuts = [0] * len(texts)
        if max_length is None or not texts:
            return prompts, cuts
        if tokenizer is None:
            raise ValueError(
                "fitting prompts in max_length tokens needs the model's tokenizer; pass one to "
                "npeff_lens.adapt(model, tokenizer)"
            )
        lengths = _token_counts(tokenizer, prompts)
        over = [i for i, n in enumerate(lengths) if n > max_length]
        if not over:
            return prompts, cuts
        frame = _token_counts(tokenizer, [prefix + self.format("")])[0]
        if frame > max_length:
            what = "the demonstrations and the prompt template" if prefix else f"the prompt template {self.template!r}"
            remedy = "use fewer or shorter demonstrations" if prefix else "raise max_length or shorten the template"
            raise ValueError(
                f"{what} alone {'are' if prefix else 'is'} {frame} tokens (special tokens included), more than "
                f"max_length={max_length}: no text fits; {remedy}"
            )
        for i in over:
            ids, cut_at = _text_tokens(tokenizer, texts[i])
            keep = max(0, len(ids) - (lengths[i] - max_length))
            while True:
                prompts[i] = prefix + self.format(cut_at(keep))
                n = _token_counts(tokenizer, [prompts[i]])[0]
                if n <= max_length or keep == 0:  # with no text left, the template alone fits (checked above)
                    break
                keep = max(0, keep - (n - max_length))
            cuts[i] = len(ids) - keep
        return prompts, cuts

    # --- distribution ----------------------------------------------------------------------
    def bind(self, adapter) -> Task:
        """Resolve anything model-specific (token ids); validates the task against the model."""
        return self

    def log_probs(self, adapter, batch) -> torch.Tensor:
        """Differentiable ``[batch, outcomes]`` log p(y|x) over the task's outcome set."""
        raise NotImplementedError

    @property
    def n_rows(self) -> int:
        raise NotImplementedError

    def pef_rows(self, log_probs: torch.Tensor) -> torch.Tensor:
        """``[batch, n_rows]`` scalars whose per-example gradients are the LRM-PEF rows."""
        if self.rows == "prediction":  # gradient clustering (§5.1): ∇ log p(argmax | x)
            return log_probs.gather(-1, log_probs.argmax(-1, keepdim=True))
        return log_probs.exp().sqrt().detach() * log_probs

    def outcome_names(self) -> list[str] | None:
        return None

    def config(self) -> dict:
        return {"kind": self.kind, "template": self.template, "rows": self.rows}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class LabelTokens(Task):
    """A categorical over the first token of each label string, tokenised the way it follows the
    prompt (leading space included), renormalised: the softmax of those logits (App. E.1).

    A label of several tokens is refused with a message naming its tokens (its probability is not one
    logit), unless ``multi_token="first"``: then its first token stands for it, the paper's rule (App. E.1:
    the first token of " Negative" / " Positive"), with a warning. A label without the leading space the
    prompt implies gets a warning that shows its tokens."""

    kind = "label-tokens"

    def __init__(self, template: str, labels: Sequence[str], rows: str = "fisher", multi_token: str = "error"):
        super().__init__(template, rows)
        labels = list(labels)
        if len(labels) < 2:
            raise ValueError(f"LabelTokens needs at least two labels, got {labels!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {labels!r}")
        if multi_token not in ("error", "first"):
            raise ValueError(f"multi_token must be 'error' or 'first', got {multi_token!r}")
        self.labels = labels
        self.multi_token = multi_token
        self.token_ids: list[int] | None = None

    def bind(self, adapter):
        probe = self.format("x")
        ids = []
        for label in self.labels:
            toks = adapter.continuation_token_ids(probe, label)
            pieces = [adapter.tokenizer.decode([t]) for t in toks]
            if not toks:
                raise ValueError(f"label {label!r} tokenises to nothing after the prompt")
            if len(toks) > 1:
                message = (
                    f"label {label!r} is {len(toks)} tokens after the prompt ({pieces}), so its probability is "
                    f"not one logit"
                )
                if self.multi_token == "error":
                    raise SettingError(
                        literal(message) + "; use a single-token label, or {label_first_token} to let its first "
                        f"token {literal(repr(pieces[0]))} stand for it as in the paper's App. E.1",
                        label_first_token="multi_token='first'",
                    )
                warnings.warn(
                    message + f"; its first token {pieces[0]!r} stands for it (App. E.1); use single-token labels "
                    "to model exactly the label you typed",
                    UserWarning,
                    stacklevel=2,
                )
            if not label[:1].isspace() and probe[-1:] not in ("", " ", "\n", "\t"):
                warnings.warn(
                    f"label {label!r} has no leading space after a prompt ending in {probe[-12:]!r}; it tokenises as "
                    f"{pieces} — did you mean {' ' + label!r}?",
                    UserWarning,
                    stacklevel=2,
                )
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            first = {l: adapter.tokenizer.decode([i]) for l, i in zip(self.labels, ids)}
            raise ValueError(f"two labels share a first token, so p(y|x) cannot tell them apart: {first}")
        self.token_ids = ids
        return self

    def log_probs(self, adapter, batch):
        if self.token_ids is None:
            self.bind(adapter)
        logits = adapter.prediction_logits(batch)
        return logits[:, self.token_ids].float().log_softmax(-1)

    @property
    def n_rows(self):
        return 1 if self.rows == "prediction" else len(self.labels)

    def outcome_names(self):
        return list(self.labels)

    def config(self):
        extra = {"multi_token": self.multi_token} if self.multi_token != "error" else {}
        return {**super().config(), "labels": list(self.labels), **extra}


class ClassifierHead(Task):
    """The model's own classification head (e.g. an NLI classifier): p(y|x) = softmax(head logits)."""

    kind = "classifier-head"

    def __init__(self, template: str = "{text}", rows: str = "fisher"):
        super().__init__(template, rows)
        self.num_labels: int | None = None
        self.label_names: list[str] | None = None

    def bind(self, adapter):
        if not adapter.is_classifier:
            raise ValueError("ClassifierHead needs a sequence-classification model (its head defines p(y|x))")
        cfg = adapter.module.config
        self.num_labels = int(cfg.num_labels)
        id2label = getattr(cfg, "id2label", None) or {}
        self.label_names = [str(id2label.get(i, i)) for i in range(self.num_labels)]
        return self

    def log_probs(self, adapter, batch):
        if self.num_labels is None:
            self.bind(adapter)
        return adapter.prediction_logits(batch).float().log_softmax(-1)

    @property
    def n_rows(self):
        if self.num_labels is None and self.rows == "fisher":
            raise ValueError("bind the task to a model first (the number of classes comes from its head)")
        return 1 if self.rows == "prediction" else self.num_labels

    def outcome_names(self):
        return self.label_names


class NextToken(Task):
    """The whole next-token distribution, with the expectation projection (§2.1.2, App. B).

    ``expectation_projections`` (r') rows ``A q``; ``A`` is r' x |V|, seeded: ``"gaussian"`` entries
    N(0, 1/r') (so E[A^T A] = I), or ``"orthogonal"`` (orthonormal columns scaled by sqrt(|V|/r'):
    with r' = |V| it is an orthogonal matrix and the PEF is exact).
    """

    kind = "next-token"

    def __init__(
        self,
        template: str = "{text}",
        expectation_projections: int = 16,
        seed: int = 0,
        projection: str = "gaussian",
        rows: str = "fisher",
    ):
        super().__init__(template, rows)
        if expectation_projections < 1:
            raise ValueError("expectation_projections must be >= 1")
        if projection not in ("gaussian", "orthogonal"):
            raise ValueError(f"projection must be 'gaussian' or 'orthogonal', got {projection!r}")
        self.expectation_projections = int(expectation_projections)
        self.seed = int(seed)
        self.projection = projection
        self._A: torch.Tensor | None = None

    def expectation_matrix(self, vocab: int, device="cpu") -> torch.Tensor:
        """The seeded r' x |V| matrix A (fp32)."""
        if self._A is None or self._A.shape[1] != vocab:
            g = torch.Generator().manual_seed(self.seed)
            r = self.expectation_projections
            if self.projection == "gaussian":
                A = torch.randn(r, vocab, generator=g) / math.sqrt(r)
            else:
                if r > vocab:
                    raise ValueError(f"an orthogonal expectation projection needs r' <= |V| ({r} > {vocab})")
                q, _ = torch.linalg.qr(torch.randn(vocab, r, generator=g, dtype=torch.float64))
                A = (q.T * math.sqrt(vocab / r)).float() if r < vocab else q.T.float()
            self._A = A
        return self._A.to(device)

    def log_probs(self, adapter, batch):
        return adapter.prediction_logits(batch).float().log_softmax(-1)

    @property
    def n_rows(self):
        return 1 if self.rows == "prediction" else self.expectation_projections

    def pef_rows(self, log_probs):
        if self.rows == "prediction":
            return super().pef_rows(log_probs)
        q = log_probs.exp().sqrt().detach() * log_probs
        return q @ self.expectation_matrix(log_probs.shape[-1], log_probs.device).T

    def config(self):
        return {
            **super().config(),
            "expectation_projections": self.expectation_projections,
            "seed": self.seed,
            "projection": self.projection,
        }


TASKS = {cls.kind: cls for cls in (LabelTokens, ClassifierHead, NextToken)}


def task_from_config(config: dict) -> Task:
    config = dict(config)
    kind = config.pop("kind")
    if kind not in TASKS:
        raise ValueError(f"unknown task kind {kind!r}; valid: {', '.join(TASKS)}")
    return TASKS[kind](**config)


def _token_counts(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Tokens per prompt, special tokens included (as ``ModelAdapter.tokenize`` adds them)."""
    # verbose=False: no "longer than the model's maximum" note on prompts about to be shortened
    return [len(ids) for ids in tokenizer(list(prompts), verbose=False)["input_ids"]]


def _text_tokens(tokenizer, text: str):
    """``(ids, cut_at)``: the text's tokens alone (no special tokens), and ``cut_at(keep)``, the text up to its first
    ``keep`` tokens: the original characters up to their end offset (fast tokenizers), else their decoding."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ends = [end for _, end in enc["offset_mapping"]]
        return enc["input_ids"], lambda keep: text[: max(ends[:keep], default=0)]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids, lambda keep: tokenizer.decode(ids[:keep]) if keep else ""


def shortened_note(text_tokens_cut: Sequence[int], max_length: int | None, what: str = "inputs") -> str | None:
    """One line on the texts :meth:`Task.fitted_prompts` shortened (``text_tokens_cut``: its counts), None when it
    shortened none."""
    cut = [int(c) for c in text_tokens_cut if c]
    if not cut:
        return None
    lo, hi = min(cut), max(cut)
    by = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return (
        f"{len(cut)} of {len(text_tokens_cut)} {what} {'was' if len(cut) == 1 else 'were'} longer than "
        f"max_length={max_length} tokens: {'its' if len(cut) == 1 else 'their'} text was shortened by {by} "
        f"token{'s' if hi > 1 else ''} (the template kept); max_length=None keeps every token"
    )
