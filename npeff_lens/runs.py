"""Run directories: the one home for the layout, resume, and the loops that run experiments.

Library modules (``collect``, ``decomposition``, ``recovery``, ``perturb``) take tensors and objects; this
module takes configs and directories::

    runs/movie/                 npeff collect    a PEF store; its manifest.json holds the collect config's key
    runs/movie/npeff/           npeff decompose  run.json, config.json + npeff.safetensors (NPEFF.save), checkpoints/
    runs/movie/perturb/         npeff perturb    run.json, perturbation.json, perturbation.csv

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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import (
    CollectCommand,
    DecomposeConfig,
    DemoCommand,
    PerturbConfig,
    TopCommand,
    ZeroShotCommand,
    check_same,
)
from .io import atomic_writer, progress, read_json, to_jsonable, write_json

RUN_FILE = "run.json"

__all__ = [
    "RUN_FILE",
    "collect",
    "decompose_store",
    "load_run",
    "top_report",
    "run_perturbation",
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
    if path.exists():
        rec = read_json(path)
        if rec.get("step") != step:
            raise ValueError(f"{out} holds a {rec.get('step')!r} run, not {step!r}: choose another directory")
        config.check_resume(rec.get("config", {}), str(out))
        check_same(rec.get("inputs", {}), to_jsonable(inputs), f"{out} (its inputs)", hint=hint)
        return rec
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a run directory")
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
    """``npeff collect``: the model, dataset and task by name -> a PEF store at ``cmd.out``."""
    from .collect import collect_pefs
    from .models import load_model
    from .tasks import task_from_config

    spec = {"kind": cmd.task, "template": cmd.template}
    if cmd.task == "label-tokens":
        spec["labels"] = list(cmd.labels)
    elif cmd.task == "next-token":
        spec.update(expectation_projections=cmd.expectation_projections, seed=cmd.task_seed)
    task = task_from_config(spec)
    adapter = load_model(cmd.model, backend=cmd.backend, device=cmd.device)
    return collect_pefs(adapter, cmd.dataset, task, cmd.out, config=cmd.collect_config())


def _store_identity(store) -> dict:
    """What a decomposition depends on: the store's space and its examples."""
    m = store.manifest
    return {"n_examples": len(store), **{k: m.get(k) for k in ("model", "task", "projection", "n_params", "config")}}


def decompose_store(store, out, config: DecomposeConfig | None = None, **options):
    """Fit NPEFF on a PEF store into ``out`` (``config`` or :class:`~npeff_lens.config.DecomposeConfig` fields).
    Checkpoints go to ``out/checkpoints``: an interrupted fit resumes; a finished one is loaded."""
    from .decomposition import NPEFF
    from .store import PEFStore

    cfg = _config(DecomposeConfig, config, options)
    store = store if isinstance(store, PEFStore) else PEFStore(store)
    if len(store) == 0:
        raise ValueError(f"the PEF store {store.path} is empty: run `npeff collect` first")
    out = Path(out)
    rec = _begin(out, "decompose", cfg, _store_identity(store), store.path)
    if rec["status"] == "done" and (out / "npeff.safetensors").exists():
        return NPEFF.load(out)
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
    C = coeffs.shape[1]
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
        if cfg.recovery == "fpc" and "lambda_max" not in fpc_options:  # one estimate for all components
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
    bar = progress(indices, desc="perturbing components", unit="component", enabled=cfg.progress)
    for j in bar:
        if j in records:
            continue
        top_j = [int(i) for i in top[j].tolist() if s.coeffs[i, j] > 0]
        if 0 < len(top_j) < cfg.top_k:
            notes.append(f"component {j}: only {len(top_j)} examples with a positive coefficient (top_k={cfg.top_k})")
        records[j] = _perturb_one(s, cfg, j, top_j, reference, fpc_options)
        bar.set_postfix(kl_ratio=perturb._fmt(records[j]["kl_ratio"]))
        if out is not None:
            _write_perturbation(Path(out), [records[i] for i in indices if i in records], cfg, notes)
    ordered = [records[i] for i in indices]
    short = [r["n_base"] for r in ordered if r.get("status") == "ok" and r["n_base"] < cfg.n_baseline]
    if short:
        notes.append(
            f"the store holds {m} examples: {len(short)} baseline set(s) have only {min(short)} to "
            f"{max(short)} examples (asked for {cfg.n_baseline})"
        )
        warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
    if out is not None:
        _write_perturbation(Path(out), ordered, cfg, notes)
        _finish(Path(out), read_json(Path(out) / RUN_FILE))
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
    flat, info = recover_direction(
        s.components, j, s.projection, method=cfg.recovery, mu=cfg.mu, reject_threshold=cfg.reject_threshold,
        lambda_max=s.lambda_max, **fpc_options,
    )  # fmt: skip
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
    return {int(r["component"]): r for r in read_json(table).get("components", [])}


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
        f"density={cmd.density} components={cmd.components} steps={cmd.steps} -> {out}",
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
