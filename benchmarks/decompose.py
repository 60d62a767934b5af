"""Benchmark of the NPEFF step (App. D) against its roofline, torch.matmul on the same GEMM shapes.

One joint step costs ~ 4 m r d C FLOPs in two GEMMs (B = G H^T: [m r, d] x [d, C]; T2: [C, m r] x
[m r, d]) plus 4 m C^2 (W S2, W^T W) and 4 C^2 d (H H^T, T1). The ratio "step / matmul" is the
fraction of the GEMM roofline the whole step achieves (1.0 = no overhead beyond the two GEMMs).

    python benchmarks/decompose.py            # CPU grid (m, d, C scaling)
    python benchmarks/decompose.py --device cuda --quick
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import time

import torch

from npeff_lens.nmf import init_H, init_W, sweep
from npeff_lens.sources import open_shard


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def bench(m: int, r: int, d: int, C: int, device: str, dtype, repeats: int) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(0)
    G = torch.randn(m, r, d, generator=g, dtype=dtype).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seed, eps = 0, 1e-12  # NPEFF's defaults
    _, shard, n_valid = open_shard(G, C, device=device, dtype=dtype)  # the shard NPEFF(C, ...) reads
    W = init_W(seed, 0, m, C, dtype).to(device)
    H = init_H(seed, C, d, dtype).to(device)
    step = _time(lambda: sweep(shard, W, H, n_valid, eps=eps, update_W=True, grad=True), repeats, sync)
    # Roofline: the two dominant GEMMs alone, same shapes, same dtype/device.
    G2 = G.reshape(m * r, d)
    B = torch.randn(m * r, C, dtype=dtype, device=device)
    gemm = _time(lambda: (torch.matmul(G2, H.T), torch.matmul(B.T, G2)), repeats, sync)
    flops = 4 * m * r * d * C + 4 * m * C * C + 4 * C * C * d
    gemm_flops = 4 * m * r * d * C
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "m": m,
        "r": r,
        "d": d,
        "C": C,
        "step_ms": step * 1e3,
        "step_gflops": flops / step / 1e9,
        "matmul_gflops": gemm_flops / gemm / 1e9,
        "ratio": gemm / step,
        "peak_mib": peak,
        "data_mib": G.numel() * G.element_size() / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one small configuration")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = dict(m=4096, r=2, d=4096, C=128)
    if args.quick:
        grid = [base]
    else:
        grid = [base]
        grid += [{**base, "m": m} for m in (1024, 16384)]
        grid += [{**base, "d": d} for d in (1024, 16384)]
        grid += [{**base, "C": C} for C in (32, 512)]
    cpu = (
        next(
            (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
            platform.processor(),
        )
        if platform.system() == "Linux"
        else platform.processor()
    )
    print(
        f"# {datetime.date.today()} device={args.device} "
        f"({cpu if args.device == 'cpu' else torch.cuda.get_device_name()}) "
        f"threads={torch.get_num_threads()} dtype={args.dtype} torch={torch.__version__}"
    )
    print(
        f"{'m':>6} {'r':>2} {'d':>6} {'C':>5} {'step ms':>9} {'GFLOP/s':>8} {'matmul GFLOP/s':>15} "
        f"{'step/matmul':>11} {'peak MiB':>9}"
    )
    for cfg in grid:
        res = bench(**cfg, device=args.device, dtype=dtype, repeats=args.repeats)
        print(
            f"{res['m']:>6} {res['r']:>2} {res['d']:>6} {res['C']:>5} {res['step_ms']:>9.1f} "
            f"{res['step_gflops']:>8.1f} "
            f"{res['matmul_gflops']:>15.1f} {res['ratio']:>11.2f} {res['peak_mib']:>9.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
