"""The NPEFF estimator: non-negative factorisation of per-example Fishers (§2.2, App. D).

Minimises, over coefficients ``W >= 0`` ("example component") and pseudo-Fisher vectors
``H`` ("component dim")::

    mean_i || F_i - sum_j W_ij h_j h_j^T ||_F^2,      F_i = G_i^T G_i / ||G_i^T G_i||_F

directly on the low-rank PEFs ``G`` ("example rank dim"): no ``d x d`` (or ``m x m``) matrix is ever
formed. One step computes ``B = G H^T`` ("example rank component") once and uses it for both the
multiplicative W update (App. D.1) and the gradient step on H (App. D.2). Data-parallel under
``torch.distributed``: each rank owns a contiguous slice of the examples, with one all-reduce of the H
gradient (packed with the loss scalars) per step (App. D.3).

The API follows scikit-learn's ``NMF``: hyper-parameters in ``__init__``, ``fit`` / ``transform`` /
``fit_transform``, learned state ending in ``_``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["NPEFF"]

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


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype; got {dtype!r}")
    return value


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    _atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------
# The local shard of the data
# ----------------------------------------------------------------------------------------------


class _Shard:
    """The examples ``[lo, hi)`` owned by this rank, resident or streamed, with their normalisation.

    ``scale[i] = 1 / sqrt(||G_i^T G_i||_F)`` (0 for excluded examples), applied to ``B = G H^T`` so that
    the PEFs are used normalised without a normalised copy.
    """

    def __init__(self, source, lo, hi, *, dtype, device, memory_budget, batch_size, nonfinite, n_components):
        self.source, self.lo, self.hi = source, lo, hi
        self.n_components = n_components  # sizes the in-memory chunks
        self.dtype, self.device, self.batch_size = dtype, device, batch_size
        self.rows, self.dim = int(source.rows), int(source.dim)
        self.m = hi - lo
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.resident_bytes = self.m * self.rows * self.dim * itemsize
        self.in_memory = self.resident_bytes <= memory_budget
        self.G: torch.Tensor | None = None
        if self.in_memory:
            self.G = self._load_resident()
        self._measure(nonfinite)

    # -- loading -------------------------------------------------------------------------------
    def _load_resident(self) -> torch.Tensor:
        src = self.source
        if isinstance(src, _TensorSource):
            G = src.tensor[self.lo : self.hi]
        elif self.lo == 0 and self.hi == len(src) and hasattr(src, "load_pefs"):
            G = src.load_pefs(dtype=self.dtype)
        else:
            G = torch.empty(self.m, self.rows, self.dim, dtype=self.dtype)
            for start, _, part in self._stream():
                G[start : start + part.shape[0]] = part.to(self.dtype)
        G = G.to(device=self.device, dtype=self.dtype)
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
        """``(local_start, G block on device in the working dtype)``; excluded rows are zeroed."""
        if self.G is not None:
            per_example = self.rows * self.n_components * 2 * self.G.element_size()
            step = self.batch_size or max(1, _TEMP_BUDGET // per_example)
            for s in range(0, self.m, step):
                yield s, self.G[s : s + step]
            return
        for s, _, part in self._stream():
            part = part.to(device=self.device, dtype=self.dtype)
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
            if nonfinite == "raise":
                raise ValueError(msg + "; fix the collection or pass nonfinite='exclude' to drop them")
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
    memory_budget : int, default 4 GiB
        Bytes for resident PEFs on this rank; above it the input is streamed every step.
    batch_size : int or None
        Examples per streamed batch (``None``: the store's default) and per in-memory chunk
        (``None``: chunks whose temporaries fit 256 MiB).
    nonfinite : {"raise", "exclude"}, default "raise"
        PEFs containing NaN/inf raise a ValueError, or are excluded with a warning. PEFs with zero
        norm are always excluded with a warning; excluded examples get coefficients 0.
    checkpoint_dir, checkpoint_every :
        Save the state every ``checkpoint_every`` steps (atomically); a new fit with the same
        ``checkpoint_dir`` and data resumes from the latest checkpoint and ends where an
        uninterrupted fit would.
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

    # -- validation -----------------------------------------------------------------------------
    def _validate(self) -> None:
        def positive_int(name, value, zero_ok=False):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_ok else 1):
                raise ValueError(f"{name} must be an integer >= {0 if zero_ok else 1}; got {value!r}")

        positive_int("n_components", self.n_components)
        positive_int("n_steps", self.n_steps, zero_ok=True)
        positive_int("n_warmup_steps", self.n_warmup_steps, zero_ok=True)
        positive_int("checkpoint_every", self.checkpoint_every)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        for name in ("lr", "warmup_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number; got {v!r}")
        if not (self.eps >= 0):
            raise ValueError(f"eps must be >= 0; got {self.eps!r}")
        if self.init not in ("random", "custom"):
            raise ValueError(f"init must be 'random' or 'custom'; got {self.init!r}")
        if self.nonfinite not in ("raise", "exclude"):
            raise ValueError(f"nonfinite must be 'raise' or 'exclude'; got {self.nonfinite!r}")
        _resolve_dtype(self.dtype)

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _shard(self, pefs, *, n_components: int) -> tuple[Any, _Shard, int]:
        source = _as_source(pefs)
        m = len(source)
        if m == 0:
            raise ValueError("no PEFs: the input has 0 examples")
        rank, world = _dist_info()
        lo, hi = rank * m // world, (rank + 1) * m // world
        dtype, device = _resolve_dtype(self.dtype), self._device()
        shard = _Shard(
            source,
            lo,
            hi,
            dtype=dtype,
            device=device,
            memory_budget=self.memory_budget,
            batch_size=self.batch_size,
            nonfinite=self.nonfinite,
            n_components=n_components,
        )
        n_valid = self._all_reduce(torch.tensor([float(shard.valid.sum())], dtype=torch.float64, device=device))
        n_valid = int(n_valid.item())
        if n_valid == 0:
            raise ValueError("no example has a finite, non-zero PEF: nothing to decompose")
        return source, shard, n_valid

    @staticmethod
    def _all_reduce(buf: torch.Tensor) -> torch.Tensor:
        if _dist_info()[1] > 1:
            torch.distributed.all_reduce(buf)
        return buf

    # -- initialisation (App. D.4) ----------------------------------------------------------------
    def _init_W(self, lo: int, hi: int, C: int, dtype) -> torch.Tensor:
        """W ~ U[0, 1], drawn in seeded blocks of rows so any split over ranks gives the same W."""
        parts = []
        for block in range(lo // _W_INIT_BLOCK, (hi - 1) // _W_INIT_BLOCK + 1 if hi > lo else 0):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * block + 1)
            rows = torch.rand(_W_INIT_BLOCK, C, generator=g, dtype=torch.float64)
            a, b = max(lo, block * _W_INIT_BLOCK), min(hi, (block + 1) * _W_INIT_BLOCK)
            parts.append(rows[a - block * _W_INIT_BLOCK : b - block * _W_INIT_BLOCK])
        W = torch.cat(parts) if parts else torch.empty(0, C, dtype=torch.float64)
        return W.to(dtype)

    def _init_H(self, C: int, d: int, dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2)
        return (torch.randn(C, d, generator=g, dtype=torch.float64) * math.sqrt(2.0 / (C * d))).to(dtype)

    # -- one sweep over the data --------------------------------------------------------------
    def _sweep(self, shard: _Shard, W: torch.Tensor, H: torch.Tensor, n_valid: int, *, update_W: bool, grad: bool):
        """One pass: ``B = G H^T`` per block, then (optionally) the W update and the H gradient.

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
                Wb = Wb * N / (D + self.eps)  # multiplicative update, App. D.1
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
        packed = self._all_reduce(torch.cat([acc, extra]))
        wn, wd, wn2, wd2 = (float(x) for x in packed[-4:].double())
        loss = (n_valid - 2.0 * wn + wd) / n_valid
        loss_mid = (n_valid - 2.0 * wn2 + wd2) / n_valid if update_W else loss
        g = packed[: C * d].view(C, d) / n_valid if grad else None
        return loss, loss_mid, g

    # -- checkpoints ----------------------------------------------------------------------------
    def _fingerprint(self, m: int, r: int, d: int) -> dict:
        return {
            "n_components": self.n_components,
            "m": m,
            "rows": r,
            "dim": d,
            "seed": self.seed,
            "lr": self.lr,
            "warmup_lr": self.warmup_lr,
            "n_warmup_steps": self.n_warmup_steps,
            "eps": self.eps,
            "dtype": str(_resolve_dtype(self.dtype)),
            "init": self.init,
        }

    def _save_checkpoint(self, step, W, H, hist, hist_w, lo, hi, fingerprint) -> None:
        root = Path(self.checkpoint_dir)
        rank, world = _dist_info()
        step_dir = root / f"step-{step:08d}"
        if rank == 0:
            step_dir.mkdir(parents=True, exist_ok=True)
        if world > 1:
            torch.distributed.barrier()
        _atomic_save_tensors(step_dir / f"W-{lo:012d}-{hi:012d}.safetensors", {"W": W})
        if rank == 0:
            _atomic_save_tensors(
                step_dir / "state.safetensors",
                {
                    "H": H,
                    "loss": torch.tensor(hist, dtype=torch.float64),
                    "loss_w": torch.tensor(hist_w, dtype=torch.float64),
                },
            )
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            meta = {"step": step, "dir": step_dir.name, "fingerprint": fingerprint}
            _atomic_write_bytes(root / "latest.json", json.dumps(meta, indent=1).encode())
            for old in root.glob("step-*"):
                if old.name != step_dir.name:
                    shutil.rmtree(old, ignore_errors=True)
        if world > 1:
            torch.distributed.barrier()

    def _load_checkpoint(self, lo, hi, fingerprint, dtype, device):
        root = Path(self.checkpoint_dir)
        latest = root / "latest.json"
        if not latest.exists():
            return None
        meta = json.loads(latest.read_text())
        diff = {k: (meta["fingerprint"].get(k), v) for k, v in fingerprint.items() if meta["fingerprint"].get(k) != v}
        if diff:
            raise ValueError(
                f"the checkpoint in {root} belongs to another fit (checkpoint vs now: {diff}); "
                "use another checkpoint_dir or delete it"
            )
        step_dir = root / meta["dir"]
        state = _load_tensors(step_dir / "state.safetensors")
        W = torch.empty(hi - lo, fingerprint["n_components"], dtype=dtype)
        covered = 0
        for f in sorted(step_dir.glob("W-*.safetensors")):
            a, b = (int(x) for x in f.stem.split("-")[1:3])
            x, y = max(a, lo), min(b, hi)
            if x < y:
                W[x - lo : y - lo] = _load_tensors(f)["W"][x - a : y - a].to(dtype)
                covered += y - x
        if covered != hi - lo:
            raise ValueError(f"the checkpoint in {step_dir} does not cover examples [{lo}, {hi})")
        return (
            int(meta["step"]),
            W.to(device),
            state["H"].to(device=device, dtype=dtype),
            state["loss"].tolist(),
            state["loss_w"].tolist(),
        )

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, pefs, y=None, *, W: torch.Tensor | None = None, H: torch.Tensor | None = None) -> NPEFF:
        """Learn ``components_`` and ``coefficients_`` from PEFs.

        ``pefs``: Tensor "example rank dim" (or "example dim", r = 1), or a PEF store (see module doc).
        ``W`` ("example component") / ``H`` ("component dim"): initial values when ``init="custom"``.
        """
        self._validate()
        if (W is not None or H is not None) and self.init != "custom":
            raise ValueError("W / H initial values need init='custom'")
        C = self.n_components
        source, shard, n_valid = self._shard(pefs, n_components=C)
        m, r, d = len(source), shard.rows, shard.dim
        dtype, device = shard.dtype, shard.device
        rank, world = _dist_info()
        lo, hi = shard.lo, shard.hi

        W_ = self._init_W(lo, hi, C, dtype) if W is None else torch.as_tensor(W)[lo:hi].to(dtype)
        H_ = self._init_H(C, d, dtype) if H is None else torch.as_tensor(H).to(dtype).clone()
        if tuple(W_.shape) != (hi - lo, C) or tuple(H_.shape) != (C, d):
            raise ValueError(f"initial W must be [{m}, {C}] and H [{C}, {d}]")
        if bool((W_ < 0).any()):
            raise ValueError("initial W must be non-negative")
        W_ = W_.to(device).clone()
        H_ = H_.to(device)
        W_[~shard.valid.to(device)] = 0

        total = self.n_warmup_steps + self.n_steps
        fingerprint = self._fingerprint(m, r, d)
        step, hist, hist_w = 0, [], []  # hist[t]: loss after t steps; hist_w[t]: after step t+1's W update
        if self.checkpoint_dir is not None:
            resumed = self._load_checkpoint(lo, hi, fingerprint, dtype, device)
            if resumed is not None:
                step, W_, H_, hist, hist_w = resumed
                hist = hist[:step]  # the loss after `step` steps is recomputed by the next sweep
                hist_w = hist_w[:step]

        bar = None
        if self.progress and rank == 0 and total > step:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=step, desc="NPEFF", unit="step", dynamic_ncols=True)
        n_rises, first_rise = 0, None
        try:
            while step < total:
                warm = step < self.n_warmup_steps
                loss, loss_mid, g = self._sweep(shard, W_, H_, n_valid, update_W=not warm, grad=True)
                phase = "warm-up" if warm else "joint"
                if not (math.isfinite(loss) and math.isfinite(loss_mid) and bool(torch.isfinite(g).all())):
                    raise FloatingPointError(
                        f"NPEFF: non-finite loss or H gradient at step {step + 1} ({phase}); "
                        f"the H learning rate ({self.warmup_lr if warm else self.lr}) is probably too large"
                    )
                if hist and loss > hist_w[-1] + 1e-6 * max(1.0, abs(hist_w[-1])):
                    n_rises += 1
                    first_rise = first_rise or step
                hist.append(loss)
                hist_w.append(loss_mid)
                H_ -= (self.warmup_lr if warm else self.lr) * g  # App. D.2
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.5f}", refresh=False)
                if self.checkpoint_dir is not None and (step % self.checkpoint_every == 0 or step == total):
                    self._save_checkpoint(step, W_, H_, hist, hist_w, lo, hi, fingerprint)
                if self.callback is not None:
                    self.callback(step, loss)
        finally:
            if bar is not None:
                bar.close()
        final, _, _ = self._sweep(shard, W_, H_, n_valid, update_W=False, grad=False)
        if not math.isfinite(final):
            raise FloatingPointError(f"NPEFF: non-finite loss after step {step}; lower the learning rate")
        hist.append(final)
        if n_rises:
            warnings.warn(
                f"NPEFF: the loss rose after {n_rises} H step(s) (first after step {first_rise}); "
                "consider a smaller lr / warmup_lr",
                RuntimeWarning,
                stacklevel=2,
            )

        # Unit-norm pseudo-Fisher vectors; W_ij h_j h_j^T unchanged (§2.2).
        hnorm = H_.norm(dim=1)
        safe = torch.where(hnorm > 0, hnorm, torch.ones_like(hnorm))
        H_ = H_ / safe[:, None]
        W_ = W_ * (safe * safe)[None, :]

        coeffs, norms = self._gather(W_, shard.norms.to(device), m)
        self.components_ = H_.cpu()
        self.coefficients_ = coeffs
        self.pef_norms_ = norms.double()
        self.excluded_ = ~(torch.isfinite(self.pef_norms_) & (self.pef_norms_ > 0))
        self.loss_history_ = torch.tensor(hist, dtype=torch.float64)
        self.w_step_loss_history_ = torch.tensor(hist_w, dtype=torch.float64)
        self.reconstruction_err_ = float(final)
        self.n_iter_ = step
        self.n_features_in_ = d
        self.n_rows_ = r
        self.manifest_ = _manifest_of(source)
        self._set_dead()
        if self.verbose and rank == 0:
            print(
                f"NPEFF: {step} steps, loss {hist[0]:.5f} -> {final:.5f}, {len(self.dead_components_)} dead components"
            )
        return self

    def _set_dead(self) -> None:
        colmax = self.coefficients_.max(0).values if self.coefficients_.shape[0] else torch.zeros(self.n_components)
        dead = (colmax < _DEAD_THRESHOLD).nonzero().flatten()
        self.dead_components_ = dead
        if len(dead):
            warnings.warn(
                f"NPEFF: {len(dead)} of {self.n_components} components are dead (coefficient column went to zero): "
                f"{dead[:20].tolist()}{' ...' if len(dead) > 20 else ''}; a longer warm-up or a smaller lr may help",
                RuntimeWarning,
                stacklevel=3,
            )

    @staticmethod
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

    # -- transform ------------------------------------------------------------------------------
    def transform(self, pefs, n_steps: int | None = None) -> torch.Tensor:
        """Coefficients ``[m, C]`` for new PEFs with ``components_`` fixed: W steps only (§2.2).

        ``B = G H^T`` does not change when H is fixed, so the data are read once and the
        multiplicative updates then run on ``[m, C]`` matrices. ``n_steps`` defaults to
        ``max(n_steps, 500)`` of the estimator.
        """
        self._check_fitted()
        n_steps = max(self.n_steps, 500) if n_steps is None else n_steps
        source = _as_source(pefs)
        if int(source.dim) != self.n_features_in_:
            raise ValueError(f"PEFs have dim {source.dim}; the components have {self.n_features_in_}")
        _check_same_space(self.manifest_, _manifest_of(source))
        C = self.n_components
        source, shard, n_valid = self._shard(source, n_components=C)
        dtype, device = shard.dtype, shard.device
        H = self.components_.to(device=device, dtype=dtype)
        S2 = (H @ H.T).square()
        N = torch.empty(shard.m, C, dtype=dtype, device=device)
        for s, G, scale in shard.blocks():
            b, r, d = G.shape
            B = (G.reshape(b * r, d) @ H.T).view(b, r, C) * scale[:, None, None]
            N[s : s + b] = B.square().sum(1)
        W = self._init_W(shard.lo, shard.hi, C, dtype).to(device)
        W[~shard.valid.to(device)] = 0
        for step in range(n_steps):
            W = W * N / (W @ S2 + self.eps)
            if step % 50 == 0 and not bool(torch.isfinite(W).all()):
                raise FloatingPointError(f"NPEFF.transform: non-finite coefficients at W step {step + 1}")
        if not bool(torch.isfinite(W).all()):
            raise FloatingPointError(f"NPEFF.transform: non-finite coefficients after {n_steps} W steps")
        coeffs, _ = self._gather(W, shard.norms.to(device), len(source))
        return coeffs

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
        _atomic_save_tensors(directory / "npeff.safetensors", {k: getattr(self, k) for k in self._TENSORS})
        _atomic_write_bytes(directory / "config.json", json.dumps(config, indent=1, default=str).encode())
        return directory

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
