"""KroneckerProjection: an independent dense construction of its matrix, adjointness, any flat range,
config round trip, and the JL-type preservation of norms and inner products of real per-example gradients."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import npeff_lens as nl
from npeff_lens.projection import KroneckerProjection, SparseProjection, projection_from_config
from npeff_lens.tasks import LabelTokens

SHAPES = [(6, 5), (7,), (3, 4, 2), (40, 33), (1, 9), (12, 2)]


def dense_reference(P: KroneckerProjection) -> torch.Tensor:
    """``A = Sᵀ B``: S block-diagonal with ``P_R ⊗ P_C`` per matrix (row-major vec) and ``I`` per vector, B the
    second stage's dense matrix; built from the factors and ``torch.kron``, not from ``project``."""
    blocks = []
    for i, shape in enumerate(P.shapes):
        if len(shape) == 1:
            blocks.append(torch.eye(shape[0]))
            continue
        R, C = shape[0], math.prod(shape[1:])
        pr, pc = P.factor(i, 0), P.factor(i, 1)
        pr = torch.eye(R) if pr is None else pr
        pc = torch.eye(C) if pc is None else pc
        blocks.append(torch.kron(pr, pc))
    S = torch.block_diag(*blocks)  # [sketch_dim, n_in]
    assert S.shape == (P.sketch_dim, P.n_in)
    return S.T @ SparseProjection(P.sketch_dim, P.n_out, seed=P.seed, density=P.density).dense()


@pytest.fixture(scope="module")
def proj():
    return KroneckerProjection(SHAPES, 64, seed=3, k=4, density=8)


def test_matches_independent_dense_matrix(proj):
    A = dense_reference(proj)
    x, y = torch.randn(3, proj.n_in), torch.randn(3, proj.n_out)
    torch.testing.assert_close(proj.project(x), x @ A, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(proj.adjoint(y), y @ A.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(proj.dense(), A, rtol=1e-4, atol=1e-5)
    # identity factors where k covers the axis, Gaussian ones otherwise
    assert proj.factor(4, 0) is None and proj.factor(2, 0) is None and proj.factor(3, 1).shape == (4, 33)


@pytest.mark.parametrize("offset,length", [(0, 30), (3, 20), (30, 7), (37, 1000), (41, 17), (100, 1), (5, 1409)])
def test_any_flat_range_and_adjointness(proj, offset, length):
    A = dense_reference(proj)
    length = min(length, proj.n_in - offset)
    x, y = torch.randn(2, length), torch.randn(2, proj.n_out)
    torch.testing.assert_close(proj.project(x, offset), x @ A[offset : offset + length], rtol=1e-4, atol=1e-4)
    back = proj.adjoint(y, offset, length)
    torch.testing.assert_close(back, y @ A[offset : offset + length].T, rtol=1e-4, atol=1e-4)
    # <x A, y> = <x, A y> on the block
    lhs = (proj.project(x, offset) * y).sum()
    rhs = (x * back).sum()
    assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + 1)


def test_blocks_add_up(proj):
    x = torch.randn(2, proj.n_in)
    cuts = [0, 13, 30, 31, 200, 1000, proj.n_in]
    parts = sum(proj.project(x[:, a:b], a) for a, b in zip(cuts, cuts[1:]))
    torch.testing.assert_close(parts, proj.project(x), rtol=1e-4, atol=1e-4)


def test_sketch_outer_is_the_sketch_of_the_outer_product_sum(proj):
    i = 3  # (40, 33)
    left, right = torch.randn(2, 5, 40), torch.randn(2, 5, 33)
    X = torch.einsum("btr,btc->brc", left, right).reshape(2, -1)
    ((mid, piece),) = proj.sketch(X, proj.offsets[i])
    assert mid == proj.sketch_offsets[i]
    torch.testing.assert_close(proj.sketch_outer(i, left, right), piece, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[0, 5, 5, 39]])
    g = torch.randn(1, 2, 4, 33)
    E = torch.zeros(1, 2, 40, 33).index_add_(2, ids[0], g)
    ((_, piece),) = proj.sketch(E.reshape(1, 2, -1), proj.offsets[i])
    torch.testing.assert_close(proj.sketch_rows(i, ids, g), piece, rtol=1e-4, atol=1e-4)


def test_config_roundtrip_seed_and_errors(proj):
    cfg = proj.state_dict()
    assert cfg["kind"] == "kron" and cfg["n_in"] == proj.n_in
    again = projection_from_config(cfg)
    assert again == proj and hash(again) == hash(proj)
    x = torch.randn(proj.n_in)
    assert torch.equal(again.project(x), proj.project(x))  # same seed: the same matrix, bit for bit
    other = KroneckerProjection(SHAPES, 64, seed=4, k=4, density=8)
    assert other != proj and not torch.allclose(other.project(x), proj.project(x))
    assert isinstance(
        projection_from_config({"kind": "sparse", "n_in": 10, "n_out": 4, "density": 2}), SparseProjection
    )
    with pytest.raises(ValueError, match="shapes sum"):
        projection_from_config({**cfg, "n_in": 5})
    with pytest.raises(ValueError, match="unsupported projection kind"):
        projection_from_config({"kind": "dense", "n_in": 3, "n_out": 2})
    with pytest.raises(ValueError, match="k must be"):
        KroneckerProjection(SHAPES, 64, k=0)
    with pytest.raises(ValueError, match="outside"):
        proj.project(torch.zeros(5), proj.n_in - 2)
    with pytest.raises(ValueError, match="no parameter"):
        proj.index_of(1)


def test_norms_and_inner_products_of_real_per_example_gradients():
    """JL-type preservation on the exact per-example gradients (LRM-PEF rows) of a tiny model: the squared norm
    ratio is near 1 and the cosine between two examples' rows is kept, at k = 16 and d = 4096."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_collect import LABELS, TEMPLATE, brute_rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = nl.load_model("tiny-llama")
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    named = adapter.named_parameters()
    texts = ["a great film .", "bad", "yes no maybe good fun", "the movie is awful and sad", "fun", "no no no"]
    X = torch.cat([brute_rows(adapter, task, named, task.format(t)) for t in texts]).float()  # [18, n]
    P = KroneckerProjection([tuple(p.shape) for _, p in named], 4096, seed=0, k=16, density=32)
    Y = P.project(X)
    ratio = Y.norm(dim=1) ** 2 / X.norm(dim=1) ** 2
    assert (ratio - 1).abs().mean() < 0.2 and (ratio - 1).abs().max() < 0.6, ratio
    cx = torch.nn.functional.normalize(X, dim=1)
    cy = torch.nn.functional.normalize(Y, dim=1)
    err = (cx @ cx.T - cy @ cy.T).abs()
    assert err.mean() < 0.1 and err.max() < 0.4, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gives_the_cpu_matrix():
    P = KroneckerProjection([(576, 1536), (576,), (192, 576)], 8192, seed=1, k=16)
    x = torch.randn(4, P.n_in)
    torch.testing.assert_close(P.project(x.cuda()).cpu(), P.project(x), rtol=1e-4, atol=1e-3)
    y = torch.randn(2, 8192)
    torch.testing.assert_close(P.adjoint(y.cuda()).cpu(), P.adjoint(y), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(P.factor(0, 0, "cuda").cpu(), P.factor(0, 0))
