"""Triton kernels for the sparse random projection (App. A); the definition is in ``npeff_lens.projection``.

Both kernels regenerate the matrix from the hash: nothing but the seed-derived keys crosses the launch.
All hash arithmetic is on ``tl.uint32`` (wrapping multiply, logical shift), which is bit-identical to the
int64-with-mask emulation of the CPU paths.

Layout. Both kernels take x / y and their outputs through strides on both axes and are fastest rows-minor:
x stored ``[L, rows]`` (``x.stride(0) == 1`` for the ``[rows, L]`` view), so one hashed index loads all rows of
that input as one contiguous run (``4 * BLOCK_R`` bytes in fp32) instead of one scattered load per row. One
row is rows-minor in any layout. The wrapper in ``npeff_lens.projection`` copies a row-major input of two or
more rows to rows-minor once (about two read passes of x, against the gathers' tens) and returns the adjoint
row-major (one transposing copy of the output). ``BLOCK_R`` is the next power of two of rows, at most
``MAX_BLOCK_R``; ``VEC_R`` (``_vec_rows``) is the largest power of two of at most 16 bytes dividing both rows
and the stride along L: the row mask and each gathered offset are then constant over and aligned to runs of
``VEC_R`` rows, so the compiler emits vector loads and vector atomics (``ld.global.v4``,
``red.global.add.v4.f32`` for 8 or 32 fp32 rows) where the base pointer is 16-byte aligned.

* ``project_forward``: x [rows, L] -> [rows, n_out], unscaled. Program = (block of BLOCK_J columns, split of
  the regions, block of BLOCK_R rows); about 4 programs per SM. Per region it hashes each of its (column,
  region) pairs once (once in all for rows <= MAX_BLOCK_R), giving one input index and sign per column, and
  loads one [BLOCK_J, BLOCK_R] tile: all rows of the block at each gathered index. Each region (``s * rows``
  values) is gathered ``n_out`` times, ``density`` reads per value on average; the programs of one split sweep
  the same regions together, so those reads are expected to hit cache and x to come from memory about once.
  Splits write separate partial sums [splits, rows, n_out], reduced in a fixed order afterwards; each partial
  sum is an fp32 sum in region order, so the result is deterministic and does not depend on the strides of x.
* ``adjoint_forward``: y [rows, n_out] -> [rows, length]. Program = (range of regions, block of BLOCK_R rows);
  it walks its regions in chunks whose outputs (``K_CHUNK_BYTES``) stay in L2 while every column adds to
  them, and per chunk walks the column blocks: one [BLOCK_J, BLOCK_R] tile of y (y is read once per chunk),
  then per region the hashes (once per column and region) and one ``tl.atomic_add`` of a [BLOCK_J, BLOCK_R]
  tile, all rows of each hashed index contiguous. A program owns the outputs of its regions and rows, so
  atomics never cross programs; but the columns of one region that hash to the same input (``density`` per
  input on average) are added in an unspecified order: last-bit differences between runs on a GPU, none
  under the interpreter (sequential, column order).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_R = 32  # rows per program: 128 contiguous bytes (fp32) per gathered index
K_CHUNK_BYTES = 1 << 16  # adjoint: bytes of output one program's region chunk spans (kept hot in L2)


@triton.jit
def _mix(x):
    # hash-prospector 32-bit mixer [15 2c1b3c6d 12 297a2d39 15]; both multipliers < 2**31
    x ^= x >> 15
    x *= 0x2C1B3C6D
    x ^= x >> 12
    x *= 0x297A2D39
    x ^= x >> 15
    return x


@triton.jit
def _entry(col_key, k, reg_base, n_in, s):
    """Row (flat input index) and sign (+-1.0) of the nonzero of region k in each column of col_key."""
    kk = tl.cast(k, tl.int64)
    reg_key = _mix(reg_base.to(tl.uint32) ^ kk.to(tl.uint32))
    h = _mix(col_key ^ reg_key)
    start = kk * s
    length = tl.minimum(n_in - start, s)
    pos = tl.umulhi(h, length.to(tl.uint32)).to(tl.int64)
    sign = 1.0 - 2.0 * (h & 1).to(tl.float32)
    return start + pos, sign


@triton.jit
def _project_kernel(
    x_ptr,
    part_ptr,
    rows,
    L,
    stride_xr,
    stride_xl,
    offset,
    n_in,
    n_out,
    s,
    col_base,
    reg_base,
    k_first,
    k_count,
    k_per_split,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    VEC_R: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_r = tl.program_id(2)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < n_out
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = r // VEC_R < rows // VEC_R  # r < rows, constant over runs of VEC_R rows (VEC_R divides rows)
    col_key = _mix(col_base.to(tl.uint32) ^ j.to(tl.uint32))
    x_rows = x_ptr + r[None, :] * stride_xr  # [1, BLOCK_R]
    acc = tl.zeros((BLOCK_J, BLOCK_R), dtype=tl.float32)
    k_lo = k_first + pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_first + k_count)
    for k in range(k_lo, k_hi):
        i, sign = _entry(col_key, k, reg_base, n_in, s)
        i = i - offset
        ok = j_ok & (i >= 0) & (i < L)
        xv = tl.load(
            x_rows + tl.multiple_of(i * stride_xl, VEC_R)[:, None], mask=ok[:, None] & r_ok[None, :], other=0.0
        )
        acc += xv.to(tl.float32) * sign[:, None]
    out = part_ptr + pid_k.to(tl.int64) * rows * n_out + r[None, :] * n_out + j[:, None]
    tl.store(out, acc, mask=j_ok[:, None] & r_ok[None, :])


@triton.jit
def _adjoint_kernel(
    y_ptr,
    out_ptr,
    rows,
    length,
    stride_yr,
    stride_yj,
    stride_or,
    stride_ol,
    offset,
    n_in,
    n_out,
    s,
    col_base,
    reg_base,
    k_first,
    k_count,
    k_per_prog,
    k_chunk,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    VEC_R: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = r // VEC_R < rows // VEC_R  # r < rows, constant over runs of VEC_R rows (VEC_R divides rows)
    y_rows = y_ptr + r[None, :] * stride_yr  # [1, BLOCK_R]
    out_rows = out_ptr + r[None, :] * stride_or
    k_lo = k_first + pid_k * k_per_prog
    k_hi = tl.minimum(k_lo + k_per_prog, k_first + k_count)
    for c in range(k_lo, k_hi, k_chunk):
        c_hi = tl.minimum(c + k_chunk, k_hi)
        for j0 in range(0, n_out, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < n_out
            col_key = _mix(col_base.to(tl.uint32) ^ j.to(tl.uint32))
            yv = tl.load(y_rows + j.to(tl.int64)[:, None] * stride_yj, mask=j_ok[:, None] & r_ok[None, :], other=0.0)
            for k in range(c, c_hi):
                i, sign = _entry(col_key, k, reg_base, n_in, s)
                i = i - offset
                ok = j_ok & (i >= 0) & (i < length)
                tl.atomic_add(
                    out_rows + tl.multiple_of(i * stride_ol, VEC_R)[:, None],
                    yv * sign[:, None],
                    mask=ok[:, None] & r_ok[None, :],
                    sem="relaxed",
                )


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton projection kernels need a CUDA tensor (or TRITON_INTERPRET=1); got {t.device}")


def _row_block(rows: int) -> int:
    return min(triton.next_power_of_2(max(rows, 1)), MAX_BLOCK_R)


def _n_programs_target(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return 1  # interpreter: programs run one after another


def _vec_rows(t: torch.Tensor, rows: int, block_r: int, stride_r: int, stride_l: int) -> int:
    """Rows per vector access (up to 16 bytes): the largest power of two that divides rows and the stride along
    L, with rows contiguous; the kernels may then take the row mask and each gathered offset as constant over
    and aligned to runs of that many rows (the compiler vectorises the loads and atomics where the base pointer
    is aligned too)."""
    if stride_r != 1:
        return 1
    v = min(block_r, 16 // t.element_size())
    while v > 1 and (rows % v or stride_l % v):
        v //= 2
    return v


def _warps(block_j: int, block_r: int) -> int:
    return 8 if block_j * block_r > 4096 else 4  # at most 32 accumulator values per thread


def project_forward(
    x: torch.Tensor, offset: int, n_in: int, n_out: int, s: int, col_base: int, reg_base: int
) -> torch.Tensor:
    """x [rows, L] (any strides, fastest rows-minor: ``x.stride(0) == 1``; fp32/fp16/bf16) -> unscaled
    x A[offset:offset+L] [rows, n_out] fp32. The result does not depend on the strides of x."""
    _check_device(x)
    rows, L = x.shape
    k_first = offset // s
    k_count = (offset + L - 1) // s + 1 - k_first
    block_j = 64 if INTERPRET else 128
    block_r = _row_block(rows)
    grid_j, grid_r = triton.cdiv(n_out, block_j), triton.cdiv(rows, block_r)
    splits = max(1, min(k_count, _n_programs_target(x) // (grid_j * grid_r)))
    k_per_split = triton.cdiv(k_count, splits)
    splits = triton.cdiv(k_count, k_per_split)
    part = torch.empty((splits, rows, n_out), dtype=torch.float32, device=x.device)
    _project_kernel[(grid_j, splits, grid_r)](
        x,
        part,
        rows,
        L,
        x.stride(0),
        x.stride(1),
        offset,
        n_in,
        n_out,
        s,
        col_base,
        reg_base,
        k_first,
        k_count,
        k_per_split,
        BLOCK_R=block_r,
        BLOCK_J=block_j,
        VEC_R=_vec_rows(x, rows, block_r, x.stride(0), x.stride(1)),
        num_warps=_warps(block_j, block_r),
    )
    return part[0] if splits == 1 else part.sum(0)


def adjoint_forward(
    y: torch.Tensor, offset: int, length: int, n_in: int, n_out: int, s: int, col_base: int, reg_base: int
) -> torch.Tensor:
    """y [rows, n_out] fp32 (any strides; already scaled) -> A[offset:offset+length] y [rows, length] fp32,
    returned as the ``[rows, length]`` view of a rows-minor ``[length, rows]`` buffer (contiguous for one row)."""
    _check_device(y)
    rows = y.shape[0]
    assert y.dtype == torch.float32
    out = torch.zeros((length, rows), dtype=torch.float32, device=y.device).t()
    k_first = offset // s
    k_count = (offset + length - 1) // s + 1 - k_first
    block_j = 64 if INTERPRET else 128
    block_r = _row_block(rows)
    grid_r = triton.cdiv(rows, block_r)
    progs = max(1, min(k_count, _n_programs_target(y) // grid_r))
    k_per_prog = triton.cdiv(k_count, progs)
    progs = triton.cdiv(k_count, k_per_prog)
    k_chunk = max(1, K_CHUNK_BYTES // (4 * s * block_r))
    _adjoint_kernel[(progs, grid_r)](
        y,
        out,
        rows,
        length,
        y.stride(0),
        y.stride(1),
        out.stride(0),
        out.stride(1),
        offset,
        n_in,
        n_out,
        s,
        col_base,
        reg_base,
        k_first,
        k_count,
        k_per_prog,
        k_chunk,
        BLOCK_R=block_r,
        BLOCK_J=block_j,
        VEC_R=_vec_rows(out, rows, block_r, out.stride(0), out.stride(1)),
        num_warps=_warps(block_j, block_r),
    )
    return out
