"""Small helpers used by every module: atomic writes, JSON, the progress bar, and lazy package exports.

Every file npeff_lens writes goes through :func:`atomic_write` (temp file beside the target, fsync,
``os.replace``, fsync of the directory): a reader sees the old file or the new one, never a torn one,
whatever point a ``kill -9`` or a full disk hits. Temp files are named ``<name>.tmp<pid>`` so that the
next writer can tell a dead process's leftovers from a live one's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

_TMP_RE = re.compile(r"\.tmp(\d+)$")

__all__ = [
    "atomic_write",
    "remove_dead_temp_files",
    "atomic_writer",
    "write_json",
    "read_json",
    "to_jsonable",
    "progress",
    "library_progress_bars",
    "tmp_name",
    "lazy_exports",
]


def tmp_name(path: Path) -> Path:
    """``<name>.tmp<pid>``: the temp file a write to ``path`` goes through."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - alive, someone else's
        return True
    except OSError:  # pragma: no cover
        return False
    return True


def remove_dead_temp_files(directory: str | os.PathLike) -> None:
    """Temp files left by killed processes (``*.tmp<pid>`` with ``pid`` no longer running)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        m = _TMP_RE.search(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """``with atomic_writer(p) as f: f.write(...)``: ``p`` is replaced only if the block completes."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def to_jsonable(obj: Any, what: str = "the value") -> Any:
    """A JSON round trip of ``obj`` (tuples become lists, tensors and numpy values lists/numbers, NaN and
    infinities None): what :func:`write_json` stores and reading it back gives."""
    try:
        return _finite(json.loads(json.dumps(obj, default=_default)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Writes ``obj`` as standard JSON, atomically: a NaN or infinite number is written as ``null``."""
    obj = to_jsonable(obj, f"the content of {path}")
    atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False))


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file; a damaged one is a ``ValueError`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or rerun the step into a new directory") from None


class _NoBar:
    """What :func:`progress` returns when progress is off: accepts the calls a tqdm bar does."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, s=""):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar (rate and ETA) or, with ``enabled=False``, a silent stand-in with the same methods."""
    if not enabled:
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("smoothing", 0.1)
    return tqdm(iterable, **kwargs)


# (module, is_on, enable, disable) of the libraries that draw their own bars: downloads, dataset loading,
# transformers' "Loading weights" while a checkpoint loads
_LIBRARY_BARS = (
    ("huggingface_hub.utils", lambda m: not m.are_progress_bars_disabled(), "enable_progress_bars",
     "disable_progress_bars"),
    ("datasets.utils.tqdm", lambda m: not m.are_progress_bars_disabled(), "enable_progress_bars",
     "disable_progress_bars"),
    ("transformers.utils.logging", lambda m: m.is_progress_bar_enabled(), "enable_progress_bar",
     "disable_progress_bar"),
)  # fmt: skip


@contextlib.contextmanager
def library_progress_bars(enabled: bool = True):
    """While the block runs, the progress bars that huggingface_hub, datasets and transformers draw themselves are
    shown (``enabled``: left as they are) or hidden, so that hiding progress hides every bar, not only
    :func:`progress`'s. Each library's setting is restored on exit; one not installed is skipped. transformers is
    not imported for this (seconds): imported inside the block, it starts from huggingface_hub's setting, hidden."""
    if enabled:
        yield
        return
    before = {}
    for name, is_on, _, off in _LIBRARY_BARS:
        if name == "transformers.utils.logging" and name not in sys.modules:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        before[name] = is_on(module)
        getattr(module, off)()
    try:
        yield
    finally:
        hub = before.get("huggingface_hub.utils", True)
        for name, _, on, _ in _LIBRARY_BARS:
            module = sys.modules.get(name)
            if module is not None and before.get(name, hub):  # first imported here: as its import would set it
                getattr(module, on)()


class DeferredSignals:
    """SIGINT and SIGTERM while a block runs (``with DeferredSignals() as signals:``): a signal raises through
    :meth:`_raise` (``KeyboardInterrupt`` here; subclasses raise their own), never inside ``signals.writing()``
    (it is raised when the write ends, so that state in memory matches the files) and only once: after the first,
    or after :meth:`hold`, further signals are recorded, not raised. Only the main thread installs handlers;
    with ``only_default`` a handler the program installed itself (or an ignored signal) is left alone. The
    previous handlers are restored on exit."""

    only_default = False

    def __init__(self):
        self.saved: dict = {}
        self.pending: int | None = None
        self.depth = 0
        self.held = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if not self.only_default or signal.getsignal(sig) is default:
                    self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved.clear()

    def hold(self) -> None:
        self.held = True

    def _handle(self, signum, frame) -> None:
        if self.depth or self.held:
            self.pending = self.pending or signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        self.hold()
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def writing(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and not self.held and self.pending is not None:
            self._raise(self.pending)


def lazy_exports(package: str, table: dict[str, str]):
    """A package's ``__getattr__`` (PEP 562) that imports ``table[name]``, a module path, on first use of ``name``
    and keeps it: the module itself when its path ends in ``.name``, else its attribute ``name``. So importing the
    package stays cheap (no torch, no transformers) until a name is used."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(table[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
