"""Selectivity, one causal test for the components of every method, in parameter space and in activation space.

For a component ``j`` with top examples ``T_j`` (its ``k`` largest coefficients, all active), one intervention
is applied identically to every example:

- NPEFF components and gradient-cluster centroids: a parameter perturbation ``θ + s·ĥ_j`` along the component's
  recovered parameter-space direction (:func:`npeff_lens.recovery.recover_direction`: rejection from dissimilar
  components, then FPC or the back-projection; ``ĥ`` at unit L2 norm over the selected parameters) —
  :class:`ParameterDirection`;
- SAE latents and SNMF features: steering, ``x ← x + s·d̂_j`` added to the activations at the feature's hook on
  every token (``d̂_j`` the unit decoder row / feature) — :class:`ActivationDirection`, :func:`steered`.

The size ``s`` is set by :func:`calibrate` (a bracketing bisection in log-log space) so that the mean
``KL(p_intervened ‖ p)`` over a random baseline set ``B_j`` (``n_baseline`` examples, disjoint from ``T_j``)
equals ``target_kl`` (default 0.01 nats) within ``rtol``. Then

    selectivity_j = mean_{x ∈ T_j} KL(p_intervened(·|x) ‖ p(·|x)) / target_kl

(about 1: the component's top examples are moved no more than random ones; well above 1: the direction
matters to its own examples). Per method, :func:`summarize` gives the geometric mean over the components with
``k`` top examples; the others are excluded and counted. At a target this small the KL is quadratic in ``s``,
so the sign of ``s`` barely matters; ``+`` is used for every method (a feature's own direction; ``h h^T`` leaves
an NPEFF component's sign open anyway).

Interventions never leak: parameters are restored bit for bit (:func:`npeff_lens.perturb.perturbed`) and hooks
are removed in ``finally`` blocks, so the model's outputs afterwards equal those before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .analysis import active_threshold
from .baselines.activations import hook_module, resolve_hook
from .errors import SettingError, literal
from .perturb import (
    Reference,
    baseline_examples,
    geometric_mean,
    kl_divergence,
    perturbed,
    task_log_probs,
    unit_direction,
)

__all__ = [
    "UnreachableTargetError",
    "ParameterDirection",
    "ActivationDirection",
    "steered",
    "calibrate",
    "component_selectivity",
    "top_positive",
    "summarize",
]


class UnreachableTargetError(SettingError):
    """No intervention size brings the baseline set's mean KL to the target. ``what``: what was tried, without the
    remedy (lowering the target KL) that the message adds."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(literal(what) + "; lower the target KL ({target_kl})", target_kl="target_kl")

    def __reduce__(self):
        return type(self), (self.what,)


# --------------------------------------------------------------------------------------------------
# The two kinds of intervention.
# --------------------------------------------------------------------------------------------------


@dataclass
class ParameterDirection:
    """``θ + s·ĥ``: ``direction`` ``{parameter name: tensor}`` is scaled to unit L2 norm over all its tensors."""

    adapter: Any
    direction: Mapping[str, torch.Tensor]

    def __post_init__(self):
        self.direction = unit_direction(self.direction)

    @contextmanager
    def applied(self, scale: float):
        with perturbed(self.adapter, {k: v * float(scale) for k, v in self.direction.items()}):
            yield


@dataclass
class ActivationDirection:
    """``x + s·d̂`` at ``hook`` on every token; ``direction [d]`` is scaled to unit L2 norm."""

    adapter: Any
    hook: str
    direction: torch.Tensor

    def __post_init__(self):
        v = torch.as_tensor(self.direction).detach().float().reshape(-1)
        norm = float(v.norm())
        if not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"the feature direction at {self.hook!r} has norm {norm}; cannot steer along it")
        self.direction = v / norm

    @contextmanager
    def applied(self, scale: float):
        with steered(self.adapter, self.hook, self.direction * float(scale)):
            yield


@contextmanager
def steered(adapter, hook: str, vector: torch.Tensor):
    """Within the block, ``vector`` is added to the activation at ``hook`` (a hook of
    :func:`npeff_lens.baselines.activations.activations`: TransformerLens name, module path, ``PATH:input``, ``attn:L``,
    ``mlp:L``) on every token of every forward pass; trailing dimensions (``hook_z``'s heads) take ``vector``
    reshaped. The hook is removed afterwards, exception or not."""
    module, reads_input = hook_module(adapter, resolve_hook(adapter, hook))
    vector = torch.as_tensor(vector).detach()

    def add(x: torch.Tensor) -> torch.Tensor:
        trailing = x.shape[2:]
        if vector.numel() != math.prod(trailing):
            raise ValueError(
                f"steering vector has {vector.numel()} entries; the activation at {hook!r} has "
                f"{math.prod(trailing)} per token"
            )
        return x + vector.to(x.device, x.dtype).reshape(trailing)

    def pre(_module, args, kwargs):
        return (add(args[0]), *args[1:]), kwargs

    def post(_module, _args, output):
        if isinstance(output, tuple):
            return (add(output[0]), *output[1:])
        return add(output)

    if reads_input:
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# Sizing the intervention.
# --------------------------------------------------------------------------------------------------


def _mean_kl(adapter, task, prompts, indices, intervention, scale, reference, batch_size) -> torch.Tensor:
    """Per-example KL ``[len(indices)]`` (fp64) under the intervention at ``scale``; NaN/inf outputs give inf.

    The prompts go through the model in batches of similar length (less padding: the evaluations are most of
    the cost), and the results come back in the order of ``indices``."""
    ref = reference.get(indices)  # unintervened log-probs, computed (and cached) outside the intervention
    order = sorted(range(len(indices)), key=lambda i: (len(prompts[indices[i]]), i))
    with intervention.applied(scale):
        lp = task_log_probs(adapter, task, [prompts[indices[i]] for i in order], batch_size=batch_size)
    lp = lp[torch.argsort(torch.tensor(order))]
    if not bool(torch.isfinite(lp).all()):
        return torch.full((len(indices),), math.inf, dtype=torch.float64)
    return kl_divergence(lp, ref)


def _next_scale(lo, hi, s: float, kl: float, target: float) -> float:
    """The next size to try: the quadratic extrapolation ``s·sqrt(target/kl)`` (KL ∝ s² for small s) until a
    bracket exists, then log-log interpolation kept inside the bracket's central 80% (so it always shrinks)."""
    if lo is None or hi is None:
        if kl <= 0:
            return s * 1000.0
        if not math.isfinite(kl):
            return s / 10.0
        factor = math.sqrt(target / kl)
        return s * (min(max(factor, 1.5), 1000.0) if kl < target else max(min(factor, 1 / 1.5), 1e-3))
    (s0, k0), (s1, k1) = lo, hi
    a, b = math.log(s0), math.log(s1)
    if k0 > 0 and math.isfinite(k1):
        t = (math.log(target) - math.log(k0)) / (math.log(k1) - math.log(k0))
    else:
        t = 0.5
    return math.exp(a + min(max(t, 0.1), 0.9) * (b - a))


def calibrate(
    measure: Callable[[float], float],
    target: float,
    *,
    start: float = 1.0,
    rtol: float = 0.02,
    max_evals: int = 40,
    max_scale: float = 1e8,
) -> dict[str, Any]:
    """The size ``s`` at which ``measure(s)`` (a mean KL, increasing in ``s`` near the target) is within ``rtol``
    of ``target``: ``{scale, kl, n_evals}``. Raises :class:`UnreachableTargetError` (naming the largest KL
    reached) when no size up to ``max_scale`` gets there; after ``max_evals`` with a bracket, returns the closest
    size tried."""
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target KL must be finite and > 0; got {target}")
    lo = hi = None  # (scale, kl) with kl < target / kl > target
    tried: list[tuple[float, float]] = []
    s = float(start)
    for _ in range(max_evals):
        kl = float(measure(s))
        tried.append((s, kl))
        if math.isfinite(kl) and abs(kl / target - 1) <= rtol:
            return {"scale": s, "kl": kl, "n_evals": len(tried)}
        if kl < target and (lo is None or s > lo[0]):
            lo = (s, kl)
        elif kl > target and (hi is None or s < hi[0]):
            hi = (s, kl)
        if hi is None and s >= max_scale:
            break
        s = min(_next_scale(lo, hi, s, kl, target), max_scale)
    if hi is None:
        best = max((k for _, k in tried if math.isfinite(k)), default=0.0)
        at = max(tried, key=lambda t: t[1] if math.isfinite(t[1]) else -1.0)[0]
        raise UnreachableTargetError(
            f"target KL {target:g} not reached: the largest mean KL on the baseline examples was {best:.3g} "
            f"(size {at:.3g}; sizes up to {max(t[0] for t in tried):.3g} tried)"
        )
    s, kl = min(tried, key=lambda t: abs(math.log(t[1] / target)) if 0 < t[1] < math.inf else math.inf)
    return {"scale": s, "kl": kl, "n_evals": len(tried)}


# --------------------------------------------------------------------------------------------------
# One component; one method.
# --------------------------------------------------------------------------------------------------


def top_positive(coefficients: torch.Tensor, j: int, k: int, threshold=None) -> list[int]:
    """The component's top-``k`` examples that are active on it (:func:`npeff_lens.analysis.active`; fewer when
    fewer are). ``threshold``: :func:`~npeff_lens.analysis.active_threshold` of ``coefficients``, when the caller
    asks for many components (computed here otherwise)."""
    c = torch.as_tensor(coefficients)
    t = float((active_threshold(c) if threshold is None else torch.as_tensor(threshold))[j])
    col = c[:, j]
    order = torch.sort(col, descending=True, stable=True).indices[:k]
    return [int(i) for i in order.tolist() if col[i] > t]


def component_selectivity(
    adapter,
    task,
    prompts: Sequence[str],
    intervention,
    top: Sequence[int],
    *,
    target_kl: float = 0.01,
    n_baseline: int = 32,
    seed: int = 0,
    reference: Reference | None = None,
    batch_size: int = 32,
    start: float = 1.0,
    rtol: float = 0.02,
) -> dict[str, Any]:
    """Selectivity of one intervention (``ParameterDirection`` / ``ActivationDirection``) with top examples
    ``top`` (indices into ``prompts``): ``{selectivity, scale, kl_top, kl_baseline, n_evals, n_top, n_base}``.
    The baseline set is ``n_baseline`` random examples outside ``top`` (:func:`npeff_lens.perturb.baseline_examples`
    with ``seed``); fewer available is a one-line ValueError."""
    top = [int(i) for i in top]
    if not top:
        raise ValueError("no top examples: selectivity needs the component's top examples")
    base = baseline_examples(len(prompts), n_baseline, top, seed=seed)
    if len(base) < n_baseline:
        raise SettingError(
            f"fewer baseline examples than asked: {len(prompts)} examples less {len(top)} top ones leave "
            f"{len(base)}, but {n_baseline} were asked for ({{n_baseline}})",
            n_baseline="n_baseline",
        )
    reference = reference or Reference(adapter, task, list(prompts), batch_size)
    reference.get(top + base)  # unintervened log-probs first
    measure = lambda s: float(_mean_kl(adapter, task, prompts, base, intervention, s, reference, batch_size).mean())  # noqa: E731
    cal = calibrate(measure, target_kl, start=start, rtol=rtol)
    kl_top = float(_mean_kl(adapter, task, prompts, top, intervention, cal["scale"], reference, batch_size).mean())
    return {
        "selectivity": kl_top / target_kl,
        "scale": cal["scale"],
        "kl_top": kl_top,
        "kl_baseline": cal["kl"],
        "n_evals": cal["n_evals"],
        "n_top": len(top),
        "n_base": len(base),
    }


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Geometric mean of the evaluated components' selectivities; components without ``k`` top examples
    (``status == "excluded"``) and those whose intervention never reached the target KL (``"unreachable"``)
    are left out and counted."""
    done = [r for r in records if r.get("status") == "ok"]
    summary = {
        "selectivity": geometric_mean([r["selectivity"] for r in done]) if done else None,
        "selectivity_n_evaluated": len(done),
        "selectivity_n_excluded": sum(r.get("status") == "excluded" for r in records),
        "selectivity_n_unreachable": sum(r.get("status") == "unreachable" for r in records),
    }
    if not done:
        why = []
        if summary["selectivity_n_excluded"]:
            why.append(f"{summary['selectivity_n_excluded']} with fewer than k examples that load on them")
        if summary["selectivity_n_unreachable"]:
            why.append(f"{summary['selectivity_n_unreachable']} whose intervention never reached the target KL")
        summary["selectivity_note"] = "no component measured: " + ("; ".join(why) or "none asked")
    return summary
