"""Fault injection: an interrupted or damaged run loses at most the unit that was hit.

Each fault is injected on purpose (SIGKILL at a chosen call, flipped bytes, truncated files, a full disk, a
second writer) into a tiny-llama run, and each test asserts equality with an uninterrupted run or a named
error, never just "no exception"."""

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import LABELS, TEMPLATE, random_texts

from npeff_lens.cli import main
from npeff_lens.collect import Interrupted, PendingBatch, _Writer, collect_pefs
from npeff_lens.decomposition import NPEFF
from npeff_lens.errors import CorruptFileError
from npeff_lens.pef import PEFComputer
from npeff_lens.runs import RUN_FILE, decompose_store, run_perturbation
from npeff_lens.store import CorruptStoreError, MissingExamplesError, PEFStore
from npeff_lens.tasks import LabelTokens

KW = dict(proj_dim=128, dtype="float32", batch_size=4, shard_size=8, flush_every=8, progress=False)
FIT = dict(n_components=3, n_steps=30, n_warmup_steps=10, checkpoint_every=10, progress=False)


def _texts(n=40, seed=0):
    return random_texts(n, seed, max_words=6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, adapter):
    """An uninterrupted collection, decomposition and perturbation."""
    root = tmp_path_factory.mktemp("faults_ref")
    store = collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), root / "pefs", **KW)
    est = decompose_store(root / "pefs", root / "npeff", **FIT)
    perturb = run_perturbation(
        root / "npeff", 2, magnitude=0.5, top_k=4, n_baseline=8, out=root / "p", adapter=adapter, progress=False
    )
    return root, store, est, perturb


def _same_store(a: PEFStore, b: PEFStore):
    assert len(a) == len(b) and a.missing == b.missing == []
    assert torch.equal(a.load_pefs(dtype=a.dtype), b.load_pefs(dtype=b.dtype))  # bitwise
    assert a.read_metadata() == b.read_metadata()


def _flip(path, offset=-5):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _shard_entry(store_path, k):
    return json.loads((store_path / "index.jsonl").read_text().splitlines()[k])


def _collected_with_shard(tmp_path, adapter, k, part):
    """A fresh collection of the reference texts and the path of its k-th shard's ``part`` (data or meta) file."""
    path = tmp_path / "pefs"
    collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    return path, path / "shards" / _shard_entry(path, k)[part]


# --------------------------------------------------------------------------------------------------
# The store: a damaged shard costs its own examples, nothing more.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip_data", "truncate_data", "flip_meta", "delete_data"])
def test_a_damaged_middle_shard_costs_only_its_examples(tmp_path, adapter, reference, damage, monkeypatch, capsys):
    _, ref, _, _ = reference
    path, f = _collected_with_shard(tmp_path, adapter, 2, "meta" if damage == "flip_meta" else "data")  # [16, 24)
    if damage.startswith("flip"):
        _flip(f)
    elif damage == "truncate_data":
        f.write_bytes(f.read_bytes()[:-9])
    else:
        f.unlink()
    with pytest.raises(CorruptStoreError) as info:
        s = PEFStore(path)
        s.load_pefs()
        s.read_metadata()
    assert "examples [16, 24)" in str(info.value) and f.name in str(info.value) and "npeff repair" in str(info.value)
    assert main(["repair", str(path)]) == 0
    out = capsys.readouterr().out
    assert "missing examples [16, 24)" in out and "32 examples intact" in out
    with pytest.raises(MissingExamplesError, match=r"\[16, 24\)"):
        PEFStore(path).load_pefs()
    seen = []
    compute = PEFComputer.compute
    monkeypatch.setattr(PEFComputer, "compute", lambda self, p, **k: seen.append(len(p)) or compute(self, p, **k))
    collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    assert sum(seen) == 8  # only the damaged shard's examples were recollected
    _same_store(PEFStore(path), ref)


def test_a_damaged_index_line_costs_its_shard(tmp_path, adapter, reference):
    _, ref, _, _ = reference
    path = tmp_path / "pefs"
    collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    lines = (path / "index.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20] + "#" + lines[1][21:]
    (path / "index.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptStoreError, match="index.*damaged line 2"):
        PEFStore(path)
    report = PEFStore.repair(path)
    assert report["missing"] == [(8, 16)] and report["kept"] == 32
    collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    _same_store(PEFStore(path), ref)


def test_a_full_disk_leaves_the_store_valid_and_the_rerun_completes(tmp_path, adapter, reference, monkeypatch):
    import npeff_lens.io as io

    _, ref, _, _ = reference
    path = tmp_path / "pefs"
    real, calls = io.os.fsync, []

    def fsync(fd):  # the 5th durable write (the 2nd shard's data file) finds the disk full
        calls.append(fd)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    monkeypatch.setattr(io.os, "fsync", real)
    s = PEFStore(path)
    assert len(s) == 8 and s.missing == [] and not [p for p in (path / "shards").iterdir() if ".tmp" in p.name]
    collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    _same_store(PEFStore(path), ref)


HOLD = textwrap.dedent(
    """
    import os, sys, time
    from npeff_lens.store import PEFStore
    s = PEFStore.create(sys.argv[1], {"m": 1}, rows=1, dim=2)
    s.append([[[1.0, 2.0]]], [{}])
    print("locked", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), 9)
    time.sleep(60)
    """
)


def _env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_a_second_writer_gets_one_line_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    from npeff_lens.store import StoreLockedError

    path = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "hold"], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(StoreLockedError, match=rf"pid {holder.pid} on {socket.gethostname()}"):
            PEFStore.create(path, {"m": 1}, rows=1, dim=2)
        assert main(["repair", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "wait for it or stop it" in err[0]
    finally:
        holder.kill()
        holder.wait()
    dead = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-c", HOLD, str(dead), "die"], env=_env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    s = PEFStore.create(dead, {"m": 1}, rows=1, dim=2)  # the dead process's lock is free again
    assert len(s) == 0
    s.close()


@pytest.mark.parametrize("damage", ["flip_data", "flip_meta"])
def test_collect_on_a_finished_store_names_a_damaged_shard(tmp_path, adapter, reference, damage, monkeypatch, capsys):
    _, ref, _, _ = reference
    path, f = _collected_with_shard(tmp_path, adapter, 3, "data" if damage == "flip_data" else "meta")  # [24, 32)
    _flip(f)  # sizes and the .npy header stay right: only the checksum can tell
    seen = []
    compute = PEFComputer.compute
    monkeypatch.setattr(PEFComputer, "compute", lambda self, p, **k: seen.append(len(p)) or compute(self, p, **k))
    with pytest.raises(CorruptStoreError) as info:
        collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    message = str(info.value)
    assert f.name in message and "examples [24, 32)" in message and f"npeff repair {path}" in message
    assert "\n" not in message and seen == []  # one line; nothing computed
    assert main(["repair", str(path)]) == 0  # the failed collect released the store
    assert "missing examples [24, 32)" in capsys.readouterr().out
    collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW)
    assert sum(seen) == 8  # only the damaged shard's examples were recollected
    _same_store(PEFStore(path), ref)


@pytest.mark.parametrize("in_flight", [False, True])
def test_a_failure_while_the_next_batch_computes_keeps_the_batch_computed_before_it(
    tmp_path, adapter, reference, monkeypatch, in_flight
):
    """On CUDA, collection queues batch k + 1 before it writes batch k (so that the write overlaps the device's
    work; ``in_flight`` makes the CPU run that order too): an error in batch k + 1 (here out of memory; a sticky
    CUDA error, which fails every later CUDA call, would also lose batch k) must still leave batch k in the store,
    committed, and the rerun completes it."""
    _, ref, _, _ = reference
    order = []
    monkeypatch.setattr(PendingBatch, "in_flight", property(lambda self: in_flight))
    monkeypatch.setattr(
        _Writer, "write", lambda self, lo, *a, write=_Writer.write: order.append(("write", lo)) or write(self, lo, *a)
    )
    compute, calls = PEFComputer.compute, [0]

    def failing(self, prompts, **k):
        calls[0] += 1
        order.append(("compute", calls[0]))
        if calls[0] == 4:  # batches 1-3 computed; in flight, batch 3 is waiting to be written
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return compute(self, prompts, **k)

    monkeypatch.setattr(PEFComputer, "compute", failing)
    path = tmp_path / "pefs"
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **{**KW, "flush_every": 1000})
    s = PEFStore(path)
    assert len(s) == s.manifest["count"] == 12  # batches 1-3 (in flight, the third written after the failure)
    s.verify()
    if in_flight:
        expected = [
            ("compute", 1),
            ("compute", 2),
            ("write", 0),
            ("compute", 3),
            ("write", 4),
            ("compute", 4),
            ("write", 8),
        ]
    else:
        expected = [
            ("compute", 1),
            ("write", 0),
            ("compute", 2),
            ("write", 4),
            ("compute", 3),
            ("write", 8),
            ("compute", 4),
        ]
    assert order == expected
    monkeypatch.setattr(PEFComputer, "compute", compute)
    _same_store(collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **KW), ref)


def test_a_signal_while_a_batch_is_written_keeps_the_batch_queued_meanwhile(tmp_path, adapter, monkeypatch):
    """In flight (CUDA), batch k + 1 is computed while batch k waits: a SIGTERM during batch k's write is raised
    once it is written, and batch k + 1, computed before the signal, is written too."""
    monkeypatch.setattr(PendingBatch, "in_flight", property(lambda self: True))
    write, calls = _Writer.write, [0]

    def signalling(self, lo, *a):
        calls[0] += 1
        if calls[0] == 2:  # writing examples [4, 8) while [8, 12) is computed and waiting
            os.kill(os.getpid(), signal.SIGTERM)
        return write(self, lo, *a)

    monkeypatch.setattr(_Writer, "write", signalling)
    path = tmp_path / "pefs"
    with pytest.raises(Interrupted, match="keeps its 12 committed examples"):
        collect_pefs(adapter, _texts(), LabelTokens(TEMPLATE, LABELS), path, **{**KW, "flush_every": 1000})
    s = PEFStore(path)
    assert len(s) == s.manifest["count"] == 12 and calls[0] == 3
    s.verify()


# --------------------------------------------------------------------------------------------------
# Interruptions: SIGTERM (timeout, a scheduler's preemption) is handled like Ctrl-C.
# --------------------------------------------------------------------------------------------------

# `npeff collect` with PEFComputer.compute pausing at its PAUSE-th call (the batches before it appended, none
# committed yet), once per output directory in OUTS (os.pathsep-separated): several collections, one process.
PAUSING_COLLECT = textwrap.dedent(
    """
    import os, sys, time
    from npeff_lens.cli import main
    from npeff_lens.pef import PEFComputer
    pause, outs, argv = int(sys.argv[1]), sys.argv[2].split(os.pathsep), sys.argv[3:]
    compute, calls = PEFComputer.compute, [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == pause:
            print("paused", flush=True)
            time.sleep(120)
        return compute(*a, **k)
    PEFComputer.compute = wrapped
    for out in outs:
        status = main([*argv, "--out", out])
        if status:
            sys.exit(status)
    """
)


def test_sigterm_mid_collection_commits_what_was_computed_and_the_rerun_completes_it(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(24)))
    argv = shlex.split(
        "collect --model tiny-llama --template 'Review: {text} Sentiment:' --labels ' bad' ' sad' --proj-dim 128"
        " --dtype float32 --batch-size 4 --shard-size 1000 --flush-every 1000 --no-progress"
    )
    argv += ["--dataset", str(data)]
    script = tmp_path / "collect.py"
    script.write_text(PAUSING_COLLECT)
    env = dict(_env(), OMP_NUM_THREADS="1")  # both processes run the same numerics
    out, ref = tmp_path / "pefs", tmp_path / "ref"
    proc = subprocess.Popen(
        [sys.executable, str(script), "3", str(out), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.strip() == "paused":  # 8 examples appended, none committed by count
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = [x for x in err.splitlines() if "interrupted" in x]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("npeff collect: interrupted by SIGTERM") and "keeps its 8 committed examples" in lines[0]
    assert "rerun the same command" in lines[0]
    s = PEFStore(out)
    assert len(s) == s.manifest["count"] == 8
    s.verify()
    # the rerun completes it; then an uninterrupted collection in the same process, for reference
    done = subprocess.run(
        [sys.executable, str(script), "0", os.pathsep.join([str(out), str(ref)]), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(PEFStore(ref)) > 8
    _same_store(PEFStore(out), PEFStore(ref))


def test_sigterm_is_raised_like_sigint_never_inside_a_store_write_and_the_handlers_are_restored():
    import threading

    from npeff_lens.collect import Interrupted, _Interruptions

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(Interrupted) as info, _Interruptions() as signals:
        assert signal.getsignal(signal.SIGTERM) == signals._handle  # else the kill below would end the tests
        with signals.writing():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("write finished")
        done.append("not reached")
    assert done == ["write finished"] and isinstance(info.value, KeyboardInterrupt)
    assert info.value.signum == signal.SIGTERM and "SIGTERM" in str(info.value)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    seen = []

    def elsewhere():  # only the main thread installs handlers
        with _Interruptions():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert seen == [before[0]]


# --------------------------------------------------------------------------------------------------
# Decomposition: SIGKILL at several points; damaged checkpoints and results are named.
# --------------------------------------------------------------------------------------------------

KILL_DECOMPOSE = textwrap.dedent(
    """
    import os, sys
    import npeff_lens.nmf as D
    import npeff_lens.io as io
    from npeff_lens.runs import decompose_store
    store, out, where, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    target = (D, "sweep") if where == "sweep" else (io.os, "replace")
    original, calls = getattr(*target), [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), 9)
        return original(*a, **k)
    setattr(*target, wrapped)
    decompose_store(store, out, **{FIT!r})
    """
).replace("{FIT!r}", repr(FIT))


@pytest.mark.parametrize(
    "where, n",
    [
        ("replace", 1),
        ("sweep", 5),
        ("sweep", 15),
        ("sweep", 27),
        ("replace", 6),
        ("replace", 11),
        ("replace", 12),
        ("replace", 13),
    ],
    ids=[
        "before-first-write",
        "warm-up",
        "after-checkpoint",
        "late",
        "checkpoint-rename",
        "result-rename",
        "config",
        "final-record",
    ],
)
def test_decompose_killed_anywhere_then_rerun_equals_uninterrupted(tmp_path, reference, where, n):
    root, _, ref, _ = reference
    out = tmp_path / "npeff"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DECOMPOSE, str(root / "pefs"), str(out), where, str(n)],
        env=_env(),
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    again = decompose_store(root / "pefs", out, **FIT)
    assert torch.equal(again.components_, ref.components_) and torch.equal(again.coefficients_, ref.coefficients_)
    assert json.loads((out / RUN_FILE).read_text())["status"] == "done"


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, reference):
    root, _, ref, _ = reference
    out = tmp_path / "npeff"
    calls = []

    def stop_at_25(step, loss):
        calls.append(step)
        if step == 25:
            raise KeyboardInterrupt

    est = NPEFF(**{**FIT, "checkpoint_dir": out / "checkpoints"}, callback=stop_at_25)
    with pytest.raises(KeyboardInterrupt):
        est.fit(PEFStore(root / "pefs"))
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 20 and latest["previous"]["step"] == 10
    _flip(out / "checkpoints" / latest["dir"] / "state.safetensors")
    with pytest.warns(RuntimeWarning, match=r"step 20 is damaged.*state\.safetensors.*checksum"):
        again = NPEFF(**{**FIT, "checkpoint_dir": out / "checkpoints"}).fit(PEFStore(root / "pefs"))
    assert torch.equal(again.components_, ref.components_)


def test_a_damaged_result_is_named_and_refitted_from_the_checkpoints(tmp_path, reference, capsys):
    root, _, ref, _ = reference
    out = tmp_path / "npeff"
    decompose_store(root / "pefs", out, **FIT)
    _flip(out / "npeff.safetensors", offset=-3)
    with pytest.raises(CorruptFileError, match=r"npeff\.safetensors is damaged"):
        NPEFF.load(out)
    assert main(["top", str(out)]) == 2
    assert "npeff.safetensors is damaged" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="fitting again from the last intact checkpoint"):
        again = decompose_store(root / "pefs", out, **FIT)
    assert torch.equal(again.components_, ref.components_)
    assert torch.equal(NPEFF.load(out).coefficients_, ref.coefficients_)


# --------------------------------------------------------------------------------------------------
# Perturbation: killed between components; a damaged results table is recomputed.
# --------------------------------------------------------------------------------------------------

KILL_PERTURB = textwrap.dedent(
    """
    import os, sys
    import npeff_lens.perturb as P
    from npeff_lens.runs import run_perturbation
    original, calls = P.perturb_component, [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), 9)
        return original(*a, **k)
    P.perturb_component = wrapped
    run_perturbation(sys.argv[1], 2, magnitude=0.5, top_k=4, n_baseline=8, out=sys.argv[2], progress=False)
    """
)


def _records(summary):
    """The records without ``recovery_seconds``, the one field (wall time) that a rerun cannot repeat."""
    return [{k: v for k, v in r.items() if k != "recovery_seconds"} for r in json.loads(json.dumps(summary["records"]))]


def test_perturb_killed_between_components_resumes_to_the_same_table(tmp_path, reference, adapter):
    root, _, _, ref = reference
    out = tmp_path / "p"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_PERTURB, str(root / "npeff"), str(out)], env=_env(), capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [r["component"] for r in json.loads((out / "perturbation.json").read_text())["components"]] == [0]
    again = run_perturbation(
        root / "npeff", 2, magnitude=0.5, top_k=4, n_baseline=8, out=out, adapter=adapter, progress=False
    )
    assert _records(again) == _records(ref)


def test_a_damaged_perturbation_table_is_recomputed(tmp_path, reference, adapter):
    root, _, _, ref = reference
    out = tmp_path / "p"
    run_perturbation(root / "npeff", 2, magnitude=0.5, top_k=4, n_baseline=8, out=out, adapter=adapter, progress=False)
    table = out / "perturbation.json"
    table.write_bytes(table.read_bytes()[:50])
    with pytest.warns(RuntimeWarning, match=r"perturbation\.json is damaged"):
        again = run_perturbation(
            root / "npeff", 2, magnitude=0.5, top_k=4, n_baseline=8, out=out, adapter=adapter, progress=False
        )
    assert _records(again) == _records(ref)


# --------------------------------------------------------------------------------------------------
# Bad input named.
# --------------------------------------------------------------------------------------------------


def test_more_components_than_examples_and_k_beyond_the_support_are_named(reference, tmp_path, capsys):
    root, _, _, _ = reference
    argv = ["decompose", "--store", str(root / "pefs"), "--out", str(tmp_path / "d"), "--no-progress"]
    assert main([*argv, "--components", "100"]) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "CPU thread(s)" not in x]
    assert len(err) == 1 and "100" in err[0] and "40 examples" in err[0]
    assert main(["top", str(root / "npeff"), "--k", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--k 100" in err[0] and "40 examples" in err[0]


def test_a_multi_token_label_is_named_with_its_tokens(adapter):
    with pytest.warns(UserWarning, match=r"label ' extraordinarily positive' is \d+ tokens .*first token"):
        LabelTokens(TEMPLATE, [" bad", " extraordinarily positive"], multi_token="first").bind(adapter)
    with pytest.raises(ValueError, match=r"label ' extraordinarily positive' is \d+ tokens after the prompt \(\["):
        LabelTokens(TEMPLATE, [" bad", " extraordinarily positive"]).bind(adapter)
    with pytest.warns(UserWarning, match=r"no leading space.*did you mean ' sad'"):
        LabelTokens(TEMPLATE, [" bad", "sad"]).bind(adapter)


# --------------------------------------------------------------------------------------------------
# The later steps: compare, unlearn, report.
# --------------------------------------------------------------------------------------------------

KILL_STEP = textwrap.dedent(
    """
    import os, sys, importlib
    module, name, n, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    target = importlib.import_module(module)
    original, calls = getattr(target, name), [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), 9)
        return original(*a, **k)
    setattr(target, name, wrapped)
    from npeff_lens.cli import main
    main(sys.argv[5:])
    """
)


def _kill(module, name, n, argv):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_STEP, module, name, str(n), "x", *argv], env=_env(), capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def _same_compare_tables(ref_dir, run_dir) -> dict:
    """Asserts the two runs' compare.json tables are equal but for timing and memory; returns the first's."""
    a, b = (json.loads((d / "npeff" / "compare" / "compare.json").read_text())["methods"] for d in (ref_dir, run_dir))
    strip = ("fit_seconds", "peak_rss_mib")
    assert {m: {k: v for k, v in r.items() if k not in strip} for m, r in a.items()} == {
        m: {k: v for k, v in r.items() if k not in strip} for m, r in b.items()
    }
    return a


def test_compare_killed_in_the_sae_fit_reruns_only_the_sae_and_equals_uninterrupted(tmp_path, reference):
    root, _, _, _ = reference
    args = ["--components", "3", "--k", "4", "--sae-tokens", "2000", "--no-progress"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        shutil.copytree(root / "npeff", d / "npeff", ignore=shutil.ignore_patterns("compare", "report"))
        shutil.copytree(root / "pefs", d / "pefs")
        run = json.loads((d / "npeff" / RUN_FILE).read_text())
        assert run["source"]["relative"] == "../pefs"  # the copied tree finds its own store
    assert main(["compare", str(ref_dir / "npeff"), *args]) == 0
    _kill("npeff_lens.baselines.sae", "activations", 1, ["compare", str(run_dir / "npeff"), *args])
    assert json.loads((run_dir / "npeff" / "compare" / "grad-cluster" / RUN_FILE).read_text())["status"] == "done"
    assert json.loads((run_dir / "npeff" / "compare" / "sae" / RUN_FILE).read_text())["status"] == "running"
    assert main(["compare", str(run_dir / "npeff"), *args]) == 0
    _same_compare_tables(ref_dir, run_dir)


def test_compare_killed_in_selectivity_resumes_after_the_measured_components(tmp_path, reference):
    root, _, _, _ = reference
    args = shlex.split(
        "--methods npeff,snmf --components 3 --k 4 --snmf-iterations 20 --selectivity --target-kl 0.0002"
        " --n-baseline 8 --no-progress"
    )
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        shutil.copytree(root / "npeff", d / "npeff", ignore=shutil.ignore_patterns("compare", "report"))
        shutil.copytree(root / "pefs", d / "pefs")
    assert main(["compare", str(ref_dir / "npeff"), *args]) == 0
    _kill("npeff_lens.selectivity", "component_selectivity", 5, ["compare", str(run_dir / "npeff"), *args])
    sel = run_dir / "npeff" / "compare" / "snmf" / "selectivity"
    assert json.loads((sel / RUN_FILE).read_text())["status"] == "running"
    assert [r["component"] for r in json.loads((sel / "selectivity.json").read_text())["components"]] == [0]
    assert main(["compare", str(run_dir / "npeff"), *args]) == 0
    a = _same_compare_tables(ref_dir, run_dir)
    assert a["npeff"]["selectivity_n_evaluated"] == 3
    (sel / "selectivity.json").write_text('{"components": [')  # a torn results file: measured again, equal
    with pytest.warns(RuntimeWarning, match="selectivity.json is damaged"):
        assert main(["compare", str(run_dir / "npeff"), *args]) == 0
    c = json.loads((run_dir / "npeff" / "compare" / "compare.json").read_text())["methods"]
    assert c["snmf"]["selectivity_per_component"] == a["snmf"]["selectivity_per_component"]
    # Measuring the first component only, then all: the second run measures only the others, and equals one run.
    part = tmp_path / "part"
    shutil.copytree(ref_dir / "npeff", part / "npeff", ignore=shutil.ignore_patterns("selectivity"))
    shutil.copytree(root / "pefs", part / "pefs")
    assert main(["compare", str(part / "npeff"), *args, "--selectivity-components", "1"]) == 0
    p = json.loads((part / "npeff" / "compare" / "compare.json").read_text())["methods"]
    assert p["snmf"]["selectivity_per_component"] == a["snmf"]["selectivity_per_component"][:1]
    _kill("npeff_lens.selectivity", "component_selectivity", 2, ["compare", str(part / "npeff"), *args])  # no redo
    sel = part / "npeff" / "compare" / "npeff" / "selectivity"
    assert [r["component"] for r in json.loads((sel / "selectivity.json").read_text())["components"]] == [0, 1]
    assert main(["compare", str(part / "npeff"), *args]) == 0
    p = json.loads((part / "npeff" / "compare" / "compare.json").read_text())["methods"]
    assert {m: r["selectivity_per_component"] for m, r in p.items()} == {
        m: r["selectivity_per_component"] for m, r in a.items()
    }


def test_unlearn_killed_mid_run_reruns_to_the_same_report(tmp_path, reference):
    root, _, _, _ = reference
    args = shlex.split(
        "--components 0 --n-batches 2 --retain-batch-size 4 --n-random 4 --k-eval 2 --k-mitigation 2 --no-progress"
    )
    assert main(["unlearn", str(root / "npeff"), "--out", str(tmp_path / "ref"), *args]) == 0
    _kill(
        "npeff_lens.applications.unlearning",
        "unlearning_objective",
        3,
        ["unlearn", str(root / "npeff"), "--out", str(tmp_path / "run"), *args],
    )
    assert not (tmp_path / "run" / "unlearning.json").exists()
    assert main(["unlearn", str(root / "npeff"), "--out", str(tmp_path / "run"), *args]) == 0
    a = json.loads((tmp_path / "ref" / "unlearning.json").read_text())
    b = json.loads((tmp_path / "run" / "unlearning.json").read_text())
    assert a["per_component"] == b["per_component"] and a["summary"] == b["summary"]


def test_report_killed_mid_build_rebuilds_the_same_site(tmp_path, reference):
    root, _, _, _ = reference
    argv = ["report", str(root / "npeff"), "--no-progress", "--n-attributed", "2", "--out"]
    assert main([*argv, str(tmp_path / "ref")]) == 0
    _kill("npeff_lens.io", "atomic_write", 3, [*argv, str(tmp_path / "run")])
    assert main([*argv, str(tmp_path / "run")]) == 0
    ref = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*") if p.is_file())
    run = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert ref == run
    for rel in ref:
        if rel.suffix == ".json":
            a, b = json.loads((tmp_path / "ref" / rel).read_text()), json.loads((tmp_path / "run" / rel).read_text())
            a.pop("generated", None), b.pop("generated", None)
            assert a == b, rel
