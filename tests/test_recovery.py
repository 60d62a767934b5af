"""Compressed-sensing recovery (FPC), orthogonal rejection and the parameter layout (App. F, §3.3)."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from npeff_lens.layout import flatten, parameter_layout, unflatten, validate_layout
from npeff_lens.projection import SparseProjection, projection_from_config
from npeff_lens.recovery import recover, reject, save_pseudo_fisher
from npeff_lens.sensing import estimate_lambda_max, fpc, fpc_step_size, fpc_tau


class DenseOperator:
    """Reference operator: ``project(x) = x A`` with a materialised ``A`` ``[n_in, n_out]``."""

    def __init__(self, a: torch.Tensor):
        self.a = a
        self.n_in, self.n_out = a.shape

    def project(self, x, offset=0):
        return x @ self.a[offset : offset + x.shape[-1]]

    def adjoint(self, y, offset=0, length=None):
        length = self.n_in - offset if length is None else length
        return y @ self.a[offset : offset + length].T

    def dense(self, offset=0, length=None):
        length = self.n_in - offset if length is None else length
        return self.a[offset : offset + length]


def gaussian_operator(n_in=2000, n_out=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DenseOperator(torch.randn(n_in, n_out, generator=g) / math.sqrt(n_out))


def planted(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n)
    idx = torch.randperm(n, generator=g)[:k]
    x[idx] = torch.randn(k, generator=g)
    return x / x.norm()


def lambda_max_dense(a: torch.Tensor) -> float:
    """λ_max(ΦᵀΦ) = λ_max(ΦΦᵀ) = λ_max(AᵀA) for Φ = Aᵀ (the small n_out × n_out side)."""
    a = a.double()
    return float(torch.linalg.eigvalsh(a.T @ a)[-1])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------- FPC


def test_fpc_recovers_planted_sparse_vector_and_degrades_gracefully():
    op = gaussian_operator()
    ks = [5, 20, 60, 200, 350]
    errors = []
    for k in ks:
        x_true = planted(op.n_in, k, seed=k)
        res = fpc(op, op.project(x_true), inner_iterations=None, chunk=512)
        assert torch.isfinite(res.x).all()
        assert float(res.x.norm()) < 3.0  # no blow-up (‖x_true‖ = 1)
        errors.append(rel_err(res.x, x_true))
    # k ≪ d: essentially exact (μ = 4e-5 leaves a bias ~1e-4); past the ℓ1 phase transition: not recoverable.
    assert errors[0] < 1e-2 and errors[1] < 1e-2, errors
    assert errors[-1] > 0.3, errors
    assert errors[-1] > 30 * errors[0], errors
    for a, b in zip(errors, errors[1:]):  # monotone-ish
        assert b > 0.5 * a, errors


def test_fpc_app_f_default_is_one_step_per_stage():
    op = gaussian_operator()
    x_true = planted(op.n_in, 20, seed=3)
    b = op.project(x_true)
    res = fpc(op, b)  # γ = 0.99, β = 4, one inner iteration per stage, μ = 4e-5
    atb_inf = float(op.adjoint(b).abs().max())
    expected_stages = math.ceil(math.log(atb_inf / 0.99 / 4e-5, 4)) + 1
    assert res.n_stages == expected_stages
    assert res.n_iter == res.n_stages and res.stopped_by == "stages"
    assert [h["mu"] for h in res.history] == sorted((h["mu"] for h in res.history), reverse=True)
    assert res.history[-1]["mu"] == pytest.approx(4e-5)
    # A coarse reconstruction, yet clearly aligned with the truth and much closer to b than x = 0.
    assert torch.nn.functional.cosine_similarity(res.x, x_true, dim=0) > 0.6
    assert res.relative_residual < 0.1


def test_fpc_chunking_does_not_change_the_result():
    op = gaussian_operator(n_in=1500, n_out=300, seed=1)
    b = op.project(planted(op.n_in, 15, seed=2))
    a = fpc(op, b, inner_iterations=None, chunk=128, lambda_max=40.0)
    c = fpc(op, b, inner_iterations=None, chunk=10**7, lambda_max=40.0)
    assert a.n_iter == c.n_iter
    torch.testing.assert_close(a.x, c.x, atol=1e-5, rtol=1e-4)


def test_fpc_zero_and_bad_inputs():
    op = gaussian_operator(n_in=300, n_out=50)
    res = fpc(op, torch.zeros(50))
    assert res.n_iter == 0 and float(res.x.abs().max()) == 0.0
    with pytest.raises(ValueError, match="shape"):
        fpc(op, torch.zeros(49))
    with pytest.raises(ValueError, match="NaN"):
        fpc(op, torch.full((50,), float("nan")))
    with pytest.raises(ValueError, match="mu"):
        fpc(op, torch.ones(50), mu=0.0)


def test_tau_rule_satisfies_convergence_condition():
    # The report's rule, τ(δ) = min(1 + 1.665(1 − δ), 1.999) for λ_max(ΦᵀΦ) ≤ 1 (fpc.m).
    assert fpc_tau(1000, 100) == pytest.approx(1.999)
    assert fpc_tau(1000, 800) == pytest.approx(1 + 1.665 * 0.2)
    assert all(0 < fpc_tau(1000, m) < 2 for m in range(1, 1001, 37))
    for n_in, n_out, seed in [(2000, 400, 0), (600, 500, 1)]:
        op = gaussian_operator(n_in, n_out, seed)
        lam_true = lambda_max_dense(op.a)
        lam_est = estimate_lambda_max(op, n_iter=30)
        assert 0.95 * lam_true <= lam_est <= lam_true * (1 + 1e-5)  # power iteration: from below
        res = fpc(op, op.project(planted(n_in, 5, seed)), max_iter=3)
        assert 0 < res.tau * lam_true < 2.0  # convergence condition τ < 2/λ_max
        # ...and it is the report's step, not an arbitrary small one.
        assert res.tau * lam_true > 0.85 * fpc_tau(n_in, n_out)
        assert fpc_step_size(n_in, n_out, lam_true) * lam_true == pytest.approx(fpc_tau(n_in, n_out))
    with pytest.raises(ValueError):
        fpc_step_size(10, 5, 0.0)


# ----------------------------------------------------------------------------------------- rejection


def _similar_set(seed=0, d=40):
    """Component 0, two similar ones (|cos| > 0.5) and four dissimilar, mutually correlated ones."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    base = torch.randn(d, generator=g)
    similar = [v + 0.3 * torch.randn(d, generator=g), -v + 0.4 * torch.randn(d, generator=g)]
    dissimilar = [base + 0.6 * torch.randn(d, generator=g) + 0.2 * v for _ in range(4)]
    return torch.stack([v, *similar, *dissimilar]).double()


def test_reject_is_orthogonal_to_rejected_and_unchanged_elsewhere():
    vecs = _similar_set()
    v = vecs[0]
    out, rejected = reject(vecs, 0, 0.5, return_indices=True)
    cos = torch.nn.functional.cosine_similarity(vecs, v[None], dim=1)
    assert rejected == [i for i in range(1, len(vecs)) if abs(cos[i]) < 0.5] == [3, 4, 5, 6]
    r = vecs[rejected]
    # Orthogonal to every rejected vector (sequential Gram–Schmidt on the raw, correlated vectors fails this).
    assert (r @ out).abs().max() < 1e-9 * float(v.norm() * r.norm(dim=1).max())
    # The change lies in the span of the rejected vectors, so every direction orthogonal to them —
    # in particular the kept vectors' components outside that span — is untouched.
    q, _ = torch.linalg.qr(r.T)
    change = v - out
    assert (change - q @ (q.T @ change)).norm() < 1e-9 * v.norm()
    for k in (1, 2):
        k_perp = vecs[k] - q @ (q.T @ vecs[k])
        assert torch.dot(out, k_perp) == pytest.approx(float(torch.dot(v, k_perp)), rel=1e-9)
    # Brute force: least-squares projection onto the span.
    coef = torch.linalg.lstsq(r.T, v[:, None]).solution
    torch.testing.assert_close(out, v - (r.T @ coef)[:, 0])


def test_reject_preserve_kept_keeps_inner_products_with_kept_vectors():
    vecs = _similar_set(seed=1)
    out, rejected = reject(vecs, 0, 0.5, preserve_kept=True, return_indices=True)
    kept = [i for i in range(1, len(vecs)) if i not in rejected]
    assert kept
    assert (vecs[rejected] @ out).abs().max() < 1e-8 * float(vecs[0].norm() ** 2)
    torch.testing.assert_close(vecs[kept] @ out, vecs[kept] @ vecs[0])


def test_reject_edge_cases():
    vecs = _similar_set(seed=2).float()
    torch.testing.assert_close(reject(vecs, 0, None), vecs[0])
    assert reject(vecs, 0).dtype == torch.float32
    # Rank-deficient rejected set (duplicates): still an exact projection.
    dup = torch.cat([vecs, vecs[3:]]).double()
    out = reject(dup, 0)
    assert (dup[3:] @ out).abs().max() < 1e-9 * float(dup[0].norm() ** 2)
    with pytest.raises(ValueError, match="out of range"):
        reject(vecs, 7)
    with pytest.raises(ValueError, match="zero norm"):
        reject(torch.cat([torch.zeros(1, vecs.shape[1]), vecs]), 0)


# ----------------------------------------------------------------------------------------- layout

LAYOUT = [
    {"name": "blocks.0.attn.W_Q", "shape": [2, 3, 4], "offset": 0, "numel": 24},
    {"name": "blocks.0.ln1.w", "shape": [5], "offset": 24, "numel": 5},
    {"name": "unembed.W_U", "shape": [3, 7], "offset": 29, "numel": 21},
]


def test_flatten_unflatten_round_trip():
    flat = torch.randn(50)
    named = unflatten(flat, LAYOUT)
    assert list(named) == [e["name"] for e in LAYOUT]
    assert named["blocks.0.attn.W_Q"].shape == (2, 3, 4)
    torch.testing.assert_close(named["unembed.W_U"].reshape(-1), flat[29:])
    torch.testing.assert_close(flatten(named, LAYOUT), flat)
    # Order in the dict does not matter; layout order does.
    torch.testing.assert_close(flatten(dict(reversed(list(named.items()))), LAYOUT), flat)
    assert validate_layout(LAYOUT) == 50


def test_parameter_layout_is_the_inverse_of_unflatten():
    """The layout of named parameters is valid, and flattening them and splitting again gives them back."""
    g = torch.Generator().manual_seed(0)
    named = [(e["name"], torch.randn(*e["shape"], generator=g)) for e in LAYOUT]
    layout = parameter_layout(named)
    assert layout == LAYOUT and validate_layout(layout) == 50
    flat = torch.cat([t.reshape(-1) for _, t in named])
    assert all(torch.equal(unflatten(flat, layout)[n], t) for n, t in named)


def test_layout_errors():
    with pytest.raises(ValueError, match="50"):
        unflatten(torch.randn(49), LAYOUT)
    named = unflatten(torch.randn(50), LAYOUT)
    with pytest.raises(ValueError, match="missing.*ln1"):
        flatten({k: v for k, v in named.items() if "ln1" not in k}, LAYOUT)
    with pytest.raises(ValueError, match="not in the layout"):
        flatten({**named, "extra": torch.zeros(1)}, LAYOUT)
    with pytest.raises(ValueError, match="shape"):
        flatten({**named, "blocks.0.ln1.w": torch.zeros(5, 1)}, LAYOUT)
    gap = [dict(e) for e in LAYOUT]
    gap[1]["offset"] = 25
    with pytest.raises(ValueError, match="contiguous"):
        validate_layout(gap)
    bad_numel = [dict(e) for e in LAYOUT]
    bad_numel[0]["numel"] = 23
    with pytest.raises(ValueError, match="numel"):
        validate_layout(bad_numel)


def test_save_pseudo_fisher_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    flat = torch.randn(50)
    named = unflatten(flat, LAYOUT)  # views sharing one storage
    path = tmp_path / "h.safetensors"
    save_pseudo_fisher(path, named, metadata={"component": 3, "model": "smollm2"})
    loaded = load_file(path)
    for k, v in named.items():
        torch.testing.assert_close(loaded[k], v)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "smollm2" and json.loads(meta["component"]) == 3


# ----------------------------------------------------------------------------------------- recover


class FakeDecomposition:
    def __init__(self, components, store_manifest=None):
        self.components_ = components
        if store_manifest is not None:
            self.store_manifest = store_manifest


def _planted_decomposition(op, n_comp=3, k=8):
    """Components that are exact projections of sparse, disjoint-support parameter vectors."""
    xs = []
    for j in range(n_comp):
        x = torch.zeros(op.n_in)
        x[j * 200 : j * 200 + k] = planted(k, k, seed=10 + j)
        xs.append(x)
    xs = torch.stack(xs)
    return xs, op.project(xs)


def test_recover_end_to_end(tmp_path):
    from safetensors.torch import load_file

    op = gaussian_operator(n_in=50 * 30, n_out=300, seed=4)
    layout = [{"name": f"p{i}", "shape": [5, 10], "offset": 50 * i, "numel": 50} for i in range(30)]
    xs, comps = _planted_decomposition(op)
    dec = FakeDecomposition(comps)
    out = recover(
        dec, [0, 2], projection=op, layout=layout, reject_threshold=None, inner_iterations=None, out_dir=tmp_path
    )
    assert sorted(out) == [0, 2]
    for j in (0, 2):
        assert set(out[j]) == {e["name"] for e in layout}
        assert rel_err(flatten(out[j], layout), xs[j]) < 1e-2
        loaded = load_file(tmp_path / f"component_{j:05d}.safetensors")
        torch.testing.assert_close(flatten(loaded, layout), flatten(out[j], layout))
    assert not (tmp_path / "component_00001.safetensors").exists()
    flat = recover(dec, 1, projection=op, reject_threshold=None, inner_iterations=None, flat=True)
    assert flat[1].shape == (op.n_in,)


def test_recover_rejects_before_solving():
    op = gaussian_operator(n_in=1000, n_out=200, seed=5)
    _, comps = _planted_decomposition(op)
    res = recover(FakeDecomposition(comps), 0, projection=op, reject_threshold=0.5, inner_iterations=None, flat=True)
    # Recovered from the rejected vector: its projection matches reject(...), not the raw component.
    target = reject(comps, 0, 0.5)
    assert rel_err(op.project(res[0]), target) < 5e-3


def test_recover_bad_input():
    op = gaussian_operator(n_in=100, n_out=20)
    comps = torch.randn(3, 20)
    dec = FakeDecomposition(comps)
    with pytest.raises(ValueError, match="out of range"):
        recover(dec, 3, projection=op)
    with pytest.raises(ValueError, match="out of range"):
        recover(dec, [0, -1], projection=op)
    with pytest.raises(ValueError, match="does not match components_ width"):
        recover(FakeDecomposition(torch.randn(3, 21)), 0, projection=op)
    with pytest.raises(ValueError, match="layout covers 99"):
        recover(dec, 0, projection=op, layout=[{"name": "w", "shape": [99], "offset": 0, "numel": 99}])
    with pytest.raises(ValueError, match="no projection"):
        recover(dec, 0)
    with pytest.raises(ValueError, match="components_"):
        recover(object(), 0, projection=op)
    with pytest.raises(ValueError, match="n_out=64 does not match"):
        recover(FakeDecomposition(comps, {"projection": {"kind": "sparse", "n_in": 100, "n_out": 64}}), 0)


def test_recover_reads_projection_and_layout_from_store_manifest(monkeypatch):
    """The manifest path, with a stand-in `npeff_lens.projection` that builds the dense operator."""
    op = gaussian_operator(n_in=400, n_out=100, seed=6)
    built = []

    class StubSparseProjection(DenseOperator):
        def __init__(self, n_in, n_out, seed=0, density=32):
            built.append((n_in, n_out, seed, density))
            super().__init__(op.a)

    import npeff_lens.projection

    monkeypatch.setattr(npeff_lens.projection, "SparseProjection", StubSparseProjection)
    manifest = {
        "projection": {"kind": "sparse", "n_in": 400, "n_out": 100, "seed": 7, "density": 16},
        "layout": [
            {"name": "a", "shape": [20, 10], "offset": 0, "numel": 200},
            {"name": "b", "shape": [200], "offset": 200, "numel": 200},
        ],
    }
    xs, comps = _planted_decomposition(op, n_comp=2, k=4)
    for dec in (
        FakeDecomposition(comps, manifest),
        FakeDecomposition(comps, {"store_manifest": manifest}),  # nested
        types.SimpleNamespace(components_=comps, manifest_=manifest),  # NPEFF's attribute
        {"components_": comps, **manifest},
    ):
        out = recover(dec, 1, reject_threshold=None, inner_iterations=None)
        assert set(out[1]) == {"a", "b"} and out[1]["a"].shape == (20, 10)
        assert rel_err(flatten(out[1], manifest["layout"]), xs[1]) < 1e-2
    assert built[0] == (400, 100, 7, 16)


# ------------------------------------------------------------------------------- real SparseProjection


def test_fpc_with_real_sparse_projection():
    proj = SparseProjection(4000, 256, seed=0, density=32)
    x_true = planted(proj.n_in, 4, seed=11)
    b = proj.project(x_true)
    res = fpc(proj, b, inner_iterations=None)
    assert rel_err(res.x, x_true) < 5e-2
    # The chunked power iteration agrees with the dense matrix's λ_max(ΦᵀΦ) = σ_max(A)².
    lam_true = lambda_max_dense(proj.dense())
    assert 0.9 * lam_true <= res.lambda_max <= lam_true * (1 + 1e-4)
    assert res.tau * lam_true < 2.0


def test_recover_with_real_sparse_projection_manifest():
    manifest = {
        "projection": {"kind": "sparse", "n_in": 3000, "n_out": 256, "seed": 3, "density": 32},
        "layout": [{"name": "w", "shape": [30, 100], "offset": 0, "numel": 3000}],
    }
    proj = projection_from_config(manifest["projection"])
    assert (proj.n_in, proj.n_out, proj.seed, proj.density) == (3000, 256, 3, 32)
    x_true = planted(3000, 4, seed=12)
    comps = torch.stack([proj.project(x_true), proj.project(planted(3000, 4, seed=13))])
    out = recover(FakeDecomposition(comps, manifest), 0, reject_threshold=None, inner_iterations=None)
    assert rel_err(out[0]["w"].reshape(-1), x_true) < 5e-2
