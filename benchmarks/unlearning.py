"""Benchmark: unlearning with NPEFF-guided mitigation (§6.1, App. I) on a real decomposition run.

Reads the model, the task, the examples (their prompts) and the coefficients from a decomposition directory
(``npeff_lens.runs.load_run``) and runs :func:`~npeff_lens.applications.unlearning.unlearning_experiment`: per
component a mitigation and a control unlearning run of its top example (App. I.2: Adam lr 1e-4, ε_f 0.1,
ε_r 10, 1 forget + 32 random + 12 appended retain examples, 75 batches), then the KL of the unlearned from the
original predictions on the forget example, on the component's 12 other top examples and on random examples.

``--params store`` (the default) trains the parameters the PEFs were collected over (the store's ``params``),
``--params default`` the adapter's selection (all but embeddings and norms, the paper's), or give glob patterns.
With a two-label task the KL is bounded by ``-log min_y p_og(y|x)``, so the paper's 10-nat threshold (for the
whole next-token distribution) is out of reach: choose ``--kl-threshold`` accordingly.

    python benchmarks/unlearning.py --run /tmp/demo-new/npeff --components 0 1 --n-batches 20 --n-random 64

Prints a table and writes ``OUT/unlearning.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="decomposition directory (npeff decompose / npeff demo's OUT/npeff)")
    p.add_argument("--components", type=int, nargs="+", default=[0, 1], help="components to unlearn the top of")
    p.add_argument("--k-eval", type=int, default=12, help="top examples kept for evaluation (App. I.2: 12)")
    p.add_argument("--k-mitigation", type=int, default=12, help="top examples appended to retain batches (12)")
    p.add_argument("--n-random", type=int, default=64, help="random evaluation examples (paper: 10,000)")
    p.add_argument("--n-batches", type=int, default=20, help="unlearning batches (App. I.2: 75)")
    p.add_argument("--retain-batch-size", type=int, default=32, help="random retain examples per batch (32)")
    p.add_argument("--forget-batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (App. I.2: 1e-4)")
    p.add_argument("--epsilon-forget", type=float, default=0.1, help="ε_f (App. I.2: 0.1)")
    p.add_argument("--epsilon-retain", type=float, default=10.0, help="ε_r (App. I.2: 10)")
    p.add_argument("--kl-threshold", type=float, default=10.0, help="forget KL (nats) for a run to count as done")
    p.add_argument("--params", nargs="+", default=["store"], help="'store', 'default', or glob patterns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward when evaluating")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/../unlearning-benchmark)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from npeff_lens.applications.unlearning import format_table, unlearning_experiment
    from npeff_lens.runs import load_with_model

    t0 = time.time()
    out = Path(args.out) if args.out else Path(args.run).resolve().parent / "unlearning-benchmark"
    out.mkdir(parents=True, exist_ok=True)
    est, store, adapter, task = load_with_model(args.run)
    model = store.manifest["model"]
    if args.params == ["store"]:
        params = (store.manifest.get("config") or {}).get("params")
    else:
        params = None if args.params == ["default"] else args.params
    n_params = sum(p.numel() for _, p in adapter.named_parameters(include=params))
    print(
        f"[unlearning] {model['name']}, {len(store)} examples, training {n_params:,} parameters ({params or 'default'})"
    )
    report = unlearning_experiment(
        adapter, task, task.prompts(store.metadata["text"]), est.coefficients_, args.components,
        k_eval=args.k_eval, k_mitigation=args.k_mitigation, n_random=args.n_random, kl_threshold=args.kl_threshold,
        seed=args.seed, progress=not args.no_progress, batch_size=args.batch_size, n_batches=args.n_batches,
        retain_batch_size=args.retain_batch_size, forget_batch_size=args.forget_batch_size, lr=args.lr,
        epsilon_forget=args.epsilon_forget, epsilon_retain=args.epsilon_retain, params=params,
    )  # fmt: skip
    report["run"] = str(Path(args.run).resolve())
    report["args"] = vars(args)
    report["n_trained_parameters"] = n_params
    report["seconds"] = time.time() - t0
    (out / "unlearning.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"{report['seconds']:.0f}s; wrote {out / 'unlearning.json'}")
    return report


if __name__ == "__main__":
    main()
