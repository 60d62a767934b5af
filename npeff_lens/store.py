"""The on-disk store of a collection's PEFs: one low-rank Fisher ``G_i`` ("example rank dim") per example, in
shards that survive an interrupted run.

Written in example order by the collector (``append`` / ``flush``), read memory-mapped by the estimator
(``iter_batches`` / ``load_pefs``: the :class:`~npeff_lens.sources.PEFSource` protocol). It knows which examples
are done: a rerun of the collection with the same manifest reopens it (``PEFStore.create``) and carries on
from ``len(store)`` without losing or duplicating an example, whatever point a ``kill -9`` hit.

On disk (``format_version`` 1)::

    <path>/manifest.json                the user manifest + format_version, rows, dim, dtype, count, ...
    <path>/index.jsonl                  one JSON line per committed shard (append-only commit log)
    <path>/shards/shard-<start>.npy     [count, rows, dim] in the stored dtype (bfloat16 as a uint16 view)
    <path>/shards/shard-<start>.json    the shard's per-example metadata (a JSON list of dicts)

A shard is written as: metadata file, then data file (each: temp file, fsync, ``os.replace``), then its
index line (with byte sizes and zlib CRC-32 checksums of both files) is appended and fsynced: the index
line is the commit. ``append`` commits a shard every ``shard_size`` examples, and the whole buffer once the
last commit is ``commit_seconds`` old (``COMMIT_SECONDS``: a kill loses little more than that much work). A
torn last index line or a shard file without an index line (killed mid-commit) is simply not part of the
store; such leftovers, and temp files of dead processes, are removed by the next writer. Committed shards
are never rewritten.

Corruption (a damaged or truncated file) is reported as ``CorruptStoreError`` naming the shard and the
examples it holds: sizes and ``.npy`` headers are checked on open, checksums the first time this process
reads a shard, and of every shard when a writer reopens the store (``create``: a rerun of the collection,
finished or not, notices a damaged shard); ``verify()`` checks all. ``PEFStore.repair(path)`` (``npeff
repair``) then removes only the shards whose checks fail: their examples become *missing ranges* (gaps in
the index), reading them is a ``MissingExamplesError`` naming them, and rerunning the collection with the
same arguments recollects exactly those ranges (``missing`` / ``fill``) before it carries on.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import ConfigMismatchError, check_same
from .io import atomic_writer, to_jsonable
from .io import fsync_dir as _fsync_dir
from .io import remove_dead_temp_files as _remove_dead_temp_files

__all__ = ["PEFStore", "StoreMismatchError", "CorruptStoreError", "MissingExamplesError", "StoreLockedError"]

FORMAT = "npeff_lens.PEFStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.jsonl"
SHARDS = "shards"
LOCK = ".lock"

# Keys the store owns in its manifest; "volatile" ones may change between runs of the same configuration.
_STRUCTURAL_KEYS = ("format", "format_version", "rows", "dim", "dtype")
_VOLATILE_KEYS = ("count", "package_version", "created", "updated", "shard_size")
_RESERVED_KEYS = _STRUCTURAL_KEYS + _VOLATILE_KEYS

_DTYPES = {  # stored dtype name -> (torch dtype, numpy dtype on disk)
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),  # numpy has no bf16: its bits as uint16
    "float32": (torch.float32, np.dtype("<f4")),
}
_CHUNK = 16 * 2**20  # bytes per read while checksumming
COMMIT_SECONDS = 60.0  # append commits the buffered examples once the last commit is this old (store.commit_seconds)
_SHARD_RE = re.compile(r"^shard-(\d+)\.(npy|json)$")

# (path, inode, size, mtime_ns, crc) of files whose checksum this process already checked.
_VERIFIED: set[tuple] = set()


class StoreMismatchError(ConfigMismatchError):
    """An existing store was created with another configuration (manifest, rows, dim or dtype)."""


class CorruptStoreError(ValueError):
    """A shard or the index of a store is damaged (wrong size, header or checksum)."""


class MissingExamplesError(CorruptStoreError):
    """The store has missing ranges (damaged shards removed by ``repair``) and a read touched one."""


class StoreLockedError(RuntimeError):
    """Another process holds the store open for writing."""


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


class _CrcWriter:
    """A file wrapper that checksums and counts what goes through it (np.save writes in 16 MB chunks)."""

    def __init__(self, f):
        self.f, self.crc, self.nbytes = f, 0, 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self.crc = zlib.crc32(data, self.crc)
        self.nbytes += data.nbytes
        return self.f.write(data)


def _crc_of_file(path: Path) -> tuple[int, int]:
    crc, n = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return crc, n
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)


def _forget_verified(store: Path) -> None:
    """Drops the checksum cache of a store's files, so that they are checked again."""
    prefix = str((store / SHARDS).resolve()) + os.sep
    _VERIFIED.difference_update({t for t in _VERIFIED if t[0].startswith(prefix)})


def _gaps(starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """The missing ranges ``[(a, b), ...]`` between sorted shards (before the last shard's end)."""
    out, end = [], 0
    for a, b in zip(starts.tolist(), ends.tolist()):
        if a > end:
            out.append((end, a))
        end = max(end, b)
    return out


def _line_start(line: bytes) -> int:
    try:
        return int(json.loads(line)["start"])
    except (ValueError, KeyError, TypeError):
        return -1


def _entry_name(line: bytes) -> str:
    try:
        return str(json.loads(line)["data"])
    except (ValueError, KeyError, TypeError):
        return "a damaged index line"


def _read_index(path: Path) -> tuple[list[dict], int, bool]:
    """Committed index entries, the byte length of their lines, and whether a torn tail follows.

    Only the last line may be torn (a kill during its write): it has no newline or does not parse.
    Any other bad line is corruption.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0, False
    entries: list[dict] = []
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl < 0:
            return entries, pos, True  # torn tail: uncommitted
        line = raw[pos:nl]
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not {"start", "count", "data", "meta"} <= set(entry):
                raise ValueError("not a shard entry")
        except ValueError as e:
            if raw.find(b"\n", nl + 1) < 0 and not raw[nl + 1 :].strip():
                return entries, pos, True  # the last line, torn (e.g. zero-filled after a crash)
            raise CorruptStoreError(
                f"the index {path} has a damaged line {len(entries) + 1} ({e}); "
                f"run `npeff repair {path.parent}` (PEFStore.repair) to keep the intact shards"
            ) from None
        entries.append(entry)
        pos = nl + 1
    return entries, pos, False


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------


class PEFStore:
    """The PEFs of a collection on disk: one low-rank Fisher ``G_i`` ("example rank dim") per example, in shards,
    with per-example metadata and a manifest.

    Open an existing store with ``PEFStore(path)``; :func:`~npeff_lens.collect.collect_pefs` creates and fills
    one. A store is what :class:`~npeff_lens.decomposition.NPEFF` fits: it reads the PEFs memory-mapped, in
    batches, so a store larger than memory streams. ``store.metadata`` holds each example's text, label,
    prediction, probabilities and PEF norm; ``store.manifest`` the configuration that made it (model, task,
    parameter layout, projection).

    Example:
        >>> from npeff_lens import PEFStore
        >>> store = PEFStore("runs/movie")
        >>> len(store), store.rows, store.dim                     # examples, rows per PEF, projected dims
        >>> G = store.load_pefs()                                 # [m, rows, dim] float32
        >>> store.metadata["label_name"][:5]

    Read in batches::

        for start, G in store.iter_batches(): ...                 # G: [b, rows, dim], stored dtype

    Write (what the collector does)::

        store = PEFStore.create(path, manifest, rows=r, dim=d)    # new, or resume an identical config
        for start in range(len(store), n, b):                     # len(store): examples already done
            store.append(pefs[start:start + b], metadata[start:start + b])
            ...
            store.flush()                                         # now and then: durable up to here
        store.flush()

    ``len(store)`` counts the examples handed to ``append`` (committed shards plus the ones still
    buffered in memory, which reads also see); ``store.committed`` counts the durable ones. A fresh
    open has no buffer, so after ``kill -9`` the rerun resumes at exactly the committed examples. A damaged
    shard is a :class:`CorruptStoreError` naming it; :meth:`repair` removes it, and rerunning the collection
    recollects its examples.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.exists():
            raise FileNotFoundError(f"no PEF store at {self.path}: the directory does not exist")
        if not mpath.is_file():
            raise ValueError(f"{self.path} is not a PEF store: it has no {MANIFEST}")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise CorruptStoreError(f"the manifest {mpath} cannot be read: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f'{self.path} is not a PEF store: {MANIFEST} lacks "format": {FORMAT!r}')
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"the PEF store at {self.path} has format_version {version!r}; this npeff_lens reads "
                f"{FORMAT_VERSION} (upgrade npeff_lens, or recollect)"
            )
        if manifest.get("dtype") not in _DTYPES:
            raise CorruptStoreError(f"the manifest {mpath} has an unknown dtype {manifest.get('dtype')!r}")
        self._manifest = manifest
        self.rows, self.dim = int(manifest["rows"]), int(manifest["dim"])
        self.dtype_name = manifest["dtype"]
        self.dtype, self._np_dtype = _DTYPES[self.dtype_name]
        self.shard_size = int(manifest.get("shard_size", 256))
        self._lock_fd: int | None = None
        self._pending: list[np.ndarray] = []
        self._pending_meta: list[dict] = []
        self._n_pending = 0
        self.commit_seconds = float(COMMIT_SECONDS)
        self._last_commit = time.monotonic()
        self._maps: dict[tuple, np.ndarray] = {}
        _remove_dead_temp_files(self.path)
        _remove_dead_temp_files(self.path / SHARDS)
        self._load_index()

    # -- creation / resumption -----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        manifest: dict,
        *,
        rows: int,
        dim: int,
        dtype: str = "float16",
        shard_size: int = 256,
    ) -> PEFStore:
        """A new store at ``path``, or the existing one when it holds the same configuration (resume).

        The existing store's manifest, minus volatile keys (``count``, timestamps, ``package_version``,
        ``shard_size``), must equal ``manifest`` and its rows / dim / dtype must match; otherwise
        ``StoreMismatchError`` lists the differences. Reopening checks the checksum of every committed shard
        (``CorruptStoreError`` names the first damaged one: ``npeff repair`` removes it, and the rerun recollects
        its examples). The returned store holds the writer lock.
        """
        path = Path(path)
        for name, value in (("rows", rows), ("dim", dim), ("shard_size", shard_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        rows, dim, shard_size = int(rows), int(dim), int(shard_size)
        dtype = str(dtype).replace("torch.", "")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        if not isinstance(manifest, dict):
            raise TypeError(f"manifest must be a dict; got {type(manifest).__name__}")
        user = to_jsonable(manifest, "the manifest")
        clash = sorted(set(user) & set(_RESERVED_KEYS))
        if clash:
            raise ValueError(f"manifest keys {clash} are reserved by the store (it sets them itself)")

        if path.exists() and not path.is_dir():
            raise ValueError(f"cannot create a PEF store at {path}: it is a file")
        if (path / MANIFEST).exists():
            store = cls(path)
            store._check_same_config(user, rows=rows, dim=dim, dtype=dtype)
            store.shard_size = shard_size
            store._become_writer()
            try:
                store.verify()  # a rerun of a finished collection reads nothing else: it must notice damage here
            except BaseException:
                store.close()
                raise
            if store._manifest.get("shard_size") != shard_size or store._manifest.get("count") != store.committed:
                store._write_manifest()
            return store

        path.mkdir(parents=True, exist_ok=True)
        _remove_dead_temp_files(path)
        leftovers = [p.name for p in path.iterdir() if p.name != LOCK]
        if leftovers:
            raise ValueError(
                f"cannot create a PEF store at {path}: the directory is not empty and is not a store "
                f"(it holds {sorted(leftovers)[:5]}{' ...' if len(leftovers) > 5 else ''})"
            )
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        full = dict(user)
        full.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            rows=rows,
            dim=dim,
            dtype=dtype,
            count=0,
            shard_size=shard_size,
            package_version=__version__,
            created=now,
            updated=now,
        )
        # The manifest is written first: a kill before it leaves only temp files, which a rerun clears.
        _write_bytes(path / MANIFEST, json.dumps(full, indent=2, sort_keys=True).encode())
        _fsync_dir(path)
        store = cls(path)
        store._become_writer()
        return store

    def _check_same_config(self, user: dict, *, rows: int, dim: int, dtype: str) -> None:
        stored = {k: v for k, v in self._manifest.items() if k not in _RESERVED_KEYS}
        stored.update(rows=self._manifest["rows"], dim=self._manifest["dim"], dtype=self._manifest["dtype"])
        check_same(
            stored,
            {**user, "rows": rows, "dim": dim, "dtype": dtype},
            f"the PEF store at {self.path}",
            hint="Running a different configuration into an existing store is an error, never a mix: "
            "use another path (or delete this store).",
            error=StoreMismatchError,
        )

    # -- index -----------------------------------------------------------------------------------
    def _load_index(self) -> None:
        entries, self._index_bytes, self._torn = _read_index(self.path / INDEX)
        entries = sorted(entries, key=lambda e: int(e["start"]))  # a refilled gap is committed after later shards
        end = 0
        for e in entries:
            if int(e["start"]) < end or int(e["count"]) < 1:
                raise CorruptStoreError(
                    f"the index of the PEF store at {self.path} is inconsistent at shard {e.get('data')} "
                    f"(start {e['start']}, count {e['count']}; the shards before it end at {end}); "
                    f"run PEFStore.repair({str(self.path)!r}) (npeff repair) to keep the intact shards"
                )
            self._check_shard_cheap(e)
            end = int(e["start"]) + int(e["count"])
        self._entries = entries
        self._starts = np.asarray([int(e["start"]) for e in entries], dtype=np.int64)
        self._ends = self._starts + np.asarray([int(e["count"]) for e in entries], dtype=np.int64)
        self.committed = int(self._ends[-1]) if len(entries) else 0
        self.missing = _gaps(self._starts, self._ends)

    def refresh(self) -> None:
        """Re-read the index (shards committed by another process since this one opened the store)."""
        if self._lock_fd is not None:
            return  # we are the writer: nobody else commits
        self._load_index()

    def _corrupt(self, entry: dict, reason: str) -> CorruptStoreError:
        a, b = int(entry["start"]), int(entry["start"]) + int(entry["count"])
        return CorruptStoreError(
            f"shard {entry['data']} of the PEF store at {self.path} (examples [{a}, {b})) is corrupt: {reason}. "
            f"Run `npeff repair {self.path}` (PEFStore.repair) to remove the damaged shards only; rerunning the "
            f"collection with the same arguments then recollects their examples."
        )

    def _check_shard_cheap(self, e: dict) -> None:
        """On open: both files exist with the committed sizes, and the .npy header has the right shape."""
        shards = self.path / SHARDS
        for key in ("data", "meta"):
            p = shards / e[key]
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise self._corrupt(e, f"{e[key]} is missing") from None
            if size != int(e[f"{key}_bytes"]):
                raise self._corrupt(e, f"{e[key]} has {size} bytes, {e[f'{key}_bytes']} were committed (truncated?)")
        try:
            with open(shards / e["data"], "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unexpected .npy version {version}")
        except Exception as ex:  # noqa: BLE001 - any parse failure is corruption
            raise self._corrupt(e, f"its .npy header cannot be read ({ex})") from None
        expected = (int(e["count"]), self.rows, self.dim)
        if tuple(shape) != expected or fortran or np.dtype(dt) != self._np_dtype:
            raise self._corrupt(
                e, f"its .npy header says {tuple(shape)} {np.dtype(dt)}; expected {expected} {self._np_dtype}"
            )

    def _verify_file(self, entry: dict, key: str) -> Path:
        """Checks a shard file's CRC-32 the first time this process reads it."""
        p = self.path / SHARDS / entry[key]
        try:
            st = p.stat()
        except FileNotFoundError:
            raise self._corrupt(entry, f"{entry[key]} is missing") from None
        tag = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, int(entry[f"{key}_crc32"]))
        if tag in _VERIFIED:
            return p
        if st.st_size != int(entry[f"{key}_bytes"]):
            raise self._corrupt(entry, f"{entry[key]} has {st.st_size} bytes, {entry[f'{key}_bytes']} were committed")
        crc, _ = _crc_of_file(p)
        if crc != int(entry[f"{key}_crc32"]):
            raise self._corrupt(
                entry, f"the CRC-32 of {entry[key]} is {crc:#010x}, {int(entry[f'{key}_crc32']):#010x} was committed"
            )
        _VERIFIED.add(tag)
        return p

    def verify(self) -> None:
        """Checks the checksum of every committed shard (data and metadata); raises CorruptStoreError."""
        _forget_verified(self.path)
        for e in self._entries:
            self._check_shard_cheap(e)
            self._verify_file(e, "data")
            self._verify_file(e, "meta")

    @classmethod
    def repair(cls, path: str | os.PathLike) -> dict:
        """Removes only the damaged shards; returns ``{"kept", "missing", "removed"}``.

        Every shard is checked in full (size, header, checksum). The index is rewritten atomically with the
        intact shards, the files of the damaged ones are deleted, and their examples become missing ranges
        (``missing``); rerunning the collection with the same arguments recollects exactly those ranges.
        A damaged index line loses only its own shard (its files are then orphans and are removed).
        """
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise ValueError(f"{path} is not a PEF store: it has no {MANIFEST}")
        manifest = json.loads((path / MANIFEST).read_text())
        probe = cls.__new__(cls)
        probe.path, probe._manifest, probe._lock_fd, probe._torn, probe._maps = path, manifest, None, False, {}
        probe.rows, probe.dim, probe.dtype_name = int(manifest["rows"]), int(manifest["dim"]), manifest["dtype"]
        probe.dtype, probe._np_dtype = _DTYPES[probe.dtype_name]
        probe._acquire_lock()
        _forget_verified(path)
        try:
            raw = (path / INDEX).read_bytes() if (path / INDEX).exists() else b""
            good, removed, end = [], [], 0
            for line in sorted(raw.split(b"\n"), key=_line_start):
                try:
                    e = json.loads(line)
                    if int(e["start"]) < end or int(e["count"]) < 1:
                        raise ValueError("overlaps the shards before it")
                    probe._check_shard_cheap(e)
                    probe._verify_file(e, "data")
                    probe._verify_file(e, "meta")
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        removed.append(_entry_name(line))
                    continue
                good.append(e)
                end = int(e["start"]) + int(e["count"])
            _write_bytes(path / INDEX, b"".join((json.dumps(e, sort_keys=True) + "\n").encode() for e in good))
            probe._entries = good
            probe._remove_orphans()
            starts = np.asarray([int(e["start"]) for e in good], dtype=np.int64)
            ends = starts + np.asarray([int(e["count"]) for e in good], dtype=np.int64)
            manifest.update(count=int(ends.sum() - starts.sum()), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            _write_bytes(path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
            return {"kept": manifest["count"], "missing": _gaps(starts, ends), "removed": [r for r in removed if r]}
        finally:
            probe.close()

    # -- writer lock and cleanup -------------------------------------------------------------------
    def _become_writer(self) -> None:
        """Takes the writer lock, re-reads the index and clears what a killed writer left behind."""
        if self._lock_fd is not None:
            return
        self._acquire_lock()
        try:
            if self._n_pending == 0:
                self._load_index()
            self._remove_orphans()
        except BaseException:
            self.close()
            raise

    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks (Windows): single writer assumed
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                holder = (self.path / LOCK).read_text().strip() or "another writer"
                mine = holder.startswith(f"pid {os.getpid()} ")
                raise StoreLockedError(
                    f"the PEF store at {self.path} is being written by {holder}"
                    + ("; close() the other PEFStore open here first" if mine else "; wait for it or stop it")
                ) from None
            raise
        # who holds it, for the next writer's message (flock itself dies with the process: a dead holder's
        # lock is free again, whatever this file says)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Releases the writer lock; the store stays readable, and a later ``append`` takes the lock again.

        Call ``flush`` first: buffered examples are not written by ``close`` (the context manager flushes).
        """
        if getattr(self, "_lock_fd", None) is not None:
            try:
                os.close(self._lock_fd)
            finally:
                self._lock_fd = None

    def __enter__(self) -> PEFStore:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._lock_fd is not None:
                self.flush()  # what was appended passed its checks: keep it
        finally:
            self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover
            pass

    def _remove_orphans(self) -> None:
        """Shard files without an index entry: a commit killed before its index line (writer only)."""
        shards = self.path / SHARDS
        _remove_dead_temp_files(shards)
        if not shards.is_dir():
            return
        known = {e[k] for e in self._entries for k in ("data", "meta")}
        for p in shards.iterdir():
            if _SHARD_RE.match(p.name) and p.name not in known:
                p.unlink()
        if self._torn:  # drop the torn tail so the next line starts clean
            with open(self.path / INDEX, "r+b") as f:
                f.truncate(self._index_bytes)
                f.flush()
                os.fsync(f.fileno())
            self._torn = False

    # -- writing -----------------------------------------------------------------------------------
    def append(self, pefs, metadata: Sequence[dict]) -> None:
        """Adds examples ``[len(self), len(self) + b)``: ``pefs`` [b, rows, dim], ``metadata`` b dicts.

        Buffered; every full ``shard_size`` examples are committed as a shard, and the whole buffer once the
        last commit (or the opening) is ``commit_seconds`` old, so that a kill loses little work however slowly
        examples come. Non-finite values (also after conversion to the stored dtype, e.g. float16 overflow)
        raise ValueError, and nothing is added.
        """
        arr, meta = self._checked(pefs, metadata, len(self))
        if arr.shape[0] == 0:
            return
        b, stored = arr.shape[0], self._to_storage(arr)
        self._become_writer()
        self._pending.append(stored)
        self._pending_meta.extend(meta)
        self._n_pending += b
        while self._n_pending >= self.shard_size:
            self._commit(self.shard_size)
        if self._n_pending and time.monotonic() - self._last_commit >= self.commit_seconds:
            self._commit(self._n_pending)

    def _checked(self, pefs, metadata, first: int) -> tuple[np.ndarray, list[dict]]:
        """``(array [b, rows, dim], JSON metadata)``, or a ValueError naming examples ``first + i``."""
        if isinstance(pefs, torch.Tensor):
            arr = pefs.detach()
            arr = (arr.float() if arr.dtype == torch.bfloat16 else arr).cpu().numpy()
        else:
            arr = np.asarray(pefs)
        if arr.ndim == 2 and self.rows == 1:
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[1:] != (self.rows, self.dim):
            raise ValueError(f"PEFs must have shape [b, {self.rows}, {self.dim}]; got {tuple(arr.shape)}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"PEFs must be floating point; got dtype {arr.dtype}")
        b = arr.shape[0]
        if isinstance(metadata, dict) or len(metadata) != b:
            got = "a dict" if isinstance(metadata, dict) else f"{len(metadata)} entries"
            raise ValueError(f"metadata must be a list of {b} dicts (one per example); got {got}")
        meta = to_jsonable(list(metadata), "metadata")
        if not all(isinstance(m, dict) for m in meta):
            raise ValueError("metadata must be a list of dicts")
        if b and not np.isfinite(arr).all():
            bad = np.nonzero(~np.isfinite(arr.reshape(b, -1)).all(1))[0]
            raise ValueError(
                f"PEFs of examples {[first + int(i) for i in bad[:10]]} contain NaN/inf; the store never holds "
                "non-finite values (flag or zero such examples before appending)"
            )
        if b and self.dtype_name != "float32":
            back = self._from_storage_np(self._to_storage(arr))
            if not np.isfinite(back).all():
                bad = np.nonzero(~np.isfinite(back.reshape(b, -1)).all(1))[0]
                raise ValueError(
                    f"PEFs of examples {[first + int(i) for i in bad[:10]]} overflow {self.dtype_name} "
                    f"(max |value| {float(np.abs(arr).max()):.3g}); store them as float32 or rescale"
                )
        return arr, meta

    def flush(self) -> None:
        """Commits the buffered examples as a (possibly small) shard: durable after this returns."""
        if self._n_pending:
            self._become_writer()
            self._commit(self._n_pending)

    def _to_storage(self, arr: np.ndarray) -> np.ndarray:
        if self.dtype_name == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(torch.bfloat16)
            return t.view(torch.int16).numpy().view(np.uint16).copy()
        with np.errstate(over="ignore"):  # float16 overflow is reported by the caller
            return np.ascontiguousarray(arr, dtype=self._np_dtype)

    def _from_storage_np(self, arr: np.ndarray) -> np.ndarray:
        if self.dtype_name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float().numpy()
        return arr

    def _commit(self, n: int) -> None:
        """Writes the first ``n`` buffered examples as one shard and commits its index line."""
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        shard, rest = data[:n], data[n:]
        meta, rest_meta = self._pending_meta[:n], self._pending_meta[n:]
        self._write_shard(self.committed, shard, meta)
        self._pending = [rest] if len(rest) else []
        self._pending_meta = rest_meta
        self._n_pending = len(rest)
        self._write_manifest()

    def _write_shard(self, start: int, shard: np.ndarray, meta: list[dict]) -> None:
        """Metadata file, data file, then the index line (the commit) of the shard of examples at ``start``."""
        n = len(shard)
        shards = self.path / SHARDS
        if not shards.is_dir():
            shards.mkdir()
            _fsync_dir(self.path)
        name = f"shard-{start:012d}"
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        _write_bytes(shards / f"{name}.json", meta_bytes)
        with atomic_writer(shards / f"{name}.npy") as f:
            w = _CrcWriter(f)
            np.lib.format.write_array(w, np.ascontiguousarray(shard), allow_pickle=False)
        _fsync_dir(shards)
        entry = {
            "start": start,
            "count": n,
            "data": f"{name}.npy",
            "data_bytes": w.nbytes,
            "data_crc32": w.crc,
            "meta": f"{name}.json",
            "meta_bytes": len(meta_bytes),
            "meta_crc32": zlib.crc32(meta_bytes),
        }
        self._append_index_line((json.dumps(entry, sort_keys=True) + "\n").encode())  # the commit
        self._last_commit = time.monotonic()
        k = int(np.searchsorted(self._starts, start))
        self._entries.insert(k, entry)
        self._starts = np.insert(self._starts, k, start)
        self._ends = np.insert(self._ends, k, start + n)
        self.committed = max(self.committed, start + n)
        self.missing = _gaps(self._starts, self._ends)

    def fill(self, start: int, pefs, metadata: Sequence[dict]) -> None:
        """Recollected examples ``[start, start + b)`` of a missing range (see ``missing``), committed at once."""
        arr, meta = self._checked(pefs, metadata, start)
        b = arr.shape[0]
        if b and not any(a <= start and start + b <= z for a, z in self.missing):
            raise ValueError(f"examples [{start}, {start + b}) are not inside a missing range ({self.missing})")
        if b:
            self._become_writer()
            self._write_shard(start, self._to_storage(arr), meta)
            self._write_manifest()

    def _append_index_line(self, line: bytes) -> None:
        path = self.path / INDEX
        new = not path.exists()
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(self.path)
        self._index_bytes += len(line)

    def _write_manifest(self) -> None:
        m = dict(self._manifest)
        m.update(
            count=self.committed,
            shard_size=self.shard_size,
            package_version=__version__,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        _write_bytes(self.path / MANIFEST, json.dumps(m, indent=2, sort_keys=True).encode())
        self._manifest = m

    # -- reading -----------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The user manifest plus format_version, rows, dim, dtype, count (= ``len(self)``), package_version."""
        m = json.loads(json.dumps(self._manifest))
        m["count"] = len(self)
        return m

    def __len__(self) -> int:
        return self.committed + self._n_pending

    @property
    def n_shards(self) -> int:
        return len(self._entries)

    def _shard_array(self, k: int) -> np.ndarray:
        """Shard ``k``'s memory map (checksum checked on this process's first read)."""
        e = self._entries[k]
        key = (e["data"], int(e["data_crc32"]))
        arr = self._maps.get(key)
        if arr is None:
            p = self._verify_file(e, "data")
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            self._maps[key] = arr
            while len(self._maps) > 4:  # a few open maps: small batches don't reopen their shard
                self._maps.pop(next(iter(self._maps)))
        return arr

    def _pending_array(self) -> np.ndarray:
        if len(self._pending) > 1:
            self._pending = [np.concatenate(self._pending)]
        return self._pending[0] if self._pending else np.empty((0, self.rows, self.dim), self._np_dtype)

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        arr = np.array(arr, copy=True)  # out of the memory map
        if self.dtype_name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first index, stored-dtype array)`` per shard (and the buffer) covering ``[start, stop)``."""
        if start >= stop:
            return
        self._check_complete(start, stop)
        k = max(0, int(np.searchsorted(self._ends, start, side="right")))
        while k < len(self._entries) and self._starts[k] < stop:
            lo, hi = int(self._starts[k]), int(self._ends[k])
            a, b = max(lo, start), min(hi, stop)
            yield a, self._shard_array(k)[a - lo : b - lo]
            k += 1
        if stop > self.committed:
            a = max(start, self.committed)
            yield a, self._pending_array()[a - self.committed : stop - self.committed]

    def _check_complete(self, start: int, stop: int) -> None:
        hit = [(a, b) for a, b in self.missing if a < stop and start < b]
        if hit:
            ranges = ", ".join(f"[{a}, {b})" for a, b in hit)
            raise MissingExamplesError(
                f"examples {ranges} of the PEF store at {self.path} are missing (damaged shards removed by repair); "
                "rerun the collection with the same arguments to recollect exactly them"
            )

    def iter_batches(
        self, batch_size: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first example index, G [b, rows, dim] in the stored dtype)`` over ``[start, stop)``, in order.

        ``batch_size=None``: one batch per shard; otherwise batches of ``batch_size`` (the last may be
        shorter), across shard boundaries. ``start`` / ``stop`` follow slice rules.
        """
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}")
        start, stop, _ = slice(start, stop).indices(len(self))
        if batch_size is None:
            for a, arr in self._pieces(start, stop):
                yield a, self._to_tensor(arr)
            return
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            parts = [arr for _, arr in self._pieces(a, b)]
            yield a, self._to_tensor(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def load_pefs(self, indices=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """PEFs ``[m, rows, dim]`` (all) or ``[len(indices), rows, dim]`` (in the given order), as ``dtype``."""
        n = len(self)
        if indices is None:
            out = torch.empty(n, self.rows, self.dim, dtype=dtype)
            for a, arr in self._pieces(0, n):
                out[a : a + arr.shape[0]] = self._to_tensor(arr).to(dtype)
            return out
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D sequence of integers; got shape {idx.shape}, dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices must lie in [0, {n}); got min {idx.min()}, max {idx.max()}")
        out = torch.empty(len(idx), self.rows, self.dim, dtype=dtype)
        for a, z in self.missing:
            hit = idx[(idx >= a) & (idx < z)]
            if hit.size:
                self._check_complete(int(hit[0]), int(hit[0]) + 1)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        shard_of[idx >= self.committed] = len(self._entries)  # the buffer
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            if k < len(self._entries):
                lo, arr = int(self._starts[k]), self._shard_array(int(k))
            else:
                lo, arr = self.committed, self._pending_array()
            local = idx[sel] - lo
            order = np.argsort(local, kind="stable")  # sorted reads from the map
            rows = self._to_tensor(arr[local[order]]).to(dtype)
            out[torch.from_numpy(sel[order])] = rows
        return out

    def read_metadata(self, start: int = 0, stop: int | None = None) -> list[dict]:
        """The per-example metadata dicts of ``[start, stop)`` (slice rules), in order."""
        start, stop, _ = slice(start, stop).indices(len(self))
        out: list[dict] = []
        if start >= stop:
            return out
        self._check_complete(start, stop)
        k = int(np.searchsorted(self._ends, start, side="right"))
        while k < len(self._entries) and self._starts[k] < stop:
            e = self._entries[k]
            lo = int(self._starts[k])
            rows = json.loads(self._verify_file(e, "meta").read_bytes())
            if len(rows) != int(e["count"]):
                raise self._corrupt(e, f"its metadata has {len(rows)} rows")
            out.extend(rows[max(start, lo) - lo : min(stop, int(self._ends[k])) - lo])
            k += 1
        if stop > self.committed:
            out.extend(self._pending_meta[max(start, self.committed) - self.committed : stop - self.committed])
        return out

    def example_labels(self, meta: list[dict] | None = None) -> list | None:
        """Each example's label as the task's outcome (``manifest["outcomes"][label]``), so that labels spelled
        differently in the data (``POSITIVE``, `` positive ``) count as the one outcome they were matched to at
        collection; the recorded ``label_name`` (else ``label``) where the task has no outcome names. None
        without labels. ``meta``: the rows of :meth:`read_metadata`, when already read."""
        meta = self.read_metadata() if meta is None else meta
        if not any("label" in m or "label_name" in m for m in meta):
            return None
        outcomes = self.manifest.get("outcomes")

        def label(m):
            v = m.get("label")
            if outcomes and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(outcomes):
                return outcomes[v]
            return m.get("label_name", v)

        return [label(m) for m in meta]

    def example_predictions(self, meta: list[dict] | None = None) -> list:
        """Each example's prediction, by its outcome name where recorded."""
        meta = self.read_metadata() if meta is None else meta
        return [m.get("prediction_name", m.get("prediction")) for m in meta]

    @property
    def metadata(self):
        """A ``datasets.Dataset`` with one row per example, in order (columns from the metadata dicts)."""
        import datasets

        rows = self.read_metadata()
        columns = dict.fromkeys(k for r in rows for k in r)
        if any(len(r) != len(columns) for r in rows):  # a column a later version added (a resumed store): None before
            rows = [{k: r.get(k) for k in columns} for r in rows]
        return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})

    def __repr__(self) -> str:
        pending = f" ({self._n_pending} unflushed)" if self._n_pending else ""
        return (
            f"PEFStore({str(self.path)!r}, examples={len(self)}{pending}, rows={self.rows}, dim={self.dim}, "
            f"dtype={self.dtype_name}, shards={self.n_shards})"
        )
