"""Run directories: the ``run.json`` record that lets a step begin, resume and finish, and loading a finished
decomposition with its store and model.

The steps that write run directories (:mod:`npeff_lens.runs`, :mod:`npeff_lens.comparison`) and the readers of
finished runs (:mod:`npeff_lens.hub`, :mod:`npeff_lens.attribution`, :mod:`npeff_lens.report`) build on this
module.

``run.json`` records the step, its config's resume key (:meth:`~npeff_lens.config.BaseConfig.key`), the identity
of its inputs, where its input lies (relative to the run, so a moved tree keeps working) and its status. A
rerun into a directory whose ``run.json`` holds the same key and inputs resumes (or returns the finished
result); anything else is a :class:`~npeff_lens.config.ConfigMismatchError` naming each differing field,
never a mix. A directory that holds other files and no ``run.json`` is refused; one that holds only the record
of a step that stopped before writing anything blocks nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import __version__
from .config import check_same
from .decomposition import NPEFF
from .io import read_json, remove_dead_temp_files, to_jsonable, write_json
from .models import load_model
from .store import PEFStore
from .tasks import task_from_config

RUN_FILE = "run.json"

__all__ = [
    "RUN_FILE",
    "begin",
    "finish",
    "resolve_config",
    "load_run",
    "load_with_model",
    "label_columns",
    "space_options",
    "run_prompts",
]


def resolve_config(cls, config, options: dict):
    """``config`` (with ``options`` replaced), or ``cls(**options)``. A config that extends ``cls`` (a command:
    the step's config plus its inputs) is narrowed to ``cls``, so its inputs never reach a resume key."""
    if config is None:
        return cls(**options)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}; got {type(config).__name__}")
    if type(config) is not cls:
        config = config.narrow(cls)
    return config.replace(**options) if options else config


def begin(out: Path, step: str, config, inputs: dict, source: Path | None) -> dict:
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


def finish(out: Path, rec: dict) -> None:
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
            f"{src.get('absolute')}: pass {flag} PATH ({flag[2:]}=PATH in Python)"
        )
    raise FileNotFoundError(
        f"{run_dir} has no {RUN_FILE} naming its {what} (saved from Python?): pass {flag} PATH ({flag[2:]}=PATH in "
        "Python)"
    )


def load_run(decomposition_dir, store=None):
    """``(npeff, store)`` for a decomposition directory; ``store`` overrides the one its run.json names."""

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
    _check_store_identity(est.manifest_ or {}, store.manifest or {}, getattr(store, "path", "(given)"), d)
    if len(store) != est.coefficients_.shape[0]:
        raise ValueError(
            f"the PEF store {getattr(store, 'path', '(given)')} holds {len(store)} examples; "
            f"the decomposition {d} was fitted on {est.coefficients_.shape[0]}"
        )
    return est, store


def _check_store_identity(fitted: dict, manifest: dict, path, d: Path) -> None:
    """A decomposition records its store's manifest: refuse a store of other examples (their digest), another
    model, task or outcome set, in one line naming what differs."""
    differs = []
    for key, what in (("model", "model"), ("task", "task"), ("outcomes", "outcomes")):
        if key in fitted and key in manifest and to_jsonable(fitted[key]) != to_jsonable(manifest[key]):
            differs.append(f"{what} {manifest[key]!r}, fitted on {fitted[key]!r}")
    a, b = fitted.get("dataset") or {}, manifest.get("dataset") or {}
    if a.get("sha256") and b.get("sha256") and a["sha256"] != b["sha256"]:
        differs.append(
            f"examples of {b.get('name')!r} (digest {b['sha256']}), fitted on those of {a.get('name')!r} "
            f"(digest {a['sha256']})"
        )
    if differs:
        raise ValueError(
            f"the PEF store {path} is not the one the decomposition {d} was fitted on: it holds {'; '.join(differs)}; "
            "its coefficients belong to the fitted examples: pass that store, or decompose this one"
        )


def load_with_model(decomposition_dir, adapter=None, store=None):
    """``(npeff, store, adapter, task)`` of a decomposition directory (``store``: as :func:`load_run`'s)."""

    est, store = load_run(decomposition_dir, store)
    if adapter is None:
        model = store.manifest["model"]
        adapter = load_model(model["name"], backend=model.get("backend") or "hf")
    adapter.eval()
    return est, store, adapter, task_from_config(store.manifest["task"]).bind(adapter)


def label_columns(store):
    """``(labels, predictions)`` of a store's examples, by outcome name (labels: None without a label column);
    see :meth:`~npeff_lens.store.PEFStore.example_labels`."""
    meta = store.read_metadata()
    return store.example_labels(meta), store.example_predictions(meta)


def space_options(manifest: dict) -> dict:
    """``collect_pefs`` options that reproduce a store's PEF space: its projection, its parameters (by exact
    name, in the layout's order), rank, prompt length (``max_length``) and storage dtype."""
    key, proj = manifest.get("config") or {}, manifest.get("projection") or {}
    options = {k: key[k] for k in ("rank", "max_length", "dtype", "engine") if k in key}
    options.update(proj_dim=proj.get("n_out"), density=proj.get("density", 32), seed=proj.get("seed", 0))
    return {**options, "params": [e["name"] for e in manifest["layout"]], "exclude": None}


def run_prompts(manifest: dict, adapter, task, texts) -> list[str]:
    """The prompts a store's collection made of ``texts``: :meth:`~npeff_lens.tasks.Task.fitted_prompts` at the
    ``max_length`` its manifest records (a text too long lost its last tokens, the template kept). What the steps
    that run the model on a run's examples (perturbation, selectivity, unlearning, the activation baselines) read."""
    prompts, _ = task.fitted_prompts(adapter.tokenizer, list(texts), (manifest.get("config") or {}).get("max_length"))
    return prompts
