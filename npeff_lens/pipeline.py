"""The end-to-end pipeline behind ``npeff collect / decompose / top`` and ``make demo``:
collect -> decompose -> top examples and tunings, every step written into a run directory and
resumable (rerunning a step that finished is instant)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def decompose_store(
    store_path,
    out,
    n_components: int,
    *,
    n_steps: int = 1000,
    n_warmup_steps: int = 100,
    lr: float | None = None,
    warmup_lr: float | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
):
    """Fit NPEFF on a PEF store and save it into ``out`` (with ``source.json`` pointing at the store).
    Checkpoints go to ``out/checkpoints`` so an interrupted fit resumes."""
    from .decomposition import NPEFF
    from .store import PEFStore

    store = PEFStore(store_path)
    if len(store) == 0:
        raise ValueError(f"the PEF store {store_path} is empty: run `npeff collect` first")
    out = Path(out)
    if (out / "config.json").exists() and (out / "source.json").exists():
        done = NPEFF.load(out)
        src = json.loads((out / "source.json").read_text())
        if (
            done.n_components == n_components
            and done.n_steps == n_steps
            and done.seed == seed
            and src.get("n_examples") == len(store)
            and Path(src["store"]) == Path(store_path).resolve()
        ):
            return done
    kwargs = dict(
        n_steps=n_steps,
        n_warmup_steps=n_warmup_steps,
        seed=seed,
        progress=progress,
        checkpoint_dir=out / "checkpoints",
        checkpoint_every=checkpoint_every,
    )
    if lr is not None:
        kwargs["lr"] = lr
    if warmup_lr is not None:
        kwargs["warmup_lr"] = warmup_lr
    if memory_budget is not None:
        kwargs["memory_budget"] = memory_budget
    est = NPEFF(n_components, **kwargs).fit(store)
    est.save(out)
    tmp = out / "source.json.tmp"
    tmp.write_text(json.dumps({"store": str(Path(store_path).resolve()), "n_examples": len(store)}, indent=2))
    os.replace(tmp, out / "source.json")
    return est


def load_run(decomposition_dir):
    """``(npeff, store)`` for a decomposition directory written by :func:`decompose_store`."""
    from .decomposition import NPEFF
    from .store import PEFStore

    d = Path(decomposition_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} holds no decomposition (run `npeff decompose` first)")
    est = NPEFF.load(d)
    src = d / "source.json"
    if not src.exists():
        raise FileNotFoundError(f"{src} is missing: cannot find the PEF store of this decomposition")
    store = PEFStore(json.loads(src.read_text())["store"])
    return est, store


def top_report(decomposition_dir, k: int = 16, show: int = 5, components=None, width: int = 100) -> dict:
    """Top examples per component (label, prediction, coefficient) and the tuning summary (§3.1)."""
    from .analysis import top_examples, tuning_summary

    est, store = load_run(decomposition_dir)
    meta = store.metadata
    coeffs = est.coefficients_
    C = coeffs.shape[1]
    labels = (
        meta["label_name"]
        if "label_name" in meta.column_names
        else (meta["label"] if "label" in meta.column_names else None)
    )
    preds = meta["prediction_name"] if "prediction_name" in meta.column_names else meta["prediction"]
    summary = tuning_summary(coeffs, labels=labels, predictions=preds, k=k)
    per = summary.pop("tunings")
    t_label = per.get("label", [None] * C)
    t_pred = per["prediction"]
    top = top_examples(coeffs, k=max(k, show))
    texts = meta["text"]
    comps = range(C) if components is None else components
    lines = []
    for j in comps:
        tag = []
        if t_label[j] is not None:
            tag.append(f"label={t_label[j]}")
        if t_pred[j] is not None:
            tag.append(f"prediction={t_pred[j]}")
        lines.append(f"component {j}  [{', '.join(tag) or 'not tuned'}]")
        for i in top[j, :show].tolist():
            if coeffs[i, j] <= 0:
                break
            lab = labels[i] if labels is not None else "-"
            text = texts[i].replace("\n", " ")
            lines.append(f"  {coeffs[i, j]:9.4f}  label={lab!s:<9} pred={preds[i]!s:<9} {text[:width]}")
    summary_line = (
        f"{C} components: {summary.get('prediction', 0):.0%} tuned to a prediction, "
        f"{summary.get('label', 0):.0%} to a label (top {k}, >= 95% agreement); "
        f"{len(est.dead_components_) if getattr(est, 'dead_components_', None) is not None else 0} dead"
    )
    return {"lines": lines, "summary": summary, "summary_line": summary_line}


# Sized for a 2-core CPU in ~10 minutes: the attention weights of the last ten layers (8.8M of the
# 106M non-embedding parameters), density 8. `npeff demo --help` scales every knob up.
DEMO_DEFAULTS = dict(
    model="smollm2-135m",
    n=640,
    params=["model.layers.2[0-9].self_attn.*"],
    proj_dim=8192,
    density=8,
    components=16,
    steps=1000,
    batch_size=8,
)


def demo(
    out="runs/demo",
    model=DEMO_DEFAULTS["model"],
    n=DEMO_DEFAULTS["n"],
    params=None,
    proj_dim=DEMO_DEFAULTS["proj_dim"],
    density=DEMO_DEFAULTS["density"],
    components=DEMO_DEFAULTS["components"],
    steps=DEMO_DEFAULTS["steps"],
    batch_size=DEMO_DEFAULTS["batch_size"],
    show=3,
    progress=True,
):
    """SmolLM2-135M on movie reviews: collect -> decompose -> top examples and tunings."""
    from . import load_dataset, load_model
    from .collect import collect_pefs
    from .store import PEFStore
    from .tasks import LabelTokens

    params = params or DEMO_DEFAULTS["params"]
    out = Path(out)
    t0 = time.time()
    print(
        f"[demo] model={model} examples={n} params={params} proj_dim={proj_dim} density={density} "
        f"components={components} steps={steps} -> {out}",
        flush=True,
    )
    adapter = load_model(model)
    task = LabelTokens("Review: {text}\nSentiment:", [" negative", " positive"])
    data = load_dataset("movie-reviews", split="train", seed=0)
    collect_pefs(
        adapter,
        data,
        task,
        out / "pefs",
        proj_dim=proj_dim,
        density=density,
        params=params,
        n=n,
        batch_size=batch_size,
        progress=progress,
        split="train",
    )
    t1 = time.time()
    meta = PEFStore(out / "pefs").read_metadata()
    acc = sum(m["prediction"] == m["label"] for m in meta) / len(meta)
    print(
        f"[demo] collected {n} PEFs in {t1 - t0:.0f}s; {model}'s zero-shot accuracy on them "
        f"(argmax over the label tokens) = {acc:.3f}",
        flush=True,
    )
    decompose_store(out / "pefs", out / "npeff", components, n_steps=steps, progress=progress)
    t2 = time.time()
    print(f"[demo] decomposed into {components} components in {t2 - t1:.0f}s", flush=True)
    report = top_report(out / "npeff", show=show)
    print("\n".join(report["lines"]))
    print(f"[demo] {report['summary_line']}")
    print(f"[demo] total {time.time() - t0:.0f}s; run directory: {out}")
    (out / "summary.json").write_text(
        json.dumps({**report["summary"], "zero_shot_accuracy": acc, "seconds": time.time() - t0}, indent=2, default=str)
    )
    return report
