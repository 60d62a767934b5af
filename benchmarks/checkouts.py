"""Benchmark: two checkouts of npeff_lens on the same workloads, in alternation, through the public API only.

For a change that should not move performance (a restructuring), this says whether it did: each workload runs in a
fresh process with ``PYTHONPATH`` set to checkout A or B, A B A B ..., and times only its own work (not the
interpreter's start or the imports). Workloads:

  projection     ``SparseProjection(4M, 8192, density 32)``: ``project`` of 8 rows, then ``adjoint``
  collection     ``collect_pefs`` on SmolLM2-135M, 16 movie reviews, layer 29 (sparse projection, d = 8192)
  decomposition  ``NPEFF(16 components, 200 steps).fit`` on seeded PEFs [512 examples, 2 rows, 8192]

    python benchmarks/checkouts.py --a /path/to/old/checkout --b . --rounds 5

The table gives each workload's median and range (seconds) per checkout and the median of the per-round ratios
B / A; a ratio within the rounds' spread is no change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOADS = {
    "projection": """
import time, torch
from npeff_lens import SparseProjection
P = SparseProjection(4_000_000, 8192, seed=0, density=32)
x = torch.randn(8, 4_000_000, generator=torch.Generator().manual_seed(0))
P.adjoint(P.project(x))  # warm-up (numba compiles each kernel on its first call)
t = time.perf_counter()
y = P.project(x)
P.adjoint(y)
seconds = time.perf_counter() - t
""",
    "collection": """
import tempfile, time
from npeff_lens import collect_pefs, load_dataset, load_model
from npeff_lens.tasks import LabelTokens
adapter = load_model("smollm2-135m")
data = load_dataset("movie-reviews", split="train")
task = LabelTokens("Review: {text}\\nSentiment:", [" negative", " positive"])
options = dict(n=16, params=["model.layers.29.*"], proj_dim=8192, batch_size=8, max_length=256, progress=False)
collect_pefs(adapter, data, task, tempfile.mkdtemp(), **{**options, "n": 2})  # warm-up
t = time.perf_counter()
collect_pefs(adapter, data, task, tempfile.mkdtemp(), **options)
seconds = time.perf_counter() - t
""",
    "decomposition": """
import time, torch
from npeff_lens import NPEFF
pefs = torch.randn(512, 2, 8192, generator=torch.Generator().manual_seed(0))
NPEFF(16, n_steps=5, n_warmup_steps=2, progress=False).fit(pefs)  # warm-up
t = time.perf_counter()
NPEFF(16, n_steps=200, n_warmup_steps=20, progress=False).fit(pefs)
seconds = time.perf_counter() - t
""",
}


def run_once(checkout: Path, code: str) -> float:
    """Seconds the workload's own timed part took, in a fresh process that imports ``checkout``'s npeff_lens."""
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    probe = "import npeff_lens, sys; sys.stderr.write(npeff_lens.__file__)\n"
    script = probe + code + "\nprint('SECONDS', seconds)\n"
    with tempfile.TemporaryDirectory() as cwd:  # no checkout on the path by accident
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: the workload failed:\n{done.stderr[-3000:]}")
    loaded = Path(done.stderr.splitlines()[0] if done.stderr else "")
    if checkout.resolve() not in loaded.resolve().parents:
        raise SystemExit(f"{checkout}: imported npeff_lens from {loaded} instead; is it installed over PYTHONPATH?")
    return float(next(line for line in done.stdout.splitlines() if line.startswith("SECONDS")).split()[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="checkout B (the change)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each workload per checkout")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--json", type=Path, help="also write the raw seconds here")
    args = parser.parse_args(argv)
    raw: dict[str, dict[str, list[float]]] = {}
    for name in args.workloads:
        raw[name] = {"a": [], "b": []}
        for r in range(args.rounds):
            for side in ("a", "b"):
                raw[name][side].append(run_once(getattr(args, side), WORKLOADS[name]))
            print(f"{name} round {r + 1}: A {raw[name]['a'][-1]:.3f} s, B {raw[name]['b'][-1]:.3f} s", flush=True)
    print("\n| workload | A median s (min-max) | B median s (min-max) | B / A (median of rounds; range) |")
    print("|---|---:|---:|---:|")
    for name, sides in raw.items():
        ratios = [b / a for a, b in zip(sides["a"], sides["b"])]

        def cell(xs):
            return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"

        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"| {name} | {cell(sides['a'])} | {cell(sides['b'])} | {statistics.median(ratios):.3f} ({spread}) |")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
