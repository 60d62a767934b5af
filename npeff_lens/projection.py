"""The random projections that shrink per-example gradients from the model's parameter count to ``d`` dimensions:
:class:`SparseProjection` (the paper's, App. A, §2.1.1) and :class:`KroneckerProjection` (a sketch, then it).

Definition (identical on every backend: Triton on CUDA, the Triton interpreter, numba and torch on CPU)
----------------------------------------------------------------------------------------------------
A is n_in x n_out; x (a row of the LRM-PEF, length n_in) projects to x A (length n_out).

* Region size ``s = n_out // density`` (``density=None`` means ``density = n_out``, i.e. s = 1: a dense
  +-1 matrix, the paper's dense mode for small n_out). Column j (0 <= j < n_out) is split into
  ``R = ceil(n_in / s)`` regions; region k covers input rows ``[k*s, k*s + L_k)``, ``L_k = min(s, n_in - k*s)``
  (the last region may be partial).
* All hash arithmetic is on unsigned 32-bit integers (wrapping multiply, logical right shift):
  ``mix(x) = x ^= x >> 15; x *= 0x2C1B3C6D; x ^= x >> 12; x *= 0x297A2D39; x ^= x >> 15``
  (both multipliers are < 2**31, so ``(x * c) & 0xFFFFFFFF`` is exact in int64 for x < 2**32).
* Keys: ``col_base = mix(seed ^ 0x243F6A88)``, ``reg_base = mix(seed ^ 0x13198A2E)``,
  ``col_key[j] = mix(col_base ^ j)``, ``reg_key[k] = mix(reg_base ^ k)``, ``h(j, k) = mix(col_key[j] ^ reg_key[k])``
  (seed, j, k taken as uint32; so 0 <= seed < 2**32 and n_in < 2**32).
* In column j, region k holds exactly one nonzero, at row ``k*s + ((h * L_k) >> 32)`` (the high 32 bits of the
  64-bit product, so the position is in [0, L_k) for partial regions too), with value
  ``+scale`` if ``h & 1 == 0`` else ``-scale``, ``scale = sqrt(s / n_out)``.

Each row of A has on average ``n_out / s ~= density`` nonzeros of squared size ``s / n_out``, so
``E ||x A||^2 = ||x||^2`` (for full regions; exactly E A A^T = I on their rows).

Blocks: ``project(x, offset)`` takes x [..., L] holding the flat entries [offset, offset + L) and returns their
contribution; the projection is linear and separable over the flat index, so projecting the blocks of any
partition and summing gives the projection of the whole (the collector projects each parameter block as soon
as its per-example gradient exists). ``adjoint(y, offset, length)`` returns rows [offset, offset + length) of
A y. Both accumulate in fp32 and stream over bounded chunks, so n_in may be in the hundreds of millions.

:class:`Projection` is the interface this projection and :class:`KroneckerProjection` implement, and the one the
collector, the store, NPEFF, recovery and perturbation use; :func:`projection_from_config` rebuilds either from
its ``state_dict()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "HAVE_NUMBA",
    "KroneckerProjection",
    "Projection",
    "SparseProjection",
    "project_entries",
    "projection_from_config",
    "start_numba_threads",
]

_MASK = 0xFFFFFFFF
_M1, _M2 = 0x2C1B3C6D, 0x297A2D39
_COL_SALT, _REG_SALT = 0x243F6A88, 0x13198A2E
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Inputs per CPU chunk: bounds the fp32 transposed copy (rows x chunk) and the torch path's index tensors.
_CPU_CHUNK_ELEMS = 1 << 22
# numba project: bytes of the transposed input chunk each thread re-reads (L2-sized) and of one output tile
# "tile rows" (L1-sized); tests shrink them to hit the chunk and tile edges.
_CPU_CHUNK_BYTES = 1 << 16
_CPU_TILE_BYTES = 1 << 14


@runtime_checkable
class Projection(Protocol):
    """A linear map ``x ↦ x A`` (``A``: ``n_in × n_out``) applied block by block over the flat input index.

    Recovery reads it as the sensing matrix ``Φ = Aᵀ``: ``Φ x = project(x)``, ``Φᵀ y = adjoint(y)``.
    """

    n_in: int
    n_out: int

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x ``"... L"`` holding flat inputs [offset, offset + L) -> their contribution ``x A[offset:offset+L]``,
        ``"... n_out"`` fp32 (the projection is separable over the flat index: the blocks' contributions sum)."""
        ...

    def adjoint(self, y: torch.Tensor, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """y ``"... n_out"`` -> rows [offset, offset + length) of ``A y``, ``"... length"`` fp32 (``length``
        defaults to the rest)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The JSON-able definition (``kind``, ``n_in``, ``n_out``, ...) that :func:`projection_from_config`
        rebuilds the same matrix from; stores record it in their manifest."""
        ...

    def dense(self, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """Rows [offset, offset + length) of ``A`` as a dense fp32 tensor ``[length, n_out]`` (tests, small
        cases)."""
        ...


def _mix_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 15
    x = (x * _M1) & _MASK
    x ^= x >> 12
    x = (x * _M2) & _MASK
    x ^= x >> 15
    return x


def _mix_torch(x: torch.Tensor) -> torch.Tensor:
    """mix on an int64 tensor of values in [0, 2**32); products stay below 2**63."""
    x = x ^ (x >> 15)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 12)
    x = (x * _M2) & _MASK
    return x ^ (x >> 15)


# ----------------------------------------------------------------------------------------------- numba path
_numba_started = False


def start_numba_threads() -> None:
    """Starts numba's threading layer once per process, keeping torch's CPU thread count. The first parallel
    numba call sets the process's OpenMP threads to numba's count (all cores): torch ops after it would run with
    another thread count than those before it, and differ in low bits, so the same computation would give other
    bits depending on whether a projection ran before it in the process. Every numba call goes through here."""
    global _numba_started
    if _numba_started or not HAVE_NUMBA:
        return
    _numba_started = True
    threads = torch.get_num_threads()
    SparseProjection(64, 2, density=1).project(torch.zeros(2, 64), backend="numba")
    torch.set_num_threads(threads)


try:  # numba is optional: without it the CPU path is vectorised torch (slower, same matrix)
    if os.environ.get("NPEFF_DISABLE_NUMBA") == "1":
        raise ImportError
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised when numba is absent
    HAVE_NUMBA = False

if HAVE_NUMBA:

    @njit(inline="always", cache=True)
    def _mix_nb(x):
        x ^= x >> 15
        x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
        x ^= x >> 12
        x = (x * 0x297A2D39) & 0xFFFFFFFF
        x ^= x >> 15
        return x

    @njit(cache=True)
    def _col_keys_nb(col_base, n_out):
        col_key = np.empty(n_out, np.int64)
        for j in range(n_out):
            col_key[j] = _mix_nb(col_base ^ j)
        return col_key

    @njit(inline="always", cache=True)
    def _hash_regions_nb(col_key, j0, nq, rk, base, lk, n, idx, sg):
        """idx[q], sg[q] = position in [0, n) and sign of column j0 + q's nonzero in the region with key rk whose
        first row is at ``base`` (buffer coordinates); sign 0 (and idx 0) where it falls outside [0, n).
        Branch-free, so it vectorises over q: each (region, column) hash is computed once per call."""
        for q in range(nq):
            h = _mix_nb(col_key[j0 + q] ^ rk)
            i = base + ((h * lk) >> 32)
            ok = (i >= 0) & (i < n)
            idx[q] = i if ok else 0
            sg[q] = np.float32(1 - 2 * (h & 1)) if ok else np.float32(0.0)

    @njit(parallel=True, cache=True, boundscheck=False)
    def _project_nb(x, offset, n_in, s, col_key, reg_base, out_t, chunk_regions, nj, n_tasks):
        """out_t[j, r] += (x A[offset:offset+L])[r, j] (unscaled A); x "rows L" fp32 (row-major block), out_t
        "n_out rp" fp32 (rows padded to a multiple of 8; the padding stays 0).

        One task per thread, each owning a column range (one fork-join per call: barriers stall on a loaded
        machine). A task walks the block in chunks of whole regions: it transposes x's slice into its own
        L2-sized buffer "pos rp" (cheap: s*rp copies per region against n_out/n_tasks*rp multiply-adds), then
        walks its columns in tiles of nj whose output rows stay in L1: per (region, tile) the hashes go to
        idx/sg scratch (each hash computed once per call), then a gather of buffer rows + add over rp floats."""
        rows, L = x.shape
        n_out, rp = out_t.shape
        k_first = offset // s
        k_last = (offset + L - 1) // s
        bj = (n_out + n_tasks - 1) // n_tasks
        of = out_t.ravel()
        for task in prange(n_tasks):
            buf = np.zeros((min(L, chunk_regions * s), rp), np.float32)
            bf = buf.ravel()
            idx = np.empty(nj, np.int64)
            sg = np.empty(nj, np.float32)
            j_end = min(n_out, task * bj + bj)
            for c in range(k_first, k_last + 1, chunk_regions):
                ce = min(k_last + 1, c + chunk_regions)
                lo = max(0, c * s - offset)  # buf holds block positions [lo, hi)
                hi = min(L, ce * s - offset)
                n = hi - lo
                for p0 in range(0, n, 64):
                    p1 = min(n, p0 + 64)
                    for r in range(rows):
                        for p in range(p0, p1):
                            buf[p, r] = x[r, lo + p]
                for j0 in range(task * bj, j_end, nj):
                    nq = min(nj, j_end - j0)
                    for k in range(c, ce):
                        rk = _mix_nb(reg_base ^ (k & 0xFFFFFFFF))
                        _hash_regions_nb(col_key, j0, nq, rk, k * s - offset - lo, min(s, n_in - k * s), n, idx, sg)
                        for q in range(nq):
                            # unsigned offsets: no negative-index wraparound, so the row loop vectorises
                            ob = numba.uint64((j0 + q) * rp)
                            xb = numba.uint64(idx[q] * rp)
                            w = sg[q]
                            for r in range(numba.uint64(rp)):
                                of[ob + r] += w * bf[xb + r]

    @njit(parallel=True, cache=True, boundscheck=False)
    def _project_nb_row(x, offset, n_in, s, col_key, reg_base, out, bj):
        """One row: hashes of a tile of regions go to a scratch buffer, then a branch-free gather loop over
        columns (vectorises with AVX2/AVX-512 gathers); out [n_out] fp32."""
        L = x.shape[0]
        n_out = out.shape[0]
        k0 = offset // s
        nk = (offset + L - 1) // s + 1 - k0
        n_blocks = (n_out + bj - 1) // bj
        tt_max = max(1, 2048 // s)
        for b in prange(n_blocks):
            j_lo = b * bj
            nj = min(n_out, j_lo + bj) - j_lo
            idx = np.empty((tt_max, nj), np.int64)
            sg = np.empty((tt_max, nj), np.float32)
            for t0 in range(0, nk, tt_max):
                tt = min(tt_max, nk - t0)
                for u in range(tt):
                    k = k0 + t0 + u
                    rk = _mix_nb(reg_base ^ (k & 0xFFFFFFFF))
                    _hash_regions_nb(col_key, j_lo, nj, rk, k * s - offset, min(s, n_in - k * s), L, idx[u], sg[u])
                for u in range(tt):
                    for q in range(nj):
                        out[j_lo + q] += sg[u, q] * x[idx[u, q]]

    @njit(parallel=True, cache=True, boundscheck=False)
    def _adjoint_nb(yt, offset, n_in, s, col_key, reg_base, out_t):
        """out_t[i, r] += A[offset + i, j] y[r, j] (unscaled A); yt [n_out, rows] fp32, out_t [length, rows].

        Tasks own disjoint runs of regions (so disjoint output rows); per region the hashes of all columns go
        to idx/sg scratch (vectorised), then a scatter into that region's few output rows (in L1)."""
        length, rows = out_t.shape
        n_out = yt.shape[0]
        k0 = offset // s
        nk = (offset + length - 1) // s + 1 - k0
        per = max(1, 4096 // s)  # regions per task
        n_tasks = (nk + per - 1) // per
        for task in prange(n_tasks):
            idx = np.empty(n_out, np.int64)
            sg = np.empty(n_out, np.float32)
            for t in range(task * per, min(nk, task * per + per)):
                k = k0 + t
                rk = _mix_nb(reg_base ^ (k & 0xFFFFFFFF))
                _hash_regions_nb(col_key, 0, n_out, rk, k * s - offset, min(s, n_in - k * s), length, idx, sg)
                if rows == 1:
                    for j in range(n_out):
                        out_t[idx[j], 0] += sg[j] * yt[j, 0]
                else:
                    for j in range(n_out):
                        i = idx[j]
                        w = sg[j]
                        for r in range(rows):
                            out_t[i, r] += w * yt[j, r]


def project_entries(
    n_in: int, n_out: int, s: int, seed: int, k0: int, k1: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and signs of the nonzeros of regions [k0, k1): (row [k1-k0, n_out] int64, sign same shape, +-1 int64).

    The vectorised-torch form of the definition (the torch CPU path, ``dense``, and the index structure the
    GPU tests compare against)."""
    col_base, reg_base = _mix_int(seed ^ _COL_SALT), _mix_int(seed ^ _REG_SALT)
    j = torch.arange(n_out, dtype=torch.int64, device=device)
    k = torch.arange(k0, k1, dtype=torch.int64, device=device)
    col_key = _mix_torch(j ^ col_base)
    reg_key = _mix_torch(k ^ reg_base)
    h = _mix_torch(col_key[None, :] ^ reg_key[:, None])
    start = k * s
    reg_len = torch.clamp(n_in - start, max=s)
    row = start[:, None] + ((h * reg_len[:, None]) >> 32)
    sign = 1 - 2 * (h & 1)
    return row, sign


class SparseProjection(Projection):
    """A sparse random projection from ``n_in`` inputs (the selected parameters) to ``n_out`` dimensions, never stored.

    It maps a flat vector ``x`` to ``x A`` with ``E ‖x A‖² = ‖x‖²``; ``A`` has about ``density`` non-zeros per input
    (``None``: dense ±1), placed by a hash of ``seed``. Both products take any block of the flat input (``offset``),
    so parameters are projected block by block and summed. Definition (App. A of the paper): the module docstring.

    >>> P = SparseProjection(1_000_003, 8192, seed=3)
    >>> y = P.project(grad_block, offset=o)     # "... L" -> "... n_out", fp32
    >>> g = P.adjoint(y, offset=o, length=L)    # "... n_out" -> "... L", fp32
    """

    def __init__(self, n_in: int, n_out: int, seed: int = 0, density: int | None = 32):
        for name, v in (("n_in", n_in), ("n_out", n_out), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if density is None:
            density = n_out
        if isinstance(density, bool) or not isinstance(density, (int, np.integer)):
            raise ValueError(f"density must be an int or None, got {density!r}")
        n_in, n_out, seed, density = int(n_in), int(n_out), int(seed), int(density)
        if not 1 <= n_in < 2**32:
            raise ValueError(f"n_in must be in [1, 2**32), got {n_in}")
        if n_out < 1:
            raise ValueError(f"n_out must be >= 1, got {n_out}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if density < 1:
            raise ValueError(f"density must be >= 1, got {density}")
        if n_out < density:
            raise ValueError(
                f"n_out ({n_out}) must be >= density ({density}): the region size n_out // density would be 0"
            )
        self.n_in, self.n_out, self.seed, self.density = n_in, n_out, seed, density
        self.region_size = n_out // density
        self.scale = math.sqrt(self.region_size / n_out)
        self._col_base = _mix_int(seed ^ _COL_SALT)
        self._reg_base = _mix_int(seed ^ _REG_SALT)

    # ------------------------------------------------------------------------------------------- config
    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sparse", "n_in": self.n_in, "n_out": self.n_out, "seed": self.seed, "density": self.density}

    config = state_dict

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparseProjection:
        if config.get("kind", "sparse") != "sparse":
            raise ValueError(f"not a sparse projection config: kind={config.get('kind')!r}")
        return cls(config["n_in"], config["n_out"], seed=config["seed"], density=config["density"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseProjection) and self.state_dict() == other.state_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.state_dict().items()))

    def __repr__(self) -> str:
        return f"SparseProjection(n_in={self.n_in}, n_out={self.n_out}, seed={self.seed}, density={self.density})"

    # ------------------------------------------------------------------------------------------- checks
    def _check_range(self, offset: int, length: int, what: str) -> None:
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
            raise ValueError(f"offset must be an int, got {offset!r}")
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if offset < 0 or offset + length > self.n_in or (length > 0 and offset >= self.n_in):
            raise ValueError(f"{what} covers inputs [{offset}, {offset + length}), outside [0, n_in={self.n_in})")

    @staticmethod
    def resolve_backend(t: torch.Tensor, backend: str) -> str:
        """The backend a call on ``t`` runs on: ``backend``, or for ``"auto"`` Triton on CUDA and numba (else torch)
        on CPU; raises where it cannot run on ``t``'s device."""
        if backend not in ("auto", "triton", "numba", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton', 'numba' or 'torch', got {backend!r}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"SparseProjection supports CPU and CUDA tensors, got device {t.device}")
        if backend == "auto":
            if t.device.type == "cuda":
                return "triton"
            backend = "numba" if HAVE_NUMBA else "torch"
        if backend == "numba" and not HAVE_NUMBA:
            raise ValueError("backend='numba' requested but numba is not installed")
        if backend == "numba":
            start_numba_threads()
        if backend in ("numba", "torch") and t.device.type != "cpu":
            raise ValueError(f"backend={backend!r} runs on CPU tensors, got device {t.device}")
        if backend == "triton" and t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the interpreter)")
        return backend

    @staticmethod
    def _check_dtype(t: torch.Tensor, name: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")

    # ------------------------------------------------------------------------------------------- project
    def project(self, x: torch.Tensor, offset: int = 0, *, backend: str = "auto") -> torch.Tensor:
        """x "... L" holding flat inputs [offset, offset + L) -> their contribution x A[offset:offset+L],
        "... n_out" fp32."""
        self._check_dtype(x, "x")
        if x.dim() < 1:
            raise ValueError("x must have at least one dimension (the flat input block)")
        L = x.shape[-1]
        self._check_range(offset, L, "x")
        backend = self.resolve_backend(x, backend)
        lead = x.shape[:-1]
        if x.numel() == 0:
            return torch.zeros(*lead, self.n_out, dtype=torch.float32, device=x.device)
        x2 = x.reshape(-1, L)
        if backend == "triton":
            from npeff_lens.triton_kernels import projection as tk

            if x2.shape[0] > 1 and x2.stride(0) != 1:
                # rows-minor ([L, rows] in memory): each hashed index then loads all rows from one contiguous run
                # instead of one scattered load per row; the copy is about two read passes of x, the gathers
                # cost tens. One row (any strides) and an input already rows-minor go as they are.
                x2 = x2.t().contiguous().t()
            out = tk.project_forward(
                x2, offset, self.n_in, self.n_out, self.region_size, self._col_base, self._reg_base
            )
        elif backend == "numba":
            out = self._project_numba(x2, offset)
        else:
            out = self._project_torch(x2, offset)
        out.mul_(self.scale)
        return out.reshape(*lead, self.n_out)

    def _numba_col_keys(self) -> np.ndarray:
        """col_key[j] for all columns (int64), computed once per projection object."""
        if getattr(self, "_col_key_np", None) is None:
            self._col_key_np = _col_keys_nb(self._col_base, self.n_out)
        return self._col_key_np

    def _project_numba(self, x2: torch.Tensor, offset: int) -> torch.Tensor:
        rows, L = x2.shape
        s, n_out = self.region_size, self.n_out
        col_key = self._numba_col_keys()
        n_threads = numba.get_num_threads()
        # fp32 blocks go to the kernel as they are (it transposes L2-sized chunks itself); other dtypes are cast
        # in bounded chunks of whole regions
        step = L if x2.dtype == torch.float32 else max(s, (_CPU_CHUNK_ELEMS // rows) // s * s)
        if rows == 1:
            out = np.zeros(n_out, dtype=np.float32)
            bj = -(-n_out // min(n_out, 4 * n_threads))
            for a in range(0, L, step):
                xa = x2[0, a : a + step].to(torch.float32).contiguous().numpy()
                _project_nb_row(xa, offset + a, self.n_in, s, col_key, self._reg_base, out, bj)
            return torch.from_numpy(out)[None]
        rp = -(-rows // 8) * 8
        out_t = np.zeros((n_out, rp), dtype=np.float32)
        chunk_regions = max(1, _CPU_CHUNK_BYTES // (4 * rp * s))
        nj = max(8, _CPU_TILE_BYTES // (4 * rp))
        n_tasks = max(1, min(n_threads, n_out // nj))
        for a in range(0, L, step):
            xa = x2[:, a : a + step]
            if xa.dtype != torch.float32 or xa.stride(-1) != 1:
                xa = xa.to(torch.float32).contiguous()
            xa = xa.numpy()
            _project_nb(xa, offset + a, self.n_in, s, col_key, self._reg_base, out_t, chunk_regions, nj, n_tasks)
        return torch.from_numpy(out_t[:, :rows]).t().contiguous()

    def _project_torch(self, x2: torch.Tensor, offset: int) -> torch.Tensor:
        rows, L = x2.shape
        s = self.region_size
        out = torch.zeros(rows, self.n_out, dtype=torch.float32)
        k_first, k_last = offset // s, (offset + L - 1) // s
        per = max(1, _CPU_CHUNK_ELEMS // (self.n_out * max(rows, 4)))  # regions per chunk
        for k0 in range(k_first, k_last + 1, per):
            k1 = min(k_last + 1, k0 + per)
            row, sign = project_entries(self.n_in, self.n_out, s, self.seed, k0, k1)
            i = row - offset
            ok = (i >= 0) & (i < L)
            i = torch.where(ok, i, 0)
            w = torch.where(ok, sign, 0).to(torch.float32)  # [kc, n_out]
            xv = x2[:, i.reshape(-1)].to(torch.float32).reshape(rows, *i.shape)  # [rows, kc, n_out]
            out += torch.einsum("rkj,kj->rj", xv, w)
        return out

    # ------------------------------------------------------------------------------------------- adjoint
    def adjoint(
        self, y: torch.Tensor, offset: int = 0, length: int | None = None, *, backend: str = "auto"
    ) -> torch.Tensor:
        """y "... n_out" -> rows [offset, offset + length) of A y, "... length" fp32 (length defaults to the rest)."""
        self._check_dtype(y, "y")
        if y.dim() < 1 or y.shape[-1] != self.n_out:
            raise ValueError(f"y must have shape [..., n_out={self.n_out}], got {tuple(y.shape)}")
        if length is None:
            length = self.n_in - offset
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        self._check_range(offset, int(length), "adjoint")
        length = int(length)
        backend = self.resolve_backend(y, backend)
        lead = y.shape[:-1]
        y2 = (y.reshape(-1, self.n_out).to(torch.float32) * self.scale).contiguous()
        rows = y2.shape[0]
        if rows == 0 or length == 0:
            return torch.zeros(*lead, length, dtype=torch.float32, device=y.device)
        if backend == "triton":
            from npeff_lens.triton_kernels import projection as tk

            # rows-minor y and output ([n_out, rows], [length, rows] in memory): each hashed index adds all rows
            # to one contiguous run; the output comes back row-major (a no-op for one row)
            out = tk.adjoint_forward(
                y2.t().contiguous().t(),
                offset,
                length,
                self.n_in,
                self.n_out,
                self.region_size,
                self._col_base,
                self._reg_base,
            ).contiguous()
        elif backend == "numba":
            out = torch.empty(rows, length, dtype=torch.float32)
            yt = y2.t().contiguous().numpy()
            col_key = self._numba_col_keys()
            s = self.region_size
            step = max(s, _CPU_CHUNK_ELEMS // rows)
            for a in range(0, length, step):
                b = min(length, a + step)
                out_t = np.zeros((b - a, rows), dtype=np.float32)
                _adjoint_nb(yt, offset + a, self.n_in, s, col_key, self._reg_base, out_t)
                out[:, a:b] = torch.from_numpy(out_t).t()
        else:
            out = self._adjoint_torch(y2, offset, length)
        return out.reshape(*lead, length)

    def _adjoint_torch(self, y2: torch.Tensor, offset: int, length: int) -> torch.Tensor:
        rows = y2.shape[0]
        s = self.region_size
        out = torch.zeros(rows, length, dtype=torch.float32)
        k_first, k_last = offset // s, (offset + length - 1) // s
        per = max(1, _CPU_CHUNK_ELEMS // (self.n_out * max(rows, 4)))
        for k0 in range(k_first, k_last + 1, per):
            k1 = min(k_last + 1, k0 + per)
            row, sign = project_entries(self.n_in, self.n_out, s, self.seed, k0, k1)
            i = row - offset
            ok = (i >= 0) & (i < length)
            vals = y2[:, None, :] * sign.to(torch.float32)[None]  # [rows, kc, n_out]
            out.index_add_(1, i[ok], vals[:, ok])
        return out

    # ------------------------------------------------------------------------------------------- dense
    def dense(self, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """Rows [offset, offset + length) of A as a dense fp32 tensor [length, n_out] (tests, small cases)."""
        if length is None:
            length = self.n_in - offset
        self._check_range(offset, length, "dense")
        dense = torch.zeros(length, self.n_out, dtype=torch.float32)
        if length == 0:
            return dense
        s = self.region_size
        row, sign = project_entries(self.n_in, self.n_out, s, self.seed, offset // s, (offset + length - 1) // s + 1)
        i = row - offset
        ok = (i >= 0) & (i < length)
        cols = torch.arange(self.n_out).expand_as(i)
        dense[i[ok], cols[ok]] = sign[ok].to(torch.float32) * self.scale
        return dense


# ------------------------------------------------------------------------------------------- Kronecker
def _factor_seed(seed: int, index: int, side: int) -> int:
    """Seed of one factor matrix: a hash of (projection seed, parameter index, side), so factors are independent."""
    return _mix_int(_mix_int(seed ^ 0x3C6EF372) ^ _mix_int((2 * index + side) & _MASK))


class KroneckerProjection(Projection):
    """A two-stage random projection of per-example gradients that never forms a weight gradient (LoGra's factored
    first stage, FactGraSS's global second stage); collection uses it with ``projection="kron"``.

    >>> P = KroneckerProjection([p.shape for _, p in model.named_parameters()], 8192, seed=0, k=16)
    >>> y = P.project(flat_gradient)                                # "... n_in" -> "... 8192"

    Definition. The input is the flat vector of the selected parameters, ``shapes`` in layout order. Each
    parameter of shape ``(R, C, ...)`` with two or more axes is read as the matrix ``X`` (``R`` rows, the other
    axes flattened into ``C`` columns) and sketched to ``P_R X P_Cᵀ`` (``k_R × k_C``, row-major) with
    ``k_R = min(k, R)``, ``k_C = min(k, C)``; ``P_R`` is ``I`` when ``k_R = R``, else ``k_R × R`` with i.i.d.
    ``N(0, 1/k_R)`` entries drawn by ``torch.Generator`` (CPU, float32) from a hash of ``(seed, index, side)``;
    ``P_C`` likewise. One-axis parameters (biases, norm weights) pass through unchanged. The concatenation
    (length ``sketch_dim``) is then projected to ``n_out`` by ``SparseProjection(sketch_dim, n_out, seed,
    density)``. So ``A = S · B`` with ``S`` block-diagonal (``P_R ⊗ P_C`` per matrix, ``I`` per vector) and
    ``E ‖x A‖² = ‖x‖²``.

    Why two stages: one global sparse stage mixes every layer into every output, so recovery (FPC,
    back-projection) sees each direction through all ``n_out`` measurements, as with ``SparseProjection``;
    disjoint per-layer output slices would give a component spread over many layers only a slice per layer.

    Cost: a linear layer's per-example gradient ``Σ_t δ_t a_tᵀ`` sketches as ``Σ_t (P_R δ_t)(P_C a_t)ᵀ`` in
    ``T·(R·k_R + C·k_C + k_R·k_C)`` multiply-adds (:meth:`sketch_outer`), instead of ``T·R·C`` to form it: several
    times faster over many parameters. ``project``/``adjoint`` take any flat range, like ``SparseProjection``'s.
    """

    kind = "kron"

    def __init__(self, shapes, n_out: int, seed: int = 0, k: int = 16, density: int | None = 32):
        shapes = [tuple(int(v) for v in s) for s in shapes]
        if not shapes or any(any(v < 1 for v in s) for s in shapes):
            raise ValueError(f"shapes must be a non-empty list of non-empty parameter shapes, got {shapes[:3]}...")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.shapes, self.k, self.seed, self.n_out = shapes, int(k), int(seed), int(n_out)
        self.offsets, self.sketch_offsets, self.dims = [], [], []  # dims: (R, C, k_R, k_C) or None
        off = mid = 0
        for s in shapes:
            numel = math.prod(s)
            self.offsets.append(off)
            self.sketch_offsets.append(mid)
            if len(s) >= 2:
                R, C = s[0], numel // s[0]
                kr, kc = min(self.k, R), min(self.k, C)
                self.dims.append((R, C, kr, kc))
                mid += kr * kc
            else:
                self.dims.append(None)
                mid += numel
            off += numel
        self.n_in, self.sketch_dim = off, mid
        self._ends = np.array(self.offsets[1:] + [off], dtype=np.int64)
        self.inner = SparseProjection(mid, self.n_out, seed=self.seed, density=density)
        self.density = self.inner.density
        self._factors: dict[tuple[int, int, str], torch.Tensor | None] = {}

    # ------------------------------------------------------------------------------------------- config
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "kron",
            "n_in": self.n_in,
            "n_out": self.n_out,
            "seed": self.seed,
            "density": self.density,
            "k": self.k,
            "shapes": [list(s) for s in self.shapes],
        }

    config = state_dict

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KroneckerProjection:
        if config.get("kind") != "kron":
            raise ValueError(f"not a Kronecker projection config: kind={config.get('kind')!r}")
        proj = cls(config["shapes"], config["n_out"], seed=config["seed"], k=config["k"], density=config["density"])
        if proj.n_in != config.get("n_in", proj.n_in):
            raise ValueError(f"projection config: shapes sum to {proj.n_in} inputs, n_in says {config['n_in']}")
        return proj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KroneckerProjection) and self.state_dict() == other.state_dict()

    def __hash__(self) -> int:
        return hash((self.n_in, self.n_out, self.seed, self.density, self.k, tuple(self.shapes)))

    def __repr__(self) -> str:
        return (
            f"KroneckerProjection(n_in={self.n_in}, n_out={self.n_out}, seed={self.seed}, k={self.k}, "
            f"density={self.density}, {len(self.shapes)} parameters, sketch_dim={self.sketch_dim})"
        )

    # ------------------------------------------------------------------------------------------- factors
    def factor(self, index: int, side: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """``P_R`` (side 0) or ``P_C`` (side 1) of parameter ``index``, ``[k, R]`` / ``[k, C]`` fp32 on ``device``;
        ``None`` for the identity. Drawn on the CPU, so every device gets the same matrix."""
        key = (index, side, str(device))
        if key not in self._factors:
            R, C, kr, kc = self.dims[index]
            n, k = (R, kr) if side == 0 else (C, kc)
            if k == n:
                mat = None
            else:
                gen = torch.Generator().manual_seed(_factor_seed(self.seed, index, side))
                mat = (torch.randn(k, n, generator=gen) / math.sqrt(k)).to(device)
            self._factors[key] = mat
        return self._factors[key]

    @staticmethod
    def _apply(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """``x "... n" -> "... k"`` (``x P^T``)."""
        return x if p is None else x @ p.T

    def index_of(self, offset: int) -> int:
        """The parameter starting at flat ``offset``."""
        i = int(np.searchsorted(self._ends, offset, side="right"))
        if i >= len(self.shapes) or self.offsets[i] != offset:
            raise ValueError(f"no parameter of this projection starts at offset {offset}")
        return i

    def sketch_outer(self, index: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Sketch of ``Σ_t left_t right_tᵀ`` for matrix parameter ``index``: left ``"... t R"``, right
        ``"... t C"`` (broadcast over leading axes) -> ``"... (k_R k_C)"`` fp32, its ``sketch_dim`` slice."""
        lp = self._apply(self.factor(index, 0, left.device), left.float())
        rp = self._apply(self.factor(index, 1, right.device), right.float())
        return (lp.transpose(-1, -2) @ rp).flatten(-2)

    def sketch_rows(self, index: int, ids: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Sketch of ``Σ_t e_{ids_t} right_tᵀ`` (an embedding's per-example gradient): ids ``"b t"``, right
        ``"b r t C"`` -> ``"b r (k_R k_C)"``."""
        p = self.factor(index, 0, right.device)
        R = self.dims[index][0]
        lp = torch.nn.functional.one_hot(ids, R).float() if p is None else p.T[ids]  # "b t k"
        rp = self._apply(self.factor(index, 1, right.device), right.float())
        return torch.einsum("btk,brtl->brkl", lp, rp).flatten(-2)

    # ------------------------------------------------------------------------------------------- stage 1
    def _overlaps(self, offset: int, length: int):
        """(index, lo, hi) of each parameter overlapping flat [offset, offset + length), lo/hi within it."""
        if length <= 0:
            return
        i = int(np.searchsorted(self._ends, offset, side="right"))
        while i < len(self.shapes) and self.offsets[i] < offset + length:
            o = self.offsets[i]
            n = int(self._ends[i]) - o
            yield i, max(0, offset - o), min(n, offset + length - o)
            i += 1

    def sketch(self, x: torch.Tensor, offset: int = 0) -> list[tuple[int, torch.Tensor]]:
        """Stage 1 of flat block x ``"... L"`` at ``offset``: ``(sketch offset, "... m")`` pieces."""
        lead, L = x.shape[:-1], x.shape[-1]
        x = x.float()
        pieces = []
        for i, lo, hi in self._overlaps(offset, L):
            xi = x[..., self.offsets[i] + lo - offset : self.offsets[i] + hi - offset]
            if self.dims[i] is None:
                pieces.append((self.sketch_offsets[i] + lo, xi))
                continue
            R, C, kr, kc = self.dims[i]
            r0, r1 = lo // C, -(-hi // C)
            if lo != r0 * C or hi != r1 * C:  # a partial row at either end: zero-pad to whole rows
                xi = torch.nn.functional.pad(xi, (lo - r0 * C, r1 * C - hi))
            X = xi.reshape(*lead, r1 - r0, C)
            pr, pc = self.factor(i, 0, x.device), self.factor(i, 1, x.device)
            left = X if pr is None else pr[:, r0:r1] @ X
            if pr is None and (r0, r1) != (0, R):
                left = torch.nn.functional.pad(X, (0, 0, r0, R - r1))
            pieces.append((self.sketch_offsets[i], self._apply(pc, left).reshape(*lead, kr * kc)))
        return pieces

    def unsketch(self, z: torch.Tensor, offset: int, length: int) -> torch.Tensor:
        """Adjoint of stage 1: z ``"... sketch_dim"`` -> flat entries [offset, offset + length), ``"... length"``."""
        out = z.new_zeros(*z.shape[:-1], length)
        for i, lo, hi in self._overlaps(offset, length):
            m, start = self.sketch_offsets[i], self.offsets[i] + lo - offset
            if self.dims[i] is None:
                out[..., start : start + hi - lo] = z[..., m + lo : m + hi]
                continue
            R, C, kr, kc = self.dims[i]
            Z = z[..., m : m + kr * kc].reshape(*z.shape[:-1], kr, kc)
            pr, pc = self.factor(i, 0, z.device), self.factor(i, 1, z.device)
            r0, r1 = lo // C, -(-hi // C)
            zc = Z if pc is None else Z @ pc  # "... k_R C"
            rows = zc[..., r0:r1, :] if pr is None else pr[:, r0:r1].T @ zc  # "... (r1 - r0) C"
            flat = rows.flatten(-2)[..., lo - r0 * C : hi - r0 * C]
            out[..., start : start + hi - lo] = flat
        return out

    # ------------------------------------------------------------------------------------------- operator
    def project(self, x: torch.Tensor, offset: int = 0, **kwargs) -> torch.Tensor:
        """x ``"... L"`` holding flat inputs [offset, offset + L) -> their contribution ``"... n_out"`` fp32."""
        SparseProjection._check_dtype(x, "x")
        L = x.shape[-1]
        if offset < 0 or offset + L > self.n_in:
            raise ValueError(f"x covers [{offset}, {offset + L}), outside [0, {self.n_in})")
        out = torch.zeros(*x.shape[:-1], self.n_out, dtype=torch.float32, device=x.device)
        for mid, piece in self.sketch(x, offset):
            out += self.inner.project(piece, offset=mid, **kwargs)
        return out

    def adjoint(self, y: torch.Tensor, offset: int = 0, length: int | None = None, **kwargs) -> torch.Tensor:
        """y ``"... n_out"`` -> rows [offset, offset + length) of ``A y``, ``"... length"`` fp32."""
        if y.dim() < 1 or y.shape[-1] != self.n_out:
            raise ValueError(f"y must have shape [..., n_out={self.n_out}], got {tuple(y.shape)}")
        length = self.n_in - offset if length is None else int(length)
        if offset < 0 or length < 0 or offset + length > self.n_in:
            raise ValueError(f"adjoint range [{offset}, {offset + length}) outside [0, {self.n_in})")
        spans = list(self._overlaps(offset, length))
        if not spans:
            return torch.zeros(*y.shape[:-1], length, dtype=torch.float32, device=y.device)
        first, last = spans[0][0], spans[-1][0]
        m0 = self.sketch_offsets[first]
        m1 = self.sketch_offsets[last + 1] if last + 1 < len(self.shapes) else self.sketch_dim
        z = y.new_zeros(*y.shape[:-1], self.sketch_dim, dtype=torch.float32)
        z[..., m0:m1] = self.inner.adjoint(y, offset=m0, length=m1 - m0, **kwargs)
        return self.unsketch(z, offset, length)

    def dense(self, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """Rows [offset, offset + length) of A, ``[length, n_out]`` fp32 (tests, small cases)."""
        length = self.n_in - offset if length is None else length
        return self.project(torch.eye(length), offset)


def projection_from_config(config: Mapping[str, Any]) -> Projection:
    """The projection a manifest's ``projection`` entry (a :meth:`Projection.state_dict`) describes (``kind``:
    ``sparse`` or ``kron``)."""
    missing = [k for k in ("n_in", "n_out") if k not in config]
    if missing:
        raise ValueError(f"projection config lacks {missing}: {dict(config)}")
    kind = config.get("kind", "sparse")
    if kind == "kron":
        return KroneckerProjection.from_config(dict(config))
    if kind != "sparse":
        raise ValueError(f"unsupported projection kind {kind!r} in {dict(config)}")
    kwargs = {k: config[k] for k in ("seed", "density") if k in config}
    return SparseProjection(int(config["n_in"]), int(config["n_out"]), **kwargs)
