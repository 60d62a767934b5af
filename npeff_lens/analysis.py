"""Reading a decomposition's coefficients: top examples, tunings, similarity between decompositions, and the
metrics that compare NPEFF with its baselines.

Tunings are §3.1 of the paper, the comparison with the baselines §5.

All functions take non-negative coefficients "example component" ``[m, C]`` (torch or numpy) and need torch
alone. One set of metrics serves every method: NPEFF's ``coefficients_`` (dense), gradient clusters'
``coefficients_`` (one non-zero per example: closeness to its centroid, §5.1) and SAE latents (sparse, with
dead columns, §5.2). A component's *top examples* are its ``k`` largest coefficients; only *active* coefficients
count (:func:`active`: above :data:`ACTIVE_FRACTION` of the component's maximum; the order among inactive ones is
arbitrary), and a component is *alive* when at least ``min_examples`` examples are active on it (§5.2 discards SAE
latents with fewer than 16).

One meaning of *active* for every method and every page (compare's warnings, the report's share, tunings, top
examples, ``npeff explain``): relative to each component's own scale, since NPEFF's coefficients (on unit-norm
PEFs), cluster closeness (in (0, 1]) and SAE / SNMF activations (the hook's units) share none. NPEFF's
multiplicative W updates (App. D.1) shrink a coefficient geometrically without ever reaching zero, leaving values
like 1e-30 that are not loadings; any fixed threshold at or below the estimator's dead-column 1e-8 counts them.

:func:`method_summary` is the row that ``npeff compare`` prints per method. The one causal test shared by every
method, selectivity (a component's own top examples vs random ones under an intervention sized to a target KL),
needs the model and lives in :mod:`npeff_lens.selectivity`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Hashable, Sequence
from typing import Any

import torch

__all__ = [
    "ACTIVE_FRACTION",
    "ACTIVE_DEFINITION",
    "active_threshold",
    "active",
    "active_share",
    "top_examples",
    "tunings",
    "tuned_fraction",
    "tuning_summary",
    "decomposition_similarity",
    "alive",
    "argmax_shared",
    "argmax_shared_fraction",
    "token_tunings",
    "token_tuned",
    "coverage",
    "method_summary",
    "degeneracy",
]


def _coefficients(coefficients) -> torch.Tensor:
    c = torch.as_tensor(coefficients)
    if c.ndim != 2:
        raise ValueError(f"coefficients must be [m, C]; got shape {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("coefficients contain NaN/inf")
    return c


# A coefficient below this fraction of its component's maximum is a leftover, not a loading. NPEFF's leftovers sit
# many decades below (1e-30 after the multiplicative updates), real loadings within a few of the maximum; 1e-3
# also keeps a TopK SAE latent's small but selected activations, and every gradient-cluster member (>= 1/3 of 1).
ACTIVE_FRACTION = 1e-3
ACTIVE_DEFINITION = f"active = coefficient above {ACTIVE_FRACTION:.1%} of the component's maximum over the examples"


def active_threshold(coefficients, fraction: float = ACTIVE_FRACTION) -> torch.Tensor:
    """Per component ``[C]``, the value a coefficient must exceed to be active (:func:`active`): ``fraction`` of
    the component's maximum over the examples, and at least ``fraction**2`` of the largest coefficient of all
    components, so that a column of leftovers alone (a dead NPEFF component, max 1e-30) has no active example
    (all-zero coefficients: thresholds 0, nothing exceeds them). Pass it to :func:`active` to judge new examples
    (``npeff explain``'s inputs) by the run's scale."""
    c = _coefficients(coefficients)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    if c.shape[0] == 0 or c.shape[1] == 0:
        return torch.zeros(c.shape[1], dtype=c.dtype)
    colmax = c.max(0).values.clamp_min(0)
    return fraction * torch.maximum(colmax, fraction * colmax.max())


def active(coefficients, threshold=None) -> torch.Tensor:
    """Bool ``[m, C]``: the coefficient exceeds :func:`active_threshold` (of these coefficients, or the given
    per-component ``threshold [C]``, e.g. a run's, for new examples)."""
    c = _coefficients(coefficients)
    t = active_threshold(c) if threshold is None else torch.as_tensor(threshold).to(c.dtype)
    return c > t


def active_share(coefficients, threshold=None) -> torch.Tensor:
    """Float64 ``[C]``: the fraction of the examples active on each component (:func:`active`)."""
    c = _coefficients(coefficients)
    if c.shape[0] == 0:
        return torch.zeros(c.shape[1], dtype=torch.float64)
    return active(c, threshold).double().mean(0)


def top_examples(coefficients, k: int = 16) -> torch.Tensor:
    """Example indices ``[C, min(k, m)]`` by decreasing coefficient; ties keep the example order."""
    c = _coefficients(coefficients)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    order = torch.sort(c.T, dim=1, descending=True, stable=True).indices
    return order[:, : min(k, c.shape[0])].long()


def _as_list(values, m: int) -> list:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    elif hasattr(values, "tolist"):  # numpy
        values = values.tolist()
    values = list(values)
    if len(values) != m:
        raise ValueError(f"got {len(values)} labels for {m} examples")
    return values


def tunings(coefficients, labels: Sequence[Any], k: int = 16, threshold: float = 0.95) -> list[Any]:
    """Per component, the label (or prediction) shared by at least ``threshold`` of its top ``k``
    examples, else ``None`` (§3.1: tuned when >= 95% of the top 16 share it).

    Only *active* examples (:func:`active`) count as top examples: a component with fewer
    than ``k`` of them (a dead or very rare component) is reported as not tuned (``None``), since
    the order among inactive coefficients is arbitrary and would decide its tuning.
    """
    c = _coefficients(coefficients)
    labels = _as_list(labels, c.shape[0])
    top = top_examples(c, k)
    on = active(c)
    out: list[Any] = []
    for j in range(c.shape[1]):
        idx = top[j]
        if idx.numel() < k or not bool(on[idx, j].all()):
            out.append(None)
            continue
        value, count = Counter(labels[i] for i in idx.tolist()).most_common(1)[0]
        out.append(value if count >= threshold * k else None)
    return out


def tuned_fraction(tuning: Sequence[Any]) -> float:
    """Fraction of components that are tuned (not ``None``) in the output of :func:`tunings`."""
    tuning = list(tuning)
    return sum(t is not None for t in tuning) / len(tuning) if tuning else 0.0


def tuning_summary(coefficients, labels=None, predictions=None, k: int = 16, threshold: float = 0.95) -> dict:
    """Fractions of components tuned to the label, to the prediction, and to either (Table 1).

    Fractions are over all C components (dead ones count as not tuned). ``out["tunings"]`` holds the
    per-component results of :func:`tunings` for each of ``label`` / ``prediction`` given.
    """
    c = _coefficients(coefficients)
    out: dict[str, Any] = {"n_components": c.shape[1], "k": k, "threshold": threshold}
    per = {}
    for name, values in (("label", labels), ("prediction", predictions)):
        if values is not None:
            per[name] = tunings(c, values, k=k, threshold=threshold)
            out[name] = tuned_fraction(per[name])
    if per:
        either = [any(p[j] is not None for p in per.values()) for j in range(c.shape[1])]
        out["either"] = sum(either) / c.shape[1]
    out["tunings"] = per
    out["not_enough_examples"] = int((active(c).sum(0) < k).sum())
    return out


def decomposition_similarity(coeffs_a, coeffs_b) -> float:
    """Mean over the components of ``a`` of the max cosine similarity between their coefficient
    vectors (columns, over the same m examples) and those of ``b`` (§3). Not symmetric: pass both
    orders to compare both ways. An all-zero column has similarity 0.
    """
    a, b = _coefficients(coeffs_a).double(), _coefficients(coeffs_b).double()
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the decompositions cover {a.shape[0]} and {b.shape[0]} examples")
    an = a / a.norm(dim=0).clamp_min(1e-300)
    bn = b / b.norm(dim=0).clamp_min(1e-300)
    return float((an.T @ bn).max(1).values.mean())


# ----------------------------------------------------------------------------------------------
# Metrics shared by NPEFF and the baselines (§5)
# ----------------------------------------------------------------------------------------------


def alive(coefficients, min_examples: int = 1) -> torch.Tensor:
    """Bool ``[C]``: the components active (:func:`active`) on at least ``min_examples`` examples.

    ``min_examples=1`` drops only all-zero columns (an empty cluster, a dead NPEFF component); §5.2 uses
    ``min_examples=16`` (= k) for SAE latents, whose top 16 examples must all be real activations.
    """
    c = _coefficients(coefficients)
    if min_examples < 1:
        raise ValueError(f"min_examples must be >= 1; got {min_examples}")
    return active(c).sum(0) >= min_examples


def argmax_shared(coefficients, predictions: Sequence[Any], k: int = 16) -> torch.Tensor:
    """Bool ``[C]``: all ``k`` top examples of the component share the same prediction
    ``argmax p(y|x)`` (§5.1: 1690 of 2048 gradient clusters, 384 of 2048 NPEFF components on TriviaQA).

    Only active coefficients count: a component with fewer than ``k`` active examples is ``False``.
    This is :func:`tunings` to the prediction with ``threshold=1``.
    """
    return torch.tensor([t is not None for t in tunings(coefficients, predictions, k=k, threshold=1.0)])


def argmax_shared_fraction(coefficients, predictions: Sequence[Any], k: int = 16, min_examples: int = 1) -> float:
    """Fraction of the alive components (:func:`alive` with ``min_examples``) for which
    :func:`argmax_shared` holds; 0.0 when none is alive."""
    live = alive(coefficients, min_examples)
    n = int(live.sum())
    return int((argmax_shared(coefficients, predictions, k) & live).sum()) / n if n else 0.0


def token_tunings(
    top_token_sets: Sequence[Sequence[Collection[Hashable]]], threshold: float = 0.95, k: int | None = None
) -> list[Hashable | None]:
    """§5.2 token tuning. ``top_token_sets[j]`` holds, for each top example of component j (its examples
    that are active on it, in rank order), the set of tokens (vocabulary ids, or any hashable) on which
    the latent is non-zero. The component is tuned to token ``t`` when ``t`` lies in at least ``threshold``
    of those sets (at k = 16, threshold 0.95: all 16, as the paper's "greater than 95%").

    Returns per component the token shared by the most sets when it reaches the threshold (ties: the one
    seen first), else ``None``. A component with no sets, or fewer than ``k`` when ``k`` is given, is
    ``None``: as in :func:`tunings`, too few top examples cannot define a tuning.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    out: list[Hashable | None] = []
    for sets in top_token_sets:
        sets = list(sets)
        if not sets or (k is not None and len(sets) < k):
            out.append(None)
            continue
        counts = Counter(t for s in sets for t in set(s))
        top = counts.most_common(1)
        out.append(top[0][0] if top and top[0][1] >= threshold * len(sets) else None)
    return out


def token_tuned(
    top_token_sets: Sequence[Sequence[Collection[Hashable]]], threshold: float = 0.95, k: int | None = None
) -> list[bool]:
    """Per component, whether :func:`token_tunings` finds a shared token."""
    return [t is not None for t in token_tunings(top_token_sets, threshold=threshold, k=k)]


def coverage(coefficients, k: int = 16, min_examples: int = 1) -> float:
    """Fraction of the m examples that are a top-``k`` example (active on it) of at least
    one alive component (:func:`alive` with ``min_examples``): how much of the data the components'
    top examples describe."""
    c = _coefficients(coefficients)
    if c.shape[0] == 0:
        return 0.0
    top = top_examples(c, k)  # [C, k']
    on = torch.gather(active(c).T, 1, top)
    on &= alive(c, min_examples)[:, None]
    return int(torch.unique(top[on]).numel()) / c.shape[0]


def degeneracy(coefficients, *, always_on: float = 0.99, duplicate_cosine: float = 0.99) -> dict[str, Any]:
    """Signs of a degenerate set of components (e.g. an SAE trained on too few tokens): ``n_always_on``, the
    components active (:func:`active`) on at least ``always_on`` of the examples; ``n_near_duplicate_pairs``,
    the pairs whose coefficient columns have cosine ``>= duplicate_cosine``; ``max_cosine`` over the pairs of
    components that are not all zero; and ``degenerate``, one line saying what was found (None when nothing)."""
    c = _coefficients(coefficients).double()
    n = c.shape[1]
    on = active_share(c)
    n_on = int((on >= always_on).sum())
    norms = c.norm(dim=0)
    live = norms > 0
    unit = c[:, live] / norms[live]
    cos = unit.T @ unit if int(live.sum()) > 1 else torch.zeros(0, 0, dtype=torch.float64)
    pairs = torch.triu(cos >= duplicate_cosine, diagonal=1)
    n_pairs = int(pairs.sum())
    max_cos = float(torch.triu(cos, diagonal=1).max()) if cos.shape[0] > 1 else None
    found = []
    if n_on:
        found.append(f"{n_on} of {n} components active on >= {always_on:.0%} of the examples ({ACTIVE_DEFINITION})")
    if n_pairs:
        found.append(f"{n_pairs} pair(s) of components at cosine >= {duplicate_cosine} (max {max_cos:.4f})")
    return {
        "n_always_on": n_on,
        "n_near_duplicate_pairs": n_pairs,
        "max_cosine": max_cos,
        "degenerate": "; ".join(found) or None,
    }


def method_summary(
    coefficients,
    *,
    labels: Sequence[Any] | None = None,
    predictions: Sequence[Any] | None = None,
    k: int = 16,
    threshold: float = 0.95,
    alive_min_examples: int = 1,
    token_sets: Sequence[Sequence[Collection[Hashable]]] | None = None,
    token_tuned: Sequence[bool] | None = None,
) -> dict:
    """One method's row of ``npeff compare`` (§3.1, §5), from its ``[m, C]`` coefficients.

    - ``n_components``: C; ``alive``: the number of alive components (:func:`alive` with
      ``alive_min_examples``: 1 for NPEFF and clusters, k for SAE latents as in §5.2);
    - fractions **over the alive components** (0.0 when none is alive): ``tuned_label`` / ``tuned_prediction``
      (:func:`tunings`: at least ``threshold`` of the top ``k`` share it; an alive component with fewer than
      ``k`` active examples counts as not tuned), ``argmax_shared`` (all ``k`` share the prediction),
      ``tuned_tokens`` (:func:`token_tuned`);
    - ``coverage``: fraction of the examples among the top ``k`` of some alive component (:func:`coverage`).

    ``tuned_label`` is None without ``labels``, ``tuned_prediction`` and ``argmax_shared`` without
    ``predictions``, ``tuned_tokens`` without token information: pass ``token_sets`` (per component, the
    token sets of its top examples, see :func:`token_tunings`) or ``token_tuned`` (per component, bools).
    """
    if token_sets is not None and token_tuned is not None:
        raise ValueError("pass token_sets or token_tuned, not both")
    c = _coefficients(coefficients)
    n_components = c.shape[1]
    live = alive(c, alive_min_examples)
    n_alive = int(live.sum())

    def over_alive(flags) -> float:
        flags = torch.as_tensor([bool(f) for f in flags], dtype=torch.bool)
        if flags.numel() != n_components:
            raise ValueError(f"got {flags.numel()} per-component values for {n_components} components")
        return int((flags & live).sum()) / n_alive if n_alive else 0.0

    out: dict[str, Any] = {"n_components": n_components, "alive": n_alive, "k": k, "threshold": threshold}
    for name, values in (("tuned_label", labels), ("tuned_prediction", predictions)):
        out[name] = None if values is None else over_alive(t is not None for t in tunings(c, values, k, threshold))
    out["argmax_shared"] = None if predictions is None else over_alive(argmax_shared(c, predictions, k))
    out["coverage"] = coverage(c, k, alive_min_examples)
    if token_sets is not None:
        token_tuned = [t is not None for t in token_tunings(token_sets, threshold=threshold, k=k)]
    out["tuned_tokens"] = None if token_tuned is None else over_alive(token_tuned)
    return out
