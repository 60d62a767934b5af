"""Multi-process PEF collection under ``torchrun``: data-parallel over examples, one store, one writer.

``torchrun --nproc-per-node N -m npeff_lens.cli collect ...`` (or ``collect_pefs`` inside a process group, or
with ``WORLD_SIZE`` > 1 in the environment) splits the examples over N ranks and writes one store, equal
example by example to a single-process run:

- every rank builds the same model, task, data and ``PEFComputer``, then the ranks exchange what they were
  given (the store's manifest, ``n``, rows, dim, dtype): a difference (another seed, model or dataset on one
  rank) stops every rank with one error naming the fields;
- rank 0 alone opens the store (its single writer: configuration check, lock, leftovers of dead writers) and
  makes the plan (collect's plan: missing ranges, then the tail, cut at the batch boundaries of an
  uninterrupted run); an error there (another configuration in ``out``, a store locked by another process)
  stops every rank with rank 0's message;
- the plan's batches are dealt round-robin; each round every rank computes its batch, rank 0 gathers them
  (``gather_object`` on a gloo group: a batch is ``batch x rows x dim`` floats on the CPU) and writes them in
  plan order with the appends and flushes of a single process (collect's writer), then tells every rank
  to go on or to stop, so that all ranks stop together;
- an exception on a rank travels to rank 0 in place of its batch: that rank reports it, the others stop
  quietly (exit status 2); a rank that dies (SIGKILL, out of memory) breaks the collectives, or makes torchrun
  stop the others with SIGTERM: then rank 0 commits what it has written (a store write is never cut: SIGTERM
  and SIGINT wait for it), and the lowest surviving rank names the dead one (from the process ids of the
  ranks on its host). Rerunning the same command, with any number of processes, resumes.

Equality with one process is bitwise when the ranks run the numerics of the single process: the batches are
the same (kept), and so must be the CPU thread count of the kernels whose sums split by thread; torchrun sets
``OMP_NUM_THREADS=1`` per rank, so compare with a single process run with ``OMP_NUM_THREADS=1`` (README).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigMismatchError, diff
from .io import DeferredSignals, progress
from .store import PEFStore

__all__ = ["RankFailedError", "Steps", "active", "collect", "local_device", "rank", "world_size"]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks of the process group, else ``WORLD_SIZE`` from the environment (torchrun), else 1."""
    return dist.get_world_size() if _initialised() else int(os.environ.get("WORLD_SIZE") or 1)


def rank() -> int:
    """This process's rank (0 outside a multi-process run)."""
    return dist.get_rank() if _initialised() else int(os.environ.get("RANK") or 0)


def active() -> bool:
    """Whether collection runs over several processes."""
    return world_size() > 1


def local_device(device: str) -> str:
    """``"cuda"`` in a multi-process run is ``cuda:LOCAL_RANK`` (one GPU per rank); other devices are kept."""
    if str(device) == "cuda" and active():
        return f"cuda:{int(os.environ.get('LOCAL_RANK') or 0)}"
    return str(device)


class RankFailedError(RuntimeError):
    """A rank of a multi-process collection failed or died, so every rank stopped.

    ``quiet``: another rank reports the failure (the command line prints nothing for this rank)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class _PeerLost(Exception):
    """A collective failed: a peer died, or did not answer within the timeout."""


class _Stopped(BaseException):
    """SIGTERM: torchrun stops this rank because another one failed (BaseException: no ``except Exception``
    in the computation swallows it)."""


class _Signals(DeferredSignals):
    """SIGTERM and SIGINT interrupt this rank, but never inside a store write (``writing``), and only once:
    after the first interruption or failure (``hold``) further signals are recorded, not raised, so that
    rank 0 can commit what it wrote and every rank can report."""

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            if not (self.held and sig == signal.SIGTERM):  # failing: torchrun's SIGTERM must not cut the report
                signal.signal(sig, handler)
        self.saved.clear()

    def _raise(self, signum: int) -> None:
        self.hold()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Stopped


@contextlib.contextmanager
def _process_group(device: str, timeout: datetime.timedelta):
    """The default process group (initialised here from torchrun's environment when it is not yet: gloo, plus
    nccl for CUDA tensors) and a gloo group for the exchanged objects (CPU tensors and metadata)."""
    owned = not _initialised()
    if owned:
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield group
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)
        if owned:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _dead(pid: int) -> bool:
    """Whether a process of this host has exited (a zombie not yet reaped by torchrun counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _portable(error: BaseException | None):
    """``error`` if it survives pickling (to be raised on the other ranks as it is), else its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _span(chunk) -> str:
    return f"[{min(lo for lo, _, _ in chunk)}, {max(hi for _, hi, _ in chunk)})"


class _Run:
    """One multi-process collection (see the module docstring); ``run`` returns the store or None."""

    def __init__(self, group, out, manifest, computer, dataset, task, cfg, n: int, rows: int, dim: int, steps):
        self.group, self.out, self.manifest, self.steps = group, out, manifest, steps
        self.computer, self.dataset, self.task, self.cfg, self.n = computer, dataset, task, cfg, n
        self.rows, self.dim = rows, dim
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store, self.chunk, self.flagged = None, None, 0
        self.signals = _Signals()

    # -- collectives: a failure (a dead or silent peer) becomes _PeerLost ------------------------------
    def _call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs, group=self.group)
        except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out ..."; DistBackendError
            self.signals.hold()
            raise _PeerLost(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None

    def _all_gather(self, obj) -> list:
        out = [None] * self.world
        self._call(dist.all_gather_object, out, obj)
        return out

    def _broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self._call(dist.broadcast_object_list, box, src=0)
        return box[0]

    def _gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.rank == 0 else None
        self._call(dist.gather_object, obj, out, dst=0)
        return out

    # -- the run ---------------------------------------------------------------------------------------
    def run(self):
        with self.signals:
            try:
                plan = self._setup()
                self._rounds(plan)
                self._broadcast("done")  # rank 0 has committed and closed the store
            except (_PeerLost, _Stopped) as e:
                raise self._lost(e) from None
            finally:
                if self.store is not None:
                    self.store.close()
        if self.rank == 0:
            return self.store
        return PEFStore(self.out) if os.path.exists(os.path.join(self.out, "manifest.json")) else None

    def _setup(self) -> list:
        """Agreement between the ranks, then rank 0 opens the store and sends the plan (or its error)."""
        cfg = self.cfg
        given = {"manifest": self.manifest, "n": self.n, "rows": self.rows, "dim": self.dim, "dtype": cfg.dtype}
        self.peers = self._all_gather({"host": socket.gethostname(), "pid": os.getpid(), "given": given})
        error, plan = None, None
        if self.rank == 0:
            try:
                for r, peer in enumerate(self.peers[1:], 1):
                    lines = diff(given, peer["given"])
                    if lines:
                        fields = "; ".join(
                            x.replace(": stored ", ": rank 0 ").replace(", now ", f", rank {r} ") for x in lines[:5]
                        )
                        raise ConfigMismatchError(
                            f"rank {r} was given another collection than rank 0 ({fields}): every rank must run "
                            "the same command on the same model and data"
                        )
                self.store = PEFStore.create(
                    self.out, self.manifest, rows=self.rows, dim=self.dim, dtype=cfg.dtype, shard_size=cfg.shard_size
                )
                plan = self.steps.plan(self.store, self.n, cfg.batch_size)
            except Exception as e:
                error = e
        decision = self._broadcast({"error": _portable(error), "plan": plan})
        if decision["error"] is not None:
            if self.rank == 0:
                raise error
            raise RankFailedError(f"rank 0 stopped the collection: {decision['error']}", quiet=True)
        return decision["plan"]

    def _compute(self, item):
        lo, hi, _ = item
        if not self.computer.checked:  # every rank checks the hooks on the example a single process checks
            first = self.plan_first
            prompts, _ = self.task.fitted_prompts(
                self.computer.adapter.tokenizer, self.dataset[first : first + 1]["text"], self.cfg.max_length
            )
            self.computer.self_check(prompts[0], max_length=self.cfg.max_length)
        return self.steps.compute(lo, hi)

    def _rounds(self, plan) -> None:
        """Round k: rank i computes batch ``k * world + i``; rank 0 writes the round in plan order."""
        if not plan:
            return
        self.plan_first = plan[0][0]
        lead = self.rank == 0
        bar = progress(
            total=sum(hi - lo for lo, hi, _ in plan),
            desc=f"collect ({self.world} ranks)",
            unit="ex",
            enabled=self.cfg.progress and lead,
        )
        writer = self.steps.writer(self.store, self.cfg.flush_every) if lead else None
        try:
            for k in range(0, len(plan), self.world):
                self.chunk = chunk = plan[k : k + self.world]
                own, result = None, None
                if self.rank < len(chunk):
                    try:
                        result = ("ok", self._compute(chunk[self.rank]))
                    except Exception as e:
                        own, result = e, ("error", f"{type(e).__name__}: {e}")
                results = self._gather(result)
                stop = None
                if lead:
                    failed = [(r, res[1]) for r, res in enumerate(results) if res is not None and res[0] == "error"]
                    if failed:
                        stop = {"rank": failed[0][0], "message": failed[0][1], "span": _span(chunk)}
                    else:
                        try:
                            with self.signals.writing():
                                for (lo, _hi, fill), res in zip(chunk, results):
                                    writer.write(lo, fill, *res[1])
                        except Exception as e:
                            own, stop = e, {"rank": 0, "message": f"{type(e).__name__}: {e}", "span": _span(chunk)}
                        bar.update(sum(hi - lo for lo, hi, _ in chunk))
                stop = self._broadcast(stop)
                if stop is not None:
                    if own is not None:
                        raise own
                    raise RankFailedError(
                        f"rank {stop['rank']} failed on examples {stop['span']} ({stop['message']}); "
                        + self._resume_hint(),
                        quiet=True,
                    )
        finally:
            if lead:
                with self.signals.writing():
                    self.store.flush()
                self.flagged = writer.flagged
                bar.close()

    # -- failures ----------------------------------------------------------------------------------------
    def _resume_hint(self) -> str:
        kept = f"the store at {self.out} keeps its {self.store.committed} committed examples; " if self.store else ""
        return kept + "rerun the same command (with any number of processes) to resume"

    def _lost(self, cause: BaseException) -> RankFailedError:
        """The error of a run that lost a peer, naming the dead ranks of this host (printed by one rank)."""
        host = socket.gethostname()
        local = {r: p["pid"] for r, p in enumerate(getattr(self, "peers", [])) if p["host"] == host and r != self.rank}
        dead: list[int] = []
        for _ in range(20):  # a killed peer's connection can close just before its process is gone
            dead = [r for r, pid in local.items() if _dead(pid)]
            if dead or not local:
                break
            time.sleep(0.1)
        where = f" while the ranks collected examples {_span(self.chunk)}" if self.chunk else ""
        if dead:
            who = ", ".join(f"rank {r} (pid {local[r]})" for r in dead)
            what = f"{who} died{where}"
        elif isinstance(cause, _Stopped):
            what = f"torchrun stopped rank {self.rank}{where} (another rank failed: see torchrun's report)"
        else:
            what = (
                f"rank {self.rank} lost its peers{where} ({cause}; the ranks wait dist_timeout seconds for each other)"
            )
        # one report: from the lowest rank still alive on this host (all ranks when the others are elsewhere)
        quiet = any(r < self.rank and r not in dead for r in local)
        return RankFailedError(f"{what}; " + self._resume_hint(), quiet=quiet)


@dataclass(frozen=True)
class Steps:
    """What a single-process collection does, handed over by :mod:`npeff_lens.collect` so that the ranks do the
    same: ``plan(store, n, batch_size)`` -> ``[(lo, hi, fill)]``, ``compute(lo, hi)`` -> a batch's results,
    ``writer(store, flush_every)`` -> an object whose ``write(lo, fill, *results)`` appends them in plan order
    (and counts ``flagged``)."""

    plan: Callable
    compute: Callable
    writer: Callable


def collect(
    out, manifest: dict, computer, dataset, task, cfg, n: int, *, rows: int, dim: int, device: str, steps: Steps
):
    """Collects examples ``[0, n)`` into the store at ``out`` over the ranks of the process group (initialised
    here from torchrun's environment if need be), with the single-process ``steps``. Returns ``(store,
    flagged)`` on rank 0; on the other ranks a read-only view of the store when its directory is visible to them
    (a shared filesystem), else None, and 0.
    """
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    with _process_group(device, timeout) as group:
        run = _Run(group, out, manifest, computer, dataset, task, cfg, n, rows, dim, steps)
        store = run.run()
    return store, run.flagged
