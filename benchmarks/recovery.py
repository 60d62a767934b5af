"""Compressed-sensing solvers for App. F eq. 6 on planted sparse vectors: operator products to convergence.

Each solver needs only ``Φx`` (project) and ``Φᵀy`` (adjoint); at scale those products are the whole cost
(``benchmarks/projection.py`` times them), so the table counts them, with the relative error against the
planted vector. FPC runs to its stopping rule (capped at ``--max-iter``) and at
the paper's one inner iteration per stage; SpaRSA and FISTA at their defaults.

    python benchmarks/recovery.py
"""

from __future__ import annotations

import argparse

import torch

from npeff_lens.projection import KroneckerProjection, SparseProjection
from npeff_lens.sensing import estimate_lambda_max, fpc, solve_l1


def planted(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n)
    x[torch.randperm(n, generator=g)[:k]] = torch.randn(k, generator=g)
    return x / x.norm()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-iter", type=int, default=3000, help="iteration cap of every solver")
    args = ap.parse_args()
    cases = [
        ("sparse n=20,000 d=512 density 32", SparseProjection(20_000, 512, seed=0, density=32), (10, 40)),
        ("sparse n=200,000 d=512 density 8", SparseProjection(200_000, 512, seed=0, density=8), (10, 30)),
        (
            "kron n=7,808 (sketch 832) d=256",
            KroneckerProjection([(64, 48), (40, 40), (64,), (32, 96)], 256, seed=0, k=16),
            (5, 15),
        ),
    ]
    print("| projection | k | FPC (to rule) | FPC (1 inner, App. F) | SpaRSA | FISTA |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, op, ks in cases:
        lam = estimate_lambda_max(op) * 1.1
        for k in ks:
            x_true = planted(op.n_in, k, seed=k)
            b = op.project(x_true)
            cells = []
            for solve in (
                lambda: fpc(op, b, inner_iterations=None, lambda_max=lam, max_iter=args.max_iter),
                lambda: fpc(op, b, lambda_max=lam),
                lambda: solve_l1(op, b, method="sparsa", lambda_max=lam, max_iter=args.max_iter),
                lambda: solve_l1(op, b, method="fista", lambda_max=lam, max_iter=args.max_iter),
            ):
                r = solve()
                products = getattr(r, "n_project", r.n_iter) + getattr(r, "n_adjoint", r.n_iter)
                err = float((r.x - x_true).norm())
                cells.append(f"{products} / {err:.1e}")
            print(f"| {name} | {k} | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: operator products (Φx + Φᵀy) / relative error against the planted vector")


if __name__ == "__main__":
    main()
