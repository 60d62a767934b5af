"""Run directories: the one home for the layout, resume, and the loops that run experiments.

Library modules (``collect``, ``decomposition``, ``recovery``, ``perturb``) take tensors and objects; this
module takes configs and directories::

    runs/movie/                 npeff collect    a PEF store; its manifest.json holds the collect config's key
    runs/movie/npeff/           npeff decompose  run.json, config.json + npeff.safetensors (NPEFF.save), checkpoints/
    runs/movie/perturb/         npeff perturb    run.json, perturbation.json, perturbation.csv
    runs/movie/npeff/compare/   npeff compare    compare.json; per method run.json and its fit (grad-cluster/, sae/)
    runs/movie/npeff/unlearn/   npeff unlearn    run.json, unlearning.json
    runs/movie/npeff/icl/       npeff icl        run.json, icl.json, eval-pefs/ (held-out PEFs)
    runs/movie/npeff/report/    npeff report     index.html, components/, methods/, data/ (npeff_lens.report)

``run.json`` records the step, its config's resume key (:meth:`~npeff_lens.config._Config.key`), the identity
of its inputs, where its input lies (relative to the run, so a moved tree keeps working) and its status. A
rerun into a directory whose ``run.json`` holds the same key and inputs resumes (or returns the finished
result); anything else is a :class:`~npeff_lens.config.ConfigMismatchError` naming each differing field,
never a mix. A directory that holds other files and no ``run.json`` is refused.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import (
    CollectCommand,
    CollectConfig,
    CompareConfig,
    DecomposeConfig,
    DemoCommand,
    IclConfig,
    PerturbConfig,
    TopCommand,
    UnlearnConfig,
    ZeroShotCommand,
    check_same,
)
from .io import atomic_writer, progress, read_json, remove_dead_temp_files, to_jsonable, write_json

RUN_FILE = "run.json"

__all__ = [
    "RUN_FILE",
    "collect",
    "decompose_store",
    "load_run",
    "top_report",
    "run_perturbation",
    "compare",
    "unlearn",
    "icl",
    "load_with_model",
    "held_out_coefficients",
    "held_out_examples",
    "demo",
    "zero_shot",
]


# ----------------------------------------------------------------------------------------------
# run.json: begin (or resume) a step, finish it.
# ----------------------------------------------------------------------------------------------


def _config(cls, config, options: dict):
    """``config`` (with ``options`` replaced), or ``cls(**options)``."""
    if config is None:
        return cls(**options)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}; got {type(config).__name__}")
    return config.replace(**options) if options else config


def _begin(out: Path, step: str, config, inputs: dict, source: Path | None) -> dict:
    """The step's record in ``out``: the stored one when it holds this config and these inputs (resume),
    a new one otherwise (``out`` new or empty). Another config or inputs: ``ConfigMismatchError``."""
    path = out / RUN_FILE
    hint = "rerun with the stored values to resume, or choose another output directory"
    if path.exists() and _failed_before_results(out):
        path.unlink()  # a step that stopped before writing anything holds nothing to resume: start afresh
    if path.exists():
        rec = read_json(path)
        if rec.get("step") != step:
            raise ValueError(f"{out} holds a {rec.get('step')!r} run, not {step!r}: choose another directory")
        config.check_resume(rec.get("config", {}), str(out))
        check_same(rec.get("inputs", {}), to_jsonable(inputs), f"{out} (its inputs)", hint=hint)
        return rec
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a run directory")
    remove_dead_temp_files(out)  # a run killed before its first write left only these
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} holds other files and no {RUN_FILE}: choose a new or empty directory for the run")
    out.mkdir(parents=True, exist_ok=True)
    rec = {
        "step": step,
        "status": "running",
        "config": config.key(),
        "inputs": to_jsonable(inputs),
        "source": _relative(source, out),
        "npeff_lens_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(path, rec)
    return rec


def _failed_before_results(out: Path) -> bool:
    """Whether ``out`` holds only the record of a step that never finished (and perhaps empty folders or dead
    temporary files): such a record blocks no other configuration."""
    rec = read_json(out / RUN_FILE)
    if rec.get("status") == "done":
        return False
    remove_dead_temp_files(out)
    return all(p.name == RUN_FILE or (p.is_dir() and not any(p.rglob("*"))) for p in out.iterdir())


def _finish(out: Path, rec: dict) -> None:
    rec.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(out / RUN_FILE, rec)


def _relative(path: Path | None, start: Path) -> dict | None:
    if path is None:
        return None
    return {"relative": os.path.relpath(Path(path).resolve(), start.resolve()), "absolute": str(Path(path).resolve())}


def _source(run_dir: Path, given, what: str, flag: str) -> Path:
    """The input a run was made from: ``given``, else run.json's (relative first, then absolute)."""
    if given is not None:
        return Path(given)
    rec = read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else {}
    src = rec.get("source") or {}
    for candidate in (run_dir / src["relative"] if "relative" in src else None, src.get("absolute")):
        if candidate is not None and Path(candidate).exists():
            return Path(candidate)
    if src:
        raise FileNotFoundError(
            f"the {what} of {run_dir} is not at {src.get('relative')} (relative to it) nor at "
            f"{src.get('absolute')}: pass {flag} PATH"
        )
    raise FileNotFoundError(f"{run_dir} has no {RUN_FILE} naming its {what} (saved from Python?): pass {flag} PATH")


# ----------------------------------------------------------------------------------------------
# collect -> decompose -> top.
# ----------------------------------------------------------------------------------------------


def collect(cmd: CollectCommand):
    """``npeff collect``: the model, dataset and task by name -> a PEF store at ``cmd.out`` (under torchrun: one
    store from all ranks, see ``npeff_lens.distributed``)."""
    from .collect import collect_pefs
    from .distributed import local_device
    from .models import load_model
    from .tasks import task_from_config

    spec = {"kind": cmd.task, "template": cmd.template}
    if cmd.task == "label-tokens":
        spec["labels"] = list(cmd.labels)
        if cmd.label_first_token:
            spec["multi_token"] = "first"
    elif cmd.task == "next-token":
        spec.update(expectation_projections=cmd.expectation_projections, seed=cmd.task_seed)
    task = task_from_config(spec)
    adapter = load_model(cmd.model, backend=cmd.backend, device=local_device(cmd.device))  # torchrun: cuda:LOCAL_RANK
    return collect_pefs(adapter, cmd.dataset, task, cmd.out, config=cmd.narrow(CollectConfig))


def _store_identity(store) -> dict:
    """What a decomposition depends on: the store's space and its examples."""
    m = store.manifest
    return {"n_examples": len(store), **{k: m.get(k) for k in ("model", "task", "projection", "n_params", "config")}}


def decompose_store(store, out, config: DecomposeConfig | None = None, **options):
    """Fit NPEFF on a PEF store into ``out`` (``config`` or :class:`~npeff_lens.config.DecomposeConfig` fields).
    Checkpoints go to ``out/checkpoints``: an interrupted fit resumes; a finished one is loaded."""
    from .decomposition import NPEFF, CorruptFileError
    from .store import PEFStore

    cfg = _config(DecomposeConfig, config, options)
    store = store if isinstance(store, PEFStore) else PEFStore(store)
    if len(store) == 0:
        raise ValueError(f"the PEF store {store.path} is empty: run `npeff collect` first")
    if cfg.n_components > len(store):
        raise ValueError(f"--components {cfg.n_components} exceeds the {len(store)} examples of {store.path}: "
                         "each component needs examples to load on; use fewer components or collect more")  # fmt: skip
    out = Path(out)
    rec = _begin(out, "decompose", cfg, _store_identity(store), store.path)
    if rec["status"] == "done" and (out / "npeff.safetensors").exists():
        try:
            return NPEFF.load(out)
        except CorruptFileError as e:  # refit: it resumes from the last intact checkpoint
            warnings.warn(f"{e}; fitting again from the last intact checkpoint", RuntimeWarning, stacklevel=2)
    est = NPEFF(**cfg.estimator_params(), checkpoint_dir=out / "checkpoints").fit(store)
    est.save(out)
    _finish(out, rec)
    return est


def load_run(decomposition_dir, store=None):
    """``(npeff, store)`` for a decomposition directory; ``store`` overrides the one its run.json names."""
    from .decomposition import NPEFF
    from .store import PEFStore

    d = Path(decomposition_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} holds no decomposition (run `npeff decompose` first)")
    est = NPEFF.load(d)
    if store is None or isinstance(store, (str, os.PathLike)):  # else an open store (anything store-shaped)
        store = PEFStore(_source(d, store, "PEF store", "--store"))
    for key in ("projection", "layout"):
        if key in est.manifest_:
            check_same(
                {key: est.manifest_[key]},
                {key: to_jsonable(store.manifest.get(key))},
                f"the PEF store {getattr(store, 'path', '(given)')} (vs the decomposition {d})",
                hint="the components live in another space: is this the store the decomposition was fitted on?",
            )
    if len(store) != est.coefficients_.shape[0]:
        raise ValueError(
            f"the PEF store {getattr(store, 'path', '(given)')} holds {len(store)} examples; "
            f"the decomposition {d} was fitted on {est.coefficients_.shape[0]}"
        )
    return est, store


def _label_columns(meta):
    cols = meta.column_names
    labels = meta["label_name"] if "label_name" in cols else (meta["label"] if "label" in cols else None)
    preds = meta["prediction_name"] if "prediction_name" in cols else meta["prediction"]
    return labels, preds


def top_report(decomposition_dir, k: int = 16, show: int = 5, components=None, width: int = 100, store=None) -> dict:
    """Top examples per component (label, prediction, coefficient) and the tuning summary (§3.1)."""
    from .analysis import top_examples, tuning_summary

    est, store = load_run(decomposition_dir, store)
    meta, coeffs = store.metadata, est.coefficients_
    (m, C), support = coeffs.shape, int((coeffs > 0).sum(0).max()) if coeffs.numel() else 0
    if k > m:
        raise ValueError(f"--k {k} exceeds the {m} examples of the run: a tuning needs k top examples")
    labels, preds = _label_columns(meta)
    summary = tuning_summary(coeffs, labels=labels, predictions=preds, k=k)
    per = summary.pop("tunings")
    t_label, t_pred = per.get("label", [None] * C), per["prediction"]
    top, texts, lines = top_examples(coeffs, k=max(k, show)), meta["text"], []
    for j in range(C) if components is None else components:
        tag = [f"{what}={t[j]}" for what, t in (("label", t_label), ("prediction", t_pred)) if t[j] is not None]
        lines.append(f"component {j}  [{', '.join(tag) or 'not tuned'}]")
        for i in top[j, :show].tolist():
            if coeffs[i, j] <= 0:
                break
            lab = labels[i] if labels is not None else "-"
            lines.append(
                f"  {coeffs[i, j]:9.4f}  label={lab!s:<9} pred={preds[i]!s:<9} {texts[i].replace(chr(10), ' ')[:width]}"
            )
    dead = getattr(est, "dead_components_", None)
    n_dead = 0 if dead is None else len(dead)
    summary_line = (
        f"{C} components: {summary.get('prediction', 0):.0%} tuned to a prediction, "
        f"{summary.get('label', 0):.0%} to a label (top {k}, >= 95% agreement); {n_dead} dead"
    )
    if support < k:
        summary_line += f"; note: no component has {k} examples with a positive coefficient (at most {support})"
    return {"lines": lines, "summary": summary, "summary_line": summary_line}


# ----------------------------------------------------------------------------------------------
# Perturbation (§3.3).
# ----------------------------------------------------------------------------------------------


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
    from .models import load_model
    from .perturb import check_adapter
    from .recovery import estimate_lambda_max, projection_from_config, validate_layout
    from .tasks import task_from_config

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
        task.prompts(meta["text"]),
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
    """The perturbation experiment of §3.3 on a saved decomposition: the summary, with ``records``.

    ``components`` / ``options``: :class:`~npeff_lens.config.PerturbConfig` fields (or pass ``config``).
    ``out``: where ``perturbation.json`` / ``.csv`` are rewritten after each component; a rerun with the same
    config resumes after the components already there. ``store``: the PEF store (default: the fitted one);
    ``adapter``: the manifest's model, already loaded; ``fpc_options``: more :func:`~npeff_lens.recovery.fpc`
    arguments (``inner_iterations``, ``max_iter``, ...).
    """
    from . import perturb
    from .analysis import top_examples

    cfg = _config(PerturbConfig, config, {**options, **({} if components is None else {"components": components})})
    fpc_options = dict(fpc_options or {})
    s = _perturbation_setup(decomposition_dir, cfg, store, adapter, fpc_options)
    m, n_comp = s.coeffs.shape
    try:
        indices = cfg.component_list(n_comp)
    except ValueError as e:
        raise ValueError(f"components {cfg.components!r}: {e}") from None
    records = _previous_records(Path(out), cfg, s.identity, decomposition_dir) if out is not None else {}
    top, notes = top_examples(s.coeffs, k=cfg.top_k), []
    reference = perturb._Reference(s.adapter, s.task, s.prompts, cfg.batch_size)  # unperturbed p(y|x), cached
    deadline = None if cfg.time_budget is None else time.monotonic() + 60 * cfg.time_budget
    bar = progress(indices, desc="perturbing components", unit="component", enabled=cfg.progress)
    for j in bar:
        if j in records:
            continue
        if deadline is not None and time.monotonic() >= deadline:
            done = sum(i in records for i in indices)
            notes.append(f"time budget of {cfg.time_budget:g} min spent: {done} of {len(indices)} components "
                         "measured; rerun the same command to continue")  # fmt: skip
            warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
            break
        top_j = [int(i) for i in top[j].tolist() if s.coeffs[i, j] > 0]
        if 0 < len(top_j) < cfg.top_k:
            notes.append(f"component {j}: only {len(top_j)} examples with a positive coefficient (top_k={cfg.top_k})")
        records[j] = _perturb_one(s, cfg, j, top_j, reference, fpc_options)
        bar.set_postfix(kl_ratio=perturb._fmt(records[j]["kl_ratio"]))
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
            _finish(Path(out), read_json(Path(out) / RUN_FILE))
    ordered = to_jsonable(ordered)  # as stored: an undefined ratio is None
    return {**_perturbation_summary(ordered, cfg, notes), "records": ordered}


def _perturb_one(s: _Setup, cfg: PerturbConfig, j: int, top_j: list[int], reference, fpc_options: dict) -> dict:
    """One component: reject and recover its direction once, perturb ±, and the record (§3.3)."""
    from . import perturb
    from .recovery import recover_direction, unflatten

    if not top_j:
        return {"component": j, "status": "dead", "sign": None, "kl_ratio": math.nan, "pef_norm_ratio": math.nan,
                "n_top": 0, "n_base": 0}  # fmt: skip
    m = s.coeffs.shape[0]
    base_j = perturb.baseline_examples(m, cfg.n_baseline, top_j, seed=cfg.seed)
    if not base_j:
        raise ValueError(f"no baseline examples left: the store holds {m} examples, all among the top {cfg.top_k}")
    t0 = time.perf_counter()
    capped = {"max_iter": cfg.max_iter} if cfg.recovery in ("sparsa", "fista", "minnorm") else {}
    flat, info = recover_direction(
        s.components, j, s.projection, method=cfg.recovery, mu=cfg.mu, reject_threshold=cfg.reject_threshold,
        lambda_max=s.lambda_max, **{**capped, **fpc_options},
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    norm = float(flat.norm())
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"component {j}: the recovered pseudo-Fisher vector has norm {norm}; cannot perturb")
    direction = unflatten(flat.float(), s.layout)
    rec = perturb.perturb_component(
        s.adapter, s.task, s.prompts, direction, cfg.magnitude, top=top_j, baseline=base_j, pef_norms=s.pef_norms,
        reference=reference, batch_size=cfg.batch_size, component=j,
    )  # fmt: skip
    rec.update(
        recovery_norm=norm, recovery_relative_residual=info["relative_residual"], recovery_n_iter=info["n_iter"],
        recovery_n_rejected=info["n_rejected"], recovery_nonzero_fraction=float((flat != 0).double().mean()),
        recovery_seconds=seconds,
    )  # fmt: skip
    return rec


def _perturbation_summary(records, cfg: PerturbConfig, notes) -> dict:
    from .perturb import summarize

    return {
        **summarize(records),
        "magnitude": cfg.magnitude,
        "top_k": cfg.top_k,
        "n_baseline": cfg.n_baseline,
        "notes": list(notes),
    }


def _previous_records(out: Path, cfg: PerturbConfig, identity: dict, decomposition_dir) -> dict[int, dict]:
    """The records already in ``out`` (same config and decomposition), by component."""
    _begin(out, "perturb", cfg, identity, Path(decomposition_dir))
    table = out / "perturbation.json"
    if not table.exists():
        return {}
    try:
        return {int(r["component"]): r for r in read_json(table).get("components", [])}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a results cache: recompute what it held
        warnings.warn(f"{table} is damaged ({e}); its components are perturbed again", RuntimeWarning, stacklevel=3)
        return {}


def _write_perturbation(out: Path, records: list[dict], cfg: PerturbConfig, notes) -> None:
    from .perturb import COLUMNS

    records = to_jsonable(records)
    write_json(
        out / "perturbation.json",
        {"summary": to_jsonable(_perturbation_summary(records, cfg, notes)), "components": records},
    )
    with atomic_writer(out / "perturbation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows({k: r.get(k) for k in COLUMNS} for r in records)


# ----------------------------------------------------------------------------------------------
# Comparison with the baselines (§5).
# ----------------------------------------------------------------------------------------------


def compare(decomposition_dir, config: CompareConfig | None = None, *, store=None, adapter=None, **options) -> dict:
    """NPEFF's components beside gradient clusters (§5.1), TopK-SAE latents (§5.2) and SNMF features on the same
    examples, scored by one set of metrics. Writes ``decomposition_dir/compare/compare.json`` (per method:
    ``n_components, alive, tuned_label, tuned_prediction, tuned_tokens, argmax_shared, coverage, fit_seconds,
    peak_rss_mib``; with ``selectivity=True`` also ``selectivity`` (geometric mean), ``selectivity_per_component``,
    ``target_kl``, ``n_baseline``: :mod:`npeff_lens.selectivity`) and returns it. Each method resumes on its own:
    a finished one is read back, a different configuration is a ``ConfigMismatchError``; so does each method's
    selectivity (``compare/<method>/selectivity/``, resumed component by component)."""
    cfg = _config(CompareConfig, config, options)
    d = Path(decomposition_dir)
    est, store = load_run(d, store)
    root = d / "compare"
    results = {"config": cfg.key(), "methods": _earlier_rows(root / "compare.json", cfg.methods)}
    context = _CompareContext(d, est, store, cfg, adapter)
    if "sae" in cfg.methods and cfg.sae_hook is not None:  # a wrong hook stops here, before anything is written
        from .baselines.sae import hook_module, resolve_hook

        hook_module(context.adapter, resolve_hook(context.adapter, cfg.sae_hook))
    for method in cfg.methods:
        mdir = root / method
        key = cfg.method_key(method)
        if "components" in key:  # resolved: "the decomposition's number" and that number are one configuration
            key["components"] = context.components
        if "sae_hook" in key and key["sae_hook"] is None:  # likewise the default hook and layer
            from .baselines.sae import default_hook

            key["sae_hook"] = default_hook(context.adapter)
        if "snmf_layer" in key and key["snmf_layer"] is None:
            from .baselines.snmf import default_layer

            key["snmf_layer"] = default_layer(context.adapter)
        rec = _begin(mdir, f"compare-{method}", _MethodKey(key, resolved=("components", "sae_hook", "snmf_layer")),
                     context.identity(), d)  # fmt: skip
        if rec["status"] == "done":  # fitted before: read back; the metrics are recomputed (k may differ)
            coeffs, extra = context.load(method, mdir)
        else:
            _reset_peak_rss()
            t0 = time.time()
            coeffs, extra = context.fit(method, mdir)
            rec.update(fit_seconds=extra.pop("fit_seconds", time.time() - t0), peak_rss_mib=_peak_rss_mib())
            _finish(mdir, rec)
        summary = context.summarize(method, coeffs, extra)
        summary.update(fit_seconds=rec.get("fit_seconds"), peak_rss_mib=rec.get("peak_rss_mib"))
        if cfg.selectivity:
            summary.update(context.selectivity(method, mdir, coeffs, extra))
        results["methods"][method] = to_jsonable({**summary, "config": key})
        write_json(root / "compare.json", results)
    return results


def _earlier_rows(path: Path, methods) -> dict:
    """The rows of an earlier compare.json for methods not compared this time (each row carries its config):
    comparing a subset of methods keeps the others' results."""
    if not path.exists():
        return {}
    try:
        rows = read_json(path).get("methods") or {}
    except (ValueError, AttributeError):
        return {}
    return {m: row for m, row in rows.items() if m not in methods}


@dataclass(frozen=True)
class _MethodKey:
    """One method's resume key, in the shape ``_begin`` expects of a config."""

    fields: dict
    ignored: tuple = ()  # fields that older runs stored in the key and no longer change the result
    resolved: tuple = ()  # fields that older runs stored unresolved (None: the default this key resolves)

    def key(self) -> dict:
        return to_jsonable(self.fields)

    def check_resume(self, stored: dict, where: str) -> None:
        stored = {k: self.fields[k] if v is None and k in self.resolved else v
                  for k, v in stored.items() if k not in self.ignored}  # fmt: skip
        check_same(stored, self.key(), where, hint="rerun with the stored values, or delete that method's folder")


class _CompareContext:
    """The run's model, task, examples and metadata, loaded once and shared by the methods."""

    def __init__(self, d: Path, est, store, cfg: CompareConfig, adapter):
        self.d, self.est, self.store, self.cfg, self._adapter = d, est, store, cfg, adapter
        self._reference, self._prompts, self._task = None, None, None  # _reference: unintervened log-probs
        self.meta = store.metadata
        self.manifest = store.manifest
        self.components = cfg.components or int(est.n_components)
        labels, preds = _label_columns(self.meta)
        self.labels, self.predictions = labels, self.meta["prediction"]
        for flag, value in (("--components", self.components), ("--k", cfg.k)):
            if value > len(store):
                raise ValueError(f"{flag} {value} exceeds the {len(store)} examples of the run")

    def identity(self) -> dict:
        return {"n_examples": len(self.store), "decomposition_loss": self.est.reconstruction_err_}

    @property
    def adapter(self):
        if self._adapter is None:
            from .models import load_model

            model = self.manifest.get("model") or {}
            if not model.get("name"):
                raise ValueError("the store's manifest records no model: pass adapter=")
            self._adapter = load_model(model["name"], backend=model.get("backend") or "hf", device=self.cfg.device)
        return self._adapter

    @property
    def task(self):
        if self._task is None:
            from .tasks import task_from_config

            self._task = task_from_config(self.manifest["task"]).bind(self.adapter)
        return self._task

    def load(self, method: str, mdir: Path):
        """``(coefficients, extra)`` of a method fitted before."""
        if method == "npeff":
            return self.est.coefficients_, {}
        if method == "grad-cluster":
            from .baselines.gradient_clustering import GradientClustering

            gc = GradientClustering.load(mdir / "clusters")
            return gc.coefficients_, {"clusters": gc}
        if method == "snmf":
            from .baselines.snmf import SNMFBaseline

            snmf = SNMFBaseline.load(mdir / "snmf")
            return snmf.coefficients_, {"snmf": snmf, "hook": snmf.hook}
        from .baselines.sae import TopKSAEBaseline

        sae = TopKSAEBaseline.load(mdir / "sae")
        return sae.coefficients_, {"sae": sae, "hook": sae.hook, "sae_k": sae.k}

    def fit(self, method: str, mdir: Path):
        if method == "npeff":
            return self.est.coefficients_, {"fit_seconds": _npeff_seconds(self.d)}
        if method == "grad-cluster":
            return self._grad_cluster(mdir)
        if method == "snmf":
            return self._snmf(mdir)
        return self._sae(mdir)

    def _grad_cluster(self, mdir: Path):
        from .baselines.gradient_clustering import GradientClustering, collect_prediction_gradients

        options = {**_space_options(self.manifest), "rank": None}  # one row per example: nothing to reduce
        t0 = time.time()
        store = collect_prediction_gradients(
            self.adapter, list(self.meta["text"]), self.task, mdir / "pefs", batch_size=self.cfg.batch_size,
            progress=self.cfg.progress, **options,
        )  # fmt: skip
        gc = GradientClustering(self.components, seed=self.cfg.seed).fit(store)
        gc.save(mdir / "clusters")
        return gc.coefficients_, {"fit_seconds": time.time() - t0, "clusters": gc}

    def _snmf(self, mdir: Path):
        from .baselines.snmf import SNMFBaseline

        cfg, t0 = self.cfg, time.time()
        snmf = SNMFBaseline(
            self.components, layer=cfg.snmf_layer, sparsity=cfg.snmf_sparsity, n_iter=cfg.snmf_iterations,
            n_init=cfg.snmf_restarts, max_tokens=cfg.snmf_tokens, seed=cfg.seed, k_top=cfg.k,
            activation_batch_size=cfg.batch_size, show_progress=cfg.progress,
        )  # fmt: skip
        snmf.fit(self.adapter, self.task.prompts(list(self.meta["text"])))
        snmf.save(mdir / "snmf")
        return snmf.coefficients_, {"fit_seconds": time.time() - t0, "snmf": snmf, "hook": snmf.hook}

    def _sae(self, mdir: Path):
        from .baselines.sae import TopKSAEBaseline, default_hook, resolve_hook

        cfg = self.cfg
        hook = resolve_hook(self.adapter, cfg.sae_hook or default_hook(self.adapter))
        k = cfg.sae_k or max(1, min(32, self.components // 4))
        t0 = time.time()
        sae = TopKSAEBaseline(
            self.components, k, hook=hook, seed=cfg.seed, lr=cfg.sae_lr, total_tokens=cfg.sae_tokens,
            activation_batch_size=cfg.batch_size, show_progress=cfg.progress,
        )  # fmt: skip
        sae.fit(self.adapter, self.task.prompts(list(self.meta["text"])))
        sae.save(mdir / "sae")
        return sae.coefficients_, {"fit_seconds": time.time() - t0, "sae": sae, "hook": hook, "sae_k": k}

    def summarize(self, method: str, coeffs, extra: dict) -> dict:
        from .analysis import method_summary, top_examples

        cfg = self.cfg
        token_tuned = None
        if method == "sae":
            sae = extra["sae"]
            top = top_examples(coeffs, k=cfg.k)
            token_tuned = [
                sae.active_token_sets(j, [int(i) for i in top[j].tolist() if coeffs[i, j] > 0])
                for j in range(coeffs.shape[1])
            ]
        summary = method_summary(
            coeffs, labels=self.labels, predictions=self.predictions, k=cfg.k, threshold=cfg.threshold,
            alive_min_examples=cfg.k if method in ("sae", "snmf") else 1, token_sets=token_tuned,
        )  # fmt: skip
        return {**summary, **{k: extra[k] for k in ("hook", "sae_k") if k in extra}}

    # --- selectivity (npeff_lens.selectivity) ------------------------------------------------------
    def selectivity(self, method: str, mdir: Path, coeffs, extra: dict) -> dict:
        """The method's selectivity fields of compare.json, resumed component by component from
        ``mdir/selectivity/selectivity.json`` (its run.json holds the selectivity key)."""
        from . import selectivity as sel

        cfg, out = self.cfg, mdir / "selectivity"
        key = _MethodKey(cfg.selectivity_key(method), ignored=("selectivity_components",))
        rec = _begin(out, f"selectivity-{method}", key, self.identity(), self.d)
        done = {}
        if (out / "selectivity.json").exists():
            try:
                done = {int(r["component"]): r for r in read_json(out / "selectivity.json").get("components", [])}
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # a results cache: measure again
                warnings.warn(f"{out / 'selectivity.json'} is damaged ({e}); measured again", RuntimeWarning, 2)
        coeffs = torch.as_tensor(coeffs)
        direction = self._directions(method, extra)
        if self._reference is None:
            from .perturb import _Reference

            self._reference = _Reference(self.adapter, self.task, self.prompts, cfg.batch_size)
        n = min(coeffs.shape[1], cfg.selectivity_components or coeffs.shape[1])
        bar = progress(range(n), desc=f"selectivity {method}", unit="component", enabled=cfg.progress)
        for j in bar:
            if j in done:
                continue
            # Sizing starts from the previous measured component's size (a good guess: far fewer evaluations),
            # which is in the saved records, so a resumed run starts where the uninterrupted one did.
            start = next((done[i]["scale"] for i in range(j - 1, -1, -1) if done[i]["status"] == "ok"), 1.0)
            done[j] = self._component_selectivity(j, sel.top_positive(coeffs, j, cfg.k), direction, start)
            write_json(out / "selectivity.json", {"components": [done[i] for i in sorted(done)]})
        records = [done[j] for j in range(n)]
        unreachable = [r for r in records if r["status"] == "unreachable"]
        if unreachable and len(unreachable) == sum(r["status"] != "excluded" for r in records):
            raise sel.UnreachableTargetError(f"{method}: {unreachable[0]['error']}")  # no component gets there
        _finish(out, rec)
        per = [r.get("selectivity") for r in records]
        return {**sel.summarize(records), "selectivity_per_component": per, "target_kl": cfg.target_kl,
                "n_baseline": cfg.n_baseline}  # fmt: skip

    def _component_selectivity(self, j: int, top: list[int], direction, start: float) -> dict:
        """One component's record: ``ok`` (the measurement), ``excluded`` (fewer than k top examples) or
        ``unreachable`` (no size brings the baseline to the target KL; the message names the largest KL)."""
        from . import selectivity as sel

        cfg = self.cfg
        if len(top) < cfg.k:
            return {"component": j, "status": "excluded", "n_top": len(top)}
        try:
            r = sel.component_selectivity(
                self.adapter, self.task, self.prompts, direction(j), top, target_kl=cfg.target_kl,
                n_baseline=cfg.n_baseline, seed=cfg.seed, reference=self._reference, batch_size=cfg.batch_size,
                start=start,
            )  # fmt: skip
        except sel.UnreachableTargetError as e:
            return {"component": j, "status": "unreachable", "n_top": len(top), "error": str(e)}
        return {"component": j, "status": "ok", **r}

    @property
    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = self.task.prompts(list(self.meta["text"]))
        return self._prompts

    def _directions(self, method: str, extra: dict):
        """``j -> intervention``: a parameter direction (NPEFF components, cluster centroids, recovered like
        ``npeff perturb``'s) or an activation direction (SAE decoder rows, SNMF features) at the method's hook."""
        from .selectivity import ActivationDirection

        if method == "sae":
            decoder, hook = extra["sae"].sae_.W_dec.detach().float(), extra["sae"].hook
            return lambda j: ActivationDirection(self.adapter, hook, decoder[j])
        if method == "snmf":
            features, hook = extra["snmf"].features_, extra["snmf"].hook
            return lambda j: ActivationDirection(self.adapter, hook, features[j])
        if method == "npeff":
            return self._parameter_directions(torch.as_tensor(self.est.components_).float(), self.manifest)
        gc = extra["clusters"]
        return self._parameter_directions(gc.cluster_centers_.float(), gc.manifest_ or self.manifest)

    def _parameter_directions(self, vectors: torch.Tensor, manifest: dict):
        from .perturb import check_adapter
        from .recovery import estimate_lambda_max, projection_from_config, recover_direction, unflatten
        from .selectivity import ParameterDirection

        cfg, layout = self.cfg, manifest["layout"]
        check_adapter(self.adapter, layout)
        op = projection_from_config(manifest["projection"]) if manifest.get("projection") else None
        needs_lambda = op is not None and cfg.recovery not in ("adjoint", "minnorm")  # step sizes of the solvers
        lam = estimate_lambda_max(op) * 1.1 if needs_lambda else None

        def direction(j: int):
            flat, _ = recover_direction(vectors, j, op, method=cfg.recovery, reject_threshold=cfg.reject_threshold,
                                        lambda_max=lam)  # fmt: skip
            return ParameterDirection(self.adapter, unflatten(flat.float(), layout))

        return direction


def _npeff_seconds(d: Path) -> float | None:
    rec = read_json(d / RUN_FILE) if (d / RUN_FILE).exists() else {}
    try:
        t0 = time.mktime(time.strptime(rec["started"], "%Y-%m-%dT%H:%M:%S%z"))
        return time.mktime(time.strptime(rec["finished"], "%Y-%m-%dT%H:%M:%S%z")) - t0
    except (KeyError, ValueError):
        return None


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_compare(results: dict) -> str:
    """The comparison as a table, one row per method."""
    cols = ("n_components", "alive", "tuned_label", "tuned_prediction", "tuned_tokens", "argmax_shared", "coverage",
            "selectivity", "fit_seconds", "peak_rss_mib")  # fmt: skip
    rows = [[m] + [_cell(r.get(c)) for c in cols] for m, r in results["methods"].items()]
    head = ["method", *cols]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines += [f"{m}: selectivity -, {r['selectivity_note']}" for m, r in results["methods"].items()
              if r.get("selectivity_note")]  # fmt: skip
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# Applications (§6).
# ----------------------------------------------------------------------------------------------


def _space_options(manifest: dict) -> dict:
    """``collect_pefs`` options that reproduce a store's PEF space: its projection, its parameters (by exact
    name, in the layout's order), rank, truncation and storage dtype."""
    key, proj = manifest.get("config") or {}, manifest.get("projection") or {}
    options = {k: key[k] for k in ("rank", "max_length", "dtype", "engine") if k in key}
    options.update(proj_dim=proj.get("n_out"), density=proj.get("density", 32), seed=proj.get("seed", 0))
    return {**options, "params": [e["name"] for e in manifest["layout"]], "exclude": None}


def load_with_model(decomposition_dir, adapter=None):
    """``(npeff, store, adapter, task)`` of a decomposition directory."""
    from .models import load_model
    from .tasks import task_from_config

    est, store = load_run(decomposition_dir)
    if adapter is None:
        model = store.manifest["model"]
        adapter = load_model(model["name"], backend=model.get("backend") or "hf")
    adapter.eval()
    return est, store, adapter, task_from_config(store.manifest["task"]).bind(adapter)


def held_out_examples(store, n: int, *, dataset=None, split="test", seed=None, text_column=None, label_column=None):
    """``(rows, description)``: ``n`` examples none of which is in ``store`` (compared by a hash of the text), from
    ``dataset`` (default: the dataset the store was collected from, with its columns, label names and seed), its
    ``split``, labels numbered as the store's outcomes (:func:`~npeff_lens.data.align_labels`). Fewer than ``n``
    such examples is an error that says how many there are."""
    import hashlib

    from .data import align_labels, load_dataset

    collected = (store.manifest.get("dataset") or {}).get("name")
    cfg = store.manifest.get("config") or {}
    own = dataset is None
    if own:
        if collected in (None, "texts", "user"):
            raise ValueError(
                f"the run's store {store.path} was collected from an in-memory dataset, which cannot be read again: "
                "pass the held-out data with --dataset NAME_OR_FILE"
            )
        dataset = collected
    text_column = text_column or (cfg.get("text_column") if own else None) or "text"
    if label_column is None and own:
        label_column = cfg.get("label_column")
    label_names = cfg.get("label_names") if own else None
    seed = seed if seed is not None else (cfg.get("data_seed", 0) if own else 0)
    data = load_dataset(dataset, split=split, seed=seed, columns={"text": text_column, "label": label_column},
                        label_names=label_names)  # fmt: skip
    data, _ = align_labels(data, store.manifest.get("outcomes"), drop_invalid=True, source=f"the dataset {dataset!r}")

    def digest(text):
        return hashlib.sha1(str(text).encode()).digest()

    seen = {digest(t) for t in store.metadata["text"]}
    fresh = [i for i, t in enumerate(data["text"]) if digest(t) not in seen]
    where = f"{dataset!r} ({split or 'all'} split, seed {seed})"
    if len(fresh) < n:
        raise ValueError(
            f"{len(fresh)} examples of {where} are not in the run's store ({len(data) - len(fresh)} of its "
            f"{len(data)} valid rows are); {n} were asked for: lower --n-eval to {len(fresh)} or less, or give "
            "another --dataset / --eval-split"
        )
    return data.select(fresh[:n]), f"{n} examples of {where}, none in the run's store"


def held_out_coefficients(est, store, adapter, task, texts, out, *, batch_size=8, progress=True):
    """Coefficients ``[n, C]`` of new texts: their PEFs in the store's space (same projection, parameters,
    truncation and task, collected into ``out``, resumable), then ``est.transform`` with the components fixed."""
    from .collect import collect_pefs

    options = _space_options(store.manifest)
    new = collect_pefs(adapter, list(texts), task, out, batch_size=batch_size, progress=progress, **options)
    space = ("projection", "layout")
    check_same({k: store.manifest.get(k) for k in space}, {k: new.manifest.get(k) for k in space},
               f"the held-out PEFs in {out}")  # fmt: skip
    return est.transform(new)


def unlearn(decomposition_dir, config: UnlearnConfig | None = None, *, out=None, adapter=None, **options) -> dict:
    """``npeff unlearn``: :func:`~npeff_lens.applications.unlearning.unlearning_experiment` on a run's model,
    task, examples and coefficients; ``out/unlearning.json`` (default ``decomposition_dir/unlearn``). A finished
    run with the same config is read back; another config is a ``ConfigMismatchError``."""
    from .applications.unlearning import unlearning_experiment

    cfg = _config(UnlearnConfig, config, options)
    d = Path(decomposition_dir)
    out = Path(out) if out is not None else d / "unlearn"
    est, store = load_run(d)
    components = cfg.component_list(est.n_components)  # a wrong choice stops here, before anything is written
    n_random = cfg.n_random
    if n_random is None:  # 64, or what a small store leaves beside the top and control sets and a retain pool
        n_random = max(1, min(64, len(store) - (1 + cfg.k_eval + cfg.k_mitigation) - cfg.k_mitigation - 16))
    rec = _begin(out, "unlearn", cfg, {"n_examples": len(store), "fit_loss": est.reconstruction_err_}, d)
    if rec["status"] == "done" and (out / "unlearning.json").exists():
        return read_json(out / "unlearning.json")
    est, store, adapter, task = load_with_model(d, adapter)
    store_params = (store.manifest.get("config") or {}).get("params")
    params = {("store",): store_params, ("default",): None}.get(tuple(cfg.params), list(cfg.params))
    t0 = time.time()
    report = unlearning_experiment(
        adapter, task, task.prompts(store.metadata["text"]), est.coefficients_, components,
        k_eval=cfg.k_eval, k_mitigation=cfg.k_mitigation, n_random=n_random, kl_threshold=cfg.kl_threshold,
        seed=cfg.seed, progress=cfg.progress, batch_size=cfg.batch_size, n_batches=cfg.n_batches,
        retain_batch_size=cfg.retain_batch_size, forget_batch_size=cfg.forget_batch_size, lr=cfg.lr,
        epsilon_forget=cfg.epsilon_forget, epsilon_retain=cfg.epsilon_retain, params=params,
    )  # fmt: skip
    report.update(n_trained_parameters=sum(p.numel() for _, p in adapter.named_parameters(include=params)),
                  seconds=time.time() - t0)  # fmt: skip
    write_json(out / "unlearning.json", to_jsonable(report))
    _finish(out, rec)
    return report


def icl(decomposition_dir, config: IclConfig | None = None, *, out=None, adapter=None, **options) -> dict:
    """``npeff icl``: the tuning classifier fitted on the run's coefficients and labels, evaluated held-in and
    on ``n_eval`` held-out examples (coefficients by ``transform``) beside zero-shot and best-of-N in-context
    prompts (§6.2); ``out/icl.json`` (default ``decomposition_dir/icl``), resumable like every step."""
    from .applications.icl import TuningClassifier, agreement, icl_experiment

    cfg = _config(IclConfig, config, options)
    d = Path(decomposition_dir)
    out = Path(out) if out is not None else d / "icl"
    est, store = load_run(d)
    meta = store.metadata
    if "label" not in meta.column_names:
        raise ValueError(f"the run's store {store.path} has no 'label' column: the tuning classifier needs labels")
    data, source = held_out_examples(store, cfg.n_eval, dataset=cfg.dataset, split=cfg.eval_split,
                                     seed=cfg.data_seed, text_column=cfg.text_column,
                                     label_column=cfg.label_column)  # fmt: skip
    rec = _begin(out, "icl", cfg, {"n_examples": len(store), "fit_loss": est.reconstruction_err_}, d)
    if rec["status"] == "done" and (out / "icl.json").exists():
        return read_json(out / "icl.json")
    print(f"[icl] held-out: {source}", file=sys.stderr, flush=True)
    est, store, adapter, task = load_with_model(d, adapter)
    texts, labels, coef, t0 = meta["text"], meta["label"], est.coefficients_, time.time()
    clf = TuningClassifier(threshold=cfg.threshold, k=cfg.k).fit(coef, labels)
    held_in = {"n": len(texts), "classifier_accuracy": clf.score(coef, labels), "n_unscored": clf.n_unscored_,
               "zero_shot_accuracy": agreement(meta["prediction"], labels),
               "classifier_zero_shot_agreement": agreement(clf.predict(coef), meta["prediction"])}  # fmt: skip
    eval_coef = held_out_coefficients(est, store, adapter, task, data["text"], out / "eval-pefs",
                                      batch_size=cfg.batch_size, progress=cfg.progress)  # fmt: skip
    result = icl_experiment(
        adapter, task, texts, labels, coef, data["text"], data["label"], eval_coef, threshold=cfg.threshold, k=cfg.k,
        shots=cfg.shots, n_prompts=cfg.n_prompts, n_select=min(cfg.n_select, len(texts) - cfg.shots),
        seed=cfg.seed, batch_size=cfg.batch_size, progress=cfg.progress,
    )  # fmt: skip
    result.update(held_in=held_in, held_out_source=source, seconds=time.time() - t0)
    write_json(out / "icl.json", to_jsonable(result))
    _finish(out, rec)
    return result


# ----------------------------------------------------------------------------------------------
# The demo and the zero-shot check.
# ----------------------------------------------------------------------------------------------


def demo(cmd: DemoCommand | None = None, **options) -> dict:
    """SmolLM2-135M on movie reviews: collect -> decompose -> top examples and tunings, into ``cmd.out``."""
    from .collect import collect_pefs
    from .data import load_dataset
    from .models import load_model
    from .store import PEFStore
    from .tasks import LabelTokens

    cmd = _config(DemoCommand, cmd, options)
    out, t0 = Path(cmd.out), time.time()
    print(
        f"[demo] model={cmd.model} examples={cmd.n} params={list(cmd.params)} proj_dim={cmd.proj_dim} "
        f"density={cmd.density} projection={cmd.projection} components={cmd.components} steps={cmd.steps} -> {out}",
        flush=True,
    )
    task = LabelTokens("Review: {text}\nSentiment:", [" negative", " positive"])
    data = load_dataset("movie-reviews", split="train", seed=0)
    collect_pefs(
        load_model(cmd.model),
        data,
        task,
        out / "pefs",
        proj_dim=cmd.proj_dim,
        density=cmd.density,
        projection=cmd.projection,
        kron_k=cmd.kron_k,
        params=cmd.params,
        n=cmd.n,
        batch_size=cmd.batch_size,
        progress=cmd.progress,
        split="train",
    )
    t1 = time.time()
    meta = PEFStore(out / "pefs").read_metadata()
    acc = sum(m["prediction"] == m["label"] for m in meta) / len(meta)
    print(
        f"[demo] collected {cmd.n} PEFs in {t1 - t0:.0f}s; {cmd.model}'s zero-shot accuracy on them "
        f"(argmax over the label tokens) = {acc:.3f}",
        flush=True,
    )
    decompose_store(out / "pefs", out / "npeff", n_components=cmd.components, n_steps=cmd.steps, progress=cmd.progress)
    print(f"[demo] decomposed into {cmd.components} components in {time.time() - t1:.0f}s", flush=True)
    report = top_report(out / "npeff", show=cmd.show)
    print("\n".join(report["lines"]))
    print(f"[demo] {report['summary_line']}")
    from .report import build

    index = build(out / "npeff", progress=cmd.progress)
    print(f"[demo] report: {index} (open it in a browser)")
    print(f"[demo] total {time.time() - t0:.0f}s; run directory: {out}")
    write_json(
        out / "summary.json",
        to_jsonable(
            {**report["summary"], "zero_shot_accuracy": acc, "seconds": time.time() - t0, "config": cmd.to_dict()}
        ),
    )
    return report


def zero_shot(cmd: ZeroShotCommand | None = None, **options) -> dict:
    """``npeff zero-shot``: the protocol of :func:`npeff_lens.zero_shot.held_out_accuracy` on movie reviews."""
    from .models import load_model
    from .zero_shot import held_out_accuracy

    cmd = _config(ZeroShotCommand, cmd, options)
    return held_out_accuracy(load_model(cmd.model), n=cmd.n)


def top(cmd: TopCommand) -> dict:
    return top_report(cmd.decomposition, k=cmd.k, show=cmd.show, store=cmd.store)
