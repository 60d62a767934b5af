"""Benchmark: the tuning classifier vs zero-shot vs best-of-N ICL (§6.2) on a real decomposition run.

Reads the model, the task, the training examples (text, label) and their coefficients from a decomposition
directory (``npeff_lens.runs.load_run``). The classifier (:class:`~npeff_lens.applications.icl.TuningClassifier`)
is fitted on the run's examples; it is evaluated on

- held-in: the run's own examples and coefficients (the paper's protocol: only the top-k examples' labels
  are used to fit it), next to the zero-shot predictions recorded in the store;
- held-out: ``--n-eval`` reviews of ``--dataset``'s ``--eval-split``, whose PEFs are collected with the store's
  projection, parameters and task (``collect_pefs`` into ``OUT/eval-pefs``) and whose coefficients are fitted
  with the components fixed (``NPEFF.transform``); there zero-shot and the best of ``--n-prompts`` random
  ``--shots``-shot prefixes (chosen on ``--n-select`` training examples) are evaluated too.

    python benchmarks/icl.py --run /tmp/demo-new/npeff --n-eval 200 --shots 2 --n-prompts 10 --n-select 64

Prints a table and writes ``OUT/icl.json``.
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
    p.add_argument("--dataset", default=None, help="dataset of the held-out examples (default: the run's own)")
    p.add_argument("--eval-split", default="test", help="its split (seeded by --data-seed)")
    p.add_argument("--data-seed", type=int, default=None, help="default: the run's")
    p.add_argument("--n-eval", type=int, default=200, help="held-out examples (none in the run store)")
    p.add_argument("--threshold", type=float, default=0.75, help="tuning threshold of the classifier (§6.2: 0.75)")
    p.add_argument("--k", type=int, default=16, help="top examples per component (§6.2: 16)")
    p.add_argument("--shots", type=int, default=2, help="demonstrations per ICL prompt (§6.2: 6)")
    p.add_argument("--n-prompts", type=int, default=10, help="random ICL prefixes to choose from (§6.2: 50)")
    p.add_argument("--n-select", type=int, default=64, help="training examples to choose the prefix on (§6.2: 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/../icl-benchmark)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from npeff_lens.applications.icl import TuningClassifier, agreement, format_table, icl_experiment
    from npeff_lens.runs import held_out_coefficients, held_out_examples, load_with_model

    t0 = time.time()
    out = Path(args.out) if args.out else Path(args.run).resolve().parent / "icl-benchmark"
    out.mkdir(parents=True, exist_ok=True)
    est, store, adapter, task = load_with_model(args.run)
    meta = store.metadata
    if "label" not in meta.column_names:
        raise SystemExit("the run's store has no 'label' column: the tuning classifier needs ground-truth labels")
    train_texts, train_labels = meta["text"], meta["label"]
    outcomes = [o.strip() for o in (task.outcome_names() or [])]
    if "label_name" in meta.column_names and outcomes:
        names = {lab: name for lab, name in zip(train_labels, meta["label_name"])}
        if any(outcomes[lab] != str(name).strip() for lab, name in names.items()):
            raise SystemExit(f"labels {names} do not index the task's outcomes {outcomes}")
    coef = est.coefficients_

    clf = TuningClassifier(threshold=args.threshold, k=args.k).fit(coef, train_labels)
    held_in = {
        "n": len(train_texts),
        "classifier_accuracy": clf.score(coef, train_labels),
        "n_unscored": clf.n_unscored_,
        "zero_shot_accuracy": agreement(meta["prediction"], train_labels),
        "classifier_zero_shot_agreement": agreement(clf.predict(coef), meta["prediction"]),
    }
    t1 = time.time()
    data, source = held_out_examples(store, args.n_eval, dataset=args.dataset, split=args.eval_split,
                                     seed=args.data_seed)  # fmt: skip
    print(f"held-out: {source}")
    eval_coef = held_out_coefficients(
        est, store, adapter, task, data["text"], out / "eval-pefs", progress=not args.no_progress
    )
    t2 = time.time()
    result = icl_experiment(
        adapter, task, train_texts, train_labels, coef, data["text"], data["label"], eval_coef,
        threshold=args.threshold, k=args.k, shots=args.shots, n_prompts=args.n_prompts, n_select=args.n_select,
        seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip
    t3 = time.time()
    result["held_in"] = held_in
    result["held_out_source"] = source
    result["run"] = str(Path(args.run).resolve())
    result["args"] = vars(args)
    result["seconds"] = {"classifier_held_in": t1 - t0, "held_out_pefs": t2 - t1, "held_out": t3 - t2}
    (out / "icl.json").write_text(json.dumps(result, indent=1))
    print(
        f"held-in ({held_in['n']} run examples): tuning classifier {held_in['classifier_accuracy']:.3f}, "
        f"zero-shot {held_in['zero_shot_accuracy']:.3f}, agreement {held_in['classifier_zero_shot_agreement']:.3f}; "
        f"{held_in['n_unscored']} unscored"
    )
    print(f"held-out ({result['n_eval']} {args.dataset} {args.eval_split} examples):")
    print(format_table(result))
    print(f"ICL prefix:\n{result['icl']['prefix']}")
    secs = result["seconds"]
    print(
        f"seconds: load + held-in {secs['classifier_held_in']:.0f}, held-out PEFs + transform "
        f"{secs['held_out_pefs']:.0f}, zero-shot + ICL {secs['held_out']:.0f}; wrote {out / 'icl.json'}"
    )
    return result


if __name__ == "__main__":
    main()
