"""Benchmark: SparseProjection.project / adjoint against baselines measured in the same run.

Baselines (same rows, same device):
  read    x.sum(): one pass over the input block (memory-bandwidth floor)
  matmul  dense fp32 [rows, K] @ [K, n_out] with K = n_in * density / n_out (same multiply-adds), chunked
  dense   x @ A with A materialised (only where n_in * n_out * 4 bytes <= --dense-limit-gb)
Also prints the norm-preservation error |‖xA‖²/‖x‖² - 1| per density (quality side of the density trade-off).

    python benchmarks/projection.py --quick        # ~1 minute on 2 CPU cores
    python benchmarks/projection.py --collection   # how collection calls it: n_in = 106M, one weight per call
    python benchmarks/projection.py                # full grid, n_in up to 128M
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from npeff_lens.projection import SparseProjection


def _times(fn, repeat=1):
    """Seconds of each of `repeat` calls after one warm-up (numba / triton compile, allocator)."""
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def _time(fn, repeat=1):
    return min(_times(fn, repeat))


def _matmul_seconds(rows, K, n_out, device, chunk_elems=1 << 26, repeat=2):
    """Times of [rows, K] @ [K, n_out], chunked along K; extrapolated from a timed prefix for huge K."""
    kc = max(1, min(K, chunk_elems // n_out))
    a = torch.randn(kc, n_out, device=device)
    x = torch.randn(rows, kc, device=device)
    return [t * K / kc for t in _times(lambda: x @ a, repeat)]


def _collection_grid(args, device):
    """How collection calls project: one parameter block [rows, L] of a 106M-parameter model per call (L = a
    576 x 1536 MLP weight, a 576 x 192 k/v weight). % of matmul = matmul time / project time for the same
    multiply-adds ([rows, L / s] @ [L / s, n_out]), min and median of `--repeat` interleaved calls."""
    n_in, n_out = 106_000_000, args.n_out
    print(f"device: {device}; n_in = {n_in:,}; n_out = {n_out}; {args.repeat} calls each (min / median)\n")
    print(
        "| block L | density | rows | project ms (min / med) | adjoint ms (min / med) | matmul ms (min / med) | "
        "project % of matmul (min / med) | adjoint % of matmul (min / med) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for L in args.blocks:
        for density in args.densities or [8, 32]:
            P = SparseProjection(n_in, n_out, seed=0, density=density)
            K = max(1, L // P.region_size)
            for rows in args.rows or [1, 8, 16, 32]:
                x = torch.randn(rows, L, device=device)
                y = torch.randn(rows, n_out, device=device)
                xm, am = torch.randn(rows, K, device=device), torch.randn(K, n_out, device=device)
                tp, ta, tm = [], [], []
                P.project(x, offset=n_in - L), xm @ am  # warm-up
                for _ in range(args.repeat):  # interleaved, so load changes hit both alike
                    tp += _times(lambda: P.project(x, offset=n_in - L), 1)
                    tm += _times(lambda: xm @ am, 1)
                    if rows in (1, 8):
                        ta += _times(lambda: P.adjoint(y, offset=n_in - L, length=L), 1)
                med = statistics.median
                ms = lambda t: f"{min(t) * 1e3:.2f} / {med(t) * 1e3:.2f}" if t else "—"  # noqa: E731
                pct = lambda t: f"{100 * min(tm) / min(t):.0f}% / {100 * med(tm) / med(t):.0f}%" if t else "—"  # noqa: E731
                print(
                    f"| {L:,} | {density} | {rows} | {ms(tp)} | {ms(ta)} | {ms(tm)} | {pct(tp)} | {pct(ta)} |",
                    flush=True,
                )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small grid (n_in up to 4M)")
    p.add_argument("--n-in", type=int, nargs="*", default=None)
    p.add_argument("--densities", type=int, nargs="*", default=None)
    p.add_argument("--rows", type=int, nargs="*", default=None)
    p.add_argument("--n-out", type=int, default=8192)
    p.add_argument(
        "--block",
        type=int,
        default=1 << 21,
        help="inputs per timed block; throughput is extrapolated to n_in (blocks are independent)",
    )
    p.add_argument("--dense-limit-gb", type=float, default=1.0)
    p.add_argument("--collection", action="store_true", help="collection-shaped calls: n_in = 106M, real blocks")
    p.add_argument("--blocks", type=int, nargs="*", default=[884_736, 110_592], help="--collection block sizes")
    p.add_argument("--repeat", type=int, default=5, help="--collection calls per figure")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.collection:
        print(f"load average at start: {os.getloadavg()}")
        _collection_grid(args, device)
        print(f"load average at end: {os.getloadavg()}")
        return
    n_ins = args.n_in or ([1_000_000, 4_000_000] if args.quick else [1_000_000, 16_000_000, 128_000_000])
    densities = args.densities or ([1, 8, 32] if args.quick else [1, 4, 8, 16, 32])
    rows_list = args.rows or ([1, 8, 32] if args.quick else [1, 4, 8, 32])
    n_out = args.n_out
    print(
        f"device: {device}; n_out = {n_out}; times per call, extrapolated from a block of "
        f"{args.block:,} inputs (the projection is separable over blocks)\n"
    )
    print(
        "| n_in | density | rows | project s | adjoint s | Mpar/s (row-params) | read x | "
        "matmul (equal MACs) s | project / matmul | dense x@A s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_in in n_ins:
        L = min(n_in, args.block)
        for density in densities:
            P = SparseProjection(n_in, n_out, seed=0, density=density)
            for rows in rows_list:
                x = torch.randn(rows, L, device=device)
                y = torch.randn(rows, n_out, device=device)
                tp = _time(lambda: P.project(x, offset=n_in - L)) * n_in / L
                ta = _time(lambda: P.adjoint(y, offset=n_in - L, length=L)) * n_in / L
                tr = _time(lambda: x.sum(), repeat=3) * n_in / L
                K = max(1, n_in * density // n_out)
                tm = min(_matmul_seconds(rows, K, n_out, device))
                dense = "—"
                if n_in * n_out * 4 <= args.dense_limit_gb * 2**30:
                    A = torch.randn(n_in, n_out, device=device)
                    xf = torch.randn(rows, n_in, device=device)
                    dense = f"{_time(lambda: xf @ A):.3f}"
                    del A, xf
                print(
                    f"| {n_in:,} | {density} | {rows} | {tp:.3f} | {ta:.3f} | {rows * n_in / tp / 1e6:.0f} | "
                    f"{tr:.4f} | {tm:.3f} | {tm / tp:.2f} | {dense} |",
                    flush=True,
                )
    # quality side of the trade-off: norm preservation on Gaussian and heavy-tailed (Student-t 3) inputs
    print("\n| density | s | mean abs(‖xA‖²/‖x‖² − 1), Gaussian | same, heavy-tailed | project s (1M, 8 rows) |")
    print("|---:|---:|---:|---:|---:|")
    n_in = 1_000_000
    g = torch.Generator().manual_seed(0)
    xg = torch.randn(32, n_in, generator=g)
    xt = torch.distributions.StudentT(3.0).sample((32, n_in))
    for density in densities:
        P = SparseProjection(n_in, n_out, seed=1, density=density)
        errs = []
        for xx in (xg, xt):
            pr = P.project(xx.to(device)).cpu()
            errs.append(((pr.pow(2).sum(1) / xx.pow(2).sum(1)) - 1).abs().mean().item())
        t = _time(lambda: P.project(xg[:8].to(device)))
        print(f"| {density} | {n_out // density} | {errs[0]:.4f} | {errs[1]:.4f} | {t:.3f} |", flush=True)


if __name__ == "__main__":
    main()
