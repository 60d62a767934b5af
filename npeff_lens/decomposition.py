"""The NPEFF estimator: non-negative factorisation of per-example Fishers (§2.2, App. D).

Minimises, over coefficients ``W >= 0`` ("example component") and pseudo-Fisher vectors
``H`` ("component dim")::

    mean_i || F_i - sum_j W_ij h_j h_j^T ||_F^2,      F_i = G_i^T G_i / ||G_i^T G_i||_F

directly on the low-rank PEFs ``G`` ("example rank dim"): no ``d x d`` (or ``m x m``) matrix is ever
formed. One step computes ``B = G H^T`` ("example rank component") once and uses it for both the
multiplicative W update (App. D.1) and the gradient step on H (App. D.2). Data-parallel under
``torch.distributed``: each rank owns a contiguous slice of the examples, with one all-reduce of the H
gradient (packed with the loss scalars) per step (App. D.3).
The PEFs may be held in a narrower ``storage_dtype`` (e.g. bfloat16) than the working ``dtype``: each
chunk of examples is cast up just before use, so every product and reduction accumulates in ``dtype``.

The API follows scikit-learn's ``NMF``: hyper-parameters in ``__init__`` (checked against the table
``npeff_lens.constraints`` by :func:`validate_params`), ``fit`` / ``transform`` / ``fit_transform``,
learned state ending in ``_``. As there, the estimator only orchestrates: the update steps are
module-level functions (``_sweep``: one pass of W update and H gradient; ``_w_updates``: the W-only
iterations of ``transform``), and checkpoints are written and read by ``_Checkpoints``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import pretrained
from .config import check_same, validate_params
from .io import atomic_write, read_json
from .io import progress as progress_bar

__all__ = ["NPEFF", "validate_params"]

_W_INIT_BLOCK = 4096  # rows per seeded block of the W initialisation: identical for any rank split
_TEMP_BUDGET = 256 * 2**20  # bytes for the per-chunk temporaries B and its weighted copy (in memory)
_DEAD_THRESHOLD = 1e-8  # a column whose largest normalised coefficient is below this is dead


# ----------------------------------------------------------------------------------------------
# Input protocol
# ----------------------------------------------------------------------------------------------


class _TensorSource:
    """Adapts a resident tensor ``"example rank dim"`` (or ``"example dim"``) to the store protocol."""

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


def _as_source(pefs: Any):
    if isinstance(pefs, torch.Tensor):
        return _TensorSource(pefs)
    missing = [a for a in ("rows", "dim", "iter_batches", "__len__") if not hasattr(pefs, a)]
    if missing:
        raise TypeError(
            "PEFs must be a torch.Tensor [m, r, d] or a store with __len__, rows, dim, manifest and "
            f"iter_batches(batch_size); {type(pefs).__name__} lacks {missing}"
        )
    return pefs


def _manifest_of(source) -> dict:
    manifest = getattr(source, "manifest", None) or {}
    return json.loads(json.dumps(dict(manifest), default=str))  # a JSON-able copy


def _check_same_space(fit_manifest: dict, manifest: dict) -> None:
    """PEFs given to ``transform`` must live in the space the components were fitted in."""
    for key in sorted(set(fit_manifest) & set(manifest)):
        if ("projection" in key or "layout" in key) and fit_manifest[key] != manifest[key]:
            raise ValueError(
                f"the PEFs' manifest entry {key!r} differs from the one the decomposition was fitted on "
                f"({manifest[key]!r} != {fit_manifest[key]!r}): the components live in another space"
            )


def _dist_info() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _resolve_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be a floating torch dtype; got {dtype!r}")
    return value


def _storage_dtype(params: dict) -> torch.dtype:
    """The dtype G is held in: ``storage_dtype``, or the working ``dtype`` when it is None."""
    if params.get("storage_dtype") is None:
        return _resolve_dtype(params["dtype"])
    return _resolve_dtype(params["storage_dtype"], "storage_dtype")


def _typed(params: dict) -> dict:
    """Params with their types: ``3`` and ``3.0`` compare equal, but only one of them is a valid ``n_steps``."""
    return {k: (type(v), v) for k, v in params.items()}


class CorruptFileError(ValueError):
    """A checkpoint or a saved decomposition is damaged (unreadable, truncated, or its checksum differs)."""


def _crc(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for k in sorted(tensors):
        crc = zlib.crc32(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors with the CRC-32 of the tensors' bytes in its metadata (checked by ``_load_tensors``)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, save(tensors, metadata={"crc32": str(_crc(tensors))}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, or a ``CorruptFileError`` naming it (files without a checksum are trusted)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CorruptFileError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if "crc32" in meta and int(meta["crc32"]) != _crc(tensors):
        raise CorruptFileError(f"{path} is damaged: the checksum of its tensors differs from the one written")
    return tensors


# ----------------------------------------------------------------------------------------------
# The local shard of the data
# ----------------------------------------------------------------------------------------------


class _Shard:
    """The examples ``[lo, hi)`` owned by this rank, resident or streamed, with their normalisation.

    G is held (or streamed to the device) in ``storage_dtype`` and each block is cast to the working
    ``dtype`` just before use, so the working-precision copy exists one chunk at a time; ``scale``, W and H
    are in the working dtype. ``scale[i] = 1 / sqrt(||G_i^T G_i||_F)`` (0 for excluded examples, computed in
    float64 from the stored values), applied to ``B = G H^T`` so that the PEFs are used normalised without a
    normalised copy.
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
        block) fit ``_TEMP_BUDGET``."""
        if self.G is not None:
            cast = self.dim if self.storage_dtype != self.dtype else 0
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            per_example = self.rows * (self.n_components * 2 + cast) * itemsize
            step = self.batch_size or max(1, _TEMP_BUDGET // per_example)
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
            bad = (~finite).nonzero().flatten() + self.lo
            msg = f"{len(bad)} PEF(s) contain NaN/inf (examples {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''})"
            fix = "fix the collection"
            if self.storage_dtype == torch.float16 and self.dtype != torch.float16:
                msg += " as held in float16 (storage_dtype, --storage-dtype)"
                fix = "if they are finite in the store, float16 overflowed them (its largest value is 65504): "
                fix += "hold them in bfloat16, which has float32's range; else fix the collection"
            if nonfinite == "raise":
                raise ValueError(f"{msg}; {fix} or pass nonfinite='exclude' to drop them")
            warnings.warn(msg + "; they are excluded from the fit (coefficients 0)", RuntimeWarning, stacklevel=4)
            norms[~finite] = float("nan")
        zero = finite & ((norms == 0) | ~torch.isfinite(norms))
        if bool(zero.any()):
            bad = zero.nonzero().flatten() + self.lo
            warnings.warn(
                f"{len(bad)} PEF(s) have zero or non-finite Frobenius norm (examples {bad[:10].tolist()}"
                f"{' ...' if len(bad) > 10 else ''}), e.g. a one-hot prediction; they are excluded (coefficients 0)",
                RuntimeWarning,
                stacklevel=4,
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

    def blocks(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(local_start, G block, scale block)``."""
        for s, block in self.raw_blocks():
            yield s, block, self.scale[s : s + block.shape[0]]


# ----------------------------------------------------------------------------------------------
# Initialisation (App. D.4) and collectives
# ----------------------------------------------------------------------------------------------


def _init_W(seed: int, lo: int, hi: int, C: int, dtype) -> torch.Tensor:
    """Rows ``[lo, hi)`` of W ~ U[0, 1], drawn in seeded blocks of rows so any split over ranks gives the same W."""
    parts = []
    for block in range(lo // _W_INIT_BLOCK, (hi - 1) // _W_INIT_BLOCK + 1 if hi > lo else 0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * block + 1)
        rows = torch.rand(_W_INIT_BLOCK, C, generator=g, dtype=torch.float64)
        a, b = max(lo, block * _W_INIT_BLOCK), min(hi, (block + 1) * _W_INIT_BLOCK)
        parts.append(rows[a - block * _W_INIT_BLOCK : b - block * _W_INIT_BLOCK])
    W = torch.cat(parts) if parts else torch.empty(0, C, dtype=torch.float64)
    return W.to(dtype)


def _init_H(seed: int, C: int, d: int, dtype) -> torch.Tensor:
    """H ~ N(0, 2 / (C d))."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2)
    return (torch.randn(C, d, generator=g, dtype=torch.float64) * math.sqrt(2.0 / (C * d))).to(dtype)


def _initial_state(shard: _Shard, C: int, seed: int, W=None, H=None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of W, and H, on the device: drawn from ``seed`` or the given ones (``init="custom"``)."""
    lo, hi, d, dtype, device = shard.lo, shard.hi, shard.dim, shard.dtype, shard.device
    W_ = _init_W(seed, lo, hi, C, dtype) if W is None else torch.as_tensor(W)[lo:hi].to(dtype)
    H_ = _init_H(seed, C, d, dtype) if H is None else torch.as_tensor(H).to(dtype).clone()
    if tuple(W_.shape) != (hi - lo, C) or tuple(H_.shape) != (C, d):
        raise ValueError(f"initial W must be [{len(shard.source)}, {C}] and H [{C}, {d}]")
    if bool((W_ < 0).any()):
        raise ValueError("initial W must be non-negative")
    W_ = W_.to(device).clone()
    W_[~shard.valid.to(device)] = 0
    return W_, H_.to(device)


def _all_reduce(buf: torch.Tensor) -> torch.Tensor:
    """Sums ``buf`` over the ranks in place (no-op outside ``torch.distributed``)."""
    if _dist_info()[1] > 1:
        torch.distributed.all_reduce(buf)
    return buf


def _gather(W: torch.Tensor, norms: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full ``[m, C]`` coefficients and ``[m]`` norms on every rank (CPU)."""
    _, world = _dist_info()
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
# The update steps
# ----------------------------------------------------------------------------------------------


def _sweep(shard: _Shard, W: torch.Tensor, H: torch.Tensor, n_valid: int, *, eps: float, update_W: bool, grad: bool):
    """One pass: ``B = G H^T`` per block, then (optionally) the W update (in place) and the H gradient.

    Returns (loss before, loss after the W update, gradient of the mean loss in H or None).
    Scalars and the gradient are all-reduced together (one collective, App. D.3).
    """
    C, d = H.shape
    S = H @ H.T
    S2 = S * S  # (H H^T) ⊙ (H H^T)
    acc = torch.zeros(C * d + C * C + 2 if grad else 2, dtype=H.dtype, device=H.device)
    if grad:
        gradT2 = acc[: C * d].view(C, d)
        WtW = acc[C * d : C * d + C * C].view(C, C)
    scal = acc[-2:].view(2)  # <W, N>, <W, W S2> before the W update
    wn_mid = torch.zeros((), dtype=torch.float64, device=H.device)
    for s, G, scale in shard.blocks():
        b, r, _ = G.shape
        Wb = W[s : s + b]
        G2 = G.reshape(b * r, d)
        B = (G2 @ H.T).view(b, r, C) * scale[:, None, None]  # App. D.1: B = G H^T (normalised)
        N = B.square().sum(1)  # "example component"
        D = Wb @ S2
        scal[0] += (Wb * N).sum()
        scal[1] += (Wb * D).sum()
        if update_W:
            Wb = Wb * N / (D + eps)  # multiplicative update, App. D.1
            W[s : s + b] = Wb
            wn_mid += (Wb * N).sum().double()
        if grad:
            coef = (B * Wb[:, None, :]) * scale[:, None, None]  # T2 = -4 sum W B G, App. D.2
            gradT2.addmm_(coef.view(b * r, C).T, G2, alpha=-4.0)
            WtW.addmm_(Wb.T, Wb)
    if grad:
        # T1 = 4 ((W^T W) ⊙ (H H^T)) H, linear in W^T W, so per-rank terms sum correctly.
        gradT2.addmm_(WtW * S, H, alpha=4.0)
        extra = torch.stack([wn_mid.to(H.dtype), (S2 * WtW).sum()])
    else:
        # <W', W' S2> for the updated W needs W'^T W' (cheap relative to the sweep).
        wtw = torch.zeros(C, C, dtype=H.dtype, device=H.device)
        if update_W:
            for s in range(0, W.shape[0], 65536):
                wtw.addmm_(W[s : s + 65536].T, W[s : s + 65536])
        extra = torch.stack([wn_mid.to(H.dtype), (S2 * wtw).sum()])
    packed = _all_reduce(torch.cat([acc, extra]))
    wn, wd, wn2, wd2 = (float(x) for x in packed[-4:].double())
    loss = (n_valid - 2.0 * wn + wd) / n_valid
    loss_mid = (n_valid - 2.0 * wn2 + wd2) / n_valid if update_W else loss
    g = packed[: C * d].view(C, d) / n_valid if grad else None
    return loss, loss_mid, g


def _w_updates(shard: _Shard, W: torch.Tensor, H: torch.Tensor, *, eps: float, n_steps: int) -> torch.Tensor:
    """``n_steps`` multiplicative W updates (App. D.1) with H fixed; returns the new W.

    ``B = G H^T`` does not change when H is fixed, so the data are read once and the updates then
    run on ``[m, C]`` matrices.
    """
    C = H.shape[0]
    S2 = (H @ H.T).square()
    N = torch.empty(shard.m, C, dtype=H.dtype, device=H.device)
    for s, G, scale in shard.blocks():
        b, r, d = G.shape
        B = (G.reshape(b * r, d) @ H.T).view(b, r, C) * scale[:, None, None]
        N[s : s + b] = B.square().sum(1)
    for step in range(n_steps):
        W = W * N / (W @ S2 + eps)
        if step % 50 == 0 and not bool(torch.isfinite(W).all()):
            raise FloatingPointError(f"NPEFF.transform: non-finite coefficients at W step {step + 1}")
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(f"NPEFF.transform: non-finite coefficients after {n_steps} W steps")
    return W


def _unit_norm(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm pseudo-Fisher vectors; ``W_ij h_j h_j^T`` unchanged (§2.2)."""
    hnorm = H.norm(dim=1)
    safe = torch.where(hnorm > 0, hnorm, torch.ones_like(hnorm))
    return W * (safe * safe)[None, :], H / safe[:, None]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _fingerprint(params: dict, m: int, r: int, d: int) -> dict:
    """What a checkpoint must share with the fit that resumes it (the data's shape and the numerics).

    ``storage_dtype`` is there only when it differs from ``dtype``: checkpoints written before it existed
    (G held in the working dtype) resume as before."""
    fingerprint = {
        "n_components": params["n_components"],
        "m": m,
        "rows": r,
        "dim": d,
        "seed": params["seed"],
        "lr": params["lr"],
        "warmup_lr": params["warmup_lr"],
        "n_warmup_steps": params["n_warmup_steps"],
        "eps": params["eps"],
        "dtype": str(_resolve_dtype(params["dtype"])),
        "init": params["init"],
    }
    if _storage_dtype(params) != _resolve_dtype(params["dtype"]):
        fingerprint["storage_dtype"] = str(_storage_dtype(params))
    return fingerprint


class _Checkpoints:
    """``root/latest.json`` names the newest ``root/step-XXXXXXXX/``, which holds ``state.safetensors``
    (H and the loss histories, from rank 0) and one ``W-<lo>-<hi>.safetensors`` per rank."""

    def __init__(self, root: str | os.PathLike, lo: int, hi: int, fingerprint: dict):
        self.root, self.lo, self.hi, self.fingerprint = Path(root), lo, hi, fingerprint

    def save(self, step: int, W: torch.Tensor, H: torch.Tensor, hist: list, hist_w: list) -> None:
        rank, world = _dist_info()
        barrier = torch.distributed.barrier if world > 1 else (lambda: None)
        step_dir = self.root / f"step-{step:08d}"
        if rank == 0:
            step_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        _save_tensors(step_dir / f"W-{self.lo:012d}-{self.hi:012d}.safetensors", {"W": W})
        if rank == 0:
            state = {"H": H, "loss": torch.tensor(hist, dtype=torch.float64)}
            state["loss_w"] = torch.tensor(hist_w, dtype=torch.float64)
            _save_tensors(step_dir / "state.safetensors", state)
        barrier()
        if rank == 0:  # the newest two are kept: a damaged newest one falls back to the one before
            previous = read_json(self.root / "latest.json") if (self.root / "latest.json").exists() else {}
            meta = {"step": step, "dir": step_dir.name, "fingerprint": self.fingerprint}
            if previous.get("dir") not in (None, step_dir.name):
                meta["previous"] = {"step": previous["step"], "dir": previous["dir"]}
            atomic_write(self.root / "latest.json", json.dumps(meta, indent=1))
            keep = {step_dir.name, meta.get("previous", {}).get("dir")}
            for old in self.root.glob("step-*"):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, dtype: torch.dtype, device: torch.device):
        """``(step, W, H, hist, hist_w)`` of the latest checkpoint (None when there is none); a checkpoint
        of another fit is a ``ConfigMismatchError`` naming the differing fields."""

        root = self.root
        if not (root / "latest.json").exists():
            return None
        meta = read_json(root / "latest.json")
        check_same(
            meta["fingerprint"],
            self.fingerprint,
            f"the checkpoint in {root}",
            hint="use another checkpoint_dir or delete it",
        )
        for candidate in (meta, meta.get("previous")):
            if candidate is None:
                continue
            try:
                return self._load_step(int(candidate["step"]), root / candidate["dir"], dtype, device)
            except (CorruptFileError, FileNotFoundError) as e:
                warnings.warn(f"NPEFF: checkpoint step {candidate['step']} is damaged ({e}); trying the one before",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
        warnings.warn(f"NPEFF: no intact checkpoint in {root}; the fit starts again", RuntimeWarning, stacklevel=3)
        return None

    def _load_step(self, step: int, step_dir: Path, dtype, device):
        lo, hi = self.lo, self.hi
        state = _load_tensors(step_dir / "state.safetensors")
        W = torch.empty(hi - lo, self.fingerprint["n_components"], dtype=dtype)
        covered = 0
        for f in sorted(step_dir.glob("W-*.safetensors")):
            a, b = (int(x) for x in f.stem.split("-")[1:3])
            x, y = max(a, lo), min(b, hi)
            if x < y:
                W[x - lo : y - lo] = _load_tensors(f)["W"][x - a : y - a].to(dtype)
                covered += y - x
        if covered != hi - lo:
            raise CorruptFileError(f"the checkpoint in {step_dir} does not cover examples [{lo}, {hi})")
        # clone: a fresh, aligned buffer; BLAS takes another path (other rounding) on the loaded one
        H = state["H"].to(device=device, dtype=dtype).clone()
        # hist[:step]: the loss after `step` steps is recomputed by the next sweep
        return step, W.to(device), H, state["loss"].tolist()[:step], state["loss_w"].tolist()[:step]


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------


class NPEFF:
    """Non-Negative Per-Example Fisher Factorization (Matena & Raffel, §2.2 and App. D).

    Parameters
    ----------
    n_components : int
        Number C of components (rank-1 PSD matrices ``h_j h_j^T``).
    n_steps : int, default 1000
        Joint steps (a W update, App. D.1, then an H gradient step, App. D.2) after the warm-up.
    n_warmup_steps : int, default 100
        H-only steps with W frozen at its initialisation, first (App. D.4).
    lr, warmup_lr : float, default 0.5 / 0.5
        Learning rates of the H gradient step, applied to the gradient of the *mean* per-example loss
        (the sum of App. D.2 divided by the number m of examples), so the same value works for any m
        and d: the PEFs have unit norm, so the curvature of the mean loss in H is O(1) in the joint
        phase. During the warm-up (W ~ U[0, 1] frozen) the curvature is about ``||mean PEF||_op``,
        which shrinks like 1/C for diverse data: with hundreds of components a larger ``warmup_lr``
        (up to ~0.1 C) shortens the warm-up. Too large a value shows as a "loss rose" warning or a
        FloatingPointError. (0.5 recovers planted decompositions with C = 6 ... 64; 3 diverges at C = 6.)
    init : {"random", "custom"}, default "random"
        "random": W ~ U[0, 1], H ~ N(0, 2 / (C d)) (App. D.4); "custom": ``fit(pefs, W=..., H=...)``.
    seed : int, default 0
        Seeds the initialisation; the fit is deterministic given the seed (and the device).
    eps : float, default 1e-12
        Added to the denominator of the multiplicative W update.
    device, dtype :
        Where and in which precision to compute (``None`` device: CUDA when available, else CPU).
        W, H, the per-example norms and every product and reduction are in ``dtype``.
    storage_dtype : torch dtype, its name or None, default None
        The precision the PEFs G are held in on the device (``None``: ``dtype``). ``"bfloat16"`` halves
        their memory (and what ``memory_budget`` counts, and the host-to-device traffic when streaming):
        each chunk of examples is cast to ``dtype`` just before use, so products still accumulate in
        ``dtype``; only G's values are rounded (about 3 significant digits). The matmul precision is
        left as torch has it (``torch.backends.cuda.matmul.allow_tf32``): bf16 storage does not turn on
        TF32.
    memory_budget : int, default 4 GiB
        Bytes for resident PEFs on this rank (in ``storage_dtype``); above it the input is streamed every step.
    batch_size : int or None
        Examples per streamed batch (``None``: the store's default) and per in-memory chunk
        (``None``: chunks whose temporaries fit 256 MiB).
    nonfinite : {"raise", "exclude"}, default "raise"
        PEFs containing NaN/inf raise a ValueError, or are excluded with a warning. PEFs with zero
        norm are always excluded with a warning; excluded examples get coefficients 0.
    checkpoint_dir, checkpoint_every :
        Save the state every ``checkpoint_every`` steps (atomically); a new fit with the same
        ``checkpoint_dir`` and data resumes from the latest checkpoint and ends where an
        uninterrupted fit would. A checkpoint of another fit (other data, seed, learning rates, ...)
        is a ``ConfigMismatchError`` (a ValueError) naming each differing field.
    callback : callable or None
        ``callback(step, loss)`` after each step (1-based ``step``); an exception stops the fit.
    progress : bool, default True
        A tqdm bar over the steps showing the loss (rank 0 only).
    verbose : int, default 0
        >0 prints a summary line at the end of ``fit``.

    Attributes
    ----------
    coefficients_ : Tensor [m, C]
        Non-negative coefficients for the unit-norm PEFs, rescaled for unit-norm components.
    components_ : Tensor [C, d]
        Pseudo-Fisher vectors ``h_j``, unit L2 norm (so ``h_j h_j^T`` has unit Frobenius norm).
    loss_history_ : Tensor [n_iter_ + 1]
        Mean per-example loss after 0, 1, ... steps (1.0 is the loss of reconstructing nothing).
    w_step_loss_history_ : Tensor [n_iter_]
        Loss right after the W update of each step (the loss before it, for warm-up steps).
    reconstruction_err_ : float
        ``loss_history_[-1]``.
    n_iter_ : int
        Steps performed (warm-up + joint).
    pef_norms_ : Tensor [m]
        ``||G_i^T G_i||_F`` of the input PEFs (NaN where non-finite).
    excluded_ : BoolTensor [m]
        Examples left out of the fit (zero or non-finite PEF).
    dead_components_ : LongTensor
        Components whose coefficient column went to zero (max < 1e-8).
    manifest_ : dict
        The input store's manifest (parameter layout, projection seed and dims, ...).
    """

    def __init__(
        self,
        n_components: int,
        *,
        n_steps: int = 1000,
        n_warmup_steps: int = 100,
        lr: float = 0.5,
        warmup_lr: float = 0.5,
        init: str = "random",
        seed: int = 0,
        eps: float = 1e-12,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        storage_dtype: torch.dtype | str | None = None,
        memory_budget: int = 4 * 2**30,
        batch_size: int | None = None,
        nonfinite: str = "raise",
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        callback: Callable[[int, float], Any] | None = None,
        progress: bool = True,
        verbose: int = 0,
    ):
        self.n_components = n_components
        self.n_steps = n_steps
        self.n_warmup_steps = n_warmup_steps
        self.lr = lr
        self.warmup_lr = warmup_lr
        self.init = init
        self.seed = seed
        self.eps = eps
        self.device = device
        self.dtype = dtype
        self.storage_dtype = storage_dtype
        self.memory_budget = memory_budget
        self.batch_size = batch_size
        self.nonfinite = nonfinite
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.callback = callback
        self.progress = progress
        self.verbose = verbose

    # -- scikit-learn conveniences ---------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> NPEFF:
        for name, value in params.items():
            if name not in self._param_names():
                raise ValueError(f"invalid parameter {name!r} for NPEFF")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        shown = [f"n_components={self.n_components!r}"]
        for name in self._param_names()[1:]:
            value = getattr(self, name)
            if value is not defaults.get(name) and value != defaults.get(name):
                shown.append(f"{name}={value!r}")
        return f"NPEFF({', '.join(shown)})"

    @classmethod
    def from_config(cls, config, **params) -> NPEFF:
        """The estimator of a :class:`~npeff_lens.config.DecomposeConfig`, with ``params`` (e.g. ``checkpoint_dir``)
        added or replaced. A config checked its fields when it was built, so only ``params`` are checked here, and
        ``fit`` checks again only what is set after."""
        validate_params(params)
        est = cls(**{**config.estimator_params(), **params})
        est._checked_params = _typed(est.get_params())
        return est

    def _validate(self) -> None:
        """Check the hyper-parameters (once per set of values: ``set_params`` or an assignment makes a new set)."""
        params = self.get_params()
        if _typed(params) != getattr(self, "_checked_params", None):
            validate_params(params)
            self._checked_params = _typed(params)

    def _shard(self, pefs) -> tuple[Any, _Shard, int]:
        """``(source, this rank's shard, number of valid examples over all ranks)``."""
        source = _as_source(pefs)
        m = len(source)
        if m == 0:
            raise ValueError("no PEFs: the input has 0 examples")
        rank, world = _dist_info()
        device = torch.device(
            self.device if self.device is not None else "cuda" if torch.cuda.is_available() else "cpu"
        )
        shard = _Shard(
            source,
            rank * m // world,
            (rank + 1) * m // world,
            dtype=_resolve_dtype(self.dtype),
            storage_dtype=_storage_dtype(self.get_params()),
            device=device,
            memory_budget=self.memory_budget,
            batch_size=self.batch_size,
            nonfinite=self.nonfinite,
            n_components=self.n_components,
        )
        n_valid = int(_all_reduce(torch.tensor([float(shard.valid.sum())], dtype=torch.float64, device=device)).item())
        if n_valid == 0:
            raise ValueError("no example has a finite, non-zero PEF: nothing to decompose")
        return source, shard, n_valid

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, pefs, y=None, *, W: torch.Tensor | None = None, H: torch.Tensor | None = None) -> NPEFF:
        """Learn ``components_`` and ``coefficients_`` from PEFs.

        ``pefs``: Tensor "example rank dim" (or "example dim", r = 1), or a PEF store (see module doc).
        ``W`` ("example component") / ``H`` ("component dim"): initial values when ``init="custom"``.
        """
        self._validate()
        if (W is not None or H is not None) and self.init != "custom":
            raise ValueError("W / H initial values need init='custom'")
        source, shard, n_valid = self._shard(pefs)
        W_, H_ = _initial_state(shard, self.n_components, self.seed, W, H)
        step, hist, hist_w = 0, [], []  # hist[t]: loss after t steps; hist_w[t]: after step t+1's W update
        ckpt = None
        if self.checkpoint_dir is not None:
            fingerprint = _fingerprint(self.get_params(), len(source), shard.rows, shard.dim)
            ckpt = _Checkpoints(self.checkpoint_dir, shard.lo, shard.hi, fingerprint)
            resumed = ckpt.load(shard.dtype, shard.device)
            if resumed is not None:
                step, W_, H_, hist, hist_w = resumed
        total, rises = self.n_warmup_steps + self.n_steps, []
        show = self.progress and _dist_info()[0] == 0 and total > step
        with progress_bar(total=total, initial=step, desc="NPEFF", unit="step", enabled=show) as bar:
            while step < total:
                warm = step < self.n_warmup_steps
                lr = self.warmup_lr if warm else self.lr
                loss, loss_mid, g = _sweep(shard, W_, H_, n_valid, eps=self.eps, update_W=not warm, grad=True)
                if not (math.isfinite(loss) and math.isfinite(loss_mid) and bool(torch.isfinite(g).all())):
                    raise FloatingPointError(
                        f"NPEFF: non-finite loss or H gradient at step {step + 1} ({'warm-up' if warm else 'joint'}); "
                        f"the H learning rate ({lr}) is probably too large"
                    )
                if hist and loss > hist_w[-1] + 1e-6 * max(1.0, abs(hist_w[-1])):
                    rises.append(step)
                hist.append(loss)
                hist_w.append(loss_mid)
                H_ -= lr * g  # App. D.2
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.5f}", refresh=False)
                if ckpt is not None and (step % self.checkpoint_every == 0 or step == total):
                    ckpt.save(step, W_, H_, hist, hist_w)
                if self.callback is not None:
                    self.callback(step, loss)
        final, _, _ = _sweep(shard, W_, H_, n_valid, eps=self.eps, update_W=False, grad=False)
        if not math.isfinite(final):
            raise FloatingPointError(f"NPEFF: non-finite loss after step {step}; lower the learning rate")
        hist.append(final)
        if rises:
            warnings.warn(
                f"NPEFF: the loss rose after {len(rises)} H step(s) (first after step {rises[0]}); "
                "consider a smaller lr / warmup_lr",
                RuntimeWarning,
                stacklevel=2,
            )
        W_, H_ = _unit_norm(W_, H_)
        self._set_fitted(source, shard, W_, H_, hist, hist_w)
        return self

    def _set_fitted(self, source, shard: _Shard, W: torch.Tensor, H: torch.Tensor, hist, hist_w) -> None:
        """The learned attributes (every rank gets all of them), dead components, the verbose summary."""
        coeffs, norms = _gather(W, shard.norms.to(W.device), len(source))
        self.components_ = H.cpu()
        self.coefficients_ = coeffs
        self.pef_norms_ = norms.double()
        self.excluded_ = ~(torch.isfinite(self.pef_norms_) & (self.pef_norms_ > 0))
        self.loss_history_ = torch.tensor(hist, dtype=torch.float64)
        self.w_step_loss_history_ = torch.tensor(hist_w, dtype=torch.float64)
        self.reconstruction_err_ = float(hist[-1])
        self.n_iter_ = len(hist) - 1
        self.n_features_in_ = shard.dim
        self.n_rows_ = shard.rows
        self.manifest_ = _manifest_of(source)
        self._set_dead()
        if self.verbose and _dist_info()[0] == 0:
            print(
                f"NPEFF: {self.n_iter_} steps, loss {hist[0]:.5f} -> {hist[-1]:.5f}, "
                f"{len(self.dead_components_)} dead components"
            )

    def _set_dead(self) -> None:
        colmax = self.coefficients_.max(0).values if self.coefficients_.shape[0] else torch.zeros(self.n_components)
        dead = (colmax < _DEAD_THRESHOLD).nonzero().flatten()
        self.dead_components_ = dead
        if len(dead):
            warnings.warn(
                f"NPEFF: {len(dead)} of {self.n_components} components are dead (coefficient column went to zero): "
                f"{dead[:20].tolist()}{' ...' if len(dead) > 20 else ''}; a longer warm-up or a smaller lr may help",
                RuntimeWarning,
                stacklevel=4,
            )

    # -- transform ------------------------------------------------------------------------------
    def transform(self, pefs, n_steps: int | None = None) -> torch.Tensor:
        """Coefficients ``[m, C]`` for new PEFs with ``components_`` fixed: W steps only (§2.2).

        The data are read once (see ``_w_updates``). ``n_steps`` defaults to ``max(n_steps, 500)``
        of the estimator.
        """
        self._check_fitted()
        n_steps = max(self.n_steps, 500) if n_steps is None else n_steps
        source = _as_source(pefs)
        if int(source.dim) != self.n_features_in_:
            raise ValueError(f"PEFs have dim {source.dim}; the components have {self.n_features_in_}")
        _check_same_space(self.manifest_, _manifest_of(source))
        source, shard, _ = self._shard(source)
        H = self.components_.to(device=shard.device, dtype=shard.dtype)
        W = _init_W(self.seed, shard.lo, shard.hi, self.n_components, shard.dtype).to(shard.device)
        W[~shard.valid.to(shard.device)] = 0
        W = _w_updates(shard, W, H, eps=self.eps, n_steps=n_steps)
        return _gather(W, shard.norms.to(shard.device), len(source))[0]

    def fit_transform(
        self, pefs, y=None, *, W: torch.Tensor | None = None, H: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``fit`` then return ``coefficients_``."""
        return self.fit(pefs, W=W, H=H).coefficients_

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise RuntimeError("this NPEFF instance is not fitted yet; call fit first")

    # -- persistence ------------------------------------------------------------------------------
    _TENSORS = (
        "coefficients_",
        "components_",
        "loss_history_",
        "w_step_loss_history_",
        "pef_norms_",
        "excluded_",
        "dead_components_",
    )

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``npeff.safetensors`` (learned tensors) and ``config.json`` (hyper-parameters, manifest)."""
        self._check_fitted()
        if _dist_info()[0] != 0:
            return Path(directory)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from npeff_lens import __version__

        params = self.get_params()
        params.pop("callback")
        params["dtype"] = str(_resolve_dtype(self.dtype)).replace("torch.", "")
        if self.storage_dtype is not None:
            params["storage_dtype"] = str(_resolve_dtype(self.storage_dtype, "storage_dtype")).replace("torch.", "")
        params["device"] = None if self.device is None else str(self.device)
        params["checkpoint_dir"] = None if self.checkpoint_dir is None else str(self.checkpoint_dir)
        config = {
            "class": "NPEFF",
            "npeff_lens_version": __version__,
            "params": params,
            "fitted": {
                "n_iter_": self.n_iter_,
                "reconstruction_err_": self.reconstruction_err_,
                "n_features_in_": self.n_features_in_,
                "n_rows_": self.n_rows_,
                "n_examples": int(self.coefficients_.shape[0]),
            },
            "manifest": self.manifest_,
        }
        _save_tensors(directory / "npeff.safetensors", {k: getattr(self, k) for k in self._TENSORS})
        atomic_write(directory / "config.json", json.dumps(config, indent=1, default=str))
        return directory

    # -- the Hugging Face hub (npeff_lens.pretrained; npeff_lens.hub for run directories) -------------
    def save_pretrained(self, directory, **kwargs) -> Path:
        """``config.json`` + ``npeff.safetensors``, the run's configs and a model card (``npeff_lens.pretrained``);
        ``kwargs``: ``store_manifest``, ``run_configs``, ``tunings``, ``repo_id``."""
        return pretrained.write_folder(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, dir_or_repo_id, **kwargs):
        """A decomposition from a local folder or a hub repository (offline: a one-line error)."""
        return pretrained.from_pretrained(dir_or_repo_id, cls, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Uploads :meth:`save_pretrained`'s folder to ``repo_id``; returns the commit URL."""
        return pretrained.push_estimator(self, repo_id, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> NPEFF:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.get("class") != "NPEFF":
            raise ValueError(f"{directory} does not hold an NPEFF decomposition")
        params = dict(config["params"])
        valid = set(cls._param_names())
        est = cls(**{k: v for k, v in params.items() if k in valid})
        for k, v in _load_tensors(directory / "npeff.safetensors").items():
            setattr(est, k, v)
        for k, v in config["fitted"].items():
            if k.endswith("_"):
                setattr(est, k, v)
        est.manifest_ = config.get("manifest", {})
        return est
