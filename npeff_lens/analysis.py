"""Reading a decomposition: top examples, tunings (§3.1) and similarity between decompositions (§3).

All functions take coefficients "example component" (``NPEFF.coefficients_``) and need torch alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["top_examples", "tunings", "tuned_fraction", "tuning_summary", "decomposition_similarity"]


def _coefficients(coefficients) -> torch.Tensor:
    c = torch.as_tensor(coefficients)
    if c.ndim != 2:
        raise ValueError(f"coefficients must be [m, C]; got shape {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("coefficients contain NaN/inf")
    return c


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

    Only examples with a *positive* coefficient count as top examples: a component with fewer
    than ``k`` of them (a dead or very rare component) is reported as not tuned (``None``), since
    the order among zero coefficients is arbitrary and would decide its tuning.
    """
    c = _coefficients(coefficients)
    labels = _as_list(labels, c.shape[0])
    top = top_examples(c, k)
    out: list[Any] = []
    for j in range(c.shape[1]):
        idx = top[j]
        if idx.numel() < k or not bool((c[idx, j] > 0).all()):
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
    out["not_enough_examples"] = int(((c > 0).sum(0) < k).sum())
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
