"""The steps of a run as Python functions, each reading and writing a run directory as the ``npeff`` command does.

This module gathers them in one import: collect, decompose (:func:`decompose_store`), top (:func:`top_report`),
locate, perturb (:func:`run_perturbation`), compare, unlearn, icl and the demo. Some live in their own modules:
perturbation in :mod:`npeff_lens.run_perturbation`, locating components in :mod:`npeff_lens.run_locations` and the
comparison with the baselines in :mod:`npeff_lens.comparison`. The ``run.json`` handling and loading a finished
run are in :mod:`npeff_lens.rundir`.

Library modules (``collect``, ``decomposition``, ``recovery``, ``perturb``) take tensors and objects; the steps
take configs and directories::

    runs/movie/                 npeff collect    a PEF store; its manifest.json holds the collect config's key
    runs/movie/npeff/           npeff decompose  run.json, config.json + npeff.safetensors (NPEFF.save), checkpoints/
    runs/movie/perturb/         npeff perturb    run.json, perturbation.json, perturbation.csv
    runs/movie/npeff/compare/   npeff compare    compare.json; per method run.json and its fit (grad-cluster/, sae/)
    runs/movie/npeff/unlearn/   npeff unlearn    run.json, unlearning.json
    runs/movie/npeff/icl/       npeff icl        run.json, icl.json, eval-pefs/ (held-out PEFs)
    runs/movie/npeff/report/    npeff report     index.html, components/, methods/, data/ (npeff_lens.report)
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from pathlib import Path

from . import rundir
from .analysis import ACTIVE_DEFINITION, active, top_examples, tuning_summary
from .applications.icl import TuningClassifier, agreement, icl_experiment
from .applications.unlearning import unlearning_experiment
from .collect import collect_pefs, dataset_digest
from .commands import CollectCommand, DemoCommand, TopCommand, ZeroShotCommand
from .comparison import compare, format_compare
from .config import CollectConfig, DecomposeConfig, IclConfig, UnlearnConfig, check_same
from .data import align_labels, load_dataset
from .decomposition import NPEFF
from .distributed import local_device
from .errors import CorruptFileError, SettingError
from .io import read_json, to_jsonable, write_json
from .models import load_model
from .report import build
from .run_locations import locate, location_lines
from .run_perturbation import run_perturbation
from .rundir import RUN_FILE, begin, finish, label_columns, load_run, load_with_model, resolve_config, space_options
from .store import PEFStore
from .tasks import LabelTokens, task_from_config
from .zero_shot import held_out_accuracy

__all__ = [
    "RUN_FILE",
    "collect",
    "decompose_store",
    "load_run",
    "top_report",
    "locate",
    "run_perturbation",
    "compare",
    "format_compare",
    "unlearn",
    "icl",
    "load_with_model",
    "held_out_coefficients",
    "check_run_dataset",
    "held_out_examples",
    "demo",
    "zero_shot",
]


# ----------------------------------------------------------------------------------------------
# collect -> decompose -> top.
# ----------------------------------------------------------------------------------------------


def collect(cmd: CollectCommand):
    """``npeff collect``: the model, dataset and task by name -> a PEF store at ``cmd.out`` (under torchrun: one
    store from all ranks, see ``npeff_lens.distributed``)."""

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
    """Fit NPEFF on a PEF store and save the decomposition into a run directory (``npeff decompose``).

    Args:
        store: a :class:`~npeff_lens.store.PEFStore` or its path.
        out: the decomposition directory; it gets ``run.json``, ``config.json`` and ``npeff.safetensors``.
        config: a :class:`~npeff_lens.config.DecomposeConfig`; or pass its fields as keyword ``options``
            (``n_components``, ``n_steps``, ``seed``, ...).

    Returns:
        The fitted :class:`~npeff_lens.decomposition.NPEFF`.

    The fit saves checkpoints in ``out/checkpoints``, so an interrupted fit resumes where it stopped, and a
    finished one is loaded rather than fitted again. Another configuration in the same ``out`` is a
    ``ConfigMismatchError`` naming each differing field.

    Example:
        >>> from npeff_lens.runs import decompose_store
        >>> npeff = decompose_store("runs/movie", "runs/movie/npeff", n_components=32)
    """

    cfg = resolve_config(DecomposeConfig, config, options)
    store = store if isinstance(store, PEFStore) else PEFStore(store)
    if len(store) == 0:
        raise ValueError(f"the PEF store {store.path} is empty: run `npeff collect` first")
    if cfg.n_components > len(store):
        raise SettingError(
            f"{{n_components}} ({cfg.n_components}) exceeds the {len(store)} examples of {store.path}: each component "
            "needs examples to load on; use fewer components or collect more",
            n_components="n_components",
        )
    out = Path(out)
    rec = begin(out, "decompose", cfg, _store_identity(store), store.path)
    if rec["status"] == "done" and (out / "npeff.safetensors").exists():
        try:
            return NPEFF.load(out)
        except CorruptFileError as e:  # refit: it resumes from the last intact checkpoint
            warnings.warn(f"{e}; fitting again from the last intact checkpoint", RuntimeWarning, stacklevel=2)
    t0 = time.perf_counter()
    est = NPEFF.from_config(cfg, checkpoint_dir=out / "checkpoints").fit(store)
    est.save(out)
    rec["fit_seconds"] = time.perf_counter() - t0  # this call's fit (a resumed fit: since it resumed)
    finish(out, rec)
    return est


def top_report(
    decomposition_dir,
    k: int = 16,
    show: int = 5,
    components=None,
    width: int = 100,
    store=None,
    where: bool = False,
    where_method: str = "span",
    where_k: int = 16,
    adapter=None,
) -> dict:
    """Each component's top examples and how many components are tuned to a label or a prediction (``npeff top``).

    A component is *tuned* to a label (or a prediction) when at least 95% of its top ``k`` examples share it.

    Args:
        decomposition_dir: the decomposition's directory (``npeff decompose``'s ``--out``).
        k: the top examples a tuning is read from.
        show: the top examples listed per component.
        components: the components to list (default: all).
        width: the characters of each example's text shown.
        store: the PEF store (default: the one the run records).
        where: also say where each component lives (:func:`locate` with ``method=where_method`` and
            ``k=where_k``): its top (layer, module) groups, attention heads and MLP neurons.
        where_method: ``locate``'s ``method``.
        where_k: ``locate``'s ``k``.
        adapter: the run's model, already loaded (only ``where`` may need it).

    Returns:
        A dict: ``lines`` (the text ``npeff top`` prints: per component its tunings and top examples, with
        coefficient, label and prediction), ``summary`` (the share of components tuned to a label and to a
        prediction) and ``summary_line`` (that summary in one sentence).

    Example:
        >>> from npeff_lens.runs import top_report
        >>> report = top_report("runs/movie/npeff", show=3)
        >>> print("\\n".join(report["lines"]))
        >>> print(report["summary_line"])

    Notes:
        Tunings are §3.1 of the paper.
    """

    est, store = load_run(decomposition_dir, store)
    meta, coeffs = store.metadata, est.coefficients_
    on = active(coeffs)
    (m, C), support = coeffs.shape, int(on.sum(0).max()) if coeffs.numel() else 0
    if k > m:
        raise ValueError(f"--k {k} exceeds the {m} examples of the run: a tuning needs k top examples")
    labels, preds = label_columns(store)
    summary = tuning_summary(coeffs, labels=labels, predictions=preds, k=k)
    per = summary.pop("tunings")
    t_label, t_pred = per.get("label", [None] * C), per["prediction"]
    top, texts, lines = top_examples(coeffs, k=max(k, show)), meta["text"], []
    located = None
    if where:
        located = locate(decomposition_dir, store=store, method=where_method, k=where_k, adapter=adapter)["components"]
    kind, said = ((est.manifest_ or {}).get("projection") or {}).get("kind"), False
    for j in range(C) if components is None else components:
        tag = [f"{what}={t[j]}" for what, t in (("label", t_label), ("prediction", t_pred)) if t[j] is not None]
        lines.append(f"component {j}  [{', '.join(tag) or 'not tuned'}]")
        if located is not None:
            where_lines, chance = location_lines(located[j], kind, said)
            lines += where_lines
            said = said or chance
        for i in top[j, :show].tolist():
            if not on[i, j]:
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
        summary_line += f"; note: no component has {k} active examples (at most {support}; {ACTIVE_DEFINITION})"
    return {"lines": lines, "summary": summary, "summary_line": summary_line}


# ----------------------------------------------------------------------------------------------
# Applications (§6).
# ----------------------------------------------------------------------------------------------


def check_run_dataset(store, *, accept_changed: bool = False) -> None:
    """Refuse the dataset a store was collected from when it no longer holds the rows the store collected (a file
    edited since: other texts, other labels, rows added or removed before them), naming the first row that differs.
    ``accept_changed`` turns the refusal into a warning. Only datasets that can be read again (a built-in name or a
    path) are checked."""
    m = store.manifest
    info, cfg = m.get("dataset") or {}, m.get("config") or {}
    name = info.get("name")
    if name in (None, "texts", "user") or len(store) == 0:
        return
    data, rows = load_dataset(
        name,
        split=cfg.get("split"),
        seed=cfg.get("data_seed", 0),
        columns={"text": cfg.get("text_column"), "label": cfg.get("label_column")},
        label_names=cfg.get("label_names"),
        return_rows=True,
    )
    aligned = align_labels(data, m.get("outcomes"), drop_invalid=True, source=f"the dataset {name!r}", rows=rows)
    data, rows = aligned.dataset, aligned.rows
    n = cfg.get("n") or len(data)
    stored = store.read_metadata()
    difference = None
    if len(data) < len(stored):
        difference = f"it has {len(data)} valid rows, the store {len(stored)}"
    head = data[: len(stored)]
    for i, row in enumerate(stored if difference is None else ()):
        changed = [c for c in ("text", "label") if c in row and c in head and row[c] != head[c][i]]
        if changed:
            c = changed[0]
            outcomes = m.get("outcomes") if c == "label" else None
            now, then = (outcomes[head[c][i]], outcomes[row[c]]) if outcomes else (head[c][i], row[c])
            difference = f"example {i} (row {rows[i]} of the dataset) has {c} {now!r}, the store {then!r}"
            break
    expected = info.get("sha256")
    if difference is None and expected is not None and n <= len(data) and dataset_digest(data, n) != expected:
        difference = "the rows it collected no longer give the digest the store recorded (a row was added or changed)"
    if difference is None:
        return
    message = (
        f"the dataset {name!r} has changed since the run's store {store.path} was collected from it: {difference}; "
        "examples and labels read from it now are not the run's"
    )
    if not accept_changed:
        raise SettingError(
            message + ": restore it, give the data with {dataset}, or pass {accept_changed_dataset}",
            dataset="dataset=",
            accept_changed_dataset="accept_changed_dataset=True",
        )
    warnings.warn(message + " (accepted as it is)", UserWarning, stacklevel=2)


def held_out_examples(
    store,
    n: int,
    *,
    dataset=None,
    split="test",
    seed=None,
    text_column=None,
    label_column=None,
    accept_changed_dataset: bool = False,
):
    """``(rows, description)``: ``n`` examples none of which is in ``store`` (compared by a hash of the text), from
    ``dataset`` (default: the dataset the store was collected from, with its columns, label names and seed, checked
    to hold the store's rows still: :func:`check_run_dataset`), its ``split``, labels numbered as the store's
    outcomes (:func:`~npeff_lens.data.align_labels`). Fewer than ``n`` such examples is an error that says how many
    there are."""
    collected = (store.manifest.get("dataset") or {}).get("name")
    cfg = store.manifest.get("config") or {}
    own = dataset is None
    if own:
        if collected in (None, "texts", "user"):
            raise SettingError(
                f"the run's store {store.path} was collected from an in-memory dataset, which cannot be read again: "
                "pass the held-out data with {dataset}",
                dataset="dataset=",
            )
        dataset = collected
        check_run_dataset(store, accept_changed=accept_changed_dataset)
    text_column = text_column or (cfg.get("text_column") if own else None) or "text"
    if label_column is None and own:
        label_column = cfg.get("label_column")
    label_names = cfg.get("label_names") if own else None
    seed = seed if seed is not None else (cfg.get("data_seed", 0) if own else 0)
    data = load_dataset(
        dataset, split=split, seed=seed, columns={"text": text_column, "label": label_column}, label_names=label_names
    )
    data = align_labels(
        data, store.manifest.get("outcomes"), drop_invalid=True, source=f"the dataset {dataset!r}"
    ).dataset

    def digest(text):
        return hashlib.sha1(str(text).encode()).digest()

    seen = {digest(t) for t in store.metadata["text"]}
    fresh = [i for i, t in enumerate(data["text"]) if digest(t) not in seen]
    where = f"{dataset!r} ({split or 'all'} split, seed {seed})"
    if len(fresh) < n:
        raise SettingError(
            f"{len(fresh)} examples of {where} are not in the run's store ({len(data) - len(fresh)} of its "
            f"{len(data)} valid rows are); {n} were asked for: lower {{n_eval}} to {len(fresh)} or less, or give "
            "another {dataset} / {eval_split}",
            n_eval="n_eval",
            dataset="dataset",
            eval_split="eval_split",
        )
    return data.select(fresh[:n]), f"{n} examples of {where}, none in the run's store"


def held_out_coefficients(est, store, adapter, task, texts, out, *, batch_size=8, progress=True):
    """Coefficients ``[n, C]`` of new texts: their PEFs in the store's space (same projection, parameters,
    truncation and task, collected into ``out``, resumable), then ``est.transform`` with the components fixed."""

    options = space_options(store.manifest)
    new = collect_pefs(adapter, list(texts), task, out, batch_size=batch_size, progress=progress, **options)
    space = ("projection", "layout")
    check_same(
        {k: store.manifest.get(k) for k in space},
        {k: new.manifest.get(k) for k in space},
        f"the held-out PEFs in {out}",
    )
    return est.transform(new)


def unlearn(
    decomposition_dir, config: UnlearnConfig | None = None, *, out=None, adapter=None, store=None, **options
) -> dict:
    """``npeff unlearn``: :func:`~npeff_lens.applications.unlearning.unlearning_experiment` on a run's model,
    task, examples and coefficients; ``out/unlearning.json`` (default ``decomposition_dir/unlearn``). A finished
    run with the same config is read back; another config is a ``ConfigMismatchError``."""

    cfg = resolve_config(UnlearnConfig, config, options)
    d = Path(decomposition_dir)
    out = Path(out) if out is not None else d / "unlearn"
    est, store = load_run(d, store)
    components = cfg.component_list(est.n_components)  # a wrong choice stops here, before anything is written
    n_random = cfg.n_random
    if n_random is None:  # 64, or what a small store leaves beside the top and control sets and a retain pool
        n_random = max(1, min(64, len(store) - (1 + cfg.k_eval + cfg.k_mitigation) - cfg.k_mitigation - 16))
    rec = begin(out, "unlearn", cfg, {"n_examples": len(store), "fit_loss": est.reconstruction_err_}, d)
    if rec["status"] == "done" and (out / "unlearning.json").exists():
        return read_json(out / "unlearning.json")
    est, store, adapter, task = load_with_model(d, adapter, store)
    store_params = (store.manifest.get("config") or {}).get("params")
    params = {("store",): store_params, ("default",): None}.get(tuple(cfg.params), list(cfg.params))
    t0 = time.time()
    prompts = rundir.run_prompts(store.manifest, adapter, task, store.metadata["text"])
    report = unlearning_experiment(
        adapter,
        task,
        prompts,
        est.coefficients_,
        components,
        k_eval=cfg.k_eval,
        k_mitigation=cfg.k_mitigation,
        n_random=n_random,
        kl_threshold=cfg.kl_threshold,
        seed=cfg.seed,
        progress=cfg.progress,
        batch_size=cfg.batch_size,
        n_batches=cfg.n_batches,
        retain_batch_size=cfg.retain_batch_size,
        forget_batch_size=cfg.forget_batch_size,
        lr=cfg.lr,
        epsilon_forget=cfg.epsilon_forget,
        epsilon_retain=cfg.epsilon_retain,
        params=params,
    )
    report.update(
        n_trained_parameters=sum(p.numel() for _, p in adapter.named_parameters(include=params)),
        seconds=time.time() - t0,
    )
    write_json(out / "unlearning.json", to_jsonable(report))
    finish(out, rec)
    return report


def icl(decomposition_dir, config: IclConfig | None = None, *, out=None, adapter=None, store=None, **options) -> dict:
    """``npeff icl``: the tuning classifier fitted on the run's coefficients and labels, evaluated held-in and
    on ``n_eval`` held-out examples (coefficients by ``transform``) beside zero-shot and best-of-N in-context
    prompts (§6.2); ``out/icl.json`` (default ``decomposition_dir/icl``), resumable like every step."""

    cfg = resolve_config(IclConfig, config, options)
    d = Path(decomposition_dir)
    out = Path(out) if out is not None else d / "icl"
    est, store = load_run(d, store)
    meta = store.metadata
    if "label" not in meta.column_names:
        raise ValueError(f"the run's store {store.path} has no 'label' column: the tuning classifier needs labels")
    data, source = held_out_examples(
        store,
        cfg.n_eval,
        dataset=cfg.dataset,
        split=cfg.eval_split,
        seed=cfg.data_seed,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        accept_changed_dataset=cfg.accept_changed_dataset,
    )
    rec = begin(out, "icl", cfg, {"n_examples": len(store), "fit_loss": est.reconstruction_err_}, d)
    if rec["status"] == "done" and (out / "icl.json").exists():
        return read_json(out / "icl.json")
    print(f"[icl] held-out: {source}", file=sys.stderr, flush=True)
    est, store, adapter, task = load_with_model(d, adapter, store)
    texts, labels, coef, t0 = meta["text"], meta["label"], est.coefficients_, time.time()
    clf = TuningClassifier(threshold=cfg.threshold, k=cfg.k).fit(coef, labels)
    held_in = {
        "n": len(texts),
        "classifier_accuracy": clf.score(coef, labels),
        "n_unscored": clf.n_unscored_,
        "zero_shot_accuracy": agreement(meta["prediction"], labels),
        "classifier_zero_shot_agreement": agreement(clf.predict(coef), meta["prediction"]),
    }
    eval_coef = held_out_coefficients(
        est, store, adapter, task, data["text"], out / "eval-pefs", batch_size=cfg.batch_size, progress=cfg.progress
    )
    result = icl_experiment(
        adapter,
        task,
        texts,
        labels,
        coef,
        data["text"],
        data["label"],
        eval_coef,
        threshold=cfg.threshold,
        k=cfg.k,
        shots=cfg.shots,
        n_prompts=cfg.n_prompts,
        n_select=min(cfg.n_select, len(texts) - cfg.shots),
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        max_length=space_options(store.manifest).get("max_length"),
        icl_max_length=adapter.context_length,
    )
    result.update(held_in=held_in, held_out_source=source, seconds=time.time() - t0)
    write_json(out / "icl.json", to_jsonable(result))
    finish(out, rec)
    return result


# ----------------------------------------------------------------------------------------------
# The demo and the zero-shot check.
# ----------------------------------------------------------------------------------------------


def demo(cmd: DemoCommand | None = None, **options) -> dict:
    """SmolLM2-135M on movie reviews: collect -> decompose -> top examples and tunings, into ``cmd.out``."""

    cmd = resolve_config(DemoCommand, cmd, options)
    out, t0 = Path(cmd.out), time.time()
    print(
        f"[demo] model={cmd.model} examples={cmd.n} params={list(cmd.params)} proj_dim={cmd.proj_dim} "
        f"density={cmd.density} projection={cmd.projection} components={cmd.components} steps={cmd.steps} -> {out}",
        flush=True,
    )
    task = LabelTokens("Review: {text}\nSentiment:", [" negative", " positive"])
    data = load_dataset("movie-reviews", split="train", seed=0)
    adapter = load_model(cmd.model)
    collect_pefs(
        adapter,
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
    # where: locations.json (from the top examples' gradients, the model already loaded), the report's maps
    report = top_report(out / "npeff", show=cmd.show, where=True, adapter=adapter)
    print("\n".join(report["lines"]))
    print(f"[demo] {report['summary_line']}")

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

    cmd = resolve_config(ZeroShotCommand, cmd, options)
    return held_out_accuracy(load_model(cmd.model), n=cmd.n, max_length=cmd.max_length)


def top(cmd: TopCommand) -> dict:
    return top_report(
        cmd.decomposition,
        k=cmd.k,
        show=cmd.show,
        store=cmd.store,
        where=cmd.where,
        where_method=cmd.where_method,
        where_k=cmd.where_k,
    )
