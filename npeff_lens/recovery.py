"""Recovering a decomposition's components as directions over the model's parameters, from their projections.

A decomposition's pseudo-Fisher vectors ``h_j`` live in the projected space (``d`` dims). When a vector
is sparse in parameter space it can be recovered from its projection by compressed sensing
(:mod:`npeff_lens.sensing`: FPC, SpaRSA / FISTA, the least-norm fit); the back-projection ``A h_j`` is the
cheap, dense alternative.

:func:`recover` is the entry point: it takes a decomposition (and its store's manifest) and returns each
component's pseudo-Fisher vector as named tensors, one per parameter. The pieces it is built from are public too.
:func:`reject` removes the other components' part from one component, on the projected vectors, before
recovery. :func:`recover_direction` recovers one component's flat direction: rejection, then the chosen method
(:data:`RECOVERY_METHODS`). :func:`projection_config` and :func:`layout_from` read a store manifest's projection
and parameter layout from a decomposition or a manifest-shaped dict. :func:`save_pseudo_fisher` writes named
pseudo-Fisher tensors as safetensors keyed by parameter name.

The paper: recovery is §2.2.1 and App. F, rejection §3.3.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .io import atomic_write
from .io import progress as progress_bar
from .layout import unflatten, validate_layout
from .projection import Projection, projection_from_config
from .sensing import DEFAULT_CHUNK, L1_METHODS, estimate_lambda_max, fpc, min_norm, solve_l1

__all__ = [
    "RECOVERY_METHODS",
    "reject",
    "recover_direction",
    "save_pseudo_fisher",
    "projection_config",
    "layout_from",
    "recover",
]

logger = logging.getLogger(__name__)

#: What :func:`recover_direction` accepts: the accelerated solvers, the paper's FPC, the least-norm fit and the
#: back-projection.
RECOVERY_METHODS = (*L1_METHODS, "fpc", "minnorm", "adjoint")


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


def save_pseudo_fisher(
    path: str | os.PathLike, named: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> None:
    """Save named pseudo-Fisher tensors as safetensors keyed by parameter name (loadable with
    ``safetensors.torch.load_file``); non-string metadata values are JSON-encoded."""
    from safetensors.torch import save

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


def recover_direction(
    components: torch.Tensor,
    index: int,
    projection: Projection | None,
    *,
    method: str = "fpc",
    reject_threshold: float | None = 0.5,
    mu: float = 4e-5,
    lambda_max: float | None = None,
    **fpc_kwargs,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One component's flat parameter-space direction ``[n_in]`` and the solver's figures (§3.3, App. F).

    ``h_index`` is rejected from the dissimilar components once (:func:`reject`; ``None`` skips it), then
    ``method="fpc"`` solves FPC against ``projection`` (the figures are
    :class:`~npeff_lens.sensing.FPCResult`'s), ``"sparsa"`` / ``"fista"`` solve the same problem with
    :func:`~npeff_lens.sensing.solve_l1` (:class:`~npeff_lens.sensing.L1Result`'s figures), ``"minnorm"`` takes
    the least-norm exact fit :func:`~npeff_lens.sensing.min_norm` (dense; how selective each solver's
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
    projection: Projection | Mapping[str, Any] | None = None,
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
    """Turn a decomposition's components back into directions over the model's parameters.

    A component ``h_j`` lives in the projected space (``d`` dims). Each requested one is first rejected from the
    dissimilar components (:func:`reject`), then the parameter-space vector whose projection it is is solved for
    (by FPC, :func:`~npeff_lens.sensing.fpc`, unless ``method`` says otherwise) and split into named tensors.

    Args:
        decomposition: anything with ``components_`` ``[C, d]`` (an ``NPEFF`` estimator, a dict with
            that key, or the ``[C, d]`` tensor itself); its store manifest is read from a
            ``store_manifest`` / ``manifest`` attribute (or the dict itself) when ``projection`` /
            ``layout`` are not given.
        components: an index, a list of indices, or ``None`` for all.
        projection: an operator, or a manifest ``projection`` dict (``{"kind": "sparse", "n_in", "n_out",
            "seed", "density"}``).
        layout: the manifest ``layout``; without one (or with ``flat=True``) flat ``[n_in]`` vectors are returned.
        mu: FPC's ``μ``, which weighs the data term against the L1 norm (App. F).
        reject_threshold: the components with ``|cos| <`` this are rejected from ``h_j``; ``None``: none are.
        flat: return flat ``[n_in]`` vectors instead of one tensor per parameter.
        out_dir: if given, writes ``component_{j:05d}.safetensors`` there (keyed by parameter name, or
            ``"pseudo_fisher"`` for a flat vector) with the solver statistics as metadata.
        lambda_max: ``λ_max(ΦᵀΦ)`` if known; otherwise estimated once and shared by all components.
        fpc_kwargs: passed to :func:`recover_direction`: ``method`` (``"fpc"`` by default; ``"sparsa"``,
            ``"fista"``, ``"minnorm"``, ``"adjoint"``) and the solver's options
            (:func:`~npeff_lens.sensing.fpc`'s ``gamma``, ``beta``, ``inner_iterations``, ``max_iter``, ...;
            :func:`~npeff_lens.sensing.solve_l1`'s; :func:`~npeff_lens.sensing.min_norm`'s).
            The default ``inner_iterations=1`` is App. F's perturbation setting (a coarse, dense
            reconstruction); ``inner_iterations=None`` runs FPC to its stopping rule (sparse recovery).

    Returns:
        ``{j: {name: tensor}}`` (or ``{j: flat tensor}``), on ``device`` (default: that of ``components_``).

    Example:
        >>> npeff = nl.load_decomposition("runs/movie/npeff")
        >>> vectors = nl.recover(npeff, [0, 3], method="adjoint")           # the cheap back-projection
        >>> nl.recover(npeff, 0, out_dir="runs/movie/pseudo-fisher")        # also writes safetensors files

    Notes: recovery by compressed sensing is §2.2.1 and App. F of the paper; the rejection step is §3.3.
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
        lambda_max *= fpc_kwargs.pop("lambda_safety", 1.1)  # see sensing.fpc_step_size: an estimate is from below

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
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
