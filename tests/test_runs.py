"""The run layer: configs (CLI <-> config <-> JSON), resume that never reuses a stale result, run
directories (layout, moved trees, decompositions saved from Python), on tiny-llama end to end."""

import ast
import dataclasses
import json
import pathlib
import random
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import decompose_argv, load_script, reviews_collect_argv

from npeff_lens import commands as K
from npeff_lens import config as C
from npeff_lens.cli import COMMANDS, build_parser, from_args, main
from npeff_lens.runs import RUN_FILE, decompose_store, load_run, run_perturbation, top_report
from npeff_lens.store import PEFStore

WORDS = "great dull moving boring fun sad happy awful wonderful terrible brilliant good bad film movie".split()


def _reviews(n, seed=0):
    rng = random.Random(seed)
    return [
        (" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))), rng.choice(["sad", "bad"])) for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------------
# Configs: every command's CLI round trip, validation, the comparison behind resume.
# --------------------------------------------------------------------------------------------------

SAMPLES = {  # non-default values for every field of every command
    K.CollectCommand: dict(
        model="tiny-llama",
        backend="bridge",
        device="cpu",
        dataset="data.csv",
        text_column="review",
        label_column="sentiment",
        label_names=("neg", "pos"),
        task="label-tokens",
        template="Review: {text}\nSentiment:",
        labels=(" negative", " positive"),
        label_first_token=True,
        expectation_projections=4,
        task_seed=3,
        out="runs/x",
        proj_dim=None,
        density=4,
        rank=2,
        params=("model.layers.*",),
        exclude=("*.bias",),
        seed=7,
        n=11,
        split="test",
        data_seed=2,
        drop_invalid=True,
        max_length=None,
        dtype="bfloat16",
        top_k_probs=3,
        engine="loop",
        batch_size=3,
        shard_size=5,
        flush_every=9,
        progress=False,
        projection="sparse",
        kron_k=8,
        dist_timeout=60.0,
    ),
    K.DecomposeCommand: dict(
        store="s",
        out="o",
        n_components=7,
        n_steps=3,
        n_warmup_steps=2,
        lr=0.25,
        warmup_lr=1.5,
        seed=4,
        eps=1e-9,
        dtype="float64",
        storage_dtype="bfloat16",
        nonfinite="exclude",
        device="cpu",
        memory_budget=1000,
        batch_size=16,
        checkpoint_every=5,
        progress=False,
    ),
    K.PerturbCommand: dict(
        decomposition="d",
        out="p",
        store="s",
        components="0,3,7-9",
        magnitude=3.5,
        top_k=4,
        n_baseline=9,
        seed=2,
        recovery="adjoint",
        mu=1e-3,
        max_iter=40,
        reject_threshold=None,
        time_budget=2.5,
        backend="hooked",
        batch_size=2,
        device="cpu",
        progress=False,
    ),
    K.TopCommand: dict(decomposition="d", k=4, show=2, store="s", where=True, where_method="recovered", where_k=8),
    K.TraceCommand: dict(
        model="m",
        backend="hooked",
        device="cuda",
        dataset="facts.csv",
        n=3,
        split="test",
        data_seed=2,
        known_only=True,
        kinds=("hidden", "mlp"),
        positions="all",
        window=3,
        noise=2.0,
        samples=4,
        seed=5,
        batch_size=16,
        out="o",
        progress=False,
    ),
    K.RepairCommand: dict(store="s"),
    K.ReportCommand: dict(
        decomposition="d", out="o", store="s", k=4, n_attributed=2, perturbation="p", attributions=False, progress=False
    ),
    K.UnlearnCommand: dict(
        decomposition="d",
        out="o",
        store="s",
        components="0,2",
        k_eval=3,
        k_mitigation=4,
        n_random=5,
        n_batches=6,
        retain_batch_size=7,
        forget_batch_size=2,
        lr=1e-3,
        epsilon_forget=0.5,
        epsilon_retain=2.0,
        kl_threshold=1.0,
        params=("model.layers.*",),
        seed=1,
        batch_size=4,
        progress=False,
    ),
    K.IclCommand: dict(
        decomposition="d",
        out="o",
        store="s",
        accept_changed_dataset=True,
        dataset="x.csv",
        text_column="t",
        label_column="l",
        eval_split="train",
        data_seed=1,
        n_eval=5,
        threshold=0.8,
        k=4,
        shots=2,
        n_prompts=3,
        n_select=9,
        seed=2,
        batch_size=4,
        progress=False,
    ),
    K.CompareCommand: dict(
        decomposition="d",
        store="s",
        methods=("npeff", "sae"),
        components=5,
        k=4,
        threshold=0.9,
        seed=3,
        sae_hook="blocks.0.hook_resid_pre",
        sae_k=2,
        sae_tokens=1000,
        sae_lr=1e-3,
        sae_path="my-sae",
        snmf_layer=1,
        snmf_sparsity=None,
        snmf_iterations=7,
        snmf_restarts=2,
        snmf_tokens=None,
        keep_constant_tokens=True,
        selectivity=True,
        target_kl=0.02,
        n_baseline=9,
        selectivity_components=2,
        recovery="minnorm",
        reject_threshold=None,
        batch_size=2,
        device="cpu",
        progress=False,
    ),
    K.DemoCommand: dict(
        model="m",
        n=10,
        params=("a.*", "b.*"),
        proj_dim=64,
        density=2,
        components=3,
        steps=5,
        batch_size=2,
        show=1,
        out="o",
        progress=False,
        projection="kron",
        kron_k=8,
    ),
    K.ZeroShotCommand: dict(model="m", n=9, max_length=64),
    K.ExplainCommand: dict(
        decomposition="d",
        text=("a b", "c\nd"),
        dataset="data.csv",
        text_column="review",
        n=3,
        top=2,
        n_examples=1,
        k=4,
        out="o",
        report="r",
        store="s",
    ),
}


def _argv(cfg) -> list[str]:
    """The command line that should parse back into ``cfg``."""
    out = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        text = (lambda v: v.replace("\n", "\\n")) if isinstance(value, (str, tuple)) else str
        if f.metadata.get("positional"):
            out.insert(0, value)
        elif isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            out += [flag, "none"]
        elif isinstance(value, tuple):
            out += [flag, *map(text, value)]
        else:
            out += [flag, text(value) if isinstance(value, str) else str(value)]
    return out


def test_every_command_has_a_sample():
    assert {cls for cls, _, _ in COMMANDS.values() if cls is not None} == set(SAMPLES)
    for cls, values in SAMPLES.items():
        assert set(values) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_cli_config_json_round_trip(cls):
    cfg = cls(**SAMPLES[cls])
    name = next(n for n, (c, _, _) in COMMANDS.items() if c is cls)
    args = build_parser().parse_args([name, *_argv(cfg)])
    parsed = from_args(cls, args)
    assert parsed == cfg
    again = cls.from_dict(json.loads(json.dumps(parsed.to_dict())))
    assert again == cfg and again.key() == cfg.key()
    # defaults: a command line with only the required fields gives the dataclass defaults
    required = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    # label-tokens needs --labels; explain needs an input
    extra = {K.CollectCommand: {"task": "next-token"}, K.ExplainCommand: {"dataset": "d"}}.get(cls, {})
    minimal = cls(**{f.name: SAMPLES[cls][f.name] for f in required}, **extra)
    args = build_parser().parse_args([name, *_argv_required(minimal, required), *_argv_extra(extra)])
    assert from_args(cls, args) == minimal


def _argv_extra(extra):
    return [x for k, v in extra.items() for x in ("--" + k, v)]


def _argv_required(cfg, required):
    out = []
    for f in required:
        value = getattr(cfg, f.name)
        if f.metadata.get("positional"):
            out.insert(0, value)
        else:
            out += [f.metadata.get("flag") or "--" + f.name.replace("_", "-"), str(value)]
    return out


def test_every_flag_has_a_help_line(capsys):
    for name, (cls, _, _) in COMMANDS.items():
        if cls is None:
            continue
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help line"
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        for f in dataclasses.fields(cls):
            shown = (
                f.name.upper()
                if f.metadata.get("positional")
                else f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            )
            assert shown in out, f"{name} --help lacks {shown}"


@pytest.mark.parametrize(
    "cls, change, flag",
    [
        (C.DecomposeConfig, dict(n_components=0), "--components"),
        (C.DecomposeConfig, dict(n_components=2, lr=-1.0), "--lr"),
        (C.DecomposeConfig, dict(n_components=2, nonfinite="skip"), "--nonfinite"),
        (C.CollectConfig, dict(density=0), "--density"),
        (C.CollectConfig, dict(proj_dim=8, density=16), "--density"),
        (C.CollectConfig, dict(n="10"), "--n"),
        (C.CollectConfig, dict(dtype="float8"), "--dtype"),
        (C.PerturbConfig, dict(components="0,x"), "--components"),
        (C.PerturbConfig, dict(magnitude=float("inf")), "--magnitude"),
        (K.CollectCommand, dict(model="m", dataset="d", out="o", labels=(" yes",)), "--labels"),
        (K.CollectCommand, dict(model="m", dataset="d", out="o", labels=("a", "b"), template="no slot"), "--template"),
    ],
)
def test_bad_values_name_the_flag(cls, change, flag):
    with pytest.raises(C.ConfigError, match=flag) as info:
        cls(**change)
    assert info.value.flag == flag  # the field as data, not only in the message
    assert info.value.field in change
    assert info.value.reason and info.value.reason in str(info.value)


def test_cli_bad_value_is_one_clear_line(capsys):
    assert main(["decompose", "--store", "s", "--out", "o", "--components", "3", "--lr", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr" in err[0] and "-1.0" in err[0]


class _Handed(Exception):
    pass


@pytest.mark.parametrize(
    "argv, module, function",
    [
        (["decompose", "--store", "s", "--out", "o", "--components", "2"], "npeff_lens.runs", "decompose_store"),
        (["perturb", "d", "--components", "2"], "npeff_lens.runs", "run_perturbation"),
        (["compare", "d", "--methods", "npeff"], "npeff_lens.runs", "compare"),
        (["unlearn", "d", "--components", "0"], "npeff_lens.runs", "unlearn"),
        (["icl", "d"], "npeff_lens.runs", "icl"),
        (["report", "d", "--k", "4"], "npeff_lens.report", "build"),
        (["explain", "d", "--text", "a film", "--top", "2"], "npeff_lens.explain", "explain"),
    ],
)
def test_every_step_receives_its_command_as_its_config(argv, module, function, monkeypatch):
    """One calling convention: the step gets the parsed command itself (it extends the step's config), not a copy
    rebuilt and checked again."""
    import importlib

    handed = []

    def step(*args, **kwargs):
        handed.extend(a for a in (*args, *kwargs.values()) if isinstance(a, C.BaseConfig))
        raise _Handed

    monkeypatch.setattr(importlib.import_module(module), function, step)
    with pytest.raises(_Handed):
        main(["--debug", *argv])
    assert [type(a) for a in handed] == [COMMANDS[argv[0]][0]]


def test_a_decomposition_s_values_are_checked_once_from_the_command_line_to_fit(run, tmp_path, monkeypatch):
    from npeff_lens import constraints

    checked = []

    class Counting(constraints._Constraint):
        def check(self, name, value):
            checked.append(value)

    monkeypatch.setitem(constraints._PARAMETER_CONSTRAINTS, "lr", Counting())
    root, _, _ = run
    argv = ["--store", str(root / "tree" / "pefs"), "--components", "2", "--steps", "3", "--warmup-steps", "1"]
    assert main(["decompose", *argv, "--lr", "0.25", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert checked == [0.25]


def test_component_lists():
    assert C.PerturbConfig(components=3).component_list(10) == [0, 1, 2]
    # more components than the fit has is one line, not a silent smaller run
    with pytest.raises(ValueError, match="asks for 40 components but the decomposition has 5"):
        C.PerturbConfig(components="40").component_list(5)
    assert C.PerturbConfig(components=[4, 1]).component_list(5) == [4, 1]
    assert C.PerturbConfig(components="0,3,7-9").component_list(10) == [0, 3, 7, 8, 9]
    with pytest.raises(ValueError, match="out of range"):
        C.PerturbConfig(components="0,12").component_list(10)


def test_diff_names_nested_fields():
    stored = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0, "e": [{"n": "p"}]}
    new = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "added": 2, "e": [{"n": "q"}]}
    lines = C.diff(stored, new)
    assert lines == [
        "added: not in the stored configuration, now 2",
        "b.c.1: stored 2, now 3",
        "e.0.n: stored 'p', now 'q'",
        "gone: stored 0, not in the new configuration",
    ]
    assert C.diff(stored, json.loads(json.dumps(stored))) == []
    assert C.diff({"x": float("nan")}, {"x": float("nan")}) == []


# --------------------------------------------------------------------------------------------------
# End to end through the CLI on tiny-llama and a CSV file of the user's.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    csv = root / "reviews.csv"
    csv.write_text("review,sentiment\n" + "\n".join(f"{t},{s}" for t, s in _reviews(40)) + "\n")
    collect = reviews_collect_argv(csv, root / "tree" / "pefs")
    assert main(collect) == 0
    decompose = decompose_argv(root / "tree" / "pefs", root / "tree" / "npeff")
    assert main(decompose) == 0
    return root, collect, decompose


def test_collected_from_a_csv_with_its_columns(run):
    from npeff_lens.store import PEFStore

    root, _, _ = run
    store = PEFStore(root / "tree" / "pefs")
    meta = store.metadata
    # by default the train split (a seeded shuffle of 80% of the rows), in that order
    order = np.random.default_rng(0).permutation(40)[8:]
    reviews = [_reviews(40)[i] for i in order]
    assert len(store) == 32 and meta["text"] == [t for t, _ in reviews]
    # the CSV's labels "sad" / "bad" are matched to the task's labels " bad", " sad" by name
    assert meta["label_name"] == [" " + s for _, s in reviews] and meta["label"] == [
        int(s == "sad") for _, s in reviews
    ]
    key = store.manifest["config"]
    assert key["proj_dim"] == 256 and key["text_column"] == "review" and "batch_size" not in key


def test_collect_with_another_density_names_it_and_changes_nothing(run, capsys):
    root, collect, _ = run
    before = (root / "tree" / "pefs" / "manifest.json").read_text()
    assert main([*collect, "--density", "8"]) == 2
    err = capsys.readouterr().err
    assert "density: stored 32, now 8" in err
    assert main([*collect, "--batch-size", "3"]) == 0  # not part of the key: resumes (nothing left to do)
    assert json.loads((root / "tree" / "pefs" / "manifest.json").read_text())["count"] == json.loads(before)["count"]


def test_decompose_with_another_lr_exits_nonzero_naming_lr(run, capsys):
    root, _, decompose = run
    out = root / "tree" / "npeff"
    rec = json.loads((out / RUN_FILE).read_text())
    assert rec["step"] == "decompose" and rec["status"] == "done" and rec["config"]["n_components"] == 3
    assert rec["source"]["relative"] == "../pefs"
    weights = (out / "npeff.safetensors").read_bytes()
    for flag, value, line in (
        ("--lr", "0.1", "lr: stored 0.5, now 0.1"),
        ("--warmup-steps", "5", "n_warmup_steps: stored 10, now 5"),
        ("--seed", "1", "seed: stored 0, now 1"),
    ):
        assert main([*decompose, flag, value]) == 2
        err = capsys.readouterr().err
        assert line in err and "choose another output directory" in err
    assert main([*decompose, "--checkpoint-every", "7"]) == 0  # not part of the key: the finished fit
    assert (out / "npeff.safetensors").read_bytes() == weights


def test_an_interrupted_decomposition_resumes_to_the_same_fit(run, tmp_path, monkeypatch):
    import npeff_lens.decomposition as decomposition
    import npeff_lens.nmf as nmf

    root, _, _ = run
    store, out = root / "tree" / "pefs", tmp_path / "d"
    ref = decomposition.NPEFF.load(root / "tree" / "npeff")
    kw = dict(n_components=3, n_steps=40, n_warmup_steps=10, checkpoint_every=10, progress=False)
    calls, sweep = [], nmf.sweep

    def interrupted(*args, **kwargs):  # a kill during step 26: checkpoints up to step 20 exist
        calls.append(1)
        if len(calls) == 26:
            raise KeyboardInterrupt
        return sweep(*args, **kwargs)

    monkeypatch.setattr(nmf, "sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decompose_store(store, out, **kw)
    assert json.loads((out / RUN_FILE).read_text())["status"] == "running"
    monkeypatch.setattr(nmf, "sweep", sweep)
    resumed = decompose_store(store, out, **kw)
    assert json.loads((out / RUN_FILE).read_text())["status"] == "done"
    torch.testing.assert_close(resumed.components_, ref.components_, rtol=0, atol=0)
    torch.testing.assert_close(resumed.coefficients_, ref.coefficients_, rtol=0, atol=0)


def test_decompose_refuses_a_folder_of_user_files(run, tmp_path):
    root, _, _ = run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        decompose_store(root / "tree" / "pefs", tmp_path / "mine", n_components=2, n_steps=1, progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_top_report_load_run_and_a_moved_tree(run, tmp_path, capsys):
    root, _, _ = run
    report = top_report(root / "tree" / "npeff", k=4, show=2)
    assert len([line for line in report["lines"] if line.startswith("component")]) == 3
    # every component lists its own examples under its header (two each: --show 2)
    blocks = "\n".join(report["lines"]).split("component ")[1:]
    assert [sum(line.startswith("  ") and "label=" in line for line in b.splitlines()) for b in blocks] == [2, 2, 2]
    assert report["summary_line"].startswith("3 components:")
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "tree", moved)  # the original stays: the relative path must win
    shutil.rmtree(moved / "pefs" / "shards")
    with pytest.raises(Exception, match="corrupt|missing"):
        load_run(moved / "npeff")
    shutil.rmtree(moved)
    shutil.copytree(root / "tree", moved)
    est, store = load_run(moved / "npeff")
    assert pathlib.Path(store.path).resolve() == (moved / "pefs").resolve()
    assert main(["top", str(moved / "npeff"), "--k", "4", "--show", "1"]) == 0
    assert "component 2" in capsys.readouterr().out


def test_a_decomposition_saved_from_python_needs_store(run, tmp_path, capsys):
    from npeff_lens.decomposition import NPEFF

    root, _, _ = run
    NPEFF.load(root / "tree" / "npeff").save(tmp_path / "py")
    assert main(["top", str(tmp_path / "py")]) == 2
    assert "pass --store" in capsys.readouterr().err
    assert main(["top", str(tmp_path / "py"), "--store", str(root / "tree" / "pefs")]) == 0
    # every step that says "pass --store" has one
    for step in ("icl", "unlearn"):
        assert main([step, str(tmp_path / "py"), "--no-progress"]) == 2
        assert "pass --store PATH (store=PATH in Python)" in capsys.readouterr().err
        args = build_parser().parse_args([step, "d", "--store", "s"])
        assert args.store == "s"


def test_compare_json_lists_exactly_the_methods_of_the_call(run, tmp_path):
    from npeff_lens.runs import compare

    root, _, _ = run
    shutil.copytree(root / "tree", tmp_path / "tree")
    d = tmp_path / "tree" / "npeff"
    (d / "compare").mkdir(exist_ok=True)
    stale = {"config": {}, "methods": {"sae": {"n_components": 3, "config": {}}, "npeff": {"n_components": 9}}}
    (d / "compare" / "compare.json").write_text(json.dumps(stale))
    first = compare(d, methods="npeff", k=4, progress=False)
    table = json.loads((d / "compare" / "compare.json").read_text())
    assert (
        list(first["methods"]) == list(table["methods"]) == ["npeff"] and table["methods"]["npeff"]["n_components"] == 3
    )
    again = compare(d, methods="npeff", k=4, progress=False)  # named again: resumed from its folder
    assert again["methods"] == first["methods"]


def test_top_where_cautions_when_a_location_is_at_chance(run, monkeypatch):
    import npeff_lens.runs as runs
    from npeff_lens.layout import parameter_layout
    from npeff_lens.locations import component_locations
    from npeff_lens.models import load_model

    root, _, _ = run
    layout = parameter_layout(load_model("tiny-llama").named_parameters())
    n = sum(e["numel"] for e in layout)
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(n, generator=g)  # energy by parameter counts: every group x1.0
    planted = torch.where(torch.arange(n) < layout[3]["offset"] + layout[3]["numel"], spread, spread * 1e-3)
    located = [component_locations(x, layout) for x in (spread, planted, spread)]
    monkeypatch.setattr(runs, "locate", lambda *a, **k: {"components": located})
    lines = top_report(root / "tree" / "npeff", k=4, show=1, where=True)["lines"]
    starts = [i for i, line in enumerate(lines) if line.startswith("component ")]
    blocks = [lines[i:j] for i, j in zip(starts, [*starts[1:], len(lines)])]
    caution = [[line for line in b if line.startswith("  caution: at chance")] for b in blocks]
    assert [len(c) for c in caution] == [1, 0, 1]
    assert "top examples' gradients" in caution[0][0] and "spreads over parameters by their size" in caution[0][0]
    assert caution[2][0].endswith(", as above")  # said in full once


def test_no_progress_hides_every_bar_and_keeps_the_informational_lines(run, tmp_path, capsys):
    """--no-progress hides our bars and the libraries' (transformers' "Loading weights" for a checkpoint
    directory, datasets'), never the thread line or the label counts; the next command shows bars again."""
    from npeff_lens.models import tiny_model

    root, collect, _ = run
    model, tok = tiny_model("tiny-llama")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()
    argv = [*collect[: collect.index("--out")], "--n", "6"]
    argv[argv.index("--model") + 1] = str(tmp_path / "ckpt")
    for out, flag in (("quiet", ["--no-progress"]), ("bars", [])):
        assert main([*argv, "--out", str(tmp_path / out), *flag]) == 0
        err = capsys.readouterr().err
        assert "npeff collect: " in err and "CPU thread(s)" in err, err
        assert f"6 examples in {tmp_path / out}; labels: " in err, err
        assert ("Loading weights" in err and "%|" in err) == (not flag), err

    from npeff_lens.decomposition import NPEFF

    root, _, _ = run
    NPEFF.load(root / "tree" / "npeff").save(tmp_path / "py")
    assert main(["top", str(tmp_path / "py")]) == 2
    assert "pass --store" in capsys.readouterr().err
    assert main(["top", str(tmp_path / "py"), "--store", str(root / "tree" / "pefs")]) == 0


def test_perturb_resumes_and_another_magnitude_is_an_error(run, tmp_path, capsys):
    root, _, _ = run
    out = tmp_path / "perturb"
    s1 = run_perturbation(root / "tree" / "npeff", 2, magnitude=0.5, top_k=4, n_baseline=8, out=out, progress=False)
    rec = json.loads((out / RUN_FILE).read_text())
    assert rec["step"] == "perturb" and rec["config"]["magnitude"] == 0.5 and "components" not in rec["config"]
    s2 = run_perturbation(root / "tree" / "npeff", 2, magnitude=0.5, top_k=4, n_baseline=8, out=out, progress=False)
    assert s2["records"] == json.loads(json.dumps(s1["records"]))
    argv = ["perturb", str(root / "tree" / "npeff"), "--components", "2", "--top-k", "4", "--n-baseline", "8"]
    assert main([*argv, "--magnitude", "0.7", "--out", str(out), "--no-progress"]) == 2
    assert "magnitude: stored 0.5, now 0.7" in capsys.readouterr().err


def test_perturb_time_budget_stops_between_components_and_a_rerun_continues(run, tmp_path, monkeypatch):
    import npeff_lens.run_perturbation as runs

    root, _, _ = run
    args = dict(magnitude=0.5, top_k=4, n_baseline=8, progress=False)
    full = run_perturbation(root / "tree" / "npeff", 3, **args)
    clock, measure = [0.0], runs._perturb_one  # a clock on which each component takes one minute

    def one_minute(*a, **k):
        clock[0] += 60.0
        return measure(*a, **k)

    monkeypatch.setattr(runs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runs, "_perturb_one", one_minute)
    out = tmp_path / "budget"
    with pytest.warns(RuntimeWarning, match="time budget of 2 min spent: 2 of 3 components measured"):
        part = run_perturbation(root / "tree" / "npeff", 3, out=out, time_budget=2, **args)
    assert [r["component"] for r in part["records"]] == [0, 1]
    assert json.loads((out / RUN_FILE).read_text())["status"] == "running"
    monkeypatch.undo()
    rest = run_perturbation(root / "tree" / "npeff", 3, out=out, **args)  # continues: measures component 2 only
    untimed = [
        [{k: v for k, v in r.items() if "seconds" not in k} for r in json.loads(json.dumps(x["records"]))]
        for x in (rest, full)
    ]
    assert untimed[0] == untimed[1]
    assert json.loads((out / RUN_FILE).read_text())["status"] == "done"


# --------------------------------------------------------------------------------------------------
# Layout rules.
# --------------------------------------------------------------------------------------------------


def test_no_function_over_100_lines_unless_a_solver_says_why():
    root = pathlib.Path(__file__).resolve().parents[1] / "npeff_lens"
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                if "numerical solver" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long


def test_compare_all_methods_end_to_end_resumes_and_names_a_changed_field(run, capsys, monkeypatch):
    from npeff_lens.runs import compare

    root, _, _ = run
    d = root / "tree" / "npeff"
    argv = ["compare", str(d)] + shlex.split(
        "--methods npeff,grad-cluster,sae,snmf --components 3 --k 4 --sae-tokens 3000 --snmf-iterations 30"
        " --selectivity --target-kl 0.0002 --n-baseline 8 --no-progress"
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = json.loads((d / "compare" / "compare.json").read_text())
    assert list(table["methods"]) == ["npeff", "grad-cluster", "sae", "snmf"]
    assert "selectivity" in out.splitlines()[0]
    for name, row in table["methods"].items():
        assert row["n_components"] == 3 and name in out
        for key in (
            "alive",
            "tuned_label",
            "tuned_prediction",
            "argmax_shared",
            "coverage",
            "fit_seconds",
            "n_always_on",
            "n_near_duplicate_pairs",
            "max_cosine",
            "degenerate",
        ):
            assert key in row, (name, key)
        assert row["target_kl"] == 0.0002 and row["n_baseline"] == 8 and len(row["selectivity_per_component"]) == 3
        n = row["selectivity_n_evaluated"]
        assert n + row["selectivity_n_excluded"] + row["selectivity_n_unreachable"] == 3, (name, row)
        assert n == 0 or row["selectivity"] > 0, (name, row)
    assert table["methods"]["npeff"]["selectivity_n_evaluated"] == 3  # dense coefficients: every component has k
    assert table["methods"]["snmf"]["hook"] == "model.layers.1.mlp.down_proj:input"
    assert table["methods"]["npeff"]["tuned_tokens"] is None and table["methods"]["sae"]["tuned_tokens"] is not None
    for method in ("sae", "snmf"):
        assert json.loads((d / "compare" / method / RUN_FILE).read_text())["status"] == "done"
        assert json.loads((d / "compare" / method / "selectivity" / RUN_FILE).read_text())["status"] == "done"
    # a rerun refits nothing and re-measures no selectivity (the metrics are recomputed)
    import npeff_lens.baselines.gradient_clustering as gc
    import npeff_lens.baselines.snmf as snmf
    import npeff_lens.selectivity as sel

    monkeypatch.setattr(gc.GradientClustering, "fit", lambda *a, **k: pytest.fail("refitted"))
    monkeypatch.setattr(snmf.SNMFBaseline, "fit", lambda *a, **k: pytest.fail("refitted"))
    monkeypatch.setattr(sel, "component_selectivity", lambda *a, **k: pytest.fail("measured again"))
    assert main(argv) == 0
    again = json.loads((d / "compare" / "compare.json").read_text())
    assert again["methods"] == table["methods"] | {
        m: {**table["methods"][m], **{k: again["methods"][m][k] for k in ("fit_seconds", "peak_rss_mib")}}
        for m in table["methods"]
    }
    again = compare(
        d, methods="npeff,grad-cluster,sae,snmf", components=3, k=2, sae_tokens=3000, snmf_iterations=30, progress=False
    )
    assert again["methods"]["snmf"]["n_components"] == 3 and again["config"]["k"] == 2
    assert "selectivity" not in again["methods"]["snmf"]
    # still patched: gc.GradientClustering.fit fails if called (it must read the fit back)
    again = compare(d, methods="grad-cluster", k=2, progress=False)  # components omitted: the decomposition's 3
    assert again["methods"]["grad-cluster"]["n_components"] == 3
    # compare.json lists exactly the methods of the call; the others' fits stay in their folders for a later call
    kept = json.loads((d / "compare" / "compare.json").read_text())["methods"]
    assert list(kept) == ["grad-cluster"] and kept["grad-cluster"]["config"]["components"] == 3
    assert json.loads((d / "compare" / "sae" / RUN_FILE).read_text())["status"] == "done"
    # a bad SAE hook stops before anything is written, and does not block the corrected command
    capsys.readouterr()
    before = sorted(p.name for p in (d / "compare").iterdir())
    assert main(["compare", str(d), "--methods", "sae", "--sae-hook", "no.such.hook", "--no-progress"]) == 2
    assert "has no hook 'no.such.hook'" in capsys.readouterr().err
    assert sorted(p.name for p in (d / "compare").iterdir()) == before
    assert main([*argv, "--seed", "1"]) == 2
    assert "seed: stored 0, now 1" in capsys.readouterr().err
    assert main([*argv, "--snmf-sparsity", "0.5"]) == 2
    assert "snmf_sparsity: stored 0.1, now 0.5" in capsys.readouterr().err
    assert main([*argv, "--target-kl", "0.002"]) == 2
    err = capsys.readouterr().err
    assert "target_kl: stored 0.0002, now 0.002" in err and "selectivity" in err


def test_unlearn_and_icl_commands_on_a_tiny_run(run, capsys):
    root, _, _ = run
    d = root / "tree" / "npeff"
    unlearn = ["unlearn", str(d)] + shlex.split(
        "--components 0 --n-batches 2 --retain-batch-size 4 --n-random 4 --k-eval 2 --k-mitigation 2 --no-progress"
    )
    assert main(unlearn) == 0
    report = json.loads((d / "unlearn" / "unlearning.json").read_text())
    assert {"per_component", "summary"} <= set(report) and "mitigation" in capsys.readouterr().out
    assert json.loads((d / "unlearn" / RUN_FILE).read_text())["status"] == "done"
    # held-out examples come from the run's own CSV (its columns), none of them in the store
    icl = ["icl", str(d)] + shlex.split(
        "--n-eval 6 --shots 1 --n-prompts 2 --n-select 4 --threshold 0.5 --k 4 --no-progress"
    )
    assert main(icl) == 0
    result = json.loads((d / "icl" / "icl.json").read_text())
    assert result["held_in"]["n"] == 32 and "tuning classifier" in capsys.readouterr().out
    assert (
        result["held_out_source"].startswith("6 examples of") and "none in the run's store" in result["held_out_source"]
    )
    assert main(["icl", str(d), "--n-eval", "7", "--no-progress"]) == 2
    assert "n_eval: stored 6, now 7" in capsys.readouterr().err
    # more than the 8 held-out rows: one line saying how many there are, and nothing written
    assert main(["icl", str(d), "--n-eval", "9", "--out", str(root / "icl9"), "--no-progress"]) == 2
    assert "8 examples of" in capsys.readouterr().err and not (root / "icl9").exists()


def test_a_csv_run_reports_the_same_whatever_order_the_labels_are_given_in(tmp_path, capsys):
    """Accuracy, tunings and in-context prompts of a run on a user CSV do not depend on the order of --labels."""
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,sentiment\n" + "\n".join(f"{t},{s}" for t, s in _reviews(40)) + "\n")
    results = {}
    for labels in ((" bad", " sad"), (" sad", " bad")):
        root = tmp_path / labels[0].strip()
        assert main(reviews_collect_argv(csv, root / "pefs", labels=labels)) == 0
        assert main(decompose_argv(root / "pefs", root / "npeff")) == 0
        argv = ["icl", str(root / "npeff")] + shlex.split(
            "--n-eval 6 --shots 2 --n-prompts 3 --n-select 8 --threshold 0.5 --k 4 --no-progress"
        )
        assert main(argv) == 0
        meta = PEFStore(root / "pefs").metadata
        icl = json.loads((root / "npeff" / "icl" / "icl.json").read_text())
        names = [labels[y] for y in meta["label"]]
        assert names == meta["label_name"]  # the label index names the example's outcome
        results[labels] = {
            "zero_shot": sum(p == y for p, y in zip(meta["prediction"], meta["label"])) / len(meta),
            "predicted": [labels[p] for p in meta["prediction"]],
            "accuracy": icl["accuracy"],
            "held_in": icl["held_in"]["zero_shot_accuracy"],
            "prefix": icl["icl"]["prefix"],
        }
    a, b = results.values()
    assert a == b
    # the in-context prompt pairs each demonstration with its own label
    for line in a["prefix"].strip().split("\n"):
        text, word = line.rsplit(" Sentiment:", 1)
        assert dict(_reviews(40))[text.removeprefix("Review: ")] == word.strip()


def test_a_step_that_failed_before_writing_results_does_not_block_its_fix(run, tmp_path, capsys):
    root, _, _ = run
    d = root / "tree" / "npeff"
    out = tmp_path / "icl"
    icl = ["icl", str(d), "--out", str(out)] + shlex.split(
        "--n-eval 4 --shots 1 --n-prompts 2 --n-select 4 --threshold 0.5 --k 4 --no-progress"
    )
    assert main([*icl, "--dataset", str(root / "reviewz.csv")]) == 2
    assert "reviewz.csv" in capsys.readouterr().err and not out.exists()
    # a step that stopped after its record was written (here: the model fails to load) blocks nothing either
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"step": "icl", "status": "running", "config": {"dataset": "x.csv"}}))
    assert main(icl) == 0 and json.loads((out / RUN_FILE).read_text())["status"] == "done"
    unlearn = ["unlearn", str(d), "--out", str(tmp_path / "unlearn")] + shlex.split(
        "--n-batches 1 --retain-batch-size 4 --n-random 4 --k-eval 2 --k-mitigation 2 --no-progress"
    )
    assert main([*unlearn, "--components", "50"]) == 2
    assert "component index 50 out of range" in capsys.readouterr().err and not (tmp_path / "unlearn").exists()
    assert main([*unlearn, "--components", "1"]) == 0


def test_warnings_at_the_command_line_are_one_line(run, tmp_path, capsys):
    root, _, _ = run
    argv = ["perturb", str(root / "tree" / "npeff"), "--out", str(tmp_path / "p")] + shlex.split(
        "--components 1 --top-k 4 --n-baseline 64 --magnitude 0.5 --no-progress"
    )
    proc = subprocess.run([sys.executable, "-m", "npeff_lens.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    warning = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warning and all(line.startswith("npeff: warning: ") for line in warning), err
    assert "warnings.warn(" not in err and ".py:" not in err


def test_json_results_are_standard_json(tmp_path):
    from npeff_lens.io import write_json

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=pytest.fail) == {
        "a": None,
        "b": [1.5, None],
        "c": {"d": None},
    }


def test_collect_says_which_examples_and_the_report_shows_their_labels(run, tmp_path, capsys, monkeypatch):
    from npeff_lens import collect as collect_module
    from npeff_lens.report import build

    root, collect, _ = run
    argv = [*collect[: collect.index("--out")], "--out", str(tmp_path / "pefs"), "--n", "10"]

    assert main(argv) == 0
    meta = PEFStore(tmp_path / "pefs").metadata
    counts = {name: meta["label_name"].count(" " + name) for name in ("bad", "sad")}  # outcome names
    err = capsys.readouterr().err
    assert f"10 examples in {tmp_path / 'pefs'}; labels: bad {counts['bad']}, sad {counts['sad']}" in err
    assert f"npeff collect: {torch.get_num_threads()} CPU thread(s)" in err and "OMP_NUM_THREADS=1" in err
    index = build(root / "tree" / "npeff", out=tmp_path / "report", n_attributed=0, progress=False)
    labels = PEFStore(root / "tree" / "pefs").metadata["label_name"]
    assert f"32 examples (labels: bad {labels.count(' bad')}, sad {labels.count(' sad')})" in index.read_text()
    # unprojected PEFs that cannot fit in memory are refused, naming the estimate
    monkeypatch.setattr(collect_module, "_available_memory", lambda: 2**20)
    assert main([*argv[: argv.index("--proj-dim")], "--proj-dim", "0", "--out", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err
    assert "unprojected PEFs (--proj-dim 0) of 18,432 parameters need" in err and "GiB available" in err


def test_unlearn_with_its_defaults_runs_on_a_64_example_store(tmp_path):
    root = tmp_path
    collect = shlex.split(
        "collect --model tiny-llama --dataset movie-reviews --template 'Review: {text}'"
        " --labels ' negative' ' positive' --label-first-token --proj-dim 128 --n 64 --no-progress"
    )
    assert main([*collect, "--out", str(root / "pefs")]) == 0
    decompose = shlex.split("decompose --components 2 --steps 30 --warmup-steps 5 --no-progress")
    assert main([*decompose, "--store", str(root / "pefs"), "--out", str(root / "npeff")]) == 0
    assert main(["unlearn", str(root / "npeff"), "--components", "0", "--n-batches", "1", "--no-progress"]) == 0
    report = json.loads((root / "npeff" / "unlearn" / "unlearning.json").read_text())
    assert report["config"]["n_random"] == 64 - 25 - 12 - 16


def test_top_where_lists_where_each_component_lives_and_keeps_it_in_the_run(run, capsys, monkeypatch):
    import npeff_lens.run_locations as run_locations
    import npeff_lens.runs as runs

    root, _, _ = run
    d = root / "tree" / "npeff"
    assert main(["top", str(d), "--where", "--show", "1"]) == 0
    out = capsys.readouterr().out
    where = [line for line in out.splitlines() if line.startswith("  where: ")]
    assert len(where) == 3 and all("layer " in line and "top 5% of groups" in line for line in where)
    located = json.loads((d / "locations.json").read_text())
    assert located["key"]["method"] == "span" and located["key"]["k"] == 16 and len(located["components"]) == 3
    assert all(c["method"] == "span" and 0 <= c["fit"] <= 1 and c["examples"] for c in located["components"])
    # per head from tiny-llama's configuration alone (4 query heads, 2 key/value heads, 2 layers)
    assert located["key"]["heads"] == {"n_heads": 4, "n_kv_heads": 2}
    heads = located["components"][0]["heads"]
    assert {(r["module"], r["head"]) for r in heads if r["layer"] == 0} >= {("q", 3), ("o", 3), ("k", 1), ("v", 1)}
    assert not any(r["module"] in ("k", "v") and r["head"] >= 2 for r in heads)
    for c in located["components"]:
        assert sum(r["fraction"] for r in c["groups"]) == pytest.approx(1.0)
        assert 0 < c["top5pct"] <= 1
    # a rerun reads the file back
    monkeypatch.setattr(run_locations, "GradientSpan", lambda *a, **k: pytest.fail("located again"))
    assert main(["top", str(d), "--where", "--show", "1"]) == 0
    assert runs.locate(d, store=root / "nowhere") == located  # read back without opening the store


def test_an_interrupted_locate_keeps_the_components_it_finished(run, tmp_path, monkeypatch):
    import npeff_lens.run_locations as run_locations

    root, _, _ = run
    d = tmp_path / "npeff"
    shutil.copytree(root / "tree" / "npeff", d, ignore=shutil.ignore_patterns("locations.json", "report", "compare"))
    real, calls = run_locations._Locator.component, []

    def once_then_stop(self, j):
        calls.append(j)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, j)

    monkeypatch.setattr(run_locations._Locator, "component", once_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_locations.locate(d, k=4, progress_bar=False)
    assert [c["component"] for c in json.loads((d / "locations.json").read_text())["components"]] == [0]
    monkeypatch.setattr(run_locations._Locator, "component", lambda self, j: calls.append(j) or real(self, j))
    done = run_locations.locate(d, k=4, progress_bar=False)
    assert calls == [0, 1, 1, 2] and [c["component"] for c in done["components"]] == [0, 1, 2]


def test_the_causal_location_check_measures_on_other_examples_and_resumes(run, monkeypatch, capsys):
    """benchmarks/locations.py causal (runs.locate(causal=True)) on a small run: each component is located on its top
    k examples and measured on its next k, its top groups against random groups of about the same parameter count,
    every perturbation sized to the same baseline KL; a rerun reads locations.json back."""
    import npeff_lens.run_locations as run_locations

    bench = load_script("benchmarks/locations.py")
    root, _, _ = run
    d = root / "tree" / "npeff"
    argv = ["causal", str(d), "--k", "4", "--n-baseline", "8"]
    bench.main(argv)
    located = json.loads((d / "locations.json").read_text())
    assert located["key"]["causal"]["k"] == 4
    measured = 0
    for c in located["components"]:
        r = c["causal"]
        if r["status"] != "ok":
            continue
        measured += 1
        assert not set(r["measured_on"]) & set(c["examples"]) and len(c["examples"]) == 4
        assert not set(map(tuple, r["top_groups"])) & set(map(tuple, r["control_groups"]))
        assert r["control_params"] > 0 and r["top_params"] > 0
        for m in ("full", "top", "control"):
            assert r[m]["status"] in ("ok", "unreachable", "zero", "none")
            if r[m]["status"] == "ok":
                assert r[m]["kl_baseline"] == pytest.approx(0.01, rel=0.05)
        if r["full"]["status"] == r["top"]["status"] == "ok":
            assert r["kept"] == pytest.approx(r["top"]["selectivity"] / r["full"]["selectivity"])
    assert measured >= 1
    summary = json.loads((d / "locations-causal-recovered.json").read_text())
    assert summary["n_measured"] == measured
    monkeypatch.setattr(run_locations, "located_selectivity", lambda *a, **k: pytest.fail("measured again"))
    bench.main(argv)
    assert "comp" in capsys.readouterr().out
    monkeypatch.undo()
    # the span direction: the one the location was read from, perturbed on the next k examples
    bench.main([*argv, "--direction", "span"])
    located = json.loads((d / "locations.json").read_text())
    assert located["key"]["causal"]["direction"] == "span"
    assert all(c["causal"]["direction"] == "span" for c in located["components"] if c["causal"]["status"] == "ok")


def test_equal_size_controls_avoid_the_located_groups():
    from npeff_lens.layout import parameter_layout
    from npeff_lens.locations import equal_size_control, group_numels
    from npeff_lens.models import load_model

    layout = parameter_layout(load_model("tiny-llama").named_parameters())
    numel = group_numels(layout)
    top = [(1, "down"), (0, "q")]
    drawn = set()
    for seed in range(8):
        ctrl = equal_size_control(layout, top, seed=seed)
        assert len(ctrl) == 2 and not set(ctrl) & set(top)
        assert sum(numel[g] for g in ctrl) == sum(numel[g] for g in top)  # same shapes exist elsewhere: exact
        drawn.add(tuple(ctrl))
    assert len(drawn) > 1  # drawn at random


def test_compare_uses_an_sae_the_user_already_has(run, tmp_path, capsys, monkeypatch):
    """An SAE trained and saved by sae-lens (SAE.save_model) is compared at its recorded hook, not retrained."""
    from npeff_lens.baselines.sae import TopKSAEBaseline
    from npeff_lens.models import load_model

    root, _, _ = run
    d = root / "tree" / "npeff"
    hook = "model.layers.0"
    mine = TopKSAEBaseline(8, 2, hook=hook, total_tokens=2000, show_progress=False)
    mine.fit(load_model("tiny-llama"), [t for t, _ in _reviews(40)])
    users = tmp_path / "my-sae"
    mine.sae_.save_model(users)  # sae-lens's own format: cfg.json + sae_weights.safetensors, hook_name recorded
    monkeypatch.setattr(TopKSAEBaseline, "_train", lambda *a, **k: pytest.fail("trained an SAE"))
    out = tmp_path / "npeff-copy"
    shutil.copytree(d, out, ignore=shutil.ignore_patterns("compare", "report", "locations.json"))
    assert main(["compare", str(out), "--methods", "sae", "--sae-path", str(users), "--k", "4", "--no-progress"]) == 0
    row = json.loads((out / "compare" / "compare.json").read_text())["methods"]["sae"]
    assert row["n_components"] == 8 and row["hook"] == hook and row["config"]["sae_path"] == str(users)
    saved = TopKSAEBaseline.load(out / "compare" / "sae" / "sae")
    assert torch.equal(saved.sae_.W_dec, mine.sae_.W_dec) and saved.pretrained_
    # a folder that holds no SAE: one line, nothing written
    assert main(["compare", str(out), "--methods", "sae", "--sae-path", str(tmp_path), "--no-progress"]) == 2
    assert "holds no sae-lens SAE" in capsys.readouterr().err
    # an SAE of another width than its hook's activations: one line naming both widths and the hook
    again = tmp_path / "npeff-again"
    shutil.copytree(d, again, ignore=shutil.ignore_patterns("compare", "report", "locations.json"))
    argv = ["compare", str(again), "--methods", "sae", "--sae-path", str(users), "--sae-hook", "mlp:0", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "reads activations of width 32, but hook 'model.layers.0.mlp.down_proj:input' gives width" in err
    lines = [line for line in err.splitlines() if "CPU thread(s)" not in line]  # beside the threads line: one line
    assert len(lines) == 1 and not (again / "compare").exists()


# --------------------------------------------------------------------------------------------------
# What a user reads comes from the run it claims: outcomes not spellings, the run's own store and data.
# --------------------------------------------------------------------------------------------------


def _collect_csv(csv, out, *extra):
    return main(reviews_collect_argv(csv, out, *extra))


def _decompose(store, out):
    return main(decompose_argv(store, out))


def _write_csv(path, rows):
    path.write_text("review,sentiment\n" + "".join(f"{t},{s}\n" for t, s in rows))
    return path


def test_spellings_other_stores_and_edited_data_are_caught(tmp_path, capsys):
    rows = _reviews(40)
    spell = ("SAD", " sad ", "Sad", "sad"), ("Bad ", "BAD", " bad", "bad")
    messy = [(t, spell[s == "bad"][i % 4]) for i, (t, s) in enumerate(rows)]
    for name, data in (("clean", rows), ("messy", messy), ("other", _reviews(40, seed=5))):
        assert _collect_csv(_write_csv(tmp_path / f"{name}.csv", data), tmp_path / name / "pefs") == 0
        assert _decompose(tmp_path / name / "pefs", tmp_path / name / "npeff") == 0
    capsys.readouterr()
    # the same rows spelled differently: the same outcomes, the same tunings, outcome names in the output
    clean, messy_store = PEFStore(tmp_path / "clean" / "pefs"), PEFStore(tmp_path / "messy" / "pefs")
    assert clean.example_labels() == messy_store.example_labels()
    assert set(messy_store.example_labels()) == {" bad", " sad"}
    reports = [top_report(tmp_path / name / "npeff", k=4, show=3) for name in ("clean", "messy")]
    assert reports[0]["summary"] == reports[1]["summary"] and reports[0]["lines"] == reports[1]["lines"]
    # another run's store (same size, other texts) is refused in one line naming what differs
    assert main(["top", str(tmp_path / "messy" / "npeff"), "--store", str(tmp_path / "other" / "pefs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not the one the decomposition" in err and "examples of" in err
    # the same examples collected from another file are the same examples
    assert main(["top", str(tmp_path / "messy" / "npeff"), "--store", str(tmp_path / "clean" / "pefs")]) == 0
    # an edited dataset is refused by the steps that read it again, naming the first changed example
    flipped = [(t, {"sad": "bad", "bad": "sad"}[s]) for t, s in rows]
    _write_csv(tmp_path / "clean.csv", flipped)
    capsys.readouterr()
    icl = ["icl", str(tmp_path / "clean" / "npeff")] + shlex.split(
        "--n-eval 4 --shots 1 --n-prompts 1 --n-select 4 --threshold 0.5 --k 4 --no-progress"
    )
    assert main(icl) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has changed since the run's store" in err and "has label ' sad', the store ' bad'" in err
    assert "--accept-changed-dataset" in err and not (tmp_path / "clean" / "npeff" / "icl").exists()
    assert main([*icl, "--accept-changed-dataset"]) == 0


def test_integer_labels_say_how_they_map_and_globs_that_match_nothing_are_named(tmp_path, capsys):
    rows = [(t, int(s == "sad")) for t, s in _reviews(12)]
    csv = _write_csv(tmp_path / "ints.csv", rows)
    assert _collect_csv(csv, tmp_path / "pefs") == 0
    assert "label 0 → ' bad', 1 → ' sad'" in capsys.readouterr().err
    assert _collect_csv(csv, tmp_path / "named", "--label-names", "sad", "bad") == 0
    assert "by position" not in capsys.readouterr().err
    named, meant = PEFStore(tmp_path / "named").metadata, {t: (" sad", " bad")[y] for t, y in rows}
    assert named["label_name"] == [meant[t] for t in named["text"]]  # label 0 is "sad" by name, not " bad"
    with pytest.warns(UserWarning, match=r"\['model.layerz.\*'\] match no parameter of the model"):
        assert _collect_csv(csv, tmp_path / "glob", "--params", "model.layers.0.*", "model.layerz.*") == 0
    # two labels that are the same name up to case are refused in one line
    assert _collect_csv(_write_csv(tmp_path / "s.csv", _reviews(12)), tmp_path / "dup", "--labels", " sad", " Sad") == 2
