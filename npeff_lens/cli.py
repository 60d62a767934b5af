"""The ``npeff`` command line. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_models(args):
    from .models import BACKENDS, BUILTIN_MODELS

    print("Built-in models (npeff_lens.load_model(name, backend=...)):")
    for name, (desc, _) in BUILTIN_MODELS.items():
        print(f"  {name:<22} {desc}")
    print(f"Backends: {', '.join(BACKENDS)}. Any local checkpoint directory or HF repo id works too.")


def _cmd_datasets(args):
    from .data import DESCRIPTIONS

    print("Built-in datasets (npeff_lens.load_dataset(name, split=None|'train'|'test', seed=0)):")
    for name, desc in DESCRIPTIONS.items():
        print(f"  {name:<16} {desc}")


def _cmd_zero_shot(args):
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
    print(
        f"{args.model}: zero-shot accuracy on {len(test)} held-out movie reviews = {acc:.3f} "
        f"(threshold {thr:+.3f} = median logit gap on {n_calib} calibration reviews; {time.time() - t0:.0f}s)"
    )


def _make_task(args):
    from .tasks import ClassifierHead, LabelTokens, NextToken

    template = args.template.replace("\\n", "\n")
    if args.task == "label-tokens":
        if not args.labels:
            raise ValueError("--task label-tokens needs --labels (e.g. --labels ' negative' ' positive')")
        return LabelTokens(template, args.labels)
    if args.task == "classifier-head":
        return ClassifierHead(template)
    return NextToken(template, expectation_projections=args.expectation_projections, seed=args.seed)


def _cmd_collect(args):
    from . import load_model
    from .collect import collect_pefs

    task = _make_task(args)
    adapter = load_model(args.model, backend=args.backend, device=args.device)
    store = collect_pefs(
        adapter,
        args.dataset,
        task,
        args.out,
        proj_dim=args.proj_dim or None,
        density=args.density,
        rank=args.rank,
        params=args.params,
        exclude=args.exclude,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        n=args.n,
        split=args.split,
        data_seed=args.data_seed,
        max_length=args.max_length,
        progress=not args.no_progress,
    )
    print(f"{store!r}")


def _cmd_decompose(args):
    from .pipeline import decompose_store

    est = decompose_store(
        args.store,
        args.out,
        args.components,
        n_steps=args.steps,
        n_warmup_steps=args.warmup_steps,
        lr=args.lr,
        warmup_lr=args.warmup_lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    loss = est.loss_history_[-1] if len(est.loss_history_) else float("nan")
    print(
        f"NPEFF with {args.components} components saved to {args.out} (final loss {loss:.4f}, "
        f"{len(est.dead_components_)} dead components)"
    )


def _cmd_top(args):
    from .pipeline import top_report

    report = top_report(args.decomposition, k=args.k, show=args.show)
    print("\n".join(report["lines"]))
    print(report["summary_line"])


def _cmd_demo(args):
    from .pipeline import demo

    demo(
        out=args.out,
        model=args.model,
        n=args.n,
        params=args.params,
        proj_dim=args.proj_dim,
        density=args.density,
        components=args.components,
        steps=args.steps,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


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
    from .pipeline import DEMO_DEFAULTS as D

    p = sub.add_parser("collect", help="collect projected per-example Fishers (PEFs) into a store (resumes on rerun)")
    p.add_argument("--model", required=True, help="built-in name, local checkpoint directory or HF repo id")
    p.add_argument("--backend", default="hf", choices=["hf", "bridge", "hooked", "nnsight"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", required=True, help="built-in dataset name (npeff datasets)")
    p.add_argument("--split", default=None, choices=[None, "train", "test"])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--task", default="label-tokens", choices=["label-tokens", "classifier-head", "next-token"])
    p.add_argument("--template", default="{text}", help="prompt template with {text}; \\n is a newline")
    p.add_argument("--labels", nargs="+", help="label strings for label-tokens (leading spaces matter)")
    p.add_argument("--expectation-projections", type=int, default=16, help="r' for next-token (App. B)")
    p.add_argument("--proj-dim", type=int, default=8192, help="projected dimension d (0: unprojected)")
    p.add_argument("--density", type=int, default=32, help="projection density: outputs per input entry")
    p.add_argument("--rank", type=int, default=None, help="SVD rank reduction (App. C)")
    p.add_argument("--params", nargs="+", default=None, help="glob patterns of parameters to include")
    p.add_argument("--exclude", nargs="+", default=None, help="glob patterns of parameters to leave out")
    p.add_argument("--seed", type=int, default=0, help="projection seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--n", type=int, default=None, help="number of examples (default: all)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("decompose", help="fit NPEFF on a PEF store (resumes from checkpoints)")
    p.add_argument("--store", required=True)
    p.add_argument("--components", type=int, required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_decompose)

    p = sub.add_parser("top", help="top examples per component and the tuning summary")
    p.add_argument("decomposition")
    p.add_argument("--k", type=int, default=16, help="top examples that define a tuning")
    p.add_argument("--show", type=int, default=5, help="examples printed per component")
    p.set_defaults(func=_cmd_top)

    from .perturb import register_cli

    register_cli(sub)

    p = sub.add_parser("demo", help="the end-to-end demo: SmolLM2-135M on movie reviews")
    p.add_argument("--model", default=D["model"])
    p.add_argument("--n", type=int, default=D["n"], help="number of reviews")
    p.add_argument("--params", nargs="+", default=D["params"])
    p.add_argument("--proj-dim", type=int, default=D["proj_dim"])
    p.add_argument("--density", type=int, default=D["density"])
    p.add_argument("--components", type=int, default=D["components"])
    p.add_argument("--steps", type=int, default=D["steps"])
    p.add_argument("--batch-size", type=int, default=D["batch_size"])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("zero-shot", help="zero-shot label-token accuracy of a model on movie reviews")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=300, help="number of reviews (a third calibrates the threshold)")
    p.set_defaults(func=_cmd_zero_shot)
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
