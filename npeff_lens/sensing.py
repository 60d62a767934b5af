"""The solvers that recover a sparse parameter-space vector from its projection, using only the projection's two
operator products.

They are the compressed-sensing solvers of App. F of the paper.

With the projection convention of :mod:`npeff_lens.projection` (``x ↦ x A``, ``A`` is ``n_in × n_out``), the
sensing matrix is ``Φ = Aᵀ`` (``n_out × n_in``), so ``Φ x = project(x)`` and ``Φᵀ y = adjoint(y)``. The
solvers take any :class:`~npeff_lens.projection.Projection` (or a dense stand-in with the same ``n_in``,
``n_out``, ``project`` and ``adjoint``) and never form the matrix: the iterate is one fp32 ``n_in`` vector and
every product streams over chunks of the flat parameter index. They solve App. F eq. (6),

    min_x ‖x‖₁ + (1/2μ) ‖Φ x − b‖²,

- :func:`fpc` — fixed-point continuation (Hale, Yin & Zhang 2007), the paper's solver;
- :func:`solve_l1` — the same problem by SpaRSA (default) or FISTA, with continuation and warm starts:
  the paper's one-inner-iteration FPC returns a coarse, dense vector at large ``n/d``, and FPC run to its
  stopping rule needs many more operator products than SpaRSA (benchmarks/README.md, "Recovery at large n/d");
- :func:`min_norm` — the least-norm exact fit ``x = Φᵀ(ΦΦᵀ)⁻¹b`` by conjugate gradients: dense;
- :func:`estimate_lambda_max`, :func:`fpc_tau`, :func:`fpc_step_size` — the step sizes: ``λ_max(ΦᵀΦ)`` by
  power iteration and the FPC report's ``τ`` rule.

:mod:`npeff_lens.recovery` turns a decomposition's components into parameter-space directions with them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .projection import Projection

__all__ = [
    "DEFAULT_CHUNK",
    "FPCResult",
    "L1Result",
    "L1_METHODS",
    "fpc",
    "solve_l1",
    "min_norm",
    "fpc_tau",
    "fpc_step_size",
    "estimate_lambda_max",
]


logger = logging.getLogger(__name__)

#: Flat entries handled per project/adjoint call: bounds the temporaries to a few × 16 MB (fp32).
DEFAULT_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------------
# Chunked operator products (Φ x, Φᵀ y) that never hold more than one chunk of temporaries.
# --------------------------------------------------------------------------------------------------


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(chunk, n - start)


def _apply_phi(op: Projection, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``Φ x = x A`` as a sum of per-chunk contributions (the projection is separable over the flat index)."""
    out = None
    for start, length in _chunks(x.shape[-1], chunk):
        part = op.project(x[start : start + length], offset=start).to(torch.float32)
        out = part if out is None else out.add_(part)
    return out


def _apply_phi_phit(op: Projection, u: torch.Tensor, chunk: int) -> torch.Tensor:
    """``Φ Φᵀ u`` (``n_out × n_out``, same nonzero spectrum as ``ΦᵀΦ``) with chunk-sized temporaries only."""
    out = torch.zeros_like(u)
    for start, length in _chunks(op.n_in, chunk):
        t = op.adjoint(u, offset=start, length=length).to(torch.float32)
        out.add_(op.project(t, offset=start).to(torch.float32))
    return out


# --------------------------------------------------------------------------------------------------
# Step size: λ_max(ΦᵀΦ) and the FPC report's τ rule.
# --------------------------------------------------------------------------------------------------


def estimate_lambda_max(
    op: Projection,
    *,
    n_iter: int = 30,
    device: torch.device | str | None = None,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> float:
    """Largest eigenvalue of ``ΦᵀΦ`` by power iteration on ``Φ Φᵀ`` (``n_out × n_out``).

    ``ΦΦᵀ`` and ``ΦᵀΦ`` share their nonzero eigenvalues, and iterating in the small space keeps the
    temporaries chunk-sized. The Rayleigh quotient approaches λ_max from below, which is why
    :func:`fpc_step_size` inflates the estimate by a safety margin.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(op.n_out, generator=gen, dtype=torch.float32).to(device or "cpu")
    u /= u.norm()
    lam = 0.0
    for _ in range(n_iter):
        w = _apply_phi_phit(op, u, chunk)
        lam = max(lam, float(torch.dot(u.double(), w.double())))  # Rayleigh quotient, u unit
        norm = float(w.norm())
        if not math.isfinite(norm):
            raise ValueError("the projection produced non-finite values during power iteration")
        if norm == 0.0:
            return 0.0
        u = w / norm
    return lam


def fpc_tau(n_in: int, n_out: int) -> float:
    """The FPC default step for a problem scaled so that ``λ_max(ΦᵀΦ) ≤ 1``.

    ``τ = min(1 + 1.665 (1 − δ), 1.999)`` with ``δ = m/n = n_out/n_in``: the piecewise-linear rule of
    Hale, Yin & Zhang (2007) that the NPEFF paper cites as "equation (73)" (App. F). We verified the
    rule against the authors' released ``fpc.m`` (Hale, Yin, Zhang, last modified 28 Aug 2007:
    ``tau = min(1.999, -1.665*m/n + 2.665)``, and ``fpc_opts.m``: "tau is initialized using a
    piecewise linear function of delta = m/n", ``0 < tau < 2``); we could not read the report's
    equation numbering itself.
    """
    delta = n_out / n_in
    return min(1.0 + 1.665 * (1.0 - delta), 1.999)


def fpc_step_size(n_in: int, n_out: int, lambda_max: float, *, safety: float = 1.0) -> float:
    """Step ``τ`` for the *unscaled* problem: ``fpc_tau(δ) / (safety · λ_max)``.

    ``fpc.m`` assumes ``λ_max(ΦᵀΦ) ≤ 1``; an equivalent scaled problem is ``Φ/σ, b/σ`` with
    ``σ² = λ_max``, whose step ``τ`` becomes ``τ/λ_max`` here (and the shrinkage threshold ``τ μ/λ_max``).
    The report's convergence condition ``0 < τ < 2/λ_max(ΦᵀΦ)`` then holds because
    ``fpc_tau < 2`` — provided ``λ_max`` is not underestimated, hence ``safety ≥ 1`` for estimates.
    """
    if not lambda_max > 0 or not math.isfinite(lambda_max):
        raise ValueError(f"lambda_max must be positive and finite, got {lambda_max}")
    return fpc_tau(n_in, n_out) / (safety * lambda_max)


# --------------------------------------------------------------------------------------------------
# FPC.
# --------------------------------------------------------------------------------------------------


@dataclass
class FPCResult:
    """Output of :func:`fpc`. ``x``: ``[n_in]`` fp32 on the device of ``b``."""

    x: torch.Tensor
    n_iter: int  # shrinkage iterations in all
    n_stages: int  # continuation stages visited (μ̄ values)
    residual_norm: float  # ‖Φx − b‖ at the returned x
    relative_residual: float  # ‖Φx − b‖ / ‖b‖
    converged: bool  # the FPC stopping rule held at the final μ
    stopped_by: str  # "tolerance" (stopping rule), "stages" (inner-iteration budget at the final μ), "max_iter"
    tau: float  # step size used (unscaled problem)
    lambda_max: float  # λ_max(ΦᵀΦ) used for τ (estimated unless given)
    mu: float
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_iter": self.n_iter,
            "n_stages": self.n_stages,
            "residual_norm": self.residual_norm,
            "relative_residual": self.relative_residual,
            "converged": self.converged,
            "stopped_by": self.stopped_by,
            "tau": self.tau,
            "lambda_max": self.lambda_max,
            "mu": self.mu,
        }


def fpc(
    op: Projection,
    b: torch.Tensor,
    *,
    mu: float = 4e-5,
    gamma: float = 0.99,
    beta: float = 4.0,
    inner_iterations: int | None = 1,
    max_iter: int = 1000,
    xtol: float = 1e-4,
    gtol: float = 0.2,
    tau: float | None = None,
    lambda_max: float | None = None,
    power_iterations: int = 30,
    lambda_safety: float = 1.1,
    x0: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    verbose: bool = False,
    callback=None,
) -> FPCResult:
    """Fixed-point continuation for ``min ‖x‖₁ + (1/2μ)‖Φx − b‖²`` (App. F eq. 6).

    A numerical solver kept in one function on purpose: its loop reads line by line against the
    reference ``fpc.m``, which is how its constants and stopping rules were checked.

    Hale, Yin & Zhang, "A fixed-point continuation method for ℓ1-regularized minimization with
    applications to compressed sensing", Rice CAAM TR07-07 (2007); constants checked against the
    authors' ``fpc.m`` / ``fpc_opts.m`` (2007 release). ``fpc.m`` writes the objective as
    ``‖x‖₁ + (μ'/2)‖Ax − b‖²``, i.e. ``μ' = 1/μ`` here; all rules below are translated.

    Iteration (shrinkage / iterative soft thresholding)::

        g = Φᵀ(Φx − b);  x ← sign(y)·max(|y| − τ μ̄, 0),  y = x − τ g

    with ``τ`` = :func:`fpc_step_size` (the report's ``τ(δ)`` over ``λ_max(ΦᵀΦ)``; unless ``lambda_max``
    is given it is estimated by :func:`estimate_lambda_max` and inflated by ``lambda_safety`` because power
    iteration approaches it from below — this keeps ``τ < 2/λ_max``, the report's convergence condition)
    and ``μ̄`` the current continuation value.

    Continuation: ``x = 0`` is optimal exactly when ``μ ≥ ‖Φᵀb‖_∞``. We start at
    ``μ̄₁ = ‖Φᵀb‖_∞ / γ`` (``γ = 0.99``: just inside that region; fpc.m's ``μ'₁ = γ/‖Aᵀb‖_∞`` in its
    parametrisation — *our reading*: the NPEFF paper gives ``γ = 0.99, β = 4`` without saying where γ
    enters, and ``fpc.m`` v1 starts at ``η/‖Aᵀb‖_∞``) and divide by ``β = 4`` (fpc.m's ``eta = 4``)
    until ``μ̄ = μ``.

    Inner iterations (fpc.m's ``itrs``: shrinkage steps per μ̄ stage). A stage ends when the FPC stopping
    rule holds, ``‖x⁺ − x‖/max(‖x‖, 1) < xtol·sqrt(μ̄/μ)`` and ``‖g‖_∞/μ̄ − 1 < gtol`` (fpc.m's
    ``crit1``/``crit2``; defaults ``xtol = 1e-4``, ``gtol = 0.2``, ``mxitr = 1000``), or when
    ``inner_iterations`` steps were taken:

    - ``inner_iterations=1`` (default, App. F: "a single inner iteration"): one step per stage, the final
      μ included, so a run is ``≈ log_β(‖Φᵀb‖_∞/(γμ)) + 1`` iterations — consistent with the paper's
      "at most a few seconds" at 1e8 parameters. This is a *coarse*, early-stopped reconstruction: it
      matches the projection (``Φx ≈ b``) but is dense, not the sparse solution — its cosine with a
      planted sparse vector is ~0.8 at ``n/d = 5`` and ~0.06 at ``n/d = 2000``. App. F found this setting
      best *for perturbations*; use ``None`` to actually recover sparse vectors.
    - ``inner_iterations=None``: standard FPC — every stage runs to the stopping rule (or ``max_iter``
      in all). This is the accurate compressed-sensing solver: it recovers planted sparse vectors.
      (One step per stage followed by a converged final stage is the worst of both: the rushed
      continuation leaves ISTA at a tiny μ with a dense iterate, which converges very slowly.)

    ``x0`` defaults to zeros — the exact solution at ``μ̄₁``, which lies in the zero region (fpc.m's
    default is ``τAᵀb``; zeros also saves an ``n``-sized temporary).

    Memory: ``x`` is the only ``n_in``-sized tensor; ``Φx`` and ``Φᵀr`` stream over ``chunk`` entries.
    Works on any device: ``x`` follows ``b``.

    Args:
        op: the operator (see :class:`Projection`).
        b: ``[n_out]`` the projected vector.
        callback: called as ``callback(info_dict)`` after each iteration (iteration, mu, step, crit2).

    Returns: :class:`FPCResult`.
    """
    if b.ndim != 1 or b.shape[0] != op.n_out:
        raise ValueError(f"b must have shape [{op.n_out}] (the projection's n_out), got {list(b.shape)}")
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not beta > 1:
        raise ValueError(f"beta must be > 1, got {beta}")
    if inner_iterations is not None and inner_iterations < 1:
        raise ValueError(f"inner_iterations must be >= 1 or None, got {inner_iterations}")
    b = b.detach().to(torch.float32)
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b contains NaN or inf")
    device = b.device
    n = op.n_in
    b_norm = float(b.norm())

    if lambda_max is None:
        lam = estimate_lambda_max(op, n_iter=power_iterations, device=device, chunk=chunk)
        safety = lambda_safety
    else:
        lam, safety = float(lambda_max), 1.0
    if tau is None:
        tau = fpc_step_size(n, op.n_out, lam, safety=safety) if lam > 0 else 1.0
    elif not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")

    if x0 is None:
        x = torch.zeros(n, dtype=torch.float32, device=device)
    else:
        x = x0.detach().to(device, torch.float32).clone()
    if x.shape != (n,):
        raise ValueError(f"x0 must have shape [{n}], got {list(x.shape)}")

    # ‖Φᵀb‖_∞ decides where the continuation starts (streamed: no n-sized temporary).
    atb_inf = 0.0
    for start, length in _chunks(n, chunk):
        atb_inf = max(atb_inf, float(op.adjoint(b, offset=start, length=length).abs().max()))
    if atb_inf == 0.0:  # b = 0 or b ⟂ range(Φ): x = 0 is the solution for every μ
        x.zero_()
        return FPCResult(x, 0, 0, b_norm, 1.0 if b_norm > 0 else 0.0, True, "tolerance", float(tau), lam, mu)

    mu_bar = max(atb_inf / gamma, mu)
    stage, in_stage, converged, stopped_by = 1, 0, False, "max_iter"
    history: list[dict[str, float]] = []
    it = 0
    for it in range(1, max_iter + 1):
        r = _apply_phi(op, x, chunk).sub_(b)  # Φx − b at the current x
        thresh = tau * mu_bar
        step_sq = xp_sq = 0.0
        g_inf = 0.0
        for start, length in _chunks(n, chunk):
            g = op.adjoint(r, offset=start, length=length).to(torch.float32)
            g_inf = max(g_inf, float(g.abs().max()))
            xs = x[start : start + length]
            xp_sq += float(torch.linalg.vector_norm(xs, dtype=torch.float64)) ** 2
            # y = x − τg, then soft-threshold, in g's buffer; write back into x.
            y = g.mul_(-tau).add_(xs)
            xn = y.sign().mul_((y.abs().sub_(thresh)).clamp_(min=0))
            step_sq += float(torch.linalg.vector_norm(xn - xs, dtype=torch.float64)) ** 2
            xs.copy_(xn)
            del g, y, xn
        if not math.isfinite(step_sq) or not math.isfinite(g_inf):
            raise FloatingPointError(f"FPC diverged at iteration {it} (non-finite iterate); is the step size valid?")
        crit1 = math.sqrt(step_sq) / max(math.sqrt(xp_sq), 1.0)
        crit2 = g_inf / mu_bar - 1.0
        in_stage += 1
        info = {
            "iteration": it,
            "stage": stage,
            "mu": mu_bar,
            "step": crit1,
            "crit2": crit2,
            "residual_norm": float(r.norm()),
        }
        history.append(info)
        if callback is not None:
            callback(info)
        if verbose and (it % 50 == 0 or it == 1):
            logger.info(
                "FPC it %d stage %d mu %.3g residual %.3g step %.3g", it, stage, mu_bar, info["residual_norm"], crit1
            )
        stage_done = crit1 < xtol * math.sqrt(mu_bar / mu) and crit2 < gtol
        budget_spent = inner_iterations is not None and in_stage >= inner_iterations
        if mu_bar <= mu:
            if stage_done:
                converged, stopped_by = True, "tolerance"
                break
            if budget_spent:
                stopped_by = "stages"
                break
        elif stage_done or budget_spent:
            mu_bar = max(mu_bar / beta, mu)
            stage += 1
            in_stage = 0
    res = float(_apply_phi(op, x, chunk).sub_(b).norm())
    if verbose:
        logger.info(
            "FPC done: %d iterations, %d stages, residual %.3g (relative %.3g), stopped by %s",
            it,
            stage,
            res,
            res / b_norm,
            stopped_by,
        )
    return FPCResult(x, it, stage, res, res / b_norm, converged, stopped_by, float(tau), lam, mu, history)


# --------------------------------------------------------------------------------------------------
# Accelerated solvers for the same problem: SpaRSA and FISTA, with continuation and warm starts.
# --------------------------------------------------------------------------------------------------

#: The methods of :func:`solve_l1`.
L1_METHODS = ("sparsa", "fista")


@dataclass
class L1Result:
    """Output of :func:`solve_l1`. ``x``: ``[n_in]`` fp32 on the device of ``b``."""

    x: torch.Tensor
    method: str
    n_iter: int  # accepted iterations in all stages
    n_project: int  # Φ x applications (whole vectors), backtracking included
    n_adjoint: int  # Φᵀ y applications (whole vectors)
    n_stages: int  # continuation stages visited
    residual_norm: float  # ‖Φx − b‖
    relative_residual: float  # ‖Φx − b‖ / ‖b‖
    converged: bool  # the stopping rule held at the final μ
    stopped_by: str  # "tolerance" or "max_iter"
    lambda_max: float
    mu: float
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_iter": self.n_iter,
            "n_project": self.n_project,
            "n_adjoint": self.n_adjoint,
            "n_stages": self.n_stages,
            "residual_norm": self.residual_norm,
            "relative_residual": self.relative_residual,
            "converged": self.converged,
            "stopped_by": self.stopped_by,
            "lambda_max": self.lambda_max,
            "mu": self.mu,
        }


def _adjoint_into(op: Projection, y: torch.Tensor, out: torch.Tensor, chunk: int) -> torch.Tensor:
    """``out ← Φᵀ y`` streamed over chunks (one ``n_in`` buffer, reused across iterations)."""
    for start, length in _chunks(op.n_in, chunk):
        out[start : start + length] = op.adjoint(y, offset=start, length=length)
    return out


def _soft(y: torch.Tensor, thresh: float) -> torch.Tensor:
    """Soft thresholding ``sign(y)·max(|y| − t, 0)`` (the prox of ``t‖·‖₁``)."""
    return y.sign().mul_(y.abs().sub_(thresh).clamp_(min=0))


def _subgradient_violation(x: torch.Tensor, g: torch.Tensor, mu: float) -> float:
    """``max_i dist(−g_i, μ ∂|x_i|) / μ``: 0 exactly at a minimiser of ``½‖Φx − b‖² + μ‖x‖₁`` (``g = Φᵀ(Φx − b)``)."""
    on = torch.where(x != 0, (g + mu * x.sign()).abs(), (g.abs() - mu).clamp(min=0))
    return float(on.max()) / mu


def solve_l1(
    op: Projection,
    b: torch.Tensor,
    *,
    method: str = "sparsa",
    mu: float = 4e-5,
    continuation: float = 0.2,
    max_iter: int = 500,
    xtol: float = 1e-4,
    gtol: float = 1e-2,
    stage_gtol: float = 0.1,
    lambda_max: float | None = None,
    power_iterations: int = 30,
    lambda_safety: float = 1.1,
    memory: int = 5,
    sigma: float = 1e-2,
    x0: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    verbose: bool = False,
    callback=None,
) -> L1Result:
    """``min ‖x‖₁ + (1/2μ)‖Φx − b‖²`` (App. F eq. 6), the problem :func:`fpc` solves, in fewer operator products.

    A numerical solver kept in one function on purpose: the two methods share the continuation, the stopping
    rule and the operator bookkeeping, and each step reads against its paper.

    Both methods are proximal-gradient iterations on ``½‖Φx − b‖² + μ̄‖x‖₁`` (eq. 6 times ``μ``) that need
    only ``Φx`` and ``Φᵀy``, one of each per iteration, and share the continuation:

    - **Continuation with warm starts** (SpaRSA's adaptive rule): ``μ̄₁ = continuation·‖Φᵀb‖_∞``; each stage
      starts from the previous stage's ``x`` and, once it converges, ``μ̄ ← max(continuation·‖Φᵀr‖_∞, μ)``
      with ``r`` its residual. ``continuation ≥ 1`` turns it off (one stage at ``μ``).
    - **Stage stopping rule** (FPC's ``crit1``): ``‖x⁺ − x‖ / max(‖x‖, ε) < xtol·sqrt(μ̄/μ)`` — loose at large
      ``μ̄``, ``xtol`` at the final ``μ``.
    - ``method="sparsa"`` (Wright, Nowak & Figueiredo 2009): step ``1/α`` with the Barzilai–Borwein
      ``α = ‖Φs‖²/‖s‖²`` (``s`` the last step; ``Φs`` comes free from the stored ``Φx``), safeguarded to
      ``[λ_max·1e-8, λ_max]``, accepted when the objective is below the maximum of the last ``memory``
      values minus ``σα/2‖s‖²`` (non-monotone); otherwise ``α ← 2α`` (each retry is one more ``Φx``).
    - ``method="fista"`` (Beck & Teboulle 2009): step ``1/λ_max``, Nesterov momentum restarted at each stage
      and whenever it points uphill (O'Donoghue & Candès's gradient restart); ``Φy`` of the extrapolated
      point is the same combination of stored ``Φx`` values, so no extra product.

    ``λ_max(ΦᵀΦ)`` (``lambda_max``; estimated by power iteration and inflated by ``lambda_safety`` when not
    given) bounds the steps. Memory: four ``n_in`` fp32 vectors (``x``, the previous ``x``, a gradient buffer
    and one temporary); ``Φᵀy`` streams over ``chunk`` entries.

    Returns: :class:`L1Result` (``n_project`` / ``n_adjoint`` count whole-vector operator products, the
    cost that matters at scale; the power iteration is not counted).
    """
    if method not in L1_METHODS:
        raise ValueError(f"method must be one of {L1_METHODS}, got {method!r}")
    if b.ndim != 1 or b.shape[0] != op.n_out:
        raise ValueError(f"b must have shape [{op.n_out}] (the projection's n_out), got {list(b.shape)}")
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if not continuation > 0:
        raise ValueError(f"continuation must be positive, got {continuation}")
    b = b.detach().to(torch.float32)
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b contains NaN or inf")
    device, n = b.device, op.n_in
    b_norm = float(b.norm())
    if lambda_max is None:
        lam = estimate_lambda_max(op, n_iter=power_iterations, device=device, chunk=chunk) * lambda_safety
    else:
        lam = float(lambda_max)
    counts = {"project": 0, "adjoint": 0}

    def phi(v):
        counts["project"] += 1
        return _apply_phi(op, v, chunk)

    def phit(y, out):
        counts["adjoint"] += 1
        return _adjoint_into(op, y, out, chunk)

    x = torch.zeros(n, dtype=torch.float32, device=device) if x0 is None else x0.detach().to(device, torch.float32)
    x = x.clone()
    if x.shape != (n,):
        raise ValueError(f"x0 must have shape [{n}], got {list(x.shape)}")
    g = torch.empty_like(x)
    ax = phi(x) if x0 is not None else torch.zeros_like(b)  # Φx, kept up to date
    r = ax - b
    phit(r, g)
    g_inf = float(g.abs().max())
    if g_inf == 0.0 or not lam > 0:  # b ⟂ range(Φ) (or b = 0): x = 0 is optimal for every μ
        x.zero_()
        n_proj, n_adj = counts["project"], counts["adjoint"]
        return L1Result(x, method, 0, n_proj, n_adj, 0, b_norm, 1.0 if b_norm else 0.0, True, "tolerance", lam, mu)

    mu_bar = max(continuation * g_inf, mu) if continuation < 1 else mu

    def objective(res, xv, m):
        return 0.5 * float(res.double().square().sum()) + m * float(
            torch.linalg.vector_norm(xv, 1, dtype=torch.float64)
        )

    alpha = lam  # SpaRSA: first step of a stage is the safe 1/λ_max
    f_hist = [objective(r, x, mu_bar)]
    x_prev, ax_prev, t_mom = x.clone(), ax.clone(), 1.0  # FISTA state
    stage, in_stage, it, converged, stopped_by = 1, 0, 0, False, "max_iter"
    history: list[dict[str, float]] = []
    while it < max_iter:
        it += 1
        in_stage += 1
        if method == "sparsa":
            while True:  # backtracking on α (non-monotone acceptance)
                xn = _soft(x - g / alpha, mu_bar / alpha)
                axn = phi(xn)
                rn = axn - b
                s_sq = float((xn - x).double().square().sum())
                f_new = objective(rn, xn, mu_bar)
                if f_new <= max(f_hist[-memory:]) - 0.5 * sigma * alpha * s_sq or alpha >= lam or s_sq == 0.0:
                    break
                alpha = min(2.0 * alpha, lam)
            f_hist.append(f_new)
            step_sq = s_sq
            dax_sq = float((axn - ax).double().square().sum())
            x, ax, r = xn, axn, rn
            phit(r, g)
            alpha = min(max(dax_sq / step_sq, lam * 1e-8), lam) if step_sq > 0 else lam
        else:  # FISTA from the extrapolated point y = x + w (x − x_prev)
            t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t_mom * t_mom))
            w = (t_mom - 1.0) / t_next
            y = x + w * (x - x_prev)
            ry = ax + w * (ax - ax_prev) - b
            phit(ry, g)
            xn = _soft(y.sub_(g, alpha=1.0 / lam), mu_bar / lam)
            axn = phi(xn)
            if float(((y.add_(g, alpha=1.0 / lam)) - xn).mul_(xn - x).sum()) > 0:  # y − x⁺ · x⁺ − x > 0: restart
                t_next = 1.0
            step_sq = float((xn - x).double().square().sum())
            x_prev, ax_prev, x, ax, t_mom = x, ax, xn, axn, t_next
            r = ax - b
        del xn
        x_sq = float(x.double().square().sum())
        if method == "sparsa":  # optimality at x (g = Φᵀr is its gradient): −g ∈ μ̄ ∂‖x‖₁, scaled by μ̄
            crit = _subgradient_violation(x, g, mu_bar)
        else:
            crit = math.sqrt(step_sq) / max(math.sqrt(x_sq), 1e-12)
        info = {"iteration": it, "stage": stage, "mu": mu_bar, "step": crit, "residual_norm": float(r.norm())}
        history.append(info)
        if callback is not None:
            callback(info)
        if verbose and (it % 25 == 0 or it == 1):
            logger.info(
                "%s it %d stage %d mu %.3g residual %.3g step %.3g",
                method,
                it,
                stage,
                mu_bar,
                info["residual_norm"],
                crit,
            )
        if method == "sparsa":
            done = crit < (gtol if mu_bar <= mu else max(gtol, stage_gtol))
        else:
            done = crit < xtol * math.sqrt(mu_bar / mu) and in_stage > 1
        if done:
            if mu_bar <= mu:
                converged, stopped_by = True, "tolerance"
                break
            if method == "fista":  # the gradient at x itself decides the next μ̄
                phit(r, g)
            mu_bar = max(continuation * float(g.abs().max()), mu) if continuation < 1 else mu
            stage, in_stage, alpha, t_mom = stage + 1, 0, lam, 1.0
            x_prev, ax_prev = x.clone(), ax.clone()
            f_hist = [objective(r, x, mu_bar)]
    res = float(r.norm())
    if verbose:
        logger.info(
            "%s done: %d iterations, %d stages, %d Φx + %d Φᵀy, relative residual %.3g, stopped by %s",
            method,
            it,
            stage,
            counts["project"],
            counts["adjoint"],
            res / b_norm,
            stopped_by,
        )
    n_proj, n_adj = counts["project"], counts["adjoint"]
    return L1Result(x, method, it, n_proj, n_adj, stage, res, res / b_norm, converged, stopped_by, lam, mu, history)


def min_norm(
    op: Projection,
    b: torch.Tensor,
    *,
    rtol: float = 1e-3,
    max_iter: int = 100,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The least-ℓ2-norm ``x`` with ``Φx = b``: ``x = Φᵀu``, ``(ΦΦᵀ)u = b`` by conjugate gradients.

    The dense counterpart of eq. 6's ℓ1 solution, with the same two operators: the back-projection
    ``Φᵀb`` whitened by ``(ΦΦᵀ)⁻¹`` (``ΦΦᵀ ≈ (n/d) I`` for these projections, so CG converges in a few
    tens of products). CG runs in the ``n_out``-space; each iteration is one ``Φ Φᵀ`` pass streamed over
    chunks (no ``n_in`` temporary). Returns ``(x [n_in], figures)``.
    """
    b = b.detach().to(torch.float32)
    u = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr, b_sq = float(r.double().square().sum()), float(b.double().square().sum())
    it = 0
    while it < max_iter and rr > (rtol * rtol) * b_sq:
        it += 1
        q = _apply_phi_phit(op, p, chunk)
        alpha = rr / float(torch.dot(p.double(), q.double()))
        u.add_(p, alpha=alpha)
        r.sub_(q, alpha=alpha)
        rr_new = float(r.double().square().sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
    x = torch.empty(op.n_in, dtype=torch.float32, device=b.device)
    _adjoint_into(op, u, x, chunk)
    rel = math.sqrt(rr / b_sq) if b_sq > 0 else 0.0
    return x, {
        "n_iter": it,
        "n_project": it,
        "n_adjoint": it + 1,
        "relative_residual": rel,
        "converged": rr <= (rtol * rtol) * b_sq,
    }
