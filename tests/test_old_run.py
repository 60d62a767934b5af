"""A run directory written by an earlier version (tests/data/old-run, see its README) still resumes: the
collection refills only the missing shard and keeps the stored ones byte for byte, the decomposition resumes
from its step-30 checkpoint and ends where the earlier version ended, and `npeff top` reads the result."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import torch
from helpers import reviews_collect_argv
from safetensors.torch import load_file

from npeff_lens import checkpoints
from npeff_lens.cli import main
from npeff_lens.store import PEFStore

DATA = Path(__file__).parent / "data" / "old-run"

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_a_run_written_by_an_earlier_version_resumes(tmp_path, monkeypatch, capsys):
    root = tmp_path / "old-run"
    shutil.copytree(DATA, root)
    monkeypatch.chdir(root)  # the commands name their inputs by relative path, as they were run
    kept = {p.name: p.read_bytes() for p in (root / "run" / "pefs" / "shards").iterdir()}
    assert len(kept) == 4  # two shards of three

    assert main(reviews_collect_argv("reviews.csv", "run/pefs", "--split", "none", "--shard-size", "8")) == 0
    store = PEFStore("run/pefs")
    assert len(store) == 24
    shards = root / "run" / "pefs" / "shards"
    assert {p.name: p.read_bytes() for p in shards.iterdir() if p.name in kept} == kept
    store.verify()

    loaded = []
    load = checkpoints.Checkpoints.load
    monkeypatch.setattr(checkpoints.Checkpoints, "load", lambda self, *a: loaded.append(load(self, *a)) or loaded[-1])
    decompose = shlex.split(
        "decompose --store run/pefs --components 3 --steps 30 --warmup-steps 5 --checkpoint-every 10"
        " --out run/npeff --no-progress"
    )
    assert main(decompose) == 0
    assert loaded and loaded[0] is not None and loaded[0][0] == 30  # resumed at the step-30 checkpoint
    got, want = (
        load_file(root / "run" / "npeff" / "npeff.safetensors"),
        load_file(root / "expected" / "npeff.safetensors"),
    )
    for name in ("components_", "coefficients_"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)

    capsys.readouterr()
    assert main(["top", "run/npeff", "--k", "4", "--show", "1"]) == 0
    assert "component 0" in capsys.readouterr().out.lower()


def test_a_store_resumes_after_its_data_file_moves_and_refuses_other_data(tmp_path, monkeypatch, capsys):
    """The data is recorded by its content: the same file at another path (another machine, a fresh clone)
    resumes; a file with one label changed is another configuration."""
    rows = (DATA / "reviews.csv").read_text()

    def collect(folder: str, text: str) -> int:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "reviews.csv").write_text(text)
        monkeypatch.chdir(tmp_path / folder)
        return main(reviews_collect_argv("reviews.csv", tmp_path / "pefs", "--n", "4", "--split", "none", proj_dim=64))

    assert collect("a", rows) == 0
    assert collect("b", rows) == 0  # the same rows in another folder: resumes (nothing left to do)
    header, first, *rest = rows.splitlines(keepends=True)
    flipped = first.replace(",sad", ",bad") if ",sad" in first else first.replace(",bad", ",sad")
    capsys.readouterr()
    assert collect("c", header + flipped + "".join(rest)) == 2  # one label changed: refused
    assert "dataset.sha256" in capsys.readouterr().err
