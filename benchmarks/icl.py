"""Benchmark: the tuning classifier vs zero-shot vs best-of-N ICL (§6.2) on a real decomposition run.

Runs ``npeff icl``'s run layer (``npeff_lens.runs.icl``), with the same flags (``npeff icl --help``), on a
decomposition directory: the classifier (:class:`~npeff_lens.applications.icl.TuningClassifier`) is fitted on
the run's examples and evaluated

- held-in: on the run's own examples and coefficients (the paper's protocol: only the top-k examples' labels
  are used to fit it), next to the zero-shot predictions recorded in the store;
- held-out: on ``--n-eval`` examples of ``--dataset``'s ``--eval-split`` that are not in the store, whose PEFs
  are collected with the store's projection, parameters and task and whose coefficients are fitted with the
  components fixed (``NPEFF.transform``); there zero-shot and the best of ``--n-prompts`` random
  ``--shots``-shot prefixes (chosen on ``--n-select`` training examples) are evaluated too.

    python benchmarks/icl.py runs/demo/npeff --n-eval 200 --shots 2 --n-prompts 10 --n-select 64

Only here: ``--threads``, and the default output directory, ``DECOMPOSITION_DIR/../icl-benchmark`` (not
``npeff icl``'s, so that the two never resume each other's results). Prints a table and writes ``OUT/icl.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from npeff_lens.cli import add_arguments, from_args
from npeff_lens.commands import IclCommand


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], conflict_handler="resolve")  # our --out wins
    add_arguments(p, IclCommand)
    p.add_argument("--out", default=None, help="output directory (default: DECOMPOSITION_DIR/../icl-benchmark)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    cmd = from_args(IclCommand, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from npeff_lens.applications.icl import format_table
    from npeff_lens.runs import icl

    out = Path(cmd.out) if cmd.out else Path(cmd.decomposition).resolve().parent / "icl-benchmark"
    t0 = time.time()
    result = icl(cmd.decomposition, cmd, out=out)
    held_in = result["held_in"]
    print(
        f"held-in ({held_in['n']} run examples): tuning classifier {held_in['classifier_accuracy']:.3f}, "
        f"zero-shot {held_in['zero_shot_accuracy']:.3f}, agreement {held_in['classifier_zero_shot_agreement']:.3f}; "
        f"{held_in['n_unscored']} unscored"
    )
    print(f"held-out ({result['n_eval']} examples):")
    print(format_table(result))
    print(f"ICL prefix:\n{result['icl']['prefix']}")
    print(
        f"seconds: {time.time() - t0:.0f} in all, {result['seconds']:.0f} after loading the run and the held-out "
        f"examples (held-out PEFs + transform, zero-shot, ICL); wrote {out / 'icl.json'}"
    )
    return result


if __name__ == "__main__":
    main()
