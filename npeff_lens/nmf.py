"""The NPEFF solver as functions, for callers that want arrays rather than an estimator.

:func:`npeff_factorization` is the functional form of :class:`~npeff_lens.decomposition.NPEFF`, as
scikit-learn's ``non_negative_factorization`` is of ``NMF``; the module also exposes the solver's single steps.
The solver is §2.2 and App. D of the paper.

Minimises, over coefficients ``W >= 0`` ("example component") and pseudo-Fisher vectors
``H`` ("component dim")::

    mean_i || F_i - sum_j W_ij h_j h_j^T ||_F^2,      F_i = G_i^T G_i / ||G_i^T G_i||_F

directly on the low-rank PEFs ``G`` ("example rank dim"): no ``d x d`` (or ``m x m``) matrix is ever
formed. One step (:func:`sweep`) computes ``B = G H^T`` ("example rank component") once and uses it for both
the multiplicative W update (App. D.1) and the gradient step on H (App. D.2). Data-parallel under
``torch.distributed``: each rank owns a contiguous slice of the examples (a :class:`~npeff_lens.sources.Shard`),
with one all-reduce of the H gradient (packed with the loss scalars) per step (App. D.3).

The pieces, for callers that drive the steps themselves (benchmarks): :func:`~npeff_lens.sources.open_shard`
reads the PEFs, :func:`init_W` / :func:`init_H` draw the initial state (App. D.4), :func:`sweep` is one step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoints import Checkpoints, fingerprint
from .constraints import validate_params
from .errors import warn_caller
from .io import progress as progress_bar
from .sources import Shard, all_reduce, gather_rows, manifest_of, open_shard, rank_and_world

__all__ = ["Factorization", "factorize", "init_H", "init_W", "npeff_factorization", "sweep"]

W_INIT_BLOCK = 4096  # rows per seeded block of the W initialisation: identical for any rank split


# ----------------------------------------------------------------------------------------------
# Initialisation (App. D.4)
# ----------------------------------------------------------------------------------------------


def init_W(seed: int, lo: int, hi: int, C: int, dtype) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the initial W ~ U[0, 1] ("example component", CPU), drawn in seeded blocks of
    ``W_INIT_BLOCK`` rows so that any split of the examples over ranks gives the same W."""
    parts = []
    for block in range(lo // W_INIT_BLOCK, (hi - 1) // W_INIT_BLOCK + 1 if hi > lo else 0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * block + 1)
        rows = torch.rand(W_INIT_BLOCK, C, generator=g, dtype=torch.float64)
        a, b = max(lo, block * W_INIT_BLOCK), min(hi, (block + 1) * W_INIT_BLOCK)
        parts.append(rows[a - block * W_INIT_BLOCK : b - block * W_INIT_BLOCK])
    W = torch.cat(parts) if parts else torch.empty(0, C, dtype=torch.float64)
    return W.to(dtype)


def init_H(seed: int, C: int, d: int, dtype) -> torch.Tensor:
    """The initial H ~ N(0, 2 / (C d)) ("component dim", CPU)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2)
    return (torch.randn(C, d, generator=g, dtype=torch.float64) * math.sqrt(2.0 / (C * d))).to(dtype)


def _initial_state(shard: Shard, C: int, seed: int, W=None, H=None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of W, and H, on the device: drawn from ``seed`` or the given ones (``init="custom"``)."""
    lo, hi, d, dtype, device = shard.lo, shard.hi, shard.dim, shard.dtype, shard.device
    W_ = init_W(seed, lo, hi, C, dtype) if W is None else torch.as_tensor(W)[lo:hi].to(dtype)
    H_ = init_H(seed, C, d, dtype) if H is None else torch.as_tensor(H).to(dtype).clone()
    if tuple(W_.shape) != (hi - lo, C) or tuple(H_.shape) != (C, d):
        raise ValueError(f"initial W must be [{len(shard.source)}, {C}] and H [{C}, {d}]")
    if bool((W_ < 0).any()):
        raise ValueError("initial W must be non-negative")
    W_ = W_.to(device).clone()
    W_[~shard.valid.to(device)] = 0
    return W_, H_.to(device)


# ----------------------------------------------------------------------------------------------
# The update steps
# ----------------------------------------------------------------------------------------------


def sweep(shard: Shard, W: torch.Tensor, H: torch.Tensor, n_valid: int, *, eps: float, update_W: bool, grad: bool):
    """One pass over the shard: ``B = G H^T`` per block, then (optionally) the W update and the H gradient.

    ``W``: this rank's rows ("example component"), updated in place when ``update_W``; ``H`` ("component dim")
    is not changed; ``n_valid``: the examples in the fit over all ranks (:func:`~npeff_lens.sources.open_shard`).
    Returns ``(loss before, loss after the W update, gradient of the mean loss in H or None)``; one NPEFF step
    is ``H -= lr * gradient``. Scalars and the gradient are all-reduced together (one collective, App. D.3).
    """
    C, d = H.shape
    S = H @ H.T
    S2 = S * S  # (H H^T) ⊙ (H H^T)
    acc = torch.zeros(C * d + C * C + 2 if grad else 2, dtype=H.dtype, device=H.device)
    if grad:
        gradT2 = acc[: C * d].view(C, d)
        WtW = acc[C * d : C * d + C * C].view(C, C)
    scal = acc[-2:].view(2)  # <W, N>, <W, W S2> before the W update
    wn_mid = torch.zeros((), dtype=torch.float64, device=H.device)
    for s, G, scale in shard.blocks():
        b, r, _ = G.shape
        Wb = W[s : s + b]
        G2 = G.reshape(b * r, d)
        B = (G2 @ H.T).view(b, r, C) * scale[:, None, None]  # App. D.1: B = G H^T (normalised)
        N = B.square().sum(1)  # "example component"
        D = Wb @ S2
        scal[0] += (Wb * N).sum()
        scal[1] += (Wb * D).sum()
        if update_W:
            Wb = Wb * N / (D + eps)  # multiplicative update, App. D.1
            W[s : s + b] = Wb
            wn_mid += (Wb * N).sum().double()
        if grad:
            coef = (B * Wb[:, None, :]) * scale[:, None, None]  # T2 = -4 sum W B G, App. D.2
            gradT2.addmm_(coef.view(b * r, C).T, G2, alpha=-4.0)
            WtW.addmm_(Wb.T, Wb)
    if grad:
        # T1 = 4 ((W^T W) ⊙ (H H^T)) H, linear in W^T W, so per-rank terms sum correctly.
        gradT2.addmm_(WtW * S, H, alpha=4.0)
        extra = torch.stack([wn_mid.to(H.dtype), (S2 * WtW).sum()])
    else:
        # <W', W' S2> for the updated W needs W'^T W' (cheap relative to the sweep).
        wtw = torch.zeros(C, C, dtype=H.dtype, device=H.device)
        if update_W:
            for s in range(0, W.shape[0], 65536):
                wtw.addmm_(W[s : s + 65536].T, W[s : s + 65536])
        extra = torch.stack([wn_mid.to(H.dtype), (S2 * wtw).sum()])
    packed = all_reduce(torch.cat([acc, extra]))
    wn, wd, wn2, wd2 = (float(x) for x in packed[-4:].double())
    loss = (n_valid - 2.0 * wn + wd) / n_valid
    loss_mid = (n_valid - 2.0 * wn2 + wd2) / n_valid if update_W else loss
    g = packed[: C * d].view(C, d) / n_valid if grad else None
    return loss, loss_mid, g


def _w_updates(shard: Shard, W: torch.Tensor, H: torch.Tensor, *, eps: float, n_steps: int) -> torch.Tensor:
    """``n_steps`` multiplicative W updates (App. D.1) with H fixed; returns the new W.

    ``B = G H^T`` does not change when H is fixed, so the data are read once and the updates then
    run on ``[m, C]`` matrices.
    """
    C = H.shape[0]
    S2 = (H @ H.T).square()
    N = torch.empty(shard.m, C, dtype=H.dtype, device=H.device)
    for s, G, scale in shard.blocks():
        b, r, d = G.shape
        B = (G.reshape(b * r, d) @ H.T).view(b, r, C) * scale[:, None, None]
        N[s : s + b] = B.square().sum(1)
    for step in range(n_steps):
        W = W * N / (W @ S2 + eps)
        if step % 50 == 0 and not bool(torch.isfinite(W).all()):
            raise FloatingPointError(f"NPEFF.transform: non-finite coefficients at W step {step + 1}")
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(f"NPEFF.transform: non-finite coefficients after {n_steps} W steps")
    return W


def _unit_norm(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm pseudo-Fisher vectors; ``W_ij h_j h_j^T`` unchanged (§2.2)."""
    hnorm = H.norm(dim=1)
    safe = torch.where(hnorm > 0, hnorm, torch.ones_like(hnorm))
    return W * (safe * safe)[None, :], H / safe[:, None]


def _fit(shard: Shard, n_valid: int, W: torch.Tensor, H: torch.Tensor, params: dict, checkpoints):
    """The warm-up and joint steps (``params``: the hyper-parameters) from ``(W, H)`` or the latest of
    ``checkpoints`` (a :class:`~npeff_lens.checkpoints.Checkpoints` or None); ``(W, H, hist, hist_w)``."""
    n_steps, n_warmup_steps, lr, warmup_lr = (params[k] for k in ("n_steps", "n_warmup_steps", "lr", "warmup_lr"))
    eps, checkpoint_every, callback = params["eps"], params["checkpoint_every"], params["callback"]
    step, hist, hist_w = 0, [], []  # hist[t]: loss after t steps; hist_w[t]: after step t+1's W update
    if checkpoints is not None:
        resumed = checkpoints.load(shard.dtype, shard.device)
        if resumed is not None:
            step, W, H, hist, hist_w = resumed
    total, rises = n_warmup_steps + n_steps, []
    show = params["progress"] and rank_and_world()[0] == 0 and total > step
    with progress_bar(total=total, initial=step, desc="NPEFF", unit="step", enabled=show) as bar:
        while step < total:
            warm = step < n_warmup_steps
            rate = warmup_lr if warm else lr
            loss, loss_mid, g = sweep(shard, W, H, n_valid, eps=eps, update_W=not warm, grad=True)
            if not (math.isfinite(loss) and math.isfinite(loss_mid) and bool(torch.isfinite(g).all())):
                raise FloatingPointError(
                    f"NPEFF: non-finite loss or H gradient at step {step + 1} ({'warm-up' if warm else 'joint'}); "
                    f"the H learning rate ({rate}) is probably too large"
                )
            if hist and loss > hist_w[-1] + 1e-6 * max(1.0, abs(hist_w[-1])):
                rises.append(step)
            hist.append(loss)
            hist_w.append(loss_mid)
            H -= rate * g  # App. D.2
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.5f}", refresh=False)
            if checkpoints is not None and (step % checkpoint_every == 0 or step == total):
                checkpoints.save(step, W, H, hist, hist_w)
            if callback is not None:
                callback(step, loss)
    final, _, _ = sweep(shard, W, H, n_valid, eps=eps, update_W=False, grad=False)
    if not math.isfinite(final):
        raise FloatingPointError(f"NPEFF: non-finite loss after step {step}; lower the learning rate")
    hist.append(final)
    if rises:
        warn_caller(
            f"NPEFF: the loss rose after {len(rises)} H step(s) (first after step {rises[0]}); "
            "consider a smaller lr / warmup_lr",
            RuntimeWarning,
        )
    return W, H, hist, hist_w


# ----------------------------------------------------------------------------------------------
# The functional solver
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factorization:
    """What :func:`npeff_factorization` returns; it unpacks as ``W, H, n_iter``.

    ``W`` ("example component", CPU): coefficients of the unit-norm PEFs (0 for excluded examples);
    ``H`` ("component dim", CPU): the pseudo-Fisher vectors, unit L2 norm after a fit (given ones are returned
    as given when ``update_H=False``); ``n_iter``: steps run (W steps only when ``update_H=False``);
    ``loss_history`` ``[n_iter + 1]`` and ``w_step_loss_history`` ``[n_iter]`` (float64; empty when
    ``update_H=False``): the mean loss after each step and right after each step's W update; ``pef_norms``
    ``[m]`` (float64): ``||G_i^T G_i||_F`` of the input (NaN where non-finite); ``n_rows``: r;
    ``manifest``: the source's manifest.
    """

    W: torch.Tensor
    H: torch.Tensor
    n_iter: int
    loss_history: torch.Tensor
    w_step_loss_history: torch.Tensor
    pef_norms: torch.Tensor
    n_rows: int
    manifest: dict

    def __iter__(self) -> Iterator[Any]:
        return iter((self.W, self.H, self.n_iter))

    @property
    def excluded(self) -> torch.Tensor:
        """BoolTensor ``[m]``: examples left out of the fit (zero or non-finite PEF)."""
        return ~(torch.isfinite(self.pef_norms) & (self.pef_norms > 0))


def npeff_factorization(
    pefs,
    n_components: int | None = None,
    *,
    W: torch.Tensor | None = None,
    H: torch.Tensor | None = None,
    update_H: bool = True,
    init: str | None = None,
    n_steps: int = 1000,
    n_warmup_steps: int = 100,
    lr: float = 0.5,
    warmup_lr: float = 0.5,
    seed: int = 0,
    eps: float = 1e-12,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    storage_dtype: torch.dtype | str | None = None,
    memory_budget: int = 4 * 2**30,
    batch_size: int | None = None,
    nonfinite: str = "raise",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    callback: Callable[[int, float], Any] | None = None,
    progress: bool = True,
) -> Factorization:
    """Factorise PEFs with NPEFF and return the coefficients and the components: the function behind ``NPEFF``.

    It minimises ``mean_i ‖F_i − Σ_j W_ij h_j h_jᵀ‖_F²`` over non-negative coefficients ``W`` and components
    ``H``, where ``F_i`` is example ``i``'s PEF at unit Frobenius norm. :class:`~npeff_lens.decomposition.NPEFF`'s
    ``fit`` and ``transform`` call it; call it directly for the arrays without an estimator (as scikit-learn's
    ``non_negative_factorization`` is to ``NMF``).

    Args:
        pefs: a tensor "example rank dim" (or "example dim", one row per example), or a
            :class:`~npeff_lens.sources.PEFSource` such as a ``PEFStore``.
        n_components: the number ``C`` of components (default with ``update_H=False``: the rows of ``H``).
        W: initial coefficients ``[m, C]``.
        H: initial components ``[C, d]``; required with ``update_H=False``.
        update_H: ``False`` fits only the coefficients of the fixed components ``H``: ``n_steps``
            multiplicative W updates from ``W`` (or from U[0, 1] drawn from ``seed``), with no warm-up and no
            checkpoints.
        init: ``"random"`` (W ~ U[0, 1], H ~ N(0, 2 / (C d)) from ``seed``) or ``"custom"`` (the given ``W``
            and / or ``H``; a missing one is drawn). ``None`` means ``"custom"`` when ``W`` or ``H`` is given,
            else ``"random"``.

    Every other keyword argument is one of :class:`~npeff_lens.decomposition.NPEFF`'s hyper-parameters, with its
    default and meaning (checked by :func:`~npeff_lens.constraints.validate_params`).

    Returns:
        A :class:`Factorization`, which unpacks as ``W, H, n_iter``. Under ``torch.distributed`` every rank calls
        the function and gets the whole result.

    Example:
        >>> from npeff_lens import npeff_factorization
        >>> W, H, n_iter = npeff_factorization(pefs, 16, n_steps=300)    # pefs: [m, r, d]
        >>> W_new, _, _ = npeff_factorization(new_pefs, H=H, update_H=False)

    Notes:
        The objective is §2.2 of the paper; the W update, the H step and the initialisation are App. D.1, D.2
        and D.4.
    """
    params = dict(locals())  # NPEFF's hyper-parameters: the arguments but the data, W, H and update_H
    for name in ("pefs", "W", "H", "update_H"):
        del params[name]
    if n_components is None:
        if H is None:
            raise ValueError("pass n_components, or the components H")
        params["n_components"] = n_components = int(torch.as_tensor(H).shape[0])
    if init is None:
        params["init"] = init = "custom" if (W is not None or H is not None) else "random"
    validate_params(params)
    return factorize(pefs, params, W=W, H=H, update_H=update_H)


def factorize(pefs, params: dict, *, W=None, H=None, update_H: bool = True) -> Factorization:
    """:func:`npeff_factorization` with its hyper-parameters given as one dict ``params`` (every keyword argument
    of that function but ``W``, ``H`` and ``update_H``, ``n_components`` and ``init`` resolved), checked
    already by :func:`~npeff_lens.constraints.validate_params`: the estimator checks its values once per set of
    values and then calls this."""
    n_components, init, seed = params["n_components"], params["init"], params["seed"]
    if update_H and (W is not None or H is not None) and init != "custom":
        raise ValueError("W / H initial values need init='custom'")
    if not update_H and H is None:
        raise ValueError("update_H=False fits the coefficients of given components: pass H")
    reading = ("device", "dtype", "storage_dtype", "memory_budget", "batch_size", "nonfinite")
    source, shard, n_valid = open_shard(pefs, n_components, **{k: params[k] for k in reading})
    if not update_H:
        coefficients, norms = _fit_coefficients(shard, W, H, params)
        empty = torch.zeros(0, dtype=torch.float64)
        H = torch.as_tensor(H).cpu()
        return Factorization(
            coefficients, H, params["n_steps"], empty, empty, norms.double(), shard.rows, manifest_of(source)
        )
    W_, H_ = _initial_state(shard, n_components, seed, W, H)
    checkpoints = None
    if params["checkpoint_dir"] is not None:
        key = fingerprint(params, len(source), shard.rows, shard.dim)
        checkpoints = Checkpoints(params["checkpoint_dir"], shard.lo, shard.hi, key)
    W_, H_, hist, hist_w = _fit(shard, n_valid, W_, H_, params, checkpoints)
    W_, H_ = _unit_norm(W_, H_)
    coefficients, norms = gather_rows(W_, shard.norms.to(W_.device), len(source))
    return Factorization(
        W=coefficients,
        H=H_.cpu(),
        n_iter=len(hist) - 1,
        loss_history=torch.tensor(hist, dtype=torch.float64),
        w_step_loss_history=torch.tensor(hist_w, dtype=torch.float64),
        pef_norms=norms.double(),
        n_rows=shard.rows,
        manifest=manifest_of(source),
    )


def _fit_coefficients(shard: Shard, W, H, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``update_H=False``: all the coefficients ``[m, C]`` of the fixed components ``H`` and the norms ``[m]``
    (CPU), from W (or U[0, 1] drawn from the seed) after ``n_steps`` W updates."""
    C, device, dtype = params["n_components"], shard.device, shard.dtype
    H_ = torch.as_tensor(H).to(device=device, dtype=dtype)
    if tuple(H_.shape) != (C, shard.dim):
        raise ValueError(f"H must be [{C}, {shard.dim}]; got {tuple(H_.shape)}")
    if W is None:
        W_ = init_W(params["seed"], shard.lo, shard.hi, C, dtype).to(device)
    else:
        W_ = torch.as_tensor(W)[shard.lo : shard.hi].to(device=device, dtype=dtype).clone()
    W_[~shard.valid.to(device)] = 0
    W_ = _w_updates(shard, W_, H_, eps=params["eps"], n_steps=params["n_steps"])
    return gather_rows(W_, shard.norms.to(device), len(shard.source))
