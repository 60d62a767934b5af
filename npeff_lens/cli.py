"""The ``npeff`` command line: every subcommand's parser in one place, generated from its command
(``npeff_lens.commands``: a step's config plus its inputs), and a thin call that hands the step its command as its
config (the run layer: ``npeff_lens.runs``, ``.comparison``, ``.report``, ``.explain``) and prints the result."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import typing
import warnings
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal

from . import commands as C
from . import config
from .errors import SettingError, as_flag
from .io import library_progress_bars

# ----------------------------------------------------------------------------------------------
# The parser of a command, generated from its dataclass (npeff_lens.commands), and back.
# ----------------------------------------------------------------------------------------------


def _none_or(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _cli_order(cls) -> list:
    """The command's own fields (its inputs) first, then the inherited step knobs."""
    own = set(cls.__dict__.get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per CLI field of ``cls``, with its help line and default."""
    hints = typing.get_type_hints(cls)
    for f in _cli_order(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        tp, optional = config.unwrap_optional(hints[f.name])
        required = f.default is MISSING
        kw: dict[str, Any] = {"help": meta.get("help", "")}
        if not required:
            kw["default"] = f.default
            if "(default" not in kw["help"] and f.default is not None:
                shown = config.plain(f.default)
                shown = " ".join(map(repr, shown)) if isinstance(shown, list) else repr(shown)
                kw["help"] += f" (default: {shown.replace('%', '%%')})"
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kw["nargs"] = "+"
            if meta.get("repeat"):
                kw["action"] = "extend"
            kw["type"] = _unescape if meta.get("escapes") else typing.get_args(tp)[0]
        elif origin is Literal:
            kw["choices"] = list(typing.get_args(tp)) + ([None] if optional else [])
            kw["type"] = _none_or(str) if optional else str
            kw.setdefault(
                "metavar", "{" + ",".join([*map(str, typing.get_args(tp)), *(["none"] if optional else [])]) + "}"
            )
        else:
            conv = _unescape if meta.get("escapes") else tp
            kw["type"] = _none_or(conv) if optional else conv
        if meta.get("positional"):
            if not required:
                kw["nargs"] = "?"
            parser.add_argument(f.name, **kw)
        else:
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, required=required and tp is not bool, **kw)


def flag_speller(cls):
    """``spell(field)``: how the command line writes a setting of ``cls`` (its flag, or its positional's name), for
    :meth:`npeff_lens.errors.SettingError.render`; a field ``cls`` lacks is spelled ``--field-name``."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}

    def spell(name: str) -> str:
        f = fields.get(name)
        if f is None:
            return as_flag(name)
        if f.metadata.get("positional"):
            return name.upper()
        return f.metadata.get("flag") or as_flag(name)

    return spell


def from_args(cls, args: argparse.Namespace):
    """The config of parsed arguments (fields without a flag keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**values)


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
    print("Local files work too: --dataset data.csv | data.jsonl | data.parquet | a save_to_disk directory.")


def _collect(cmd: C.CollectCommand):
    from .distributed import rank
    from .runs import collect

    store = collect(cmd)
    if rank() == 0:  # under torchrun: once
        print(repr(store))


def _decompose(cmd: C.DecomposeCommand):
    from .runs import decompose_store

    est = decompose_store(cmd.store, cmd.out, cmd)
    loss = est.loss_history_[-1] if len(est.loss_history_) else float("nan")
    print(
        f"NPEFF with {cmd.n_components} components saved to {cmd.out} (final loss {loss:.4f}, "
        f"{len(est.dead_components_)} dead components)"
    )


def _top(cmd: C.TopCommand):
    from .runs import top

    report = top(cmd)
    print("\n".join(report["lines"]))
    print(report["summary_line"])


def _perturb(cmd: C.PerturbCommand):
    from .perturb import format_table
    from .runs import run_perturbation

    summary = run_perturbation(cmd.decomposition, config=cmd, out=cmd.out, store=cmd.store)
    print(format_table(summary))
    if cmd.out:
        print(f"wrote {Path(cmd.out) / 'perturbation.csv'} and perturbation.json")


def _compare(cmd: C.CompareCommand):
    from .runs import compare, format_compare

    results = compare(cmd.decomposition, cmd, store=cmd.store)
    print(format_compare(results))
    print(f"wrote {cmd.decomposition}/compare/compare.json")


def _report(cmd: C.ReportCommand):
    from .report import build

    index = build(cmd.decomposition, cmd.out, cmd, store=cmd.store)
    print(f"report: {index} (open it in a browser; it needs no network)")


def _repair(cmd: C.RepairCommand):
    from .store import PEFStore

    report = PEFStore.repair(cmd.store)
    missing = ", ".join(f"[{a}, {b})" for a, b in report["missing"])
    print(
        f"{cmd.store}: {report['kept']} examples intact; removed {len(report['removed'])} damaged shard(s)"
        + (
            f"; missing examples {missing}: rerun `npeff collect` with the same arguments to recollect them"
            if missing
            else ""
        )
    )


def _unlearn(cmd: C.UnlearnCommand):
    from .applications.unlearning import format_table
    from .runs import unlearn

    report = unlearn(cmd.decomposition, cmd, out=cmd.out, store=cmd.store)
    print(format_table(report))


def _icl(cmd: C.IclCommand):
    from .applications.icl import format_table
    from .runs import icl

    result = icl(cmd.decomposition, cmd, out=cmd.out, store=cmd.store)
    if result["icl"].get("shortened"):  # k-shot prompts fit the model's context: a query too long was shortened
        print(f"[icl] {result['icl']['shortened']}", file=sys.stderr)
    h = result["held_in"]
    print(
        f"held-in ({h['n']} run examples): tuning classifier {h['classifier_accuracy']:.3f}, zero-shot "
        f"{h['zero_shot_accuracy']:.3f}, agreement {h['classifier_zero_shot_agreement']:.3f}"
    )
    print(format_table(result))


def _explain(cmd: C.ExplainCommand):
    from .explain import explain, format_explanation, write_page
    from .io import write_json

    texts = list(cmd.text or ())
    if cmd.dataset is not None:
        from .data import load_dataset

        rows = load_dataset(cmd.dataset, split=None, columns={"text": cmd.text_column})
        texts += list(rows.select(range(min(cmd.n, len(rows))))["text"])
    found = explain(cmd.decomposition, texts, cmd, store=cmd.store)
    print("\n\n".join(format_explanation(e) for e in found))
    out = Path(cmd.out) if cmd.out else Path(cmd.decomposition) / "explain"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "explanations.json", [e.to_dict() for e in found])
    page = write_page(found, out / "index.html", report_dir=cmd.report)
    print(f"page: {page} (open it in a browser; it needs no network)")


def _demo(cmd: C.DemoCommand):
    from .runs import demo

    demo(cmd)


def _zero_shot(cmd: C.ZeroShotCommand):
    from .runs import zero_shot

    r = zero_shot(cmd)
    print(
        f"{cmd.model}: zero-shot accuracy on {r['n_test']} held-out movie reviews = {r['accuracy']:.3f} "
        f"(threshold {r['threshold']:+.3f} = median logit gap on {r['n_calibration']} calibration reviews; "
        f"{r['seconds']:.0f}s)"
    )
    if r.get("shortened"):
        print(f"[npeff_lens] {r['shortened']}", file=sys.stderr)


def _trace(cmd: C.TraceCommand):
    from .trace_run import TRACE_FILE, format_trace, trace_run

    result = trace_run(cmd)
    print(format_trace(result))
    print(f"wrote {Path(cmd.out) / TRACE_FILE} ({result['seconds']:.0f}s)")


#: name -> (config class or None, function, one-line help)
COMMANDS = {
    "models": (None, _cmd_models, "list built-in models and backends"),
    "datasets": (None, _cmd_datasets, "list built-in datasets"),
    "collect": (C.CollectCommand, _collect, "collect projected per-example Fishers (PEFs) into a store (resumes)"),
    "decompose": (C.DecomposeCommand, _decompose, "fit NPEFF on a PEF store (resumes from checkpoints)"),
    "top": (C.TopCommand, _top, "top examples per component and the tuning summary (§3.1)"),
    "report": (C.ReportCommand, _report, "a static component dashboard with exact token attributions"),
    "perturb": (C.PerturbCommand, _perturb, "perturb the model along recovered components; KL ratios (§3.3)"),
    "compare": (
        C.CompareCommand,
        _compare,
        "gradient clusters, TopK-SAE latents and SNMF features beside NPEFF, same metrics (§5)",
    ),
    "unlearn": (C.UnlearnCommand, _unlearn, "unlearn components' top examples, with and without mitigation (§6.1)"),
    "icl": (C.IclCommand, _icl, "the tuning classifier vs zero-shot vs in-context prompts (§6.2)"),
    "explain": (
        C.ExplainCommand,
        _explain,
        "which components were at work on an input: prediction, share of its PEF explained, top components",
    ),
    "repair": (C.RepairCommand, _repair, "remove only the damaged shards of a PEF store (collect then refills them)"),
    "demo": (C.DemoCommand, _demo, "the end-to-end demo: SmolLM2-135M on movie reviews"),
    "zero-shot": (C.ZeroShotCommand, _zero_shot, "zero-shot label-token accuracy on held-out movie reviews"),
    "trace": (C.TraceCommand, _trace, "causal tracing: which layers' MLP / attention outputs carry a fact (ROME)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npeff", description="NPEFF: Non-Negative Per-Example Fisher Factorization for interpretability."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also: NPEFF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, func, help_line) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip().replace("``", "") if cls is not None else help_line
        p = sub.add_parser(name, help=help_line, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        if cls is not None:
            add_arguments(p, cls)
        p.set_defaults(func=func, config_class=cls)
    return parser


def _user_errors() -> tuple:
    """Errors a user can cause (bad arguments or data, a locked, damaged or differently configured directory):
    one line at the command line; anything else keeps its traceback."""
    from .assets import MissingAssetError
    from .distributed import RankFailedError
    from .models import ModelNotFoundError
    from .store import StoreLockedError

    return (
        MissingAssetError,
        ModelNotFoundError,
        StoreLockedError,
        RankFailedError,
        ValueError,
        FileNotFoundError,
        ImportError,
    )


def _rank_tag() -> str:
    """`` [rank r/N]`` under torchrun, where several processes share one terminal."""
    from .distributed import rank, world_size

    return f" [rank {rank()}/{world_size()}]" if world_size() > 1 else ""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("NPEFF_DEBUG", "") not in ("", "0")
    formatwarning = warnings.formatwarning
    if not debug:  # a warning is one line: the message, not the library's source line that raised it
        warnings.formatwarning = _one_line_warning
    try:
        target = from_args(args.config_class, args) if args.config_class is not None else args
        if args.command in LONG_COMMANDS:  # informational, not a progress bar: shown with --no-progress too
            print(f"npeff {args.command}{_rank_tag()}: {_threads_line()}", file=sys.stderr, flush=True)
        with library_progress_bars(getattr(target, "progress", True)), library_messages():  # --no-progress: every bar
            args.func(target)
    except _user_errors() as e:
        if debug:
            raise
        if getattr(e, "quiet", False):  # a multi-process run: another rank reports it
            return 2
        text = e.render(flag_speller(args.config_class)) if isinstance(e, SettingError) else str(e)
        message = "; ".join(line.strip() for line in text.splitlines() if line.strip())
        print(f"npeff {args.command}{_rank_tag()}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; a collection also turns SIGTERM into this, after committing
        signum = getattr(e, "signum", None)
        what = str(e) if signum is not None else "interrupted; rerun the same command to resume"
        print(f"npeff {args.command}{_rank_tag()}: {what}", file=sys.stderr)
        return 128 + (signum or signal.SIGINT)  # a shell's status for a command stopped by that signal
    finally:
        warnings.formatwarning = formatwarning
    return 0


LONG_COMMANDS = ("collect", "decompose", "perturb", "compare", "unlearn", "icl", "report", "demo", "trace")


@contextlib.contextmanager
def library_messages():
    """The library's informational log records (logger ``npeff_lens``, level INFO and up) as ``[npeff_lens] ...``
    lines on stderr while a command runs; the library itself prints nothing."""
    logger = logging.getLogger("npeff_lens")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[npeff_lens] %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler configured elsewhere would print each line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _threads_line() -> str:
    import torch

    set_by = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "torch's default: one per core"
    return (
        f"{torch.get_num_threads()} CPU thread(s) ({set_by}); on a machine shared with other jobs, "
        "OMP_NUM_THREADS=1 is often several times faster"
    )


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return f"npeff: warning: {text}\n"


if __name__ == "__main__":
    sys.exit(main())
