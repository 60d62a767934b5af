"""The accelerated compressed-sensing solvers (SpaRSA, FISTA) against FPC, and ``transform`` on a held-out split."""

from __future__ import annotations

import math

import pytest
import torch

from npeff_lens.config import PerturbConfig
from npeff_lens.decomposition import NPEFF
from npeff_lens.projection import KroneckerProjection, SparseProjection
from npeff_lens.recovery import recover_direction
from npeff_lens.sensing import estimate_lambda_max, fpc, min_norm, solve_l1


def planted(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n)
    x[torch.randperm(n, generator=g)[:k]] = torch.randn(k, generator=g)
    return x / x.norm()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


class DenseOperator:
    def __init__(self, a):
        self.a, (self.n_in, self.n_out) = a, a.shape

    def project(self, x, offset=0):
        return x @ self.a[offset : offset + x.shape[-1]]

    def adjoint(self, y, offset=0, length=None):
        length = self.n_in - offset if length is None else length
        return y @ self.a[offset : offset + length].T


# n/d = 39 (sparse) and 30 (Kronecker: 7,808 parameters, 832 sketched, 256 measured); k well inside the ℓ1
# phase transition (k log(n/k) ≪ d).
PROJECTIONS = {
    "sparse": (lambda: SparseProjection(20_000, 512, seed=0, density=32), 10),
    "kron": (lambda: KroneckerProjection([(64, 48), (40, 40), (64,), (32, 96)], 256, seed=0, k=16), 5),
}


@pytest.fixture(scope="module", params=sorted(PROJECTIONS))
def problem(request):
    make, k = PROJECTIONS[request.param]
    op = make()
    x_true = planted(op.n_in, k, seed=k)
    return op, x_true, op.project(x_true), estimate_lambda_max(op) * 1.1


def test_sparsa_recovers_planted_vector_in_fewer_products_than_fpc(problem):
    op, x_true, b, lam = problem
    res = solve_l1(op, b, method="sparsa", lambda_max=lam)
    assert res.converged and res.stopped_by == "tolerance"
    assert rel_err(res.x, x_true) <= 1e-2
    assert res.relative_residual < 1e-2
    sparsa_products = res.n_project + res.n_adjoint

    # FPC run to its stopping rule (the accurate setting) needs several times more products: one Φx and one
    # Φᵀy per iteration.
    ref = fpc(op, b, inner_iterations=None, lambda_max=lam, max_iter=1000)
    assert 2 * ref.n_iter > 3 * sparsa_products, (ref.n_iter, sparsa_products)
    # The paper's default (one inner iteration per stage) is cheap but does not recover the vector.
    coarse = fpc(op, b, lambda_max=lam)
    assert rel_err(coarse.x, x_true) > 0.5


def test_fista_recovers_planted_vector():
    g = torch.Generator().manual_seed(0)
    op = DenseOperator(torch.randn(2000, 400, generator=g) / math.sqrt(400))
    x_true = planted(op.n_in, 20, seed=1)
    b = op.project(x_true)
    lam = estimate_lambda_max(op) * 1.1
    res = solve_l1(op, b, method="fista", lambda_max=lam)
    assert res.converged and rel_err(res.x, x_true) <= 1e-2
    ref = fpc(op, b, inner_iterations=None, lambda_max=lam, max_iter=2000)
    assert res.n_project + res.n_adjoint < 2 * ref.n_iter
    # The same minimiser as SpaRSA's.
    torch.testing.assert_close(solve_l1(op, b, method="sparsa", lambda_max=lam).x, res.x, atol=2e-3, rtol=0)


def test_continuation_and_warm_starts_pay():
    op = SparseProjection(20_000, 512, seed=0, density=32)
    x_true = planted(op.n_in, 10, seed=10)
    b, lam = op.project(x_true), estimate_lambda_max(op) * 1.1
    cont = solve_l1(op, b, lambda_max=lam)
    cold = solve_l1(op, b, lambda_max=lam, continuation=1.0)  # one stage, straight at μ
    assert cont.n_stages > 1 and cold.n_stages == 1
    assert [h["mu"] for h in cont.history] == sorted((h["mu"] for h in cont.history), reverse=True)
    assert cont.n_project + cont.n_adjoint < cold.n_project + cold.n_adjoint
    # x0 = the answer: the first stage starts at μ and the rule holds at once.
    warm = solve_l1(op, b, lambda_max=lam, x0=cont.x)
    assert warm.n_iter <= 3 and rel_err(warm.x, cont.x) < 1e-3


def test_solve_l1_zero_and_bad_inputs():
    op = SparseProjection(300, 64, seed=1, density=8)
    res = solve_l1(op, torch.zeros(64), lambda_max=10.0)
    assert res.n_iter == 0 and float(res.x.abs().max()) == 0.0 and res.converged
    with pytest.raises(ValueError, match="shape"):
        solve_l1(op, torch.zeros(63))
    with pytest.raises(ValueError, match="NaN"):
        solve_l1(op, torch.full((64,), float("nan")))
    with pytest.raises(ValueError, match="mu"):
        solve_l1(op, torch.ones(64), mu=0.0)
    with pytest.raises(ValueError, match="method"):
        solve_l1(op, torch.ones(64), method="omp")


def test_recover_direction_dispatches_to_the_solver():
    op = SparseProjection(4000, 256, seed=2, density=32)
    xs = [planted(op.n_in, 4, seed=s) for s in (1, 2)]
    comps = torch.stack([op.project(x) for x in xs])
    flat, info = recover_direction(comps, 0, op, method="sparsa", reject_threshold=None)
    assert rel_err(flat, xs[0]) <= 1e-2
    assert info["method"] == "sparsa" and info["n_project"] >= 1 and info["converged"]
    with pytest.raises(ValueError, match="method"):
        recover_direction(comps, 0, op, method="omp")
    assert PerturbConfig().recovery in ("sparsa", "fista", "fpc", "minnorm", "adjoint")


def test_min_norm_is_the_least_norm_exact_fit(problem):
    op, _, b, _ = problem
    x, figures = min_norm(op, b, rtol=1e-6)
    a = op.dense().double()  # [n_in, n_out]: Φ = Aᵀ
    expected = torch.linalg.lstsq(a.T, b.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    assert figures["converged"] and figures["n_project"] < 60
    assert rel_err(x.double(), expected) < 1e-4
    flat, info = recover_direction(torch.stack([b, b.flip(0)]), 0, op, method="minnorm", reject_threshold=None)
    assert rel_err(flat.double(), expected) < 1e-2 and info["relative_residual"] < 1e-3


# --------------------------------------------------------------------------------------- transform (held out)


def _planted_pefs(m, H, seed, max_active=2):
    g = torch.Generator().manual_seed(seed)
    C, d = H.shape
    W = torch.zeros(m, C, dtype=H.dtype)
    G = torch.zeros(m, max_active, d, dtype=H.dtype)
    for i in range(m):
        idx = torch.randperm(C, generator=g)[: int(torch.randint(1, max_active + 1, (1,), generator=g))]
        W[i, idx] = 0.5 + 1.5 * torch.rand(len(idx), generator=g, dtype=H.dtype)
        for row, j in enumerate(idx):
            G[i, row] = W[i, j].sqrt() * H[j]
    norms = (G @ G.transpose(1, 2)).square().sum((1, 2)).sqrt()
    return G, W / norms[:, None]  # coefficients of the unit-norm PEFs


def test_transform_on_held_out_split():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(5, 32, generator=g, dtype=torch.float64)
    H /= H.norm(dim=1, keepdim=True)
    G_train, _ = _planted_pefs(160, H, seed=1)
    G_test, W_test = _planted_pefs(80, H, seed=2)
    est = NPEFF(5, n_steps=300, n_warmup_steps=50, seed=0, progress=False).fit(G_train.float())

    # Given the training PEFs, transform reproduces the training coefficients.
    again = est.transform(G_train.float(), n_steps=1000)
    assert (again - est.coefficients_).abs().max() <= 1e-2 * est.coefficients_.max()

    # On the held-out split it recovers that split's planted coefficients (up to the component order).
    perm = (est.components_.double() @ H.T).abs().argmax(0)
    held = est.transform(G_test.float(), n_steps=1000).double()[:, perm]
    for j in range(5):
        assert torch.corrcoef(torch.stack([held[:, j], W_test[:, j]]))[0, 1] >= 0.99
    assert (held[W_test == 0] <= 1e-2 * held.max()).all()
