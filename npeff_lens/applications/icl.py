"""Comparing the processing strategies of zero-shot prediction with in-context learning, through a classifier
built from component tunings.

This is the paper's application of §6.2.

**The tuning classifier.** On a zero-shot decomposition, find the components whose top ``k`` examples share a
ground-truth label at least ``threshold`` of the time (§6.2: 75% of the top 16), build the ``n_classes ×
n_components`` indicator matrix with a one where a component is tuned to a class, and score an example by its
coefficient vector times that matrix: the class with the highest weighted score of label-tuned processing
strategies is the prediction (:class:`TuningClassifier`, scikit-learn shaped).

**ICL** (Zhang et al. 2022's best-of-N): draw ``n_prompts`` random ``shots``-example demonstration prefixes from the
training examples, keep the one with the best accuracy on a selection subset of the training examples (disjoint
from the demonstrations' pool), and predict the evaluation examples with it (:func:`best_of_n_icl`). A ``k``-shot
prompt is the task's template applied to each demonstration followed by its label word, joined by newlines, then
the query in the template::

    Review: <demo 1>\\nSentiment: positive\\nReview: <demo 2>\\nSentiment: negative\\nReview: <query>\\nSentiment:

(``label_words[y]`` is appended verbatim: for :class:`~npeff_lens.tasks.LabelTokens` they default to the task's
labels, leading space included). Predictions are ``argmax_y p(y|x)`` over the task's outcomes, labels are outcome
indices, for ICL and zero-shot alike.

**The comparison** (:func:`icl_experiment`): accuracies of the zero-shot model, the ICL model and the tuning
classifier, and their pairwise :func:`agreement` (paper, SST-2 with SmolLM2-135M and 512 components: classifier
87.6%, zero-shot 66.1%, ICL 87.5%; classifier–ICL agreement 87.6%, zero-shot–ICL 68.9%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..analysis import tunings
from ..errors import NotFittedError
from ..io import progress as progress_bar
from ..io import to_jsonable
from ..perturb import task_log_probs
from ..tasks import shortened_note

__all__ = [
    "TuningClassifier",
    "icl_prefix",
    "icl_prompts",
    "zero_shot_predictions",
    "ICLResult",
    "best_of_n_icl",
    "agreement",
    "icl_experiment",
    "format_table",
]


# --------------------------------------------------------------------------------------------------
# The tuning classifier.
# --------------------------------------------------------------------------------------------------


def _not_fitted(what: str) -> NotFittedError:
    return NotFittedError(f"this TuningClassifier is not fitted yet; call fit before {what}")


def _coefficients(coefficients) -> torch.Tensor:
    c = torch.as_tensor(np.asarray(coefficients) if not isinstance(coefficients, torch.Tensor) else coefficients)
    if c.ndim != 2:
        raise ValueError(f"coefficients must be [m, C]; got shape {tuple(c.shape)}")
    c = c.detach().double().cpu()
    if not bool(torch.isfinite(c).all()):
        raise ValueError("coefficients contain NaN/inf")
    return c


def _labels(labels, m: int) -> np.ndarray:
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or len(y) != m:
        raise ValueError(f"labels must be a 1-D sequence of {m} labels (one per example); got shape {y.shape}")
    return y


class TuningClassifier:
    """Predicts a class from NPEFF coefficients through the components tuned to a label (§6.2).

    Parameters
    ----------
    threshold : float, default 0.75
        A component is tuned to a label when at least this fraction of its top ``k`` examples have it.
    k : int, default 16
        Top examples per component. Only active coefficients count: a component with fewer than ``k``
        active examples is not tuned (see :func:`npeff_lens.analysis.tunings`).

    Attributes
    ----------
    classes_ : ndarray [n_classes]
        The distinct training labels, sorted (any labels ``np.unique`` sorts: ints, strings).
    indicator_ : Tensor [n_classes, C]
        One at ``(class, component)`` where the component is tuned to the class, else zero.
    tuned_components_ : LongTensor [n_tuned]
        The tuned components, ascending.
    component_labels_ : list [C]
        Per component, the label it is tuned to, or ``None``.
    fallback_class_ :
        The majority class of the training labels (the first in ``classes_`` on a tie): the prediction for an
        example whose score is zero for every class (no coefficient on any tuned component).
    n_features_in_ : int
        C, the number of components.
    n_unscored_ : int
        How many examples of the last :meth:`predict` call got the fallback class (0 after ``fit``).

    ``predict`` returns the class with the highest score ``coefficients @ indicator_.T``; on a tie between classes,
    the first in ``classes_`` order. ``fit`` raises a ValueError when no component is tuned.
    """

    def __init__(self, threshold: float = 0.75, k: int = 16):
        self.threshold = threshold
        self.k = k

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"threshold": self.threshold, "k": self.k}

    def set_params(self, **params) -> TuningClassifier:
        for name, value in params.items():
            if name not in ("threshold", "k"):
                raise ValueError(f"invalid parameter {name!r} for TuningClassifier; valid: threshold, k")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"TuningClassifier(threshold={self.threshold!r}, k={self.k!r})"

    def fit(self, coefficients, labels) -> TuningClassifier:
        """``coefficients [m, C]`` (non-negative, e.g. ``NPEFF.coefficients_``) and ``labels [m]``."""
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1]; got {self.threshold}")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be a positive integer; got {self.k}")
        c = _coefficients(coefficients)
        y = _labels(labels, c.shape[0])
        if len(y) == 0:
            raise ValueError("no training examples")
        classes, counts = np.unique(y, return_counts=True)
        tuning = tunings(c, y.tolist(), k=int(self.k), threshold=self.threshold)
        tuned = [j for j, t in enumerate(tuning) if t is not None]
        if not tuned:
            raise ValueError(
                f"no component is tuned to a label: none of the {c.shape[1]} components has >= {self.threshold:.0%} "
                f"of its top {self.k} examples (active ones) sharing one; lower threshold or k, or use "
                "a decomposition with more components"
            )
        index = {v: i for i, v in enumerate(classes.tolist())}
        indicator = torch.zeros(len(classes), c.shape[1], dtype=torch.float64)
        for j in tuned:
            indicator[index[tuning[j]], j] = 1.0
        self.classes_ = classes
        self.indicator_ = indicator
        self.tuned_components_ = torch.tensor(tuned, dtype=torch.long)
        self.component_labels_ = tuning
        self.fallback_class_ = classes[int(np.argmax(counts))]
        self.n_features_in_ = c.shape[1]
        self.n_unscored_ = 0
        return self

    def _check(self, coefficients, what: str) -> torch.Tensor:
        if not hasattr(self, "indicator_"):
            raise _not_fitted(what)
        c = _coefficients(coefficients)
        if c.shape[1] != self.n_features_in_:
            raise ValueError(
                f"coefficients have {c.shape[1]} components; the classifier was fitted on {self.n_features_in_}"
            )
        return c

    def class_scores(self, coefficients) -> torch.Tensor:
        """``[n, n_classes]`` (fp64): ``coefficients @ indicator_.T``, the summed coefficients of each class's
        tuned components."""
        return self._check(coefficients, "class_scores") @ self.indicator_.T

    def unscored(self, coefficients) -> torch.Tensor:
        """Bool ``[n]``: examples whose score is zero for every class (they get ``fallback_class_``)."""
        return self.class_scores(coefficients).amax(1) <= 0

    def predict(self, coefficients) -> np.ndarray:
        """``[n]`` labels from ``classes_`` (see the class docstring for ties and unscored examples)."""
        scores = self.class_scores(coefficients)
        idx = scores.argmax(1).numpy()  # the first maximum: ties go to the first class
        pred = self.classes_[idx]
        unscored = (scores.amax(1) <= 0).numpy()
        pred[unscored] = self.fallback_class_
        self.n_unscored_ = int(unscored.sum())
        return pred

    def score(self, coefficients, labels) -> float:
        """Accuracy of :meth:`predict` against ``labels``."""
        pred = self.predict(coefficients)
        return float(np.mean(pred == _labels(labels, len(pred))))


# --------------------------------------------------------------------------------------------------
# Prompts and predictions.
# --------------------------------------------------------------------------------------------------


def _label_words(task, label_words) -> list[str]:
    words = task.outcome_names() if label_words is None else label_words
    if words is None:
        raise ValueError("the task names no outcomes: pass label_words (the word appended for each label)")
    return list(words)


def _label_indices(labels, n_words: int, what: str) -> list[int]:
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or (len(y) and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D sequence of integer labels (outcome indices)")
    if len(y) and (y.min() < 0 or y.max() >= n_words):
        raise ValueError(f"{what} must be outcome indices in [0, {n_words}); got values {sorted(set(y.tolist()))[:6]}")
    return [int(v) for v in y]


def icl_prefix(task, texts: Sequence[str], labels, label_words=None, *, separator: str = "\n") -> str:
    """The demonstrations: ``task.format(text) + label_words[label]`` each, joined by ``separator``, plus a
    trailing ``separator`` (the query follows)."""
    words = _label_words(task, label_words)
    labels = _label_indices(labels, len(words), "labels")
    if len(labels) != len(texts):
        raise ValueError(f"{len(texts)} demonstration texts but {len(labels)} labels")
    return "".join(task.format(t) + words[y] + separator for t, y in zip(texts, labels))


def icl_prompts(
    task,
    texts: Sequence[str],
    demonstration_texts: Sequence[str],
    demonstration_labels,
    label_words=None,
    *,
    separator: str = "\n",
) -> list[str]:
    """``k``-shot prompts for ``texts``: :func:`icl_prefix` of the demonstrations, then ``task.format(text)``."""
    prefix = icl_prefix(task, demonstration_texts, demonstration_labels, label_words, separator=separator)
    return [prefix + task.format(t) for t in texts]


def zero_shot_predictions(
    adapter, task, texts: Sequence[str], *, batch_size: int = 32, max_length: int | None = None
) -> torch.Tensor:
    """``[n]`` outcome indices ``argmax_y p(y|x)`` of the prompts ``task.prompts(texts)``, each in at most
    ``max_length`` tokens as the collection fits them (:meth:`~npeff_lens.tasks.Task.fitted_prompts`)."""
    task.bind(adapter)
    prompts, _ = task.fitted_prompts(adapter.tokenizer, list(texts), max_length)
    return task_log_probs(adapter, task, prompts, batch_size=batch_size).argmax(-1)


def agreement(a, b) -> float:
    """Fraction of positions where the predictions ``a`` and ``b`` agree (any labels; equal lengths)."""
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two 1-D prediction sequences of the same length; got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("no predictions to compare")
    return float(np.mean(a == b))


# --------------------------------------------------------------------------------------------------
# Best-of-N ICL.
# --------------------------------------------------------------------------------------------------


@dataclass
class ICLResult:
    """What :func:`best_of_n_icl` returns.

    ``prefix``: the chosen demonstrations (:func:`icl_prefix`); ``demonstrations``: their indices in the training
    examples; ``selection``: the selection subset's indices; ``selection_accuracies``: ``[n_prompts]`` accuracy
    of each drawn prefix on it; ``best``: the chosen prefix's draw; ``predictions``: ``[n_eval]`` outcome indices;
    ``log_probs``: ``[n_eval, outcomes]``; ``accuracy``: on the evaluation examples (``None`` without labels);
    ``text_tokens_cut``: per evaluation example, the tokens its text lost so that the prompt fits ``max_length``
    (:meth:`~npeff_lens.tasks.Task.fitted_prompts`); ``shortened``: a line saying so (None when none lost any).
    """

    prefix: str
    demonstrations: list[int]
    selection: list[int]
    selection_accuracies: list[float]
    best: int
    predictions: torch.Tensor
    log_probs: torch.Tensor
    accuracy: float | None = None
    text_tokens_cut: list[int] | None = None
    shortened: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, without the log-probs."""
        keys = ("prefix", "demonstrations", "selection_accuracies", "best", "accuracy", "shortened")
        d = {k: getattr(self, k) for k in keys}
        d["selection_accuracy"] = self.selection_accuracies[self.best]
        d["n_selection"] = len(self.selection)
        d["predictions"] = self.predictions.tolist()
        return to_jsonable(d)


def _accuracy(log_probs: torch.Tensor, labels: Sequence[int]) -> float:
    return float((log_probs.argmax(-1) == torch.tensor(labels)).double().mean())


def best_of_n_icl(
    adapter,
    task,
    train_texts: Sequence[str],
    train_labels,
    label_words,
    eval_texts: Sequence[str],
    eval_labels=None,
    *,
    shots: int = 6,
    n_prompts: int = 50,
    n_select: int = 1024,
    seed: int = 0,
    batch_size: int = 16,
    separator: str = "\n",
    progress: bool = False,
    max_length: int | None = None,
) -> ICLResult:
    """The best of ``n_prompts`` random ``shots``-shot prefixes (§6.2, Zhang et al. 2022), and its predictions.

    ``n_select`` training examples (drawn at random) form the selection subset; each prefix's demonstrations are
    drawn at random from the other training examples. The prefix with the highest accuracy on the selection
    subset wins (the earliest draw on a tie) and predicts ``eval_texts``. ``train_labels`` / ``eval_labels``:
    outcome indices; ``label_words``: the word appended after each demonstration per label (``None``: the task's
    outcome names). Deterministic given ``seed``. See the module docstring for the prompt format. ``max_length``:
    the most tokens of a prompt, the demonstrations and the query together (e.g. the model's context length): a
    query too long loses tokens from its text's end (:meth:`~npeff_lens.tasks.Task.fitted_prompts`, the
    demonstrations and the template kept), and demonstrations that alone exceed it are an error; None: no limit.
    """
    words = _label_words(task, label_words)
    train_texts, eval_texts = list(train_texts), list(eval_texts)
    y = _label_indices(train_labels, len(words), "train_labels")
    if len(y) != len(train_texts):
        raise ValueError(f"{len(train_texts)} training texts but {len(y)} labels")
    if shots < 1 or n_prompts < 1 or n_select < 1:
        raise ValueError(f"shots, n_prompts and n_select must be >= 1; got {shots}, {n_prompts}, {n_select}")
    if n_select + shots > len(train_texts):
        raise ValueError(
            f"{len(train_texts)} training examples cannot hold a selection subset of {n_select} and {shots} "
            "demonstrations outside it: lower n_select or shots"
        )
    if not eval_texts:
        raise ValueError("no evaluation texts")
    task.bind(adapter)
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(train_texts), generator=gen).tolist()
    selection, pool = order[:n_select], order[n_select:]
    draws = [[pool[i] for i in torch.randperm(len(pool), generator=gen)[:shots].tolist()] for _ in range(n_prompts)]
    accuracies = []
    for demos in progress_bar(draws, desc="icl prompts", unit="prompt", enabled=progress):
        prefix = icl_prefix(task, [train_texts[i] for i in demos], [y[i] for i in demos], words, separator=separator)
        prompts, _ = task.fitted_prompts(
            adapter.tokenizer, [train_texts[i] for i in selection], max_length, prefix=prefix
        )
        lp = task_log_probs(adapter, task, prompts, batch_size=batch_size)
        accuracies.append(_accuracy(lp, [y[i] for i in selection]))
    best = int(np.argmax(accuracies))  # the first maximum
    demos = draws[best]
    prefix = icl_prefix(task, [train_texts[i] for i in demos], [y[i] for i in demos], words, separator=separator)
    prompts, cut = task.fitted_prompts(adapter.tokenizer, eval_texts, max_length, prefix=prefix)
    lp = task_log_probs(adapter, task, prompts, batch_size=batch_size)
    acc = None
    if eval_labels is not None:
        ey = _label_indices(eval_labels, len(words), "eval_labels")
        if len(ey) != len(eval_texts):
            raise ValueError(f"{len(eval_texts)} evaluation texts but {len(ey)} labels")
        acc = _accuracy(lp, ey)
    shortened = shortened_note(cut, max_length, "in-context queries")
    return ICLResult(prefix, demos, selection, accuracies, best, lp.argmax(-1), lp, acc, cut, shortened)


# --------------------------------------------------------------------------------------------------
# The comparison (§6.2).
# --------------------------------------------------------------------------------------------------


def icl_experiment(
    adapter,
    task,
    train_texts: Sequence[str],
    train_labels,
    train_coefficients,
    eval_texts: Sequence[str],
    eval_labels,
    eval_coefficients,
    *,
    label_words=None,
    threshold: float = 0.75,
    k: int = 16,
    shots: int = 6,
    n_prompts: int = 50,
    n_select: int = 1024,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    max_length: int | None = None,
    icl_max_length: int | None = None,
) -> dict[str, Any]:
    """Tuning classifier vs zero-shot vs best-of-N ICL on the evaluation examples (§6.2), JSON-able.

    The classifier is fitted on the training examples' coefficients ``[m, C]`` and labels (the decomposition's
    examples); ``eval_coefficients`` ``[n, C]`` are the evaluation examples' (the decomposition's own for the
    paper's held-in protocol, or ``NPEFF.transform`` of held-out PEFs). Labels are outcome indices. Returns
    ``accuracy`` (``classifier``, ``zero_shot``, ``icl``), ``agreement`` (``classifier_icl``, ``zero_shot_icl``,
    ``classifier_zero_shot``), ``classifier`` (``n_tuned``, ``tuned_components``, ``component_labels``,
    ``n_unscored``), ``icl`` (:meth:`ICLResult.as_dict` without predictions), ``predictions`` per method, and the
    sizes and settings. ``max_length``: the zero-shot prompts' (the collection's, so that they read what it read);
    ``icl_max_length``: the in-context prompts' (demonstrations and query, :func:`best_of_n_icl`).
    """
    eval_texts = list(eval_texts)
    ey = _label_indices(eval_labels, len(_label_words(task.bind(adapter), label_words)), "eval_labels")
    if len(ey) != len(eval_texts):
        raise ValueError(f"{len(eval_texts)} evaluation texts but {len(ey)} labels")
    clf = TuningClassifier(threshold=threshold, k=k).fit(train_coefficients, train_labels)
    ec = _coefficients(eval_coefficients)
    if ec.shape[0] != len(eval_texts):
        raise ValueError(f"{len(eval_texts)} evaluation texts but {ec.shape[0]} rows of eval_coefficients")
    pred = {"classifier": clf.predict(ec).tolist()}
    n_unscored = clf.n_unscored_
    pred["zero_shot"] = zero_shot_predictions(
        adapter, task, eval_texts, batch_size=batch_size, max_length=max_length
    ).tolist()
    icl = best_of_n_icl(
        adapter,
        task,
        train_texts,
        train_labels,
        label_words,
        eval_texts,
        ey,
        shots=shots,
        n_prompts=n_prompts,
        n_select=n_select,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        max_length=icl_max_length,
    )
    pred["icl"] = icl.predictions.tolist()
    icl_info = icl.as_dict()
    icl_info.pop("predictions")
    return to_jsonable(
        {
            "n_train": len(list(train_texts)),
            "n_eval": len(eval_texts),
            "accuracy": {name: agreement(p, ey) for name, p in pred.items()},
            "agreement": {
                "classifier_icl": agreement(pred["classifier"], pred["icl"]),
                "zero_shot_icl": agreement(pred["zero_shot"], pred["icl"]),
                "classifier_zero_shot": agreement(pred["classifier"], pred["zero_shot"]),
            },
            "classifier": {
                "n_tuned": len(clf.tuned_components_),
                "tuned_components": clf.tuned_components_.tolist(),
                "component_labels": clf.component_labels_,
                "n_unscored": n_unscored,
                "fallback_class": clf.fallback_class_,
            },
            "icl": icl_info,
            "predictions": pred,
            "config": {
                "threshold": threshold,
                "k": k,
                "shots": shots,
                "n_prompts": n_prompts,
                "n_select": n_select,
                "seed": seed,
            },
        }
    )


def format_table(result: dict[str, Any]) -> str:
    """The accuracies and agreements of :func:`icl_experiment`, as printed by the benchmark and the CLI."""
    acc, agr, clf = result["accuracy"], result["agreement"], result["classifier"]
    icl = result["icl"]
    return "\n".join(
        [
            f"{'method':<22}{'accuracy':>9}  {'agreement with ICL':>18}",
            f"{'tuning classifier':<22}{acc['classifier']:>9.3f}  {agr['classifier_icl']:>18.3f}",
            f"{'zero-shot':<22}{acc['zero_shot']:>9.3f}  {agr['zero_shot_icl']:>18.3f}",
            f"{'ICL (best of N)':<22}{acc['icl']:>9.3f}  {1.0:>18.3f}",
            f"classifier vs zero-shot agreement {agr['classifier_zero_shot']:.3f}; {clf['n_tuned']} tuned components "
            f"{clf['tuned_components']}; {clf['n_unscored']} of {result['n_eval']} evaluation examples unscored "
            f"(predicted {clf['fallback_class']!r}); ICL prefix: best of {len(icl['selection_accuracies'])}, "
            f"selection accuracy {icl['selection_accuracy']:.3f} on {icl['n_selection']}",
        ]
    )
