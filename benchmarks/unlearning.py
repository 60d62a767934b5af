"""Benchmark: unlearning with NPEFF-guided mitigation (§6.1, App. I) on a real decomposition run.

Runs ``npeff unlearn``'s run layer (``npeff_lens.runs.unlearn``), with the same flags (``npeff unlearn --help``),
on a decomposition directory: :func:`~npeff_lens.applications.unlearning.unlearning_experiment` on its model,
task, examples and coefficients, per component a mitigation and a control unlearning run of its top example
(App. I.2: Adam lr 1e-4, ε_f 0.1, ε_r 10, 1 forget + 32 random + 12 appended retain examples, 75 batches), then
the KL of the unlearned from the original predictions on the forget example, on the component's 12 other top
examples and on random examples.

``--params store`` (the default) trains the parameters the PEFs were collected over (the store's ``params``),
``--params default`` the adapter's selection (all but embeddings and norms, the paper's), or give glob patterns.
With a two-label task the KL is bounded by ``-log min_y p_og(y|x)``, so the paper's 10-nat threshold (for the
whole next-token distribution) is out of reach: choose ``--kl-threshold`` accordingly.

    python benchmarks/unlearning.py runs/demo/npeff --components 0,1 --n-batches 20 --n-random 64

Only here: ``--threads``, and the default output directory, ``DECOMPOSITION_DIR/../unlearning-benchmark`` (not
``npeff unlearn``'s, so that the two never resume each other's results). Prints a table and writes
``OUT/unlearning.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from npeff_lens.cli import add_arguments, from_args
from npeff_lens.commands import UnlearnCommand


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], conflict_handler="resolve")  # our --out wins
    add_arguments(p, UnlearnCommand)
    p.add_argument("--out", default=None, help="output directory (default: DECOMPOSITION_DIR/../unlearning-benchmark)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    cmd = from_args(UnlearnCommand, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from npeff_lens.applications.unlearning import format_table
    from npeff_lens.runs import load_run, unlearn

    out = Path(cmd.out) if cmd.out else Path(cmd.decomposition).resolve().parent / "unlearning-benchmark"
    _, store = load_run(cmd.decomposition)
    print(f"[unlearning] {store.manifest['model']['name']}, {len(store)} examples, parameters {list(cmd.params)}")
    t0 = time.time()
    report = unlearn(cmd.decomposition, cmd, out=out)
    print(format_table(report))
    print(
        f"trained {report['n_trained_parameters']:,} parameters; {time.time() - t0:.0f}s "
        f"({report['seconds']:.0f}s unlearning and evaluating); wrote {out / 'unlearning.json'}"
    )
    return report


if __name__ == "__main__":
    main()
