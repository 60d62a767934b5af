"""Recovery of parameter-space pseudo-Fisher vectors from their projections (§2.2.1, §3.3, App. F).

A decomposition's pseudo-Fisher vectors ``h_j`` live in the projected space (``d`` dims). When a vector
is sparse in parameter space it can be recovered from its projection by compressed sensing. With the
projection convention of :mod:`npeff_lens.projection` (``x ↦ x A``, ``A`` is ``n_in × n_out``), the
sensing matrix is ``Φ = Aᵀ`` (``n_out × n_in``), so ``Φ x = project(x)`` and ``Φᵀ y = adjoint(y)``.
We solve App. F eq. (6),

    min_x ‖x‖₁ + (1/2μ) ‖Φ x − b‖²,

with the fixed-point continuation (FPC) method of Hale, Yin & Zhang (2007), which needs only the two
operator products, never the matrix.

Pieces:

- :func:`fpc` — the solver, over any *operator* with ``n_in``, ``n_out``, ``project(x, offset=0)`` and
  ``adjoint(y, offset=0, length=None)`` (``SparseProjection`` or a dense stand-in). The iterate is one
  fp32 ``n_in`` vector; everything else streams over chunks of the flat parameter index.
- :func:`solve_l1` — the same problem by SpaRSA (default) or FISTA, with continuation and warm starts:
  the paper's one-inner-iteration FPC returns a coarse, dense vector at large ``n/d``, and FPC run to its
  stopping rule needs many more operator products than SpaRSA (benchmarks/README.md, "Recovery at large n/d").
- :func:`min_norm` — the least-norm exact fit ``x = Φᵀ(ΦΦᵀ)⁻¹b`` by conjugate gradients: dense. How selective
  each solver's directions are in perturbations, against the back-projection (the perturbation default), is
  measured in benchmarks/README.md.
- :func:`reject` — orthogonal rejection of one component from the other components (§3.3), done on the
  projected vectors before recovery.
- :func:`flatten` / :func:`unflatten` / :func:`save_pseudo_fisher` — between flat vectors and named
  parameter tensors (the store manifest's ``layout``), saved as safetensors keyed by parameter name.
- :func:`recover` — the entry point: decomposition (+ its store manifest) → named pseudo-Fisher vectors.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "ProjectionOperator",
    "FPCResult",
    "L1Result",
    "L1_METHODS",
    "RECOVERY_METHODS",
    "fpc",
    "solve_l1",
    "min_norm",
    "fpc_tau",
    "fpc_step_size",
    "estimate_lambda_max",
    "reject",
    "validate_layout",
    "flatten",
    "unflatten",
    "save_pseudo_fisher",
    "projection_config",
    "layout_from",
    "projection_from_config",
    "recover",
]

logger = logging.getLogger(__name__)

#: Flat entries handled per project/adjoint call: bounds the temporaries to a few × 16 MB (fp32).
DEFAULT_CHUNK = 1 << 22


@runtime_checkable
class ProjectionOperator(Protocol):
    """What the solver needs of a projection ``x ↦ x A`` (``A``: ``n_in × n_out``)."""

    n_in: int
    n_out: int

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x`` ``[..., L]`` holds flat entries ``[offset, offset+L)``; returns their contribution ``[..., n_out]``."""

    def adjoint(self, y: torch.Tensor, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """``y`` ``[..., n_out]`` → rows ``[offset, offset+length)`` of ``A`` applied to it: ``[..., length]``."""


# --------------------------------------------------------------------------------------------------
# Chunked operator products (Φ x, Φᵀ y) that never hold more than one chunk of temporaries.
# --------------------------------------------------------------------------------------------------


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(chunk, n - start)


def _apply_phi(op: ProjectionOperator, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``Φ x = x A`` as a sum of per-chunk contributions (the projection is separable over the flat index)."""
    out = None
    for start, length in _chunks(x.shape[-1], chunk):
        part = op.project(x[start : start + length], offset=start).to(torch.float32)
        out = part if out is None else out.add_(part)
    return out


def _apply_phi_phit(op: ProjectionOperator, u: torch.Tensor, chunk: int) -> torch.Tensor:
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
    op: ProjectionOperator,
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
    op: ProjectionOperator,
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
        op: the operator (see :class:`ProjectionOperator`).
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

L1_METHODS = ("sparsa", "fista")
#: What :func:`recover_direction` accepts: the accelerated solvers, the paper's FPC, and the back-projection.
RECOVERY_METHODS = (*L1_METHODS, "fpc", "minnorm", "adjoint")


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


def _adjoint_into(op: ProjectionOperator, y: torch.Tensor, out: torch.Tensor, chunk: int) -> torch.Tensor:
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
    op: ProjectionOperator,
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
        return L1Result(x, method, 0, counts["project"], counts["adjoint"], 0, b_norm, 1.0 if b_norm else 0.0,
                        True, "tolerance", lam, mu)  # fmt: skip

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
            logger.info("%s it %d stage %d mu %.3g residual %.3g step %.3g", method, it, stage, mu_bar,
                        info["residual_norm"], crit)  # fmt: skip
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
        logger.info("%s done: %d iterations, %d stages, %d Φx + %d Φᵀy, relative residual %.3g, stopped by %s",
                    method, it, stage, counts["project"], counts["adjoint"], res / b_norm, stopped_by)  # fmt: skip
    return L1Result(x, method, it, counts["project"], counts["adjoint"], stage, res, res / b_norm, converged,
                    stopped_by, lam, mu, history)  # fmt: skip


def min_norm(
    op: ProjectionOperator,
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
    return x, {"n_iter": it, "n_project": it, "n_adjoint": it + 1, "relative_residual": rel,
               "converged": rr <= (rtol * rtol) * b_sq}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Orthogonal rejection (§3.3).
# --------------------------------------------------------------------------------------------------


def _orthonormal_basis(m: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis ``[d, r']`` of the column span of ``m`` ``[d, r]`` (rank-deficient safe)."""
    if m.shape[1] == 0:
        return m
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    keep = s > rtol * s.max().clamp_min(torch.finfo(s.dtype).tiny)
    return u[:, keep]


def reject(
    vectors: torch.Tensor,
    index: int,
    threshold: float | None = 0.5,
    *,
    preserve_kept: bool = False,
    return_indices: bool = False,
):
    """Orthogonal rejection of component ``index`` from the components dissimilar to it (§3.3).

    §3.3: the perturbation should be orthogonal to all *other* pseudo-Fisher vectors, but rejecting only
    from those with absolute cosine similarity *below* ``threshold`` (0.5 in the paper) worked best;
    vectors at least as similar as the threshold are kept (not rejected from). Done on the projected
    vectors. The result is ``v − P v`` with ``P`` the orthogonal projector onto the *span* of the rejected
    vectors (an SVD basis, so correlated or rank-deficient sets are handled exactly, unlike sequential
    Gram–Schmidt against the raw vectors): it is orthogonal to every rejected vector and unchanged in
    every direction orthogonal to them.

    ``preserve_kept=True`` (not in the paper) instead removes the smallest change that makes the vector
    orthogonal to the rejected vectors *and* leaves its inner products with the kept vectors unchanged,
    even when kept and rejected vectors are correlated.

    Args:
        vectors: ``[C, d]`` pseudo-Fisher vectors (rows).
        index: the component to reject.
        threshold: reject from components with ``|cos| < threshold``; ``None`` rejects from none.
        return_indices: also return the indices rejected from.

    Returns: ``[d]`` (same dtype/device as ``vectors``), or ``(vector, rejected_indices)``.
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [components, dim], got shape {list(vectors.shape)}")
    c = vectors.shape[0]
    if not 0 <= index < c:
        raise ValueError(f"component index {index} out of range for {c} components")
    work = vectors.detach().to(torch.float64)
    v = work[index]
    if threshold is None:
        rejected = torch.zeros(c, dtype=torch.bool, device=vectors.device)
    else:
        norms = work.norm(dim=1)
        vn = norms[index]
        if vn == 0:
            raise ValueError(f"component {index} has zero norm; nothing to recover")
        cos = (work @ v) / (norms * vn).clamp_min(torch.finfo(torch.float64).tiny)
        rejected = cos.abs() < threshold
        rejected[index] = False
    kept = ~rejected
    kept[index] = False
    r_mat = work[rejected].T  # [d, r]
    if r_mat.shape[1] == 0:
        out = v
    elif not preserve_kept or int(kept.sum()) == 0:
        q = _orthonormal_basis(r_mat)
        out = v - q @ (q.T @ v)
    else:
        # min ‖w‖ s.t. Rᵀw = Rᵀv, Kᵀw = 0; then v − w ⟂ R and ⟨v − w, k⟩ = ⟨v, k⟩.
        k_mat = work[kept].T
        m = torch.cat([r_mat, k_mat], dim=1)
        rhs = torch.cat([r_mat.T @ v, torch.zeros(k_mat.shape[1], dtype=v.dtype, device=v.device)])
        w = torch.linalg.pinv(m.T, rtol=1e-10) @ rhs
        out = v - w
    out = out.to(vectors.dtype)
    if return_indices:
        return out, torch.nonzero(rejected).flatten().tolist()
    return out


# --------------------------------------------------------------------------------------------------
# Flat vector ↔ named parameters.
# --------------------------------------------------------------------------------------------------


def validate_layout(layout: Sequence[Mapping[str, Any]]) -> int:
    """Check a manifest layout (contiguous flat offsets from 0, numel = prod(shape)); returns its total size."""
    if not isinstance(layout, Sequence) or isinstance(layout, (str, bytes)) or len(layout) == 0:
        raise ValueError("layout must be a non-empty list of {name, shape, offset, numel} entries")
    expected, seen = 0, set()
    for i, entry in enumerate(layout):
        missing = {"name", "shape", "offset", "numel"} - set(entry)
        if missing:
            raise ValueError(f"layout entry {i} lacks {sorted(missing)}")
        name, shape, offset, numel = entry["name"], list(entry["shape"]), int(entry["offset"]), int(entry["numel"])
        if name in seen:
            raise ValueError(f"layout names parameter {name!r} twice")
        seen.add(name)
        if math.prod(shape) != numel:
            raise ValueError(f"layout entry {name!r}: shape {shape} has {math.prod(shape)} entries, numel says {numel}")
        if offset != expected:
            raise ValueError(
                f"layout entry {name!r}: offset {offset}, expected {expected} (offsets must be contiguous from 0)"
            )
        expected += numel
    return expected


def unflatten(flat: torch.Tensor, layout: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``[n]`` flat vector → ``{name: tensor of that parameter's shape}`` (views into ``flat``)."""
    total = validate_layout(layout)
    if flat.ndim != 1:
        raise ValueError(f"flat must be a 1-d vector, got shape {list(flat.shape)}")
    if flat.shape[0] != total:
        raise ValueError(f"flat vector has {flat.shape[0]} entries but the layout covers {total}")
    return {e["name"]: flat[int(e["offset"]) : int(e["offset"]) + int(e["numel"])].view(*e["shape"]) for e in layout}


def flatten(named: Mapping[str, torch.Tensor], layout: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``{name: tensor}`` → ``[n]`` flat vector in layout order (inverse of :func:`unflatten`)."""
    validate_layout(layout)
    names = [e["name"] for e in layout]
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"missing parameters for the layout: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    extra = sorted(set(named) - set(names))
    if extra:
        raise ValueError(f"parameters not in the layout: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    parts = []
    for e in layout:
        t = named[e["name"]]
        if list(t.shape) != list(e["shape"]):
            raise ValueError(f"parameter {e['name']!r} has shape {list(t.shape)}, layout says {list(e['shape'])}")
        parts.append(t.reshape(-1))
    return torch.cat(parts)


def save_pseudo_fisher(
    path: str | os.PathLike, named: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> None:
    """Save named pseudo-Fisher tensors as safetensors keyed by parameter name (loadable with
    ``safetensors.torch.load_file``); non-string metadata values are JSON-encoded."""
    from safetensors.torch import save

    from .io import atomic_write

    # safetensors refuses tensors sharing storage (views of one flat vector): copy each.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in named.items()}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, save(tensors, metadata=meta))


# --------------------------------------------------------------------------------------------------
# Manifests and the entry point.
# --------------------------------------------------------------------------------------------------

_MANIFEST_ATTRS = ("store_manifest", "manifest", "manifest_")
_NESTED_KEYS = ("store_manifest", "store", "manifest")


def _manifests_of(decomposition) -> list[Mapping]:
    found = []
    if isinstance(decomposition, Mapping):
        found.append(decomposition)
    for attr in _MANIFEST_ATTRS:
        m = getattr(decomposition, attr, None)
        if isinstance(m, Mapping):
            found.append(m)
    return found


def _find_key(manifests: Sequence[Mapping], key: str, depth: int = 3):
    for m in manifests:
        if key in m and m[key] is not None:
            return m[key]
    if depth > 0:
        nested = [m[k] for m in manifests for k in _NESTED_KEYS if isinstance(m.get(k), Mapping)]
        if nested:
            return _find_key(nested, key, depth - 1)
    return None


def projection_config(source) -> dict | None:
    """The ``projection`` config dict from a manifest-shaped dict or an object carrying one
    (``store_manifest`` / ``manifest`` attribute; nested ``store``/``store_manifest`` keys are searched)."""
    cfg = _find_key(_manifests_of(source), "projection")
    return dict(cfg) if isinstance(cfg, Mapping) else None


def layout_from(source) -> list[dict] | None:
    """The parameter ``layout`` from a manifest-shaped dict or an object carrying one."""
    lay = _find_key(_manifests_of(source), "layout")
    return [dict(e) for e in lay] if lay is not None else None


def projection_from_config(config: Mapping[str, Any]) -> ProjectionOperator:
    """Rebuild the projection operator a manifest describes (``kind``: ``sparse`` or ``kron``)."""
    from npeff_lens import projection as projection_module  # the one definition of the projections

    return projection_module.projection_from_config(dict(config))


def recover_direction(
    components: torch.Tensor,
    index: int,
    projection: ProjectionOperator | None,
    *,
    method: str = "fpc",
    reject_threshold: float | None = 0.5,
    mu: float = 4e-5,
    lambda_max: float | None = None,
    **fpc_kwargs,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One component's flat parameter-space direction ``[n_in]`` and the solver's figures (§3.3, App. F).

    ``h_index`` is rejected from the dissimilar components once (:func:`reject`; ``None`` skips it), then
    ``method="fpc"`` solves FPC against ``projection`` (the figures are :class:`FPCResult`'s),
    ``"sparsa"`` / ``"fista"`` solve the same problem with :func:`solve_l1` (:class:`L1Result`'s figures),
    ``"minnorm"`` takes the least-norm exact fit :func:`min_norm` (dense; how selective each solver's
    directions are is measured in benchmarks/README.md),
    and ``method="adjoint"`` takes the back-projection ``A·b`` (``projection.adjoint(b)``; for it ``δᵀF_iδ`` is
    the projected PEF's loading that NPEFF fitted; dense, cheap, and the perturbation default).
    ``projection=None``: unprojected PEFs, whose components already live in parameter space.
    """
    if method not in RECOVERY_METHODS:
        raise ValueError(f"method must be one of {RECOVERY_METHODS}, got {method!r}")
    if reject_threshold is not None:
        b, rejected = reject(components, index, reject_threshold, return_indices=True)
    else:
        b, rejected = components[index], []
    info: dict[str, Any] = {"n_rejected": len(rejected), "n_iter": None, "relative_residual": math.nan}
    if projection is None:
        return b.float().clone(), {**info, "relative_residual": 0.0}
    if method == "adjoint":
        return projection.adjoint(b.float()), info
    if method == "minnorm":
        options = {k: v for k, v in fpc_kwargs.items() if k not in ("verbose", "callback")}
        x, figures = min_norm(projection, b, **options)
        return x, {**info, **figures}
    if method in L1_METHODS:
        res = solve_l1(projection, b, method=method, mu=mu, lambda_max=lambda_max, **fpc_kwargs)
    else:
        res = fpc(projection, b, mu=mu, lambda_max=lambda_max, **fpc_kwargs)
    if res.stopped_by == "max_iter":
        logger.warning(
            "component %d: %s stopped at max_iter=%d before its stopping rule held (relative residual %.3g)",
            index,
            method,
            res.n_iter,
            res.relative_residual,
        )
    return res.x, {**info, **res.as_dict()}


def _recovery_inputs(decomposition, components, projection, layout, flat: bool):
    """``(components_ [C, d], indices, projection operator, its config or None, layout or None)``, checked."""
    if isinstance(decomposition, torch.Tensor):
        comps = decomposition
    elif isinstance(decomposition, Mapping):
        comps = decomposition.get("components_")
    else:
        comps = getattr(decomposition, "components_", None)
    if comps is None:
        raise ValueError("decomposition has no components_ (fit it first, or pass the [C, d] tensor)")
    comps = torch.as_tensor(comps)
    if comps.ndim != 2:
        raise ValueError(f"components_ must be [components, dim], got shape {list(comps.shape)}")
    n_comp, dim = comps.shape
    if components is None:
        indices = list(range(n_comp))
    else:
        indices = [components] if isinstance(components, int) else [int(i) for i in components]
    bad = [i for i in indices if not 0 <= i < n_comp]
    if bad:
        raise ValueError(f"component index {bad[0]} out of range: the decomposition has {n_comp} components")
    proj_cfg = None
    if projection is None or isinstance(projection, Mapping):
        proj_cfg = dict(projection) if isinstance(projection, Mapping) else projection_config(decomposition)
        if proj_cfg is None:
            raise ValueError("no projection: pass projection= or a decomposition whose store manifest records one")
        if "n_out" in proj_cfg and int(proj_cfg["n_out"]) != dim:
            raise ValueError(f"projection n_out={proj_cfg['n_out']} does not match components_ width {dim}")
        projection = projection_from_config(proj_cfg)
    if projection.n_out != dim:
        raise ValueError(f"projection n_out={projection.n_out} does not match components_ width {dim}")
    if layout is None and not flat:
        layout = layout_from(decomposition)
    if layout is not None:
        total = validate_layout(layout)
        if total != projection.n_in:
            raise ValueError(f"layout covers {total} parameters but the projection has n_in={projection.n_in}")
    return comps, indices, projection, proj_cfg, layout


def recover(
    decomposition,
    components: int | Sequence[int] | None = None,
    *,
    projection: ProjectionOperator | Mapping[str, Any] | None = None,
    layout: Sequence[Mapping[str, Any]] | None = None,
    mu: float = 4e-5,
    reject_threshold: float | None = 0.5,
    out_dir: str | os.PathLike | None = None,
    flat: bool = False,
    device: torch.device | str | None = None,
    lambda_max: float | None = None,
    verbose: bool = False,
    progress: bool = False,
    **fpc_kwargs,
) -> dict[int, dict[str, torch.Tensor] | torch.Tensor]:
    """Recover parameter-space pseudo-Fisher vectors of a decomposition's components (§2.2.1, §3.3, App. F).

    For each requested component ``j``: reject ``h_j`` from the dissimilar components (:func:`reject`,
    ``|cos| < reject_threshold``; ``None`` skips rejection), solve FPC (:func:`fpc`, ``μ = mu``) against
    the projection, and split the flat result by the parameter layout.

    Args:
        decomposition: anything with ``components_`` ``[C, d]`` (an ``NPEFF`` estimator, a dict with
            that key, or the ``[C, d]`` tensor itself); its store manifest is read from a
            ``store_manifest`` / ``manifest`` attribute (or the dict itself) when ``projection`` /
            ``layout`` are not given.
        components: an index, a list of indices, or ``None`` for all.
        projection: an operator, or a manifest ``projection`` dict (``{"kind": "sparse", "n_in", "n_out",
            "seed", "density"}``).
        layout: the manifest ``layout``; without one (or with ``flat=True``) flat ``[n_in]`` vectors are returned.
        out_dir: if given, writes ``component_{j:05d}.safetensors`` there (keyed by parameter name, or
            ``"pseudo_fisher"`` for a flat vector) with the solver statistics as metadata.
        lambda_max: ``λ_max(ΦᵀΦ)`` if known; otherwise estimated once and shared by all components.
        fpc_kwargs: passed to :func:`recover_direction`: ``method`` (``"fpc"`` by default; ``"sparsa"``,
            ``"fista"``, ``"minnorm"``, ``"adjoint"``) and the solver's options (:func:`fpc`'s ``gamma``,
            ``beta``, ``inner_iterations``, ``max_iter``, ...; :func:`solve_l1`'s; :func:`min_norm`'s).
            The default ``inner_iterations=1`` is App. F's perturbation setting (a coarse, dense
            reconstruction); ``inner_iterations=None`` runs FPC to its stopping rule (sparse recovery).

    Returns: ``{j: {name: tensor}}`` (or ``{j: flat tensor}``), on ``device`` (default: that of ``components_``).
    """
    comps, indices, projection, proj_cfg, layout = _recovery_inputs(decomposition, components, projection, layout, flat)
    device = torch.device(device) if device is not None else comps.device
    comps = comps.to(device)
    if lambda_max is None and fpc_kwargs.get("method", "fpc") not in ("adjoint", "minnorm"):
        lambda_max = estimate_lambda_max(
            projection,
            n_iter=fpc_kwargs.pop("power_iterations", 30),
            device=device,
            chunk=fpc_kwargs.get("chunk", DEFAULT_CHUNK),
        )
        lambda_max *= fpc_kwargs.pop("lambda_safety", 1.1)  # see fpc_step_size: an estimate is from below

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    from .io import progress as progress_bar

    iterator = progress_bar(indices, desc="recovering pseudo-Fisher vectors", unit="component", enabled=progress)

    results: dict[int, dict[str, torch.Tensor] | torch.Tensor] = {}
    for j in iterator:
        x, info = recover_direction(
            comps,
            j,
            projection,
            reject_threshold=reject_threshold,
            mu=mu,
            lambda_max=lambda_max,
            verbose=verbose,
            **fpc_kwargs,
        )
        if verbose:
            logger.info(
                "component %d: %d iterations, relative residual %.3g, %d nonzeros, rejected from %d",
                j,
                info["n_iter"],
                info["relative_residual"],
                int((x != 0).sum()),
                info["n_rejected"],
            )
        value = x if (layout is None or flat) else unflatten(x, layout)
        results[j] = value
        if out_dir is not None:
            named = {"pseudo_fisher": x} if isinstance(value, torch.Tensor) else value
            meta = {"component": j, "reject_threshold": reject_threshold, **info}
            if proj_cfg is not None:
                meta["projection"] = proj_cfg
            save_pseudo_fisher(os.path.join(out_dir, f"component_{j:05d}.safetensors"), named, meta)
    return results
