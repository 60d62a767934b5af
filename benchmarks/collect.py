"""Benchmark: PEF collection (``PEFComputer.compute``) against the minimal work, measured in the same process.

Model SmolLM2-135M (``load_model("smollm2-135m")``), movie reviews (train split, in order), task
``LabelTokens("Review: {text}\\nSentiment:", [" negative", " positive"])`` (r = 2 rows), max_length 256.

Each configuration (parameter subset, projection, density, batch size) runs in a fresh subprocess. Per batch,
interleaved:
  pef      ``PEFComputer.compute`` with a ``SparseProjection(n_params, proj_dim, density)`` or a
           ``KroneckerProjection(shapes, proj_dim, k, density)``; the sparse projection's ``project`` calls (for
           kron: its Kronecker sketches and its second stage) are timed by wrapping, so ``grad = total -
           projection``. The gradient part is further split (wrapped methods): forward (``task.log_probs``),
           dL/dy backward (``autograd.grad``), per-example rebuild (``PEFComputer.per_example``), rest (stack,
           accumulator adds, Python).
  minimal  one forward and r backward passes of the same batch without per-example gradients:
           ``autograd.grad(rows[:, j].sum(), selected params)`` for each row j (same requires_grad restriction).
Peak memory: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after ``malloc_trim``) within
each phase; ``ready`` is the RSS with the model loaded and warmed up. torch CPU allocations are invisible to
tracemalloc, hence RSS.

    python benchmarks/collect.py --quick     # a few minutes on 2 CPU cores
    python benchmarks/collect.py             # the table in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = [" negative", " positive"]
SUBSETS = {
    "all": None,  # the adapter's default selection (106M)
    "demo": ["model.layers.2[0-9].self_attn.*"],  # make demo's selection (8.8M)
    "last10-mlp": ["model.layers.2[0-9].mlp.*"],
    "layer29": ["model.layers.29.*"],  # includes 2 RMSNorm weights: per-example autograd fallback
    "layer29-linear": ["model.layers.29.self_attn.*", "model.layers.29.mlp.*"],  # the same without the norms
}


# ------------------------------------------------------------------------------------------------ memory
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak():
    """Give freed heap back to the OS, then reset VmHWM to the current RSS. Returns the RSS in MiB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") / 1024


def peak_rss():
    """The process's peak RSS (VmHWM) in MiB since the last :func:`reset_peak`."""
    return _status_kib("VmHWM") / 1024


# ------------------------------------------------------------------------------------------------ worker
class Timer:
    """Accumulates the time of wrapped functions per key (``t``) while ``on``."""

    def __init__(self):
        self.t = {}
        self.on = False

    def wrap(self, key, fn):
        def inner(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0

        return inner


def worker(cfg):
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
        os.environ.setdefault("NUMBA_NUM_THREADS", str(cfg["threads"]))
    import npeff_lens
    from npeff_lens.pef import PEFComputer
    from npeff_lens.projection import KroneckerProjection, SparseProjection
    from npeff_lens.tasks import LabelTokens

    adapter = npeff_lens.load_model("smollm2-135m")
    adapter.eval()
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    ds = npeff_lens.load_dataset("movie-reviews", split="train")
    prompts = task.prompts(ds[: cfg["n"]]["text"])
    named = adapter.named_parameters(include=SUBSETS[cfg["subset"]])
    n_params = sum(p.numel() for _, p in named)
    if cfg.get("projection", "sparse") == "kron":
        shapes = [tuple(p.shape) for _, p in named]
        proj = KroneckerProjection(shapes, cfg["proj_dim"], seed=0, k=cfg["kron_k"], density=cfg["density"])
    else:
        proj = SparseProjection(n_params, cfg["proj_dim"], seed=0, density=cfg["density"])
    comp = PEFComputer(adapter, task, named, proj)
    R = task.n_rows
    ml = cfg["max_length"]

    tm = Timer()
    if isinstance(proj, KroneckerProjection):
        proj.inner.project = tm.wrap("projection", proj.inner.project)
        proj.sketch_outer = tm.wrap("projection", proj.sketch_outer)
        proj.sketch = tm.wrap("projection", proj.sketch)
    else:
        proj.project = tm.wrap("projection", proj.project)
    comp.per_example = tm.wrap("per_example", comp.per_example)
    task.log_probs = tm.wrap("forward", task.log_probs)
    grad_fn = torch.autograd.grad
    timed_dy, timed_fb = tm.wrap("backward_dy", grad_fn), tm.wrap("fallback", grad_fn)
    fallback_ids = {id(s.param) for s in comp.fallback}

    def grad_split(outputs, inputs, *a, **k):  # the fallback asks for parameters, the hooks for outputs
        fb = isinstance(inputs, (list, tuple)) and inputs and all(id(t) in fallback_ids for t in inputs)
        return (timed_fb if fb else timed_dy)(outputs, inputs, *a, **k)

    torch.autograd.grad = grad_split

    def minimal(ps):
        with comp.only_selected_require_grad(), torch.enable_grad():
            batch = adapter.tokenize(ps, max_length=ml)
            rows = task.pef_rows(task.log_probs(adapter, batch))
            for j in range(R):
                grad_fn(rows[:, j].sum(), comp.params, retain_graph=j < R - 1, allow_unused=True)

    # warm-up: self-check (2 backward passes), numba (cached) compile, allocator
    comp.compute(prompts[:1], max_length=ml)
    minimal(prompts[:1])
    ready = reset_peak()
    b = cfg["batch"]
    res = {
        "pef_s": 0.0,
        "min_s": 0.0,
        "pef_peak": 0.0,
        "min_peak": 0.0,
        "pef_start": 0.0,
        "min_start": 0.0,
        "tokens": 0,
    }
    parts = {}
    for lo in range(0, cfg["n"], b):
        ps = prompts[lo : lo + b]
        res["tokens"] += int(adapter.tokenize(ps, max_length=ml)["input_ids"].numel())
        res["pef_start"] = max(res["pef_start"], reset_peak())
        tm.t, tm.on = {}, True
        t0 = time.perf_counter()
        comp.compute(ps, max_length=ml)
        res["pef_s"] += time.perf_counter() - t0
        tm.on = False
        for k, v in tm.t.items():
            parts[k] = parts.get(k, 0.0) + v
        res["pef_peak"] = max(res["pef_peak"], peak_rss())
        res["min_start"] = max(res["min_start"], reset_peak())
        t0 = time.perf_counter()
        minimal(ps)
        res["min_s"] += time.perf_counter() - t0
        res["min_peak"] = max(res["min_peak"], peak_rss())
    res.update(
        parts=parts,
        ready=ready,
        n_params=n_params,
        fallback=[s.name for s in comp.fallback],
        threads=torch.get_num_threads(),
    )
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------ driver
def _proj_name(c):
    return f"kron k={c['kron_k']}" if c.get("projection") == "kron" else "sparse"


def run_config(cfg):
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)], capture_output=True, text=True
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker failed for {cfg}:\n{p.stderr[-3000:]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer examples, no 106M-parameter row")
    p.add_argument("--n", type=int, default=8, help="examples per configuration (at least one batch)")
    p.add_argument("--n-all", type=int, default=4, help="examples for the all-parameters (106M) rows")
    p.add_argument("--subsets", nargs="*", default=None, choices=list(SUBSETS))
    p.add_argument("--densities", type=int, nargs="*", default=[32, 8])
    p.add_argument(
        "--projections",
        nargs="*",
        default=["sparse", "kron"],
        choices=["sparse", "kron"],
        help="sparse: every density; kron: once, at --kron-density",
    )
    p.add_argument("--kron-k", type=int, default=16, help="kron: each weight matrix sketched to k x k")
    p.add_argument("--kron-density", type=int, default=32, help="kron: density of its second (sparse) stage")
    p.add_argument("--batch", type=int, default=8, help="batch size of the subset x density grid")
    p.add_argument(
        "--memory-batches",
        type=int,
        nargs="*",
        default=[1, 4, 16],
        help="batch sizes of the memory sweep (last10-mlp, first density)",
    )
    p.add_argument("--proj-dim", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch/numba threads (0: torch default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.n = min(args.n, 4)
    subsets = args.subsets or (["layer29", "last10-mlp"] if args.quick else ["layer29", "last10-mlp", "all"])
    base = {"proj_dim": args.proj_dim, "max_length": args.max_length, "threads": args.threads, "kron_k": args.kron_k}
    configs = []
    for s in subsets:
        n = args.n_all if s == "all" else args.n
        for proj in args.projections:
            for d in args.densities if proj == "sparse" else [args.kron_density]:
                configs.append(
                    {**base, "subset": s, "projection": proj, "density": d, "batch": min(args.batch, n), "n": n}
                )
    for b in args.memory_batches:
        c = {**base, "subset": "last10-mlp", "projection": args.projections[0], "density": args.densities[0]}
        c.update(batch=b, n=max(b, args.n))
        if c not in configs:
            configs.append(c)
    print(
        f"load average {os.getloadavg()[0]:.2f}; r = 2 rows; proj_dim = {args.proj_dim}; "
        f"max_length = {args.max_length}; one fresh process per row\n"
    )
    print(
        "| params | n_params | projection | density | batch | n | tok/ex | ex/s | grad s/ex | proj s/ex | minimal s/ex "
        "| grad / minimal "
        "| total / minimal | peak RSS MiB (pef / minimal / ready) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for c in configs:
        r = run_config(c)
        n = c["n"]
        proj = r["parts"].get("projection", 0.0)
        grad = r["pef_s"] - proj
        rows.append((c, r))
        print(
            f"| {c['subset']} | {r['n_params'] / 1e6:.1f}M | {_proj_name(c)} | {c['density']} | {c['batch']} | {n} | "
            f"{r['tokens'] / n:.0f} | {n / r['pef_s']:.3f} | {grad / n:.2f} | {proj / n:.2f} | {r['min_s'] / n:.2f} | "
            f"{grad / r['min_s']:.2f} | {r['pef_s'] / r['min_s']:.2f} | "
            f"{r['pef_peak']:.0f} / {r['min_peak']:.0f} / {r['ready']:.0f} |",
            flush=True,
        )
    print("\nWhere the gradient part goes (s per example; rest = stack, accumulator adds, Python):\n")
    print(
        "| params | projection | density | batch | forward | dL/dy backward | fallback autograd | per-example rebuild "
        "| rest | minimal |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, r in rows:
        n, pt = c["n"], r["parts"]
        rest = r["pef_s"] - sum(pt.values())
        print(
            f"| {c['subset']} | {_proj_name(c)} | {c['density']} | {c['batch']} | {pt.get('forward', 0) / n:.2f} | "
            f"{pt.get('backward_dy', 0) / n:.2f} | {pt.get('fallback', 0) / n:.2f} | "
            f"{pt.get('per_example', 0) / n:.2f} | {rest / n:.2f} | "
            f"{r['min_s'] / n:.2f} |"
        )
    for s in dict.fromkeys(c["subset"] for c, _ in rows):
        fb = next(r["fallback"] for c, r in rows if c["subset"] == s)
        if fb:
            print(f"\n{s}: {len(fb)} parameter(s) on the per-example autograd fallback: {', '.join(fb)}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
