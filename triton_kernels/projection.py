"""Triton kernels for the sparse random projection (App. A); the definition is in ``npeff_lens.projection``.

Both kernels regenerate the matrix from the hash: nothing but the seed-derived keys crosses the launch.
All hash arithmetic is on ``tl.uint32`` (wrapping multiply, logical shift), which is bit-identical to the
int64-with-mask emulation of the CPU paths.

* ``project_forward``: x [rows, L] -> [rows, n_out], unscaled. Program = (column block, split of the
  regions, row block); the hash of each (column, region) pair is computed once and reused for every row of
  the block, and each program reads its slice of x once. Splits write separate partial sums, reduced in a
  fixed order afterwards, so the result is deterministic.
* ``adjoint_forward``: y [rows, n_out] -> [rows, length]. Program = (range of regions, row block); it owns
  the outputs of its regions, so atomics never cross programs, but colliding entries inside one region are
  added by ``tl.atomic_add`` in an unspecified order (last-bit differences between runs on a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
):
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_r = tl.program_id(2)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < n_out
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    col_key = _mix(col_base.to(tl.uint32) ^ j.to(tl.uint32))
    x_row = x_ptr + r.to(tl.int64)[:, None] * stride_xr
    acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
    k_lo = k_first + pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_first + k_count)
    for k in range(k_lo, k_hi):
        i, sign = _entry(col_key, k, reg_base, n_in, s)
        i = i - offset
        ok = j_ok & (i >= 0) & (i < L)
        xv = tl.load(x_row + i[None, :], mask=r_ok[:, None] & ok[None, :], other=0.0)
        acc += xv.to(tl.float32) * sign[None, :]
    out = part_ptr + pid_k.to(tl.int64) * rows * n_out + r.to(tl.int64)[:, None] * n_out + j[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & j_ok[None, :])


@triton.jit
def _adjoint_kernel(
    y_ptr,
    out_ptr,
    rows,
    length,
    stride_or,
    offset,
    n_in,
    n_out,
    s,
    col_base,
    reg_base,
    k_first,
    k_count,
    k_per_prog,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    out_row = out_ptr + r.to(tl.int64)[:, None] * stride_or
    k_lo = k_first + pid_k * k_per_prog
    k_hi = tl.minimum(k_lo + k_per_prog, k_first + k_count)
    for j0 in range(0, n_out, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < n_out
        col_key = _mix(col_base.to(tl.uint32) ^ j.to(tl.uint32))
        yv = tl.load(
            y_ptr + r.to(tl.int64)[:, None] * n_out + j[None, :], mask=r_ok[:, None] & j_ok[None, :], other=0.0
        )
        for k in range(k_lo, k_hi):
            i, sign = _entry(col_key, k, reg_base, n_in, s)
            i = i - offset
            ok = j_ok & (i >= 0) & (i < length)
            tl.atomic_add(out_row + i[None, :], yv * sign[None, :], mask=r_ok[:, None] & ok[None, :], sem="relaxed")


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton projection kernels need a CUDA tensor (or TRITON_INTERPRET=1); got {t.device}")


def _row_block(rows: int) -> int:
    return min(triton.next_power_of_2(max(rows, 1)), 16)


def _n_programs_target(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return 1  # interpreter: programs run one after another


def project_forward(
    x: torch.Tensor, offset: int, n_in: int, n_out: int, s: int, col_base: int, reg_base: int
) -> torch.Tensor:
    """x [rows, L] (unit stride along L; fp32/fp16/bf16) -> unscaled x A[offset:offset+L] [rows, n_out] fp32."""
    _check_device(x)
    rows, L = x.shape
    assert x.stride(1) == 1
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
        num_warps=4,
    )
    return part[0] if splits == 1 else part.sum(0)


def adjoint_forward(
    y: torch.Tensor, offset: int, length: int, n_in: int, n_out: int, s: int, col_base: int, reg_base: int
) -> torch.Tensor:
    """y [rows, n_out] fp32 contiguous (already scaled) -> A[offset:offset+length] y [rows, length] fp32."""
    _check_device(y)
    rows = y.shape[0]
    assert y.is_contiguous() and y.dtype == torch.float32
    out = torch.zeros((rows, length), dtype=torch.float32, device=y.device)
    k_first = offset // s
    k_count = (offset + length - 1) // s + 1 - k_first
    block_j = 64 if INTERPRET else 128
    block_r = _row_block(rows)
    grid_r = triton.cdiv(rows, block_r)
    progs = max(1, min(k_count, _n_programs_target(y) // grid_r))
    k_per_prog = triton.cdiv(k_count, progs)
    progs = triton.cdiv(k_count, k_per_prog)
    _adjoint_kernel[(progs, grid_r)](
        y,
        out,
        rows,
        length,
        out.stride(0),
        offset,
        n_in,
        n_out,
        s,
        col_base,
        reg_base,
        k_first,
        k_count,
        k_per_prog,
        BLOCK_R=block_r,
        BLOCK_J=block_j,
        num_warps=4,
    )
    return out
