"""The building blocks of the perturbation experiment, which asks whether moving the parameters θ along a
component's pseudo-Fisher vector changes the predictions of that component's top examples more than others'.

The experiment is §3.3 of the paper; the recovery of the vector is App. F.

For a component ``j`` (§3.3):

1. reject its projected pseudo-Fisher vector ``h_j`` from the dissimilar components (``|cos| < 0.5``) and
   recover it in parameter space — :func:`npeff_lens.recovery.recover_direction`; by default the
   back-projection ``adjoint``; the least-norm exact fit ``minnorm``, the paper's FPC (App. F), SpaRSA and
   FISTA are selectable (how selective each is: benchmarks/README.md);
2. perturb ``θ ± ε ĥ`` with ``ĥ`` the recovered vector at unit L2 norm over *all* selected parameters, so
   ``‖ε ĥ‖₂ = magnitude`` (20 for SmolLM2-135M/SST2, 30 for BERT/SNLI);
3. per example, ``KL(p_perturbed ‖ p_original)`` over the task's outcome set, on the component's top
   examples (16, by coefficient) and on random baseline examples (1,000, disjoint from the top ones);
4. KL ratio = mean KL(top) / mean KL(baseline) for each sign; ``h h^T`` does not know the sign of ``h``, so
   both signs are tried and the larger ratio is reported;
5. the PEF-norm ratio, mean ``‖F(x)‖_F`` over the same two groups: a KL ratio far above it means the top
   examples are not merely more sensitive to every perturbation;
6. geometric means of both ratios across components (Table 3).

Building blocks (usable on any adapter + task): :func:`perturbed` (a context manager that sets
``θ + δ`` from saved copies and restores them bit-exactly), :func:`task_log_probs`, :func:`kl_divergence`,
:func:`perturbation_kl`, :func:`kl_ratios`, :func:`perturb_component`, :func:`summarize`,
:func:`format_table`. The experiment over a saved decomposition (loading, resume, writing the table) is
:func:`npeff_lens.runs.run_perturbation`, and ``npeff perturb`` on the command line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .formatting import fmt

__all__ = [
    "NonFiniteLogitsError",
    "unit_direction",
    "perturbed",
    "task_log_probs",
    "kl_divergence",
    "perturbation_kl",
    "kl_ratios",
    "geometric_mean",
    "perturb_component",
    "summarize",
    "baseline_examples",
    "check_adapter",
    "Reference",
    "format_table",
]

logger = logging.getLogger(__name__)

#: Table columns, in order (CSV header and CLI table).
COLUMNS = (
    "component",
    "status",
    "sign",
    "kl_ratio",
    "kl_ratio_plus",
    "kl_ratio_minus",
    "kl_top_plus",
    "kl_top_minus",
    "kl_base_plus",
    "kl_base_minus",
    "pef_norm_top",
    "pef_norm_base",
    "pef_norm_ratio",
    "n_top",
    "n_base",
    "recovery_norm",
    "recovery_relative_residual",
    "recovery_n_iter",
    "recovery_n_rejected",
    "recovery_nonzero_fraction",
)


class NonFiniteLogitsError(ValueError):
    """The perturbed model produced NaN/inf log-probabilities (the magnitude is too large)."""


# --------------------------------------------------------------------------------------------------
# Parameters: direction → δ, and a perturbation that always restores θ exactly.
# --------------------------------------------------------------------------------------------------


def _direction_norm(direction: Mapping[str, torch.Tensor]) -> float:
    sq = sum(float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2 for t in direction.values())
    return math.sqrt(sq)


def unit_direction(direction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` scaled to unit L2 norm over the whole flat vector (all tensors together)."""
    if not direction:
        raise ValueError("the direction names no parameters")
    norm = _direction_norm(direction)
    if not math.isfinite(norm):
        raise ValueError("the direction contains NaN or inf")
    if norm == 0.0:
        raise ValueError("the direction is zero; there is nothing to perturb along")
    return {k: v.detach() / norm for k, v in direction.items()}


def _resolve_parameters(adapter, names) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by the (canonical) names the layout uses."""
    params = dict(adapter.all_named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"the model has no parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"(its names look like {list(params)[:4]}); was the decomposition made with another model or backend?"
        )
    return {n: params[n] for n in names}


@contextmanager
def perturbed(adapter, delta: Mapping[str, torch.Tensor]):
    """Within the block, the named parameters hold ``θ + δ``; afterwards (exception or not) they hold
    their original values bit for bit.

    ``θ + δ`` is computed from a saved copy of ``θ`` (in at least fp32, then cast to the parameter's
    dtype) and restoring copies the saved values back: no add-then-subtract drift.
    """
    params = _resolve_parameters(adapter, list(delta))
    for name, p in params.items():
        if tuple(delta[name].shape) != tuple(p.shape):
            raise ValueError(
                f"perturbation for {name!r} has shape {list(delta[name].shape)}, parameter has {list(p.shape)}"
            )
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                work = torch.promote_types(p.dtype, torch.float32)
                p.copy_((saved[name].to(work) + delta[name].to(p.device, work)).to(p.dtype))
        yield adapter
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


# --------------------------------------------------------------------------------------------------
# p(y|x) and KL.
# --------------------------------------------------------------------------------------------------


def _batches(adapter, prompts_or_batches, batch_size: int):
    items = list(prompts_or_batches)
    if items and isinstance(items[0], Mapping):  # already tokenised batches
        yield from items
        return
    for start in range(0, len(items), batch_size):
        yield adapter.tokenize(items[start : start + batch_size])


@torch.no_grad()
def task_log_probs(adapter, task, prompts_or_batches, *, batch_size: int = 32) -> torch.Tensor:
    """``[n, outcomes]`` log p(y|x) (fp32, CPU) of the task's outcome set, without gradients.

    ``prompts_or_batches``: formatted prompts (``task.prompts(texts)``) or tokenised batches.
    """
    parts = [
        task.log_probs(adapter, batch).detach().float().cpu()
        for batch in _batches(adapter, prompts_or_batches, batch_size)
    ]
    if not parts:
        raise ValueError("no prompts to evaluate")
    return torch.cat(parts)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y))`` in fp64: ``[n, outcomes]`` × 2 → ``[n]``.

    Outcomes with ``p(y) = 0`` contribute 0 (also where ``q(y) = 0``)."""
    if log_p.shape != log_q.shape:
        raise ValueError(f"log-prob shapes differ: {list(log_p.shape)} vs {list(log_q.shape)}")
    lp, lq = log_p.double(), log_q.double()
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)  # ≥ 0 exactly; rounding can dip below at tiny KL


def _check_finite(log_probs: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(log_probs).all()):
        raise NonFiniteLogitsError(what)


def perturbation_kl(
    adapter,
    task,
    prompts_or_batches,
    direction: Mapping[str, torch.Tensor],
    magnitude: float,
    *,
    signs: Sequence[int] = (1, -1),
    reference: torch.Tensor | None = None,
    batch_size: int = 32,
    normalize: bool = True,
) -> dict[int, torch.Tensor]:
    """Per-example ``KL(p_{θ+sε ĥ} ‖ p_θ)`` for each sign ``s``: ``{s: [n]}`` (fp64).

    ``ĥ`` is ``direction`` at unit norm over all its tensors (``normalize=False`` uses it as is), so the
    perturbation has L2 norm ``magnitude``. ``reference``: the unperturbed ``[n, outcomes]`` log-probs if
    already computed. Raises :class:`NonFiniteLogitsError` when the perturbed model's outputs are not finite.
    """
    if not math.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"magnitude must be finite and non-negative, got {magnitude}")
    if any(s not in (1, -1) for s in signs):
        raise ValueError(f"signs must be +1 / -1, got {list(signs)}")
    items = list(prompts_or_batches)
    unit = unit_direction(direction) if normalize else {k: v.detach() for k, v in direction.items()}
    if reference is None:
        reference = task_log_probs(adapter, task, items, batch_size=batch_size)
    _check_finite(reference, "the unperturbed model produced non-finite log-probabilities")
    out = {}
    for s in signs:
        delta = {k: v * (s * magnitude) for k, v in unit.items()}
        with perturbed(adapter, delta):
            lp = task_log_probs(adapter, task, items, batch_size=batch_size)
        if lp.shape != reference.shape:
            raise ValueError(f"reference log-probs have shape {list(reference.shape)}, perturbed {list(lp.shape)}")
        _check_finite(
            lp,
            f"perturbing with magnitude {magnitude:g} (sign {'+' if s > 0 else '-'}) gave non-finite "
            "log-probabilities; use a smaller magnitude",
        )
        out[s] = kl_divergence(lp, reference)
    return out


# --------------------------------------------------------------------------------------------------
# Ratios (§3.3) and their aggregation (Table 3).
# --------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0.0:
        return math.nan if num == 0.0 else math.inf
    return num / den


def _mean(x) -> float:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    return float(x.mean()) if x.numel() else math.nan


def kl_ratios(kl_top_plus, kl_top_minus, kl_base_plus, kl_base_minus) -> dict[str, Any]:
    """Means, per-sign KL ratios ``mean(top)/mean(base)``, and the larger one with its sign (§3.3).

    Inputs: per-example KL values (tensors or sequences). A ratio with a zero baseline mean is ``inf``
    (``nan`` if the top mean is also 0); ``sign`` is ``"+"``, ``"-"`` or ``None`` when both ratios are nan.
    """
    rec = {
        "kl_top_plus": _mean(kl_top_plus),
        "kl_top_minus": _mean(kl_top_minus),
        "kl_base_plus": _mean(kl_base_plus),
        "kl_base_minus": _mean(kl_base_minus),
    }
    plus = _ratio(rec["kl_top_plus"], rec["kl_base_plus"])
    minus = _ratio(rec["kl_top_minus"], rec["kl_base_minus"])
    rec["kl_ratio_plus"], rec["kl_ratio_minus"] = plus, minus
    if math.isnan(plus) and math.isnan(minus):
        rec["sign"], rec["kl_ratio"] = None, math.nan
    elif math.isnan(minus) or (not math.isnan(plus) and plus >= minus):
        rec["sign"], rec["kl_ratio"] = "+", plus
    else:
        rec["sign"], rec["kl_ratio"] = "-", minus
    return rec


def geometric_mean(values) -> float:
    """``exp(mean(log v))`` over the non-nan values (``nan`` if none; ``0`` if one is 0; ``inf`` if one is
    inf; ``nan`` if both occur). Negative values raise."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan
    if any(v < 0 for v in vals):
        raise ValueError(f"geometric mean of negative values: {[v for v in vals if v < 0][:5]}")
    has_zero, has_inf = any(v == 0 for v in vals), any(math.isinf(v) for v in vals)
    if has_zero and has_inf:
        return math.nan
    if has_zero:
        return 0.0
    if has_inf:
        return math.inf
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Geometric means across components of the KL ratio and the PEF-norm ratio (Table 3), plus medians.

    Components without a ratio (dead, or nan) are left out and counted in ``n_left_out``."""
    done = [r for r in records if r.get("status", "ok") == "ok"]

    def number(v):  # JSON stores an undefined ratio as null
        return math.nan if v is None else v

    kl = [number(r["kl_ratio"]) for r in done]
    pn = [number(r.get("pef_norm_ratio")) for r in done]
    finite_kl = sorted(v for v in kl if not math.isnan(v))
    n_plus = sum(r.get("sign") == "+" for r in done)
    return {
        "n_components": len(records),
        "n_evaluated": len(finite_kl),
        "n_left_out": len(records) - len(finite_kl),
        "kl_ratio_geomean": geometric_mean(kl),
        "pef_norm_ratio_geomean": geometric_mean(pn),
        "kl_ratio_median": finite_kl[len(finite_kl) // 2] if finite_kl else math.nan,
        "fraction_kl_ratio_above_1": (sum(v > 1 for v in finite_kl) / len(finite_kl)) if finite_kl else math.nan,
        "n_sign_plus": n_plus,
        "n_sign_minus": sum(r.get("sign") == "-" for r in done),
    }


# --------------------------------------------------------------------------------------------------
# One component.
# --------------------------------------------------------------------------------------------------


class Reference:
    """Unperturbed log-probs of prompts by index, computed on first use (θ must be unperturbed then) and kept: one
    instance shared by many perturbations of the same model runs each prompt unperturbed once.

    ``get(indices)`` returns ``[len(indices), outcomes]`` log-probs, computed in whole fixed blocks of
    ``batch_size`` prompts so that an example's numbers do not depend on which were asked for before."""

    def __init__(self, adapter, task, prompts, batch_size):
        self.adapter, self.task, self.prompts, self.batch_size = adapter, task, prompts, batch_size
        self.rows: dict[int, torch.Tensor] = {}

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        # Whole fixed blocks of prompts: an example's batch (hence its padding and rounding) does not depend on
        # which examples were asked for before, so a resumed experiment gives the same numbers bit for bit.
        bs = self.batch_size
        for block in sorted({i // bs for i in indices if i not in self.rows}):
            todo = list(range(block * bs, min(len(self.prompts), (block + 1) * bs)))
            lp = task_log_probs(self.adapter, self.task, [self.prompts[i] for i in todo], batch_size=bs)
            _check_finite(lp, "the unperturbed model produced non-finite log-probabilities")
            self.rows.update(zip(todo, lp))
        return torch.stack([self.rows[i] for i in indices])


def perturb_component(
    adapter,
    task,
    prompts: Sequence[str],
    direction: Mapping[str, torch.Tensor],
    magnitude: float,
    *,
    top: Sequence[int],
    baseline: Sequence[int],
    pef_norms=None,
    reference: torch.Tensor | Reference | None = None,
    batch_size: int = 32,
    component: int | None = None,
) -> dict[str, Any]:
    """KL ratios of one direction on its top examples vs a baseline set (§3.3): a record with
    ``sign, kl_ratio, kl_ratio_plus/minus, kl_top_plus/minus, kl_base_plus/minus`` (means), ``pef_norm_top,
    pef_norm_base, pef_norm_ratio`` (when ``pef_norms`` ``[len(prompts)]`` is given), ``n_top, n_base``.

    ``prompts``: all formatted prompts; ``top`` / ``baseline`` index into them. ``direction``: the
    parameter-space pseudo-Fisher vector (any norm: it is scaled to ``magnitude``).
    ``reference``: unperturbed log-probs ``[len(prompts), outcomes]`` (or a cache), if already known.
    """
    top, baseline = [int(i) for i in top], [int(i) for i in baseline]
    if not top or not baseline:
        raise ValueError(f"need top and baseline examples (got {len(top)} and {len(baseline)})")
    overlap = set(top) & set(baseline)
    if overlap:
        raise ValueError(f"baseline examples must be disjoint from the top examples; shared: {sorted(overlap)[:5]}")
    idx = top + baseline
    if isinstance(reference, Reference):
        ref = reference.get(idx)
    elif reference is not None:
        ref = torch.as_tensor(reference)[idx]
    else:
        ref = Reference(adapter, task, prompts, batch_size).get(idx)
    try:
        kl = perturbation_kl(
            adapter, task, [prompts[i] for i in idx], direction, magnitude, reference=ref, batch_size=batch_size
        )
    except NonFiniteLogitsError as e:
        where = f"component {component}: " if component is not None else ""
        raise NonFiniteLogitsError(f"{where}{e}") from None
    k = len(top)
    rec: dict[str, Any] = {"component": component, "status": "ok"}
    rec.update(kl_ratios(kl[1][:k], kl[-1][:k], kl[1][k:], kl[-1][k:]))
    if pef_norms is not None:
        norms = torch.as_tensor(pef_norms, dtype=torch.float64)
        rec["pef_norm_top"], rec["pef_norm_base"] = _mean(norms[top]), _mean(norms[baseline])
        rec["pef_norm_ratio"] = _ratio(rec["pef_norm_top"], rec["pef_norm_base"])
    else:
        rec["pef_norm_top"] = rec["pef_norm_base"] = rec["pef_norm_ratio"] = math.nan
    rec["n_top"], rec["n_base"] = k, len(baseline)
    return rec


def baseline_examples(m: int, n_baseline: int, exclude: Sequence[int], *, seed: int = 0) -> list[int]:
    """Up to ``n_baseline`` example indices in ``[0, m)`` drawn at random (seeded) outside ``exclude``.

    The same seed gives the same random order for every component; each component's top examples are
    skipped, so the baseline sets of different components share almost all their examples."""
    gen = torch.Generator().manual_seed(int(seed))
    skip = set(int(i) for i in exclude)
    out = []
    for i in torch.randperm(m, generator=gen).tolist():
        if i not in skip:
            out.append(i)
            if len(out) == n_baseline:
                break
    return out


# --------------------------------------------------------------------------------------------------
# Checks and presentation.
# --------------------------------------------------------------------------------------------------


def check_adapter(adapter, layout) -> None:
    """The adapter holds every parameter of ``layout`` with its shape (else a ValueError saying which)."""
    params = dict(adapter.all_named_parameters())
    missing = [e["name"] for e in layout if e["name"] not in params]
    if missing:
        raise ValueError(
            f"the model lacks {len(missing)} parameter(s) of the store's layout, e.g. {missing[:3]} "
            f"(its names look like {list(params)[:3]}); load it with the backend the PEFs were collected with"
        )
    for e in layout:
        if list(params[e["name"]].shape) != list(e["shape"]):
            raise ValueError(
                f"parameter {e['name']!r} has shape {list(params[e['name']].shape)} in the model but "
                f"{list(e['shape'])} in the store's layout"
            )


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-component table and the geometric means, as printed by ``npeff perturb``."""
    cols = (
        "component",
        "sign",
        "kl_ratio",
        "kl_ratio_plus",
        "kl_ratio_minus",
        "kl_top_plus",
        "kl_base_plus",
        "pef_norm_ratio",
        "n_top",
        "n_base",
    )
    rows = [[fmt(r.get(c), 4, missing="") for c in cols] for r in summary["records"]]  # an undefined ratio: blank
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    kl, pef = (fmt(summary[k], 4, missing="nan") for k in ("kl_ratio_geomean", "pef_norm_ratio_geomean"))
    lines.append(
        f"geometric mean over {summary['n_evaluated']} components: KL ratio {kl}, PEF-norm ratio {pef} "
        f"(magnitude {summary.get('magnitude')})"
    )
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)
