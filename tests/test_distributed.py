"""Multi-process collection under torchrun: two gloo ranks on the CPU write one store
equal, bit for bit, to one process; a rank killed mid-run is named, and the rerun completes the same store.

Every run is a subprocess with ``OMP_NUM_THREADS=1``, the thread count torchrun gives each rank, so that the
single-process reference runs the same numerics (README: "Multi-process collection"). Faults are injected as in
test_faults.py: a launcher script wraps a function on one rank before it runs the command line."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import random_texts

from npeff_lens.store import PEFStore

pytestmark = pytest.mark.distributed

N = 40  # 10 batches of 4: 5 rounds of two ranks
ARGS = [
    *"--model tiny-llama --template".split(),
    "Review: {text} Sentiment:",
    "--labels",
    " bad",
    " sad",
    *"--proj-dim 128 --dtype float32 --batch-size 4 --shard-size 8 --flush-every 8 --split none --no-progress".split(),
]

# Runs the command line on each rank; on rank KILL, SIGKILL at its AT-th batch; on rank SEED_RANK, another --seed.
LAUNCH = textwrap.dedent(
    """
    import os, sys
    rank, kill, at, seed_rank = int(os.environ["RANK"]), int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[4:] + (["--seed", "1"] if rank == seed_rank else [])
    if rank == kill:
        from npeff_lens.pef import PEFComputer
        original, calls = PEFComputer.compute, [0]
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), 9)
            return original(*a, **k)
        PEFComputer.compute = wrapped
    from npeff_lens.cli import main
    sys.exit(main(argv))
    """
)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(tmp_path, out, kill=-1, at=0, seed_rank=-1):
    """``torchrun --nproc-per-node 2`` of the launcher: ``npeff collect`` on each rank."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    data = str(tmp_path.parent / "data.jsonl")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script)]
    cmd = [*launcher, str(kill), str(at), str(seed_rank), "collect", *ARGS, "--dataset", data, "--out", str(out)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)


def _one_process(data, out):
    cmd = [sys.executable, "-m", "npeff_lens.cli", "collect", *ARGS, "--dataset", str(data), "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The dataset and one single-process collection of it (same thread count as a torchrun rank)."""
    root = tmp_path_factory.mktemp("dist")
    with open(root / "data.jsonl", "w") as f:
        for i, text in enumerate(random_texts(N, seed=0, max_words=12)):
            f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    _one_process(root / "data.jsonl", root / "one")
    return root


def _run_dir(reference, name):
    d = reference / name
    d.mkdir()
    return d


def _same_store(a: PEFStore, b: PEFStore):
    assert len(a) == len(b) == N and a.missing == b.missing == []
    assert torch.equal(a.load_pefs(dtype=a.dtype), b.load_pefs(dtype=b.dtype))  # bitwise
    assert a.read_metadata() == b.read_metadata()
    assert [m["index"] for m in b.read_metadata()] == list(range(N))


def test_two_gloo_ranks_write_the_store_of_one_process(reference):
    tmp = _run_dir(reference, "two")
    proc = _torchrun(tmp, tmp / "pefs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("PEFStore(") == 1  # reported once, by rank 0
    b = PEFStore(tmp / "pefs")
    _same_store(PEFStore(reference / "one"), b)
    assert b.manifest["config"] == PEFStore(reference / "one").manifest["config"]


@pytest.mark.parametrize("killed", [1, 0], ids=["rank-1", "rank-0-the-writer"])
def test_a_killed_rank_is_named_and_the_rerun_equals_one_process(reference, killed):
    tmp = _run_dir(reference, f"killed{killed}")
    out = tmp / "pefs"
    proc = _torchrun(tmp, out, kill=killed, at=3)  # dies in round 3, after rounds 1-2 (16 examples) are committed
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if "npeff collect" in x and "CPU thread(s)" not in x]
    assert len(lines) == 1, proc.stderr[-3000:]  # one report, from the surviving rank
    assert f"rank {killed} (pid " in lines[0] and "died while the ranks collected examples [16, 24)" in lines[0]
    assert "rerun the same command" in lines[0]
    if killed == 1:
        assert "keeps its 16 committed examples" in lines[0]
    root_cause = proc.stderr.split("Root Cause")[1]  # torchrun's own report names the rank and the signal
    assert f"rank      : {killed} (local_rank: {killed})" in root_cause and "SIGKILL" in root_cause
    assert 0 < len(PEFStore(out)) < N  # really mid-run
    if killed == 1:
        proc = _torchrun(tmp, out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:  # the plan does not depend on the number of processes: one process resumes a torchrun store too
        _one_process(reference / "data.jsonl", out)
    _same_store(PEFStore(reference / "one"), PEFStore(out))


def test_ranks_given_different_configurations_all_stop_with_one_line(reference):
    tmp = _run_dir(reference, "disagree")
    proc = _torchrun(tmp, tmp / "pefs", seed_rank=1)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if "npeff collect" in x and "CPU thread(s)" not in x]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "[rank 0/2]: error: rank 1 was given another collection than rank 0" in lines[0]
    assert "config.seed: rank 0 0, rank 1 1" in lines[0]
    # The first rank to exit does so with the command line's error status; torchrun may stop the other one
    # (SIGTERM) before it exits on its own, so its status is 2 or that signal: which one is a race.
    root_cause = proc.stderr.split("Root Cause")[1]
    assert "exitcode  : 2" in root_cause, proc.stderr[-3000:]
    statuses = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert statuses and set(statuses) <= {"2", str(-signal.SIGTERM)}, proc.stderr[-3000:]
    assert not (tmp / "pefs").exists()  # nothing written


def test_a_signal_never_cuts_a_store_write():
    from npeff_lens.distributed import _Signals, _Stopped

    done, previous = [], signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(_Stopped), _Signals() as signals:
            with signals.writing():
                os.kill(os.getpid(), signal.SIGTERM)  # torchrun stopping this rank mid-write
                done.append("write finished")
            done.append("not reached")
        assert done == ["write finished"]
        os.kill(os.getpid(), signal.SIGTERM)  # after a failure, a second SIGTERM waits: the report gets out
    finally:
        signal.signal(signal.SIGTERM, previous)
