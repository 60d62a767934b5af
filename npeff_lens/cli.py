"""The ``npeff`` command line. Each subcommand is a thin layer over the Python API."""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_models(args):
    from .models import BUILTIN_MODELS, BACKENDS

    print("Built-in models (npeff_lens.load_model(name, backend=...)):")
    for name, (desc, _) in BUILTIN_MODELS.items():
        print(f"  {name:<22} {desc}")
    print(f"Backends: {', '.join(BACKENDS)}. Any local checkpoint directory or HF repo id works too.")


def _cmd_datasets(args):
    from .data import DESCRIPTIONS

    print("Built-in datasets (npeff_lens.load_dataset(name, split=None|'train'|'test', seed=0)):")
    for name, desc in DESCRIPTIONS.items():
        print(f"  {name:<16} {desc}")


def _cmd_demo_smoke(args):
    from . import load_dataset, load_model
    from .zero_shot import label_token_scores, median_threshold_accuracy

    t0 = time.time()
    adapter = load_model(args.model)
    template, labels = "Review: {text}\nSentiment:", [" negative", " positive"]
    n_calib = args.n // 3
    calib = load_dataset("movie-reviews", split="train", seed=0).select(range(n_calib))
    test = load_dataset("movie-reviews", split="test", seed=0).select(range(args.n - n_calib))
    acc, thr = median_threshold_accuracy(
        label_token_scores(adapter, calib["text"], template, labels),
        label_token_scores(adapter, test["text"], template, labels),
        test["label"],
    )
    print(f"{args.model}: zero-shot accuracy on {len(test)} held-out movie reviews = {acc:.3f} "
          f"(threshold {thr:+.3f} = median logit gap on {n_calib} calibration reviews; {time.time() - t0:.0f}s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npeff",
        description="NPEFF: Non-Negative Per-Example Fisher Factorization for interpretability.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("models", help="list built-in models and backends")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("datasets", help="list built-in datasets")
    p.set_defaults(func=_cmd_datasets)
    p = sub.add_parser("demo", help="run the demo")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=300, help="number of reviews (a third calibrates the threshold)")
    p.set_defaults(func=_cmd_demo_smoke)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .assets import MissingAssetError
    from .models import ModelNotFoundError

    try:
        args.func(args)
    except (MissingAssetError, ModelNotFoundError, ValueError, FileNotFoundError) as e:
        print(f"npeff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"npeff {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
