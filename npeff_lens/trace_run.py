"""The ``npeff trace`` step: causal tracing (:mod:`npeff_lens.tracing`) of a model on a dataset of facts, written to
``OUT/trace.json`` (the settings, the average indirect effect per kind and layer, every fact's numbers), and the
average profile as a table."""

from __future__ import annotations

import math
import time
from pathlib import Path

from .commands import TraceCommand
from .data import load_dataset
from .io import write_json
from .models import load_model
from .tracing import POSITION_GROUPS, causal_trace, known_facts

__all__ = ["TRACE_FILE", "trace_run", "format_trace"]

TRACE_FILE = "trace.json"
_SCAN_BATCH = 64  # prompts per forward while looking for known facts


def _answer(target: str) -> str:
    """The continuation measured: the target after a space, as it follows the prompt's last word."""
    return target if target[:1].isspace() else " " + target


def _facts(cmd: TraceCommand, adapter) -> tuple[list[str], list[str], list[str], int]:
    """``(prompts, subjects, answers, rows scanned)``: the first ``n`` rows of the split (with ``known_only``, the
    first ``n`` the model knows)."""
    data = load_dataset(cmd.dataset, split=cmd.split, seed=cmd.data_seed)
    missing = [c for c in ("text", "subject", "target") if c not in data.column_names]
    if missing:
        raise ValueError(
            f"the dataset {cmd.dataset!r} has no {', '.join(missing)} column (it has {data.column_names}): tracing "
            "needs each prompt (text), the subject it names (subject) and its answer (target)"
        )
    if not cmd.known_only:
        rows = data.select(range(min(cmd.n, len(data))))
        return list(rows["text"]), list(rows["subject"]), [_answer(t) for t in rows["target"]], len(rows)
    prompts, subjects, answers, scanned = [], [], [], 0
    while len(prompts) < cmd.n and scanned < len(data):
        rows = data.select(range(scanned, min(scanned + _SCAN_BATCH, len(data))))
        scanned += len(rows)
        chunk = [_answer(t) for t in rows["target"]]
        for keep, text, subject, answer in zip(
            known_facts(adapter, rows["text"], chunk), rows["text"], rows["subject"], chunk
        ):
            if keep and len(prompts) < cmd.n:
                prompts.append(text), subjects.append(subject), answers.append(answer)
    if not prompts:
        raise ValueError(
            f"the model predicts the answer of none of the {scanned} facts of {cmd.dataset!r}: "
            "nothing to trace with --known-only"
        )
    return prompts, subjects, answers, scanned


def trace_run(cmd: TraceCommand) -> dict:
    """Loads the model and the facts, traces them, writes ``OUT/trace.json`` and returns its content."""
    t0 = time.time()
    adapter = load_model(cmd.model, backend=cmd.backend, device=cmd.device)
    prompts, subjects, answers, scanned = _facts(cmd, adapter)
    trace = causal_trace(
        adapter,
        prompts,
        subjects,
        answers,
        noise=cmd.noise,
        n_samples=cmd.samples,
        kinds=cmd.kinds,
        positions=cmd.positions,
        window=cmd.window,
        seed=cmd.seed,
        batch_size=cmd.batch_size,
        show_progress=cmd.progress,
    )
    result = {
        "config": cmd.to_dict(),
        "model": cmd.model,
        "dataset": cmd.dataset,
        "rows_scanned": scanned,
        **trace.to_dict(),
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(cmd.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / TRACE_FILE, result)
    return result


def format_trace(result: dict) -> str:
    """The average indirect effect per layer, one column per kind (for traces over every position: at the last
    subject token and at the last token), then each kind's peak."""
    kinds, average = result["kinds"], result["average_indirect_effect"]
    head = (
        f"causal trace of {result['model']} on {result['n_facts']} facts of {result['dataset']}: mean p_clean "
        f"{result['average_p_clean']:.4f}, mean p_corrupted {result['average_p_corrupted']:.4f} (noise "
        f"{result['noise']:g} x {result['embedding_std']:.4g}, {result['n_samples']} draws"
        + (f", window {result['window']}" if result["window"] > 1 else "")
        + ")"
    )
    if result["positions"] == "all":
        groups = (POSITION_GROUPS.index("last subject token"), POSITION_GROUPS.index("last token"))
        columns = [
            (f"{k}@{('last subj', 'last tok')[g == groups[1]]}", [row[g] for row in average[k]])
            for k in kinds
            for g in groups
        ]
        what = "average indirect effect at the last subject token and at the last token"
    else:
        columns = [(k, average[k]) for k in kinds]
        what = "average indirect effect at the last subject token"
    width = max(9, *(len(name) + 1 for name, _ in columns))
    lines = [head, what + ":", "layer" + "".join(f"{name:>{width}}" for name, _ in columns)]
    for layer in range(result["n_layers"]):
        lines.append(f"{layer:>5}" + "".join(f"{_number(values[layer]):>{width}}" for _, values in columns))
    peaks = []
    for name, values in columns:
        finite = [(v, i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if finite:
            value, layer = max(finite)
            peaks.append(f"{name} layer {layer} ({value:+.4f})")
    lines.append("peak: " + ", ".join(peaks))
    return "\n".join(lines)


def _number(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:+.4f}"
