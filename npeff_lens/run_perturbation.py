"""The perturbation experiment on a saved decomposition (``npeff perturb``): does moving the model along a
component change its own top examples' predictions more than random ones?

:func:`run_perturbation` recovers each component's direction in parameter space from its projected vector and
perturbs the model along it, using the building blocks of :mod:`npeff_lens.perturb`. It writes every component to
``perturbation.json`` and ``perturbation.csv`` as it finishes, so an interrupted run resumes where it stopped.
The experiment is §3.3 of the paper; the recovery is App. F.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import perturb, rundir
from .analysis import ACTIVE_DEFINITION, active, top_examples
from .config import PerturbConfig
from .formatting import fmt
from .io import atomic_writer, progress, read_json, to_jsonable, write_json
from .layout import unflatten, validate_layout
from .models import load_model
from .perturb import COLUMNS, check_adapter, summarize
from .projection import projection_from_config
from .recovery import recover_direction
from .rundir import RUN_FILE, begin, finish, load_run, resolve_config
from .sensing import estimate_lambda_max
from .tasks import task_from_config

__all__ = ["run_perturbation"]


@dataclass
class _Setup:
    """Everything the perturbation loop needs, loaded and checked once."""

    coeffs: torch.Tensor
    components: torch.Tensor
    layout: list
    projection: Any
    lambda_max: float | None
    adapter: Any
    task: Any
    prompts: list
    pef_norms: torch.Tensor | None
    identity: dict


def _perturbation_setup(decomposition_dir, cfg: PerturbConfig, store, adapter, fpc_options: dict) -> _Setup:

    est, store = load_run(decomposition_dir, store)
    manifest = est.manifest_ or {}
    for key in ("layout", "task", "model"):
        if not manifest.get(key):
            raise ValueError(f"the decomposition's manifest records no {key!r}; was it fitted on a PEF store?")
    layout, comps = manifest["layout"], torch.as_tensor(est.components_).float()
    n_params = validate_layout(layout)
    meta = store.metadata
    if "text" not in meta.column_names:
        raise ValueError("the store's metadata has no 'text' column")
    norms = meta["pef_norm"] if "pef_norm" in meta.column_names else est.pef_norms_.tolist()
    norms = torch.tensor([math.nan if v is None else v for v in norms], dtype=torch.float64)
    if adapter is None:
        model = manifest["model"]
        adapter = load_model(model["name"], backend=cfg.backend or model.get("backend") or "hf", device=cfg.device)
    adapter.eval()
    check_adapter(adapter, layout)
    task = task_from_config(manifest["task"]).bind(adapter)
    op, lam = None, None
    if manifest.get("projection") is not None:
        op = projection_from_config(manifest["projection"])
        if (op.n_in, op.n_out) != (n_params, comps.shape[1]):
            raise ValueError(
                f"the projection maps {op.n_in} -> {op.n_out}; the layout covers {n_params} parameters "
                f"and the components have {comps.shape[1]} dims"
            )
        needs_lambda = cfg.recovery not in ("adjoint", "minnorm")  # the step sizes of fpc / sparsa / fista
        if needs_lambda and "lambda_max" not in fpc_options:  # one estimate for all components
            lam = estimate_lambda_max(op, n_iter=fpc_options.pop("power_iterations", 30))
            lam *= fpc_options.pop("lambda_safety", 1.1)  # an estimate is from below
    elif comps.shape[1] != n_params:
        raise ValueError(f"no projection recorded, yet the components have {comps.shape[1]} dims for {n_params} params")
    identity = {
        "n_examples": len(store),
        "n_components": comps.shape[0],
        "fit_loss": est.reconstruction_err_,
        "model": manifest["model"],
        "fpc_options": to_jsonable(fpc_options),
    }
    return _Setup(
        torch.as_tensor(est.coefficients_).double(),
        comps,
        layout,
        op,
        lam,
        adapter,
        task,
        rundir.run_prompts(manifest, adapter, task, meta["text"]),
        norms,
        identity,
    )


def run_perturbation(
    decomposition_dir,
    components=None,
    *,
    config: PerturbConfig | None = None,
    out=None,
    store=None,
    adapter=None,
    fpc_options: dict | None = None,
    **options,
) -> dict:
    """Perturb the model along each component's direction and measure how selectively it changes the component's
    own top examples (``npeff perturb``).

    For each component, its direction in parameter space is recovered from its projected vector, the model's
    parameters are moved by ``magnitude`` along it (both signs), and the KL divergence of the predictions is
    compared on the component's top examples and on random ones. A KL ratio well above 1 means the direction
    matters to the component's own examples. The model's parameters are restored bit for bit afterwards.

    Args:
        decomposition_dir: the decomposition's directory.
        components: the components to perturb: a number N (the first N) or indices such as ``"0,3,7-9"``
            (default: the first 32).
        config: a :class:`~npeff_lens.config.PerturbConfig`; or pass its fields as keyword ``options``
            (``magnitude``, ``top_k``, ``n_baseline``, ``recovery``, ...).
        out: a directory where ``perturbation.json`` and ``perturbation.csv`` are rewritten after each component;
            a rerun with the same config resumes after the components already there.
        store: the PEF store (default: the one the decomposition was fitted on).
        adapter: the model the store's manifest names, already loaded (default: loaded here).
        fpc_options: more arguments of the recovery solver (:func:`~npeff_lens.recovery.recover_direction`:
            ``inner_iterations``, ``max_iter``, ...).

    Returns:
        The summary (:func:`npeff_lens.perturb.summarize`: the geometric means of the KL ratio and of the
        PEF-norm ratio over the components, with ``magnitude``, ``top_k``, ``n_baseline`` and ``notes``), and
        under ``records`` one record per component (its KLs on top and baseline examples for each sign, its KL
        ratio and PEF-norm ratio).

    Example:
        >>> from npeff_lens.runs import run_perturbation
        >>> result = run_perturbation("runs/movie/npeff", "16", magnitude=6, out="runs/movie/perturb")
        >>> result["kl_ratio_geomean"], result["records"][0]["kl_ratio"]

    Notes:
        The experiment is §3.3 of the paper (Table 3); the recovery of each direction is App. F.
    """

    cfg = resolve_config(
        PerturbConfig, config, {**options, **({} if components is None else {"components": components})}
    )
    fpc_options = dict(fpc_options or {})
    s = _perturbation_setup(decomposition_dir, cfg, store, adapter, fpc_options)
    m, n_comp = s.coeffs.shape
    try:
        indices = cfg.component_list(n_comp)
    except ValueError as e:
        raise ValueError(f"components {cfg.components!r}: {e}") from None
    records = _previous_records(Path(out), cfg, s.identity, decomposition_dir) if out is not None else {}
    top, on, notes = top_examples(s.coeffs, k=cfg.top_k), active(s.coeffs), []
    reference = perturb.Reference(s.adapter, s.task, s.prompts, cfg.batch_size)  # unperturbed p(y|x), cached
    deadline = None if cfg.time_budget is None else time.monotonic() + 60 * cfg.time_budget
    bar = progress(indices, desc="perturbing components", unit="component", enabled=cfg.progress)
    for j in bar:
        if j in records:
            continue
        if deadline is not None and time.monotonic() >= deadline:
            done = sum(i in records for i in indices)
            notes.append(
                f"time budget of {cfg.time_budget:g} min spent: {done} of {len(indices)} components "
                "measured; rerun the same command to continue"
            )
            warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
            break
        top_j = [int(i) for i in top[j].tolist() if on[i, j]]
        if 0 < len(top_j) < cfg.top_k:
            notes.append(f"component {j}: only {len(top_j)} active examples (top_k={cfg.top_k}; {ACTIVE_DEFINITION})")
        records[j] = _perturb_one(s, cfg, j, top_j, reference, fpc_options)
        bar.set_postfix(kl_ratio=fmt(records[j]["kl_ratio"], 4, missing="nan"))
        if out is not None:
            _write_perturbation(Path(out), [records[i] for i in indices if i in records], cfg, notes)
    ordered = [records[i] for i in indices if i in records]  # all of them unless the time budget was spent
    short = [r["n_base"] for r in ordered if r.get("status") == "ok" and r["n_base"] < cfg.n_baseline]
    if short:
        notes.append(
            f"the store holds {m} examples: {len(short)} baseline set(s) have only {min(short)} to "
            f"{max(short)} examples (asked for {cfg.n_baseline})"
        )
        warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
    if out is not None:
        _write_perturbation(Path(out), ordered, cfg, notes)
        if len(ordered) == len(indices):
            finish(Path(out), read_json(Path(out) / RUN_FILE))
    ordered = to_jsonable(ordered)  # as stored: an undefined ratio is None
    return {**_perturbation_summary(ordered, cfg, notes), "records": ordered}


def _perturb_one(s: _Setup, cfg: PerturbConfig, j: int, top_j: list[int], reference, fpc_options: dict) -> dict:
    """One component: reject and recover its direction once, perturb ±, and the record (§3.3)."""

    if not top_j:
        return {
            "component": j,
            "status": "dead",
            "sign": None,
            "kl_ratio": math.nan,
            "pef_norm_ratio": math.nan,
            "n_top": 0,
            "n_base": 0,
        }
    m = s.coeffs.shape[0]
    base_j = perturb.baseline_examples(m, cfg.n_baseline, top_j, seed=cfg.seed)
    if not base_j:
        raise ValueError(f"no baseline examples left: the store holds {m} examples, all among the top {cfg.top_k}")
    t0 = time.perf_counter()
    capped = {"max_iter": cfg.max_iter} if cfg.recovery in ("sparsa", "fista", "minnorm") else {}
    flat, info = recover_direction(
        s.components,
        j,
        s.projection,
        method=cfg.recovery,
        mu=cfg.mu,
        reject_threshold=cfg.reject_threshold,
        lambda_max=s.lambda_max,
        **{**capped, **fpc_options},
    )
    seconds = time.perf_counter() - t0
    norm = float(flat.norm())
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"component {j}: the recovered pseudo-Fisher vector has norm {norm}; cannot perturb")
    direction = unflatten(flat.float(), s.layout)
    rec = perturb.perturb_component(
        s.adapter,
        s.task,
        s.prompts,
        direction,
        cfg.magnitude,
        top=top_j,
        baseline=base_j,
        pef_norms=s.pef_norms,
        reference=reference,
        batch_size=cfg.batch_size,
        component=j,
    )
    rec.update(
        recovery_norm=norm,
        recovery_relative_residual=info["relative_residual"],
        recovery_n_iter=info["n_iter"],
        recovery_n_rejected=info["n_rejected"],
        recovery_nonzero_fraction=float((flat != 0).double().mean()),
        recovery_seconds=seconds,
    )
    return rec


def _perturbation_summary(records, cfg: PerturbConfig, notes) -> dict:

    return {
        **summarize(records),
        "magnitude": cfg.magnitude,
        "top_k": cfg.top_k,
        "n_baseline": cfg.n_baseline,
        "notes": list(notes),
    }


def _previous_records(out: Path, cfg: PerturbConfig, identity: dict, decomposition_dir) -> dict[int, dict]:
    """The records already in ``out`` (same config and decomposition), by component."""
    begin(out, "perturb", cfg, identity, Path(decomposition_dir))
    table = out / "perturbation.json"
    if not table.exists():
        return {}
    try:
        return {int(r["component"]): r for r in read_json(table).get("components", [])}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a results cache: recompute what it held
        warnings.warn(f"{table} is damaged ({e}); its components are perturbed again", RuntimeWarning, stacklevel=3)
        return {}


def _write_perturbation(out: Path, records: list[dict], cfg: PerturbConfig, notes) -> None:

    records = to_jsonable(records)
    write_json(
        out / "perturbation.json",
        {"summary": to_jsonable(_perturbation_summary(records, cfg, notes)), "components": records},
    )
    with atomic_writer(out / "perturbation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows({k: r.get(k) for k in COLUMNS} for r in records)
