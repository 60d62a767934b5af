"""The inputs of the NPEFF solver: a source of PEFs, and the part of it that one process owns.

:class:`PEFSource` is the interface every input implements: PEFs ``G`` "example rank dim", read in batches. A
:class:`~npeff_lens.store.PEFStore` is one, and :func:`as_source` adapts a tensor in memory.

A :class:`Shard` holds the examples ``[lo, hi)`` of a source that this rank owns (all of them outside
``torch.distributed``). It keeps them on the device when they fit ``memory_budget`` and streams them from the
source on every pass otherwise. It also normalises each PEF to unit Frobenius norm (App. D.4) and records the
examples left out of the fit. :func:`open_shard` opens this rank's shard.

:func:`rank_and_world`, :func:`all_reduce` and :func:`gather_rows` are the collectives over shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import SettingError, warn_caller

__all__ = [
    "TEMP_BUDGET",
    "PEFSource",
    "Shard",
    "all_reduce",
    "as_source",
    "gather_rows",
    "manifest_of",
    "open_shard",
    "rank_and_world",
    "resolve_dtype",
]

TEMP_BUDGET = 256 * 2**20  # bytes for the per-chunk temporaries of a resident shard: B, its weighted copy, the cast


# ----------------------------------------------------------------------------------------------
# The input interface
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class PEFSource(Protocol):
    """PEFs ``G`` ("example rank dim") that the decomposition reads; :class:`~npeff_lens.store.PEFStore` is one.

    ``rows`` (r) and ``dim`` (d) give the shape of one example, ``len(source)`` the number m of examples.
    ``iter_batches(batch_size)`` yields ``(first example index, G block [b, rows, dim])`` in order, without gaps,
    in any floating dtype (``batch_size=None``: the source's own batching). ``load_pefs(dtype=...)`` returns all
    of them ``[m, rows, dim]`` at once, ``manifest`` describes their space (parameter layout, projection, ...)
    and is recorded with the decomposition. :func:`as_source` requires only ``rows``, ``dim``, ``__len__`` and
    ``iter_batches``: a source without ``load_pefs`` is streamed into memory, one without ``manifest`` has ``{}``.
    """

    rows: int
    dim: int

    @property
    def manifest(self) -> Mapping[str, Any]: ...

    def __len__(self) -> int: ...

    def iter_batches(self, batch_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]: ...

    def load_pefs(self, *, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


class _TensorSource:
    """A resident tensor ``"example rank dim"`` (or ``"example dim"``: r = 1) as a :class:`PEFSource`."""

    def __init__(self, pefs: torch.Tensor):
        if pefs.ndim == 2:
            pefs = pefs.unsqueeze(1)
        if pefs.ndim != 3:
            raise ValueError(f"PEFs must be a tensor [m, r, d] or [m, d]; got shape {tuple(pefs.shape)}")
        self.tensor = pefs
        self.rows, self.dim = int(pefs.shape[1]), int(pefs.shape[2])
        self.manifest: dict = {}

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def iter_batches(self, batch_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        b = batch_size or 1024
        for start in range(0, len(self), b):
            yield start, self.tensor[start : start + b]

    def load_pefs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.tensor.to(dtype)


def as_source(pefs: Any) -> PEFSource:
    """``pefs`` as a :class:`PEFSource`: a tensor ``[m, r, d]`` (or ``[m, d]``) adapted, a source as it is."""
    if isinstance(pefs, torch.Tensor):
        return _TensorSource(pefs)
    missing = [a for a in ("rows", "dim", "iter_batches", "__len__") if not hasattr(pefs, a)]
    if missing:
        raise TypeError(
            "PEFs must be a torch.Tensor [m, r, d] or a store with __len__, rows, dim, manifest and "
            f"iter_batches(batch_size); {type(pefs).__name__} lacks {missing}"
        )
    return pefs


def manifest_of(source) -> dict:
    """A JSON-able copy of the source's manifest (``{}`` when it has none)."""
    manifest = getattr(source, "manifest", None) or {}
    return json.loads(json.dumps(dict(manifest), default=str))


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """A floating ``torch.dtype`` from a dtype or its name (``"float32"``, ``"torch.bfloat16"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating torch dtype; got {dtype!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Collectives (no-ops outside torch.distributed)
# ----------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the process group, ``(0, 1)`` outside ``torch.distributed``."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def all_reduce(buf: torch.Tensor) -> torch.Tensor:
    """Sums ``buf`` over the ranks in place (no-op outside ``torch.distributed``)."""
    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(buf)
    return buf


def gather_rows(W: torch.Tensor, norms: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full ``[m, C]`` coefficients and ``[m]`` norms on every rank (CPU) from each rank's rows of them."""
    _, world = rank_and_world()
    local = torch.cat([W, norms.to(W.dtype)[:, None]], 1)
    if world == 1:
        out = local
    else:
        width = max((k + 1) * m // world - k * m // world for k in range(world))
        padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        out = torch.cat([p[: (k + 1) * m // world - k * m // world] for k, p in enumerate(parts)])
    out = out.cpu()
    return out[:, :-1].contiguous(), out[:, -1].contiguous()


# ----------------------------------------------------------------------------------------------
# The local shard of the data
# ----------------------------------------------------------------------------------------------


class Shard:
    """The examples ``[lo, hi)`` owned by this rank, resident or streamed, with their normalisation.

    G is held (or streamed to the device) in ``storage_dtype`` and each block is cast to the working
    ``dtype`` just before use, so the working-precision copy exists one chunk at a time; ``scale``, W and H
    are in the working dtype. ``scale[i] = 1 / sqrt(||G_i^T G_i||_F)`` (0 for excluded examples, computed in
    float64 from the stored values), applied to ``B = G H^T`` so that the PEFs are used normalised without a
    normalised copy. ``valid [m]``: the examples in the fit; ``norms [m]``: ``||G_i^T G_i||_F`` (NaN where
    non-finite).
    """

    def __init__(
        self, source, lo, hi, *, dtype, device, memory_budget, batch_size, nonfinite, n_components, storage_dtype=None
    ):
        self.source, self.lo, self.hi = source, lo, hi
        self.n_components = n_components  # sizes the in-memory chunks
        self.dtype, self.device, self.batch_size = dtype, device, batch_size
        self.storage_dtype = dtype if storage_dtype is None else storage_dtype
        self.rows, self.dim = int(source.rows), int(source.dim)
        self.m = hi - lo
        itemsize = torch.empty((), dtype=self.storage_dtype).element_size()
        self.resident_bytes = self.m * self.rows * self.dim * itemsize
        self.in_memory = self.resident_bytes <= memory_budget
        self.G: torch.Tensor | None = None
        if self.in_memory:
            self.G = self._load_resident()
        self._measure(nonfinite)

    # -- loading -------------------------------------------------------------------------------
    def _load_resident(self) -> torch.Tensor:
        src, dtype = self.source, self.storage_dtype
        if isinstance(src, _TensorSource):
            G = src.tensor[self.lo : self.hi]
        elif self.lo == 0 and self.hi == len(src) and hasattr(src, "load_pefs"):
            G = src.load_pefs(dtype=dtype)
        else:
            G = torch.empty(self.m, self.rows, self.dim, dtype=dtype)
            for start, _, part in self._stream():
                G[start : start + part.shape[0]] = part.to(dtype)
        G = G.to(device=self.device, dtype=dtype)
        if tuple(G.shape) != (self.m, self.rows, self.dim):
            raise ValueError(f"PEFs have shape {tuple(G.shape)}; expected {(self.m, self.rows, self.dim)}")
        return G

    def _stream(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yields ``(local_start, global_start, raw block)`` covering ``[lo, hi)`` in order."""
        expected = 0
        for start, batch in self.source.iter_batches(self.batch_size):
            start = int(start)
            if start != expected:
                raise ValueError(f"iter_batches yielded a batch at {start}; expected {expected} (in order, no gaps)")
            if batch.ndim == 2:
                batch = batch.unsqueeze(1)
            expected = start + batch.shape[0]
            if tuple(batch.shape[1:]) != (self.rows, self.dim):
                raise ValueError(f"a batch has shape {tuple(batch.shape)}; expected [b, {self.rows}, {self.dim}]")
            a, b = max(start, self.lo), min(expected, self.hi)
            if a < b:
                yield a - self.lo, a, batch[a - start : b - start]
            if expected >= self.hi:
                return
        if expected < self.hi:
            raise ValueError(f"iter_batches covered {expected} examples; the store has {len(self.source)}")

    def raw_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(local_start, G block on device in the working dtype)``; excluded rows are zeroed.

        A block is cast from the storage dtype here (streamed blocks pass through it too, so streaming and
        resident storage see the same values); the chunk's temporaries (B, its weighted copy and the cast
        block) fit ``TEMP_BUDGET``."""
        if self.G is not None:
            cast = self.dim if self.storage_dtype != self.dtype else 0
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            per_example = self.rows * (self.n_components * 2 + cast) * itemsize
            step = self.batch_size or max(1, TEMP_BUDGET // per_example)
            for s in range(0, self.m, step):
                yield s, self.G[s : s + step].to(self.dtype)
            return
        for s, _, part in self._stream():
            part = part.to(device=self.device, dtype=self.storage_dtype).to(self.dtype)
            bad = getattr(self, "_zero_rows", None)
            if bad is not None:
                rows = bad[s : s + part.shape[0]]
                if bool(rows.any()):
                    part = torch.where(
                        rows.to(part.device)[:, None, None], torch.zeros((), dtype=part.dtype, device=part.device), part
                    )
            yield s, part

    # -- normalisation (App. D.4: unit-Frobenius PEFs) ------------------------------------------
    def _measure(self, nonfinite: str) -> None:
        norms = torch.empty(self.m, dtype=torch.float64)
        finite = torch.ones(self.m, dtype=torch.bool)
        self._zero_rows = None
        for s, block in self.raw_blocks():
            b = block.shape[0]
            ok = torch.isfinite(block).flatten(1).all(1).cpu()
            g = torch.where(
                ok.to(block.device)[:, None, None], block, torch.zeros((), dtype=block.dtype, device=block.device)
            )
            g = g.to(torch.float64)
            gram = g @ g.transpose(1, 2)  # "example rank rank": ||G^T G||_F = ||G G^T||_F
            norms[s : s + b] = gram.square().sum((1, 2)).sqrt().cpu()
            finite[s : s + b] = ok
        if not bool(finite.all()):
            self._nonfinite(finite, nonfinite)
            norms[~finite] = float("nan")
        zero = finite & ((norms == 0) | ~torch.isfinite(norms))
        if bool(zero.any()):
            bad = zero.nonzero().flatten() + self.lo
            warn_caller(
                f"{len(bad)} PEF(s) have zero or non-finite Frobenius norm (examples {bad[:10].tolist()}"
                f"{' ...' if len(bad) > 10 else ''}), e.g. a one-hot prediction; they are excluded (coefficients 0)",
                RuntimeWarning,
            )
        self.valid = finite & ~zero
        self.norms = norms
        scale = torch.zeros(self.m, dtype=torch.float64)
        scale[self.valid] = norms[self.valid].rsqrt()
        self.scale = scale.to(device=self.device, dtype=self.dtype)
        if not bool(finite.all()):
            self._zero_rows = ~finite
            if self.G is not None:  # never write into the caller's tensor
                self.G = torch.where(
                    (~finite).to(self.G.device)[:, None, None],
                    torch.zeros((), dtype=self.G.dtype, device=self.G.device),
                    self.G,
                )

    def _nonfinite(self, finite: torch.Tensor, nonfinite: str) -> None:
        """PEFs with NaN/inf: a :class:`~npeff_lens.errors.SettingError` (``nonfinite="raise"``) or a warning."""
        bad = (~finite).nonzero().flatten() + self.lo
        msg = f"{len(bad)} PEF(s) contain NaN/inf (examples {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''})"
        overflow = self.storage_dtype == torch.float16 and self.dtype != torch.float16
        if nonfinite == "raise" and overflow:
            raise SettingError(
                msg + " as held in float16 ({storage_dtype}); if they are finite in the store, float16 overflowed them "
                "(its largest value is 65504): hold them in bfloat16, which has float32's range; else fix the "
                "collection or pass {nonfinite}='exclude' to drop them",
                storage_dtype="",
                nonfinite="",
            )
        if nonfinite == "raise":
            raise SettingError(msg + "; fix the collection or pass {nonfinite}='exclude' to drop them", nonfinite="")
        held = " as held in float16 (storage_dtype)" if overflow else ""
        warn_caller(f"{msg}{held}; they are excluded from the fit (coefficients 0)", RuntimeWarning)

    def blocks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(local_start, G block, scale block)``."""
        for s, block in self.raw_blocks():
            yield s, block, self.scale[s : s + block.shape[0]]


def open_shard(
    pefs,
    n_components: int,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    storage_dtype: torch.dtype | str | None = None,
    memory_budget: int = 4 * 2**30,
    batch_size: int | None = None,
    nonfinite: str = "raise",
) -> tuple[PEFSource, Shard, int]:
    """``(source, this rank's shard, number of valid examples over all ranks)`` of ``pefs`` (a tensor or a
    :class:`PEFSource`), as :class:`~npeff_lens.decomposition.NPEFF` reads them with the same arguments.

    ``device`` None: CUDA when available, else the CPU; ``storage_dtype`` None: ``dtype``. Each rank owns the
    contiguous examples ``[rank m / world, (rank + 1) m / world)``."""
    source = as_source(pefs)
    m = len(source)
    if m == 0:
        raise ValueError("no PEFs: the input has 0 examples")
    rank, world = rank_and_world()
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    working = resolve_dtype(dtype)
    shard = Shard(
        source,
        rank * m // world,
        (rank + 1) * m // world,
        dtype=working,
        storage_dtype=working if storage_dtype is None else resolve_dtype(storage_dtype, "storage_dtype"),
        device=device,
        memory_budget=memory_budget,
        batch_size=batch_size,
        nonfinite=nonfinite,
        n_components=n_components,
    )
    n_valid = int(all_reduce(torch.tensor([float(shard.valid.sum())], dtype=torch.float64, device=device)).item())
    if n_valid == 0:
        raise ValueError("no example has a finite, non-zero PEF: nothing to decompose")
    return source, shard, n_valid
