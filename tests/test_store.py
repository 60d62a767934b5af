"""PEFStore: round trips, resumption, kill -9 at every stage of a commit, corruption, estimator input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from npeff_lens.store import CorruptStoreError, MissingExamplesError, PEFStore, StoreLockedError, StoreMismatchError

ROWS, DIM, N = 2, 6, 40

# The collection loop, shared by the killed child processes and the in-process reference runs: examples
# in chunks of 3, a flush every other chunk, shards of 4. KILL (set by the child) injects a SIGKILL.
COLLECT = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    from npeff_lens import store as store_mod
    from npeff_lens.store import PEFStore

    ROWS, DIM, N = 2, 6, 40
    MANIFEST = {"model": "tiny", "projection": {"seed": 3, "dim": DIM}, "layout": [["w", [2, 3]]]}

    def example_data():
        rng = np.random.default_rng(0)
        pefs = rng.standard_normal((N, ROWS, DIM)).astype(np.float32)
        meta = [
            {"index": i, "label": i % 2, "prediction": (i // 2) % 2, "probs": [0.25, 0.75],
             "pef_norm": float(np.linalg.norm(pefs[i])), "flag": None if i % 5 else "low", "text": f"ex {i}"}
            for i in range(N)
        ]
        return pefs, meta

    def run(path, dtype="float16", report=None, pause=0.0):
        pefs, meta = example_data()
        store = PEFStore.create(path, MANIFEST, rows=ROWS, dim=DIM, dtype=dtype, shard_size=4)
        for a, b in store.missing:  # ranges whose damaged shards repair removed, as the collector does
            for start in range(a, b, 3):
                store.fill(start, pefs[start:min(start + 3, b)], meta[start:min(start + 3, b)])
        for k, start in enumerate(range(len(store), N, 3)):
            stop = min(start + 3, N)
            store.append(pefs[start:stop], meta[start:stop])
            if k % 2 == 1:
                store.flush()
                if report:
                    print(f"committed {store.committed}", flush=True)
            time.sleep(pause)
        store.flush()
        store.close()

    def kill_on_call(obj, name, n, partial=None):
        # Replaces obj.name so that its n-th call dies by SIGKILL (after `partial(args)` when given).
        original, calls = getattr(obj, name), [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                if partial is not None:
                    partial(*args)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(obj, name, wrapped)
    """
)

CHILD = COLLECT + textwrap.dedent(
    """
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "external":
        run(path, report=True, pause=0.05)
    else:
        if mode == "in_data_write":  # half the .npy bytes of the 3rd shard written to its temp file
            def half(self, data):
                data = memoryview(data).cast("B")
                self.f.write(data[: len(data) // 2]); self.f.flush()
            kill_on_call(store_mod._CrcWriter, "write", 2 * 2 + 2, partial=half)  # 2 writes (header, body) per shard
        elif mode == "before_index":  # both shard files in place, index line not written
            kill_on_call(store_mod.PEFStore, "_append_index_line", 3)
        elif mode == "torn_index":  # half of the 3rd index line written
            def torn(self, line):
                with open(os.path.join(path, "index.jsonl"), "ab") as f:
                    f.write(line[: len(line) // 2]); f.flush(); os.fsync(f.fileno())
            kill_on_call(store_mod.PEFStore, "_append_index_line", 3, partial=torn)
        elif mode == "after_meta":  # the 3rd shard's metadata renamed into place, data not yet written
            kill_on_call(store_mod.os, "replace", 1 + 3 * 2 + 2)  # manifest, then (meta, data, manifest) per shard
        run(path)
    """
)

ns: dict = {}
exec(compile(COLLECT, "<collect>", "exec"), ns)
run, example_data, MANIFEST = ns["run"], ns["example_data"], ns["MANIFEST"]


def _child_env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _store_files(path):
    return sorted(os.listdir(path / "shards")) if (path / "shards").exists() else []


def _assert_same_store(a: PEFStore, b: PEFStore):
    assert len(a) == len(b)
    assert torch.equal(a.load_pefs(dtype=a.dtype), b.load_pefs(dtype=b.dtype))  # bitwise
    assert a.read_metadata() == b.read_metadata()
    assert a.metadata.to_list() == b.metadata.to_list()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "store"
    run(path)
    return PEFStore(path)


# ----------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,tdtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)]
)
def test_round_trip(tmp_path, dtype, tdtype):
    torch.manual_seed(0)
    x = torch.randn(23, ROWS, DIM)
    meta = [
        {"index": 100 + i, "label": i % 3, "probs": [i / 23, 1 - i / 23], "flag": None, "text": f"t{i}"}
        for i in range(23)
    ]
    store = PEFStore.create(tmp_path / "s", {"m": 1}, rows=ROWS, dim=DIM, dtype=dtype, shard_size=5)
    chunks = [(0, 2), (2, 3), (3, 9), (9, 10), (10, 21), (21, 23)]
    for k, (a, b) in enumerate(chunks):
        store.append(x[a:b] if k % 2 else x[a:b].numpy(), meta[a:b])
        assert len(store) == b
        if k in (1, 3):
            store.flush()
    expected = x.to(tdtype)
    # reads see buffered (unflushed) examples too
    assert torch.equal(store.load_pefs(dtype=tdtype), expected)
    store.flush()
    store.close()

    s = PEFStore(tmp_path / "s")
    assert (s.rows, s.dim, s.dtype, len(s)) == (ROWS, DIM, tdtype, 23)
    # flushed partial shards stay small; the next examples start a new shard
    counts = [json.loads(l)["count"] for l in (tmp_path / "s" / "index.jsonl").read_text().splitlines()]
    assert counts == [3, 5, 2, 5, 5, 3] and sum(counts) == 23
    assert s.manifest["count"] == 23 and s.manifest["m"] == 1 and s.manifest["dtype"] == dtype
    assert s.manifest["rows"] == ROWS and s.manifest["dim"] == DIM and "package_version" in s.manifest
    assert torch.equal(s.load_pefs(dtype=tdtype), expected)
    assert torch.equal(s.load_pefs(), expected.float())
    idx = [22, 0, 7, 7, 13, 3]
    assert torch.equal(s.load_pefs(idx, dtype=tdtype), expected[idx])
    assert torch.equal(s.load_pefs(torch.tensor(idx)), expected[idx].float())
    assert s.load_pefs([]).shape == (0, ROWS, DIM)
    with pytest.raises(IndexError):
        s.load_pefs([23])

    for bs in (None, 1, 4, 5, 7, 100):
        for start, stop in ((0, None), (4, 18), (5, 10), (22, 23), (10, 10), (0, 1000)):
            got = list(s.iter_batches(bs, start=start, stop=stop))
            lo, hi, _ = slice(start, stop).indices(23)
            if hi <= lo:
                assert got == []
                continue
            assert got[0][0] == lo
            pos = lo
            for first, batch in got:
                assert first == pos and batch.dtype == tdtype and batch.shape[1:] == (ROWS, DIM)
                if bs is not None:
                    assert batch.shape[0] == min(bs, hi - pos)
                pos += batch.shape[0]
            assert pos == hi
            assert torch.equal(torch.cat([b for _, b in got]), expected[lo:hi])
    assert [len(b) for _, b in s.iter_batches()] == counts  # one batch per shard

    assert s.read_metadata() == meta
    assert s.read_metadata(4, 12) == meta[4:12]
    ds = s.metadata
    assert ds.num_rows == 23 and ds["index"] == [100 + i for i in range(23)] and ds["text"][5] == "t5"
    s.verify()
    assert "examples=23" in repr(s) and "shards=6" in repr(s)


def test_empty_store(tmp_path):
    s = PEFStore.create(tmp_path / "e", {}, rows=3, dim=4)
    assert len(s) == 0 and list(s.iter_batches()) == [] and list(s.iter_batches(2)) == []
    assert s.metadata.num_rows == 0 and s.read_metadata() == []
    assert s.load_pefs().shape == (0, 3, 4)
    s.flush()  # nothing to write
    s.verify()
    s.close()
    r = PEFStore(tmp_path / "e")
    assert len(r) == 0 and r.manifest["count"] == 0


def test_bad_input(tmp_path):
    s = PEFStore.create(tmp_path / "b", {}, rows=2, dim=3, shard_size=4)
    good = torch.ones(2, 2, 3)
    s.append(good, [{}, {}])
    bad = good.clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"examples \[3\] contain NaN"):
        s.append(bad, [{}, {}])
    inf = good.clone()
    inf[0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        s.append(inf, [{}, {}])
    with pytest.raises(ValueError, match="overflow float16"):
        s.append(good * 1e6, [{}, {}])
    with pytest.raises(ValueError, match="shape"):
        s.append(torch.ones(2, 3, 3), [{}, {}])
    with pytest.raises(ValueError, match="2 dicts"):
        s.append(good, [{}])
    with pytest.raises(ValueError, match="JSON"):
        s.append(good, [{"x": object()}, {}])
    assert len(s) == 2  # nothing of the rejected batches was added
    s.append(good, [{"x": np.float32(0.5), "v": np.arange(2)}, {"x": torch.tensor(1.0)}])
    s.flush()
    assert s.read_metadata()[2:] == [{"x": 0.5, "v": [0, 1]}, {"x": 1.0}]
    assert len(s) == 4 and torch.isfinite(s.load_pefs()).all()


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        PEFStore(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a PEF store"):
        PEFStore(tmp_path / "plain")
    with pytest.raises(ValueError, match="not empty and is not a store"):
        PEFStore.create(tmp_path / "plain", {}, rows=1, dim=2)
    with pytest.raises(ValueError, match="reserved"):
        PEFStore.create(tmp_path / "r", {"rows": 3}, rows=1, dim=2)
    with pytest.raises(ValueError, match="dtype"):
        PEFStore.create(tmp_path / "r", {}, rows=1, dim=2, dtype="float64")
    # an empty existing directory is fine
    (tmp_path / "empty").mkdir()
    assert len(PEFStore.create(tmp_path / "empty", {}, rows=1, dim=2)) == 0


# ----------------------------------------------------------------------------------------------
# Resumption
# ----------------------------------------------------------------------------------------------


def test_resume_and_mismatch(tmp_path):
    path = tmp_path / "s"
    x = torch.randn(10, 2, 3)
    manifest = {"model": "m", "projection": {"seed": 1, "dim": 3}, "eps": None}
    s = PEFStore.create(path, manifest, rows=2, dim=3, shard_size=4)
    s.append(x[:6], [{"i": i} for i in range(6)])
    with pytest.raises(StoreLockedError):
        PEFStore.create(path, manifest, rows=2, dim=3, shard_size=4)  # one writer at a time
    s.close()  # 2 unflushed examples are lost: the rerun redoes them

    s = PEFStore.create(path, json.loads(json.dumps(manifest)), rows=2, dim=3, shard_size=8)
    assert len(s) == 4
    s.append(x[4:], [{"i": i} for i in range(4, 10)])
    s.flush()
    assert torch.equal(s.load_pefs(), x.half().float())
    assert [m["i"] for m in s.read_metadata()] == list(range(10))
    s.close()

    with pytest.raises(StoreMismatchError, match=r"projection\.seed: stored 1, now 2"):
        PEFStore.create(path, {**manifest, "projection": {"seed": 2, "dim": 3}}, rows=2, dim=3)
    with pytest.raises(StoreMismatchError, match=r"task: not in the stored configuration, now 'sst2'") as info:
        PEFStore.create(path, {**manifest, "task": "sst2"}, rows=2, dim=3)
    assert "never a mix" in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(StoreMismatchError, match="model: stored 'm', not in the new configuration"):
        PEFStore.create(path, {"projection": manifest["projection"], "eps": None}, rows=2, dim=3)
    with pytest.raises(StoreMismatchError, match="rows: stored 2, now 3"):
        PEFStore.create(path, manifest, rows=3, dim=3)
    with pytest.raises(StoreMismatchError, match="dim: stored 3, now 4"):
        PEFStore.create(path, manifest, rows=2, dim=4)
    with pytest.raises(StoreMismatchError, match="dtype: stored 'float16', now 'float32'"):
        PEFStore.create(path, manifest, rows=2, dim=3, dtype="float32")
    assert len(PEFStore(path)) == 10  # the failed attempts changed nothing


@pytest.mark.parametrize("mode", ["external", "in_data_write", "after_meta", "before_index", "torn_index"])
def test_kill9_then_resume_equals_uninterrupted(tmp_path, reference, mode):
    path = tmp_path / "s"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    seen = 0
    if mode == "external":  # kill it from outside once a few shards are committed, mid-run
        for line in proc.stdout:
            seen = int(line.split()[1])
            if seen >= 12:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()

    # the kill hit where intended: what it left behind
    leftovers = _store_files(path)
    tail = (path / "index.jsonl").read_bytes()
    if mode == "in_data_write":
        assert any(".npy.tmp" in f for f in leftovers)
    elif mode in ("after_meta", "before_index"):
        assert "shard-000000000006.json" in leftovers  # an orphan: written but never committed
        assert ("shard-000000000006.npy" in leftovers) == (mode == "before_index")
    elif mode == "torn_index":
        assert not tail.endswith(b"\n")

    boundaries = np.cumsum([0] + [len(b) for _, b in reference.iter_batches()]).tolist()
    s = PEFStore(path)  # a reader: consistent, leftovers ignored
    n = len(s)
    if mode == "external":
        assert seen <= n < N and n in boundaries
    else:
        assert n == boundaries[2]  # killed during the 3rd commit: exactly the first two shards
    assert torch.equal(s.load_pefs(dtype=s.dtype), reference.load_pefs(torch.arange(n), dtype=s.dtype))
    assert s.read_metadata() == reference.read_metadata(0, n)
    s.verify()

    run(path)  # the rerun: create() reopens, clears leftovers, continues from len()
    indexed = [json.loads(l) for l in (path / "index.jsonl").read_text().splitlines()]
    assert _store_files(path) == sorted(e[k] for e in indexed for k in ("data", "meta"))  # no orphans / temp files
    done = PEFStore(path)
    done.verify()
    _assert_same_store(done, reference)


def test_reader_refresh_sees_new_commits(tmp_path):
    path = tmp_path / "s"
    w = PEFStore.create(path, {}, rows=1, dim=2, shard_size=2)
    w.append(np.ones((3, 1, 2)), [{}] * 3)
    r = PEFStore(path)
    assert len(r) == 2  # only the committed shard; the writer's buffer is its own
    w.flush()
    r.refresh()
    assert len(r) == 3 and torch.equal(r.load_pefs(), torch.ones(3, 1, 2))


def test_append_commits_by_time_as_well_as_by_count(tmp_path, monkeypatch):
    import npeff_lens.store as store_module

    assert 0 < store_module.COMMIT_SECONDS <= 60  # a kill loses at most about a minute of slow examples
    path = tmp_path / "s"
    monkeypatch.setattr(store_module, "COMMIT_SECONDS", 0.0)  # every append finds the last commit old enough
    w = PEFStore.create(path, {}, rows=1, dim=2, shard_size=100)
    w.append(np.ones((3, 1, 2)), [{}] * 3)
    assert w.committed == 3 and len(PEFStore(path)) == 3  # durable: another process's reader sees them
    w.append(np.full((2, 1, 2), 2.0), [{"i": 1}] * 2)
    assert w.committed == 5 and w.n_shards == 2 and len(PEFStore(path)) == 5
    w.commit_seconds = float("inf")  # by count only: buffered until shard_size examples or a flush
    w.append(np.ones((4, 1, 2)), [{}] * 4)
    assert w.committed == 5 and len(w) == 9 and len(PEFStore(path)) == 5
    w.flush()
    w.close()
    r = PEFStore(path)
    assert len(r) == 9 and r.n_shards == 3 and r.read_metadata(3, 5) == [{"i": 1}] * 2
    assert torch.equal(r.load_pefs()[:, 0, 0], torch.tensor([1.0] * 3 + [2.0] * 2 + [1.0] * 4))


# ----------------------------------------------------------------------------------------------
# Corruption
# ----------------------------------------------------------------------------------------------


def _shard(path, k):
    return path / "shards" / json.loads((path / "index.jsonl").read_text().splitlines()[k])["data"]


def test_truncated_shard_detected_on_open_and_repaired(tmp_path, reference):
    path = tmp_path / "s"
    run(path)
    f = _shard(path, 3)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 7)
    with pytest.raises(CorruptStoreError, match=rf"{f.name}.*examples \[10, 12\).*truncated.*repair") as info:
        PEFStore(path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CorruptStoreError):
        run(path)  # a rerun does not silently paper over it
    report = PEFStore.repair(path)
    assert report == {"kept": 38, "missing": [(10, 12)], "removed": [f.name]}
    repaired = PEFStore(path)
    assert len(repaired) == N and repaired.missing == [(10, 12)] and not f.exists()
    with pytest.raises(MissingExamplesError, match=r"examples \[10, 12\) .* missing.*recollect"):
        repaired.load_pefs()
    assert repaired.load_pefs([0, 39]).shape == (2, 2, 6)  # intact examples still read
    with pytest.raises(MissingExamplesError):
        repaired.read_metadata(9, 11)
    run(path)  # ... and the rerun recollects exactly examples 10 and 11
    _assert_same_store(PEFStore(path), reference)


def test_flipped_byte_detected_on_read_and_verify(tmp_path, reference):
    path = tmp_path / "s"
    run(path)
    f = _shard(path, 2)
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x10  # in the data, not the header: the cheap checks on open pass
    f.write_bytes(bytes(raw))
    s = PEFStore(path)
    assert len(s) == N
    with pytest.raises(CorruptStoreError, match=rf"{f.name}.*examples \[6, 10\).*CRC"):
        s.verify()
    with pytest.raises(CorruptStoreError, match=f.name):
        s.load_pefs()
    with pytest.raises(CorruptStoreError, match=f.name):
        list(s.iter_batches(4))
    assert len(list(s.iter_batches(4, stop=6))) == 2  # shards before it still read
    # a flipped header byte is caught on open
    g = _shard(path, 5)
    raw = bytearray(g.read_bytes())
    pos = raw.index(b"'shape': (") + len(b"'shape': (")
    raw[pos] = ord("9")
    g.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match=g.name):
        PEFStore(path)
    report = PEFStore.repair(path)
    assert report["missing"] == [(6, 10), (16, 18)] and report["kept"] == N - 6
    run(path)
    _assert_same_store(PEFStore(path), reference)


def test_flipped_metadata_byte_detected(tmp_path):
    path = tmp_path / "s"
    run(path)
    entry = json.loads((path / "index.jsonl").read_text().splitlines()[1])
    m = path / "shards" / entry["meta"]
    m.write_bytes(m.read_bytes().replace(b'"ex 4"', b'"ex 5"'))
    with pytest.raises(CorruptStoreError, match=entry["meta"]):
        PEFStore(path).read_metadata()


# ----------------------------------------------------------------------------------------------
# As input to the estimator
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_budget", [4 * 2**30, 1])  # resident (load_pefs) and streamed (iter_batches)
def test_store_feeds_the_estimator(tmp_path, reference, memory_budget):
    from npeff_lens.decomposition import NPEFF

    kw = dict(n_components=2, n_steps=5, n_warmup_steps=2, progress=False, memory_budget=memory_budget)
    from_store = NPEFF(**kw).fit(reference)
    from_tensor = NPEFF(**kw).fit(reference.load_pefs())
    assert from_store.coefficients_.shape == (N, 2)
    torch.testing.assert_close(from_store.coefficients_, from_tensor.coefficients_, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_store.components_, from_tensor.components_, rtol=1e-5, atol=1e-6)
    assert from_store.manifest_["projection"] == MANIFEST["projection"] and from_store.manifest_["count"] == N
