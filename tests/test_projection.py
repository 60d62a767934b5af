"""SparseProjection (App. A): every backend against an independent slow reference of the written definition; the
Projection interface both projections implement."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from npeff_lens.projection import (
    KroneckerProjection,
    Projection,
    SparseProjection,
    project_entries,
    projection_from_config,
)


def _backends():
    out = ["torch"]
    try:
        import numba  # noqa: F401

        out.append("numba")
    except ImportError:
        pass
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    return out


BACKENDS = _backends()


def _dev(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------ reference (pure Python)
def _mix(x):
    x &= 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    return x ^ (x >> 15)


def reference_dense(n_in, n_out, seed, density):
    """The module docstring's definition, entry by entry, in plain Python integers (float64)."""
    s = n_out // density
    scale = math.sqrt(s / n_out)
    col_base, reg_base = _mix(seed ^ 0x243F6A88), _mix(seed ^ 0x13198A2E)
    A = np.zeros((n_in, n_out))
    for j in range(n_out):
        for k in range(-(-n_in // s)):
            h = _mix(_mix(col_base ^ j) ^ _mix(reg_base ^ k))
            L_k = min(s, n_in - k * s)
            A[k * s + ((h * L_k) >> 32), j] = -scale if h & 1 else scale
    return torch.from_numpy(A)


# (n_in, n_out, density): partial last region, n_in < s, s == 1 (dense), density 1
SHAPES = [(103, 64, 8), (5, 64, 4), (37, 16, 16), (50, 24, 1), (130, 48, 32 // 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_reference(shape):
    n_in, n_out, density = shape
    P = SparseProjection(n_in, n_out, seed=7, density=density)
    A = reference_dense(n_in, n_out, 7, density)
    assert torch.equal(P.dense(), A.float())
    # every column has exactly one nonzero per region
    s = n_out // density
    assert torch.equal((A != 0).sum(0), torch.full((n_out,), -(-n_in // s)))
    if n_in > 11:
        assert torch.equal(P.dense(11, min(20, n_in - 11)), A[11 : 11 + min(20, n_in - 11)].float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_project_and_adjoint_match_reference(backend, shape):
    n_in, n_out, density = shape
    P = SparseProjection(n_in, n_out, seed=3, density=density)
    A = reference_dense(n_in, n_out, 3, density).float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n_in, generator=g)
    y = torch.randn(2, 1, n_out, generator=g)
    dev = _dev(backend)
    # blocks that start and end inside regions
    for lo, hi in [(0, n_in), (n_in // 3, n_in - 1), (1, 2)]:
        if hi <= lo:
            continue
        got = P.project(x[:, lo:hi].to(dev), offset=lo, backend=backend).cpu()
        torch.testing.assert_close(got, x[:, lo:hi] @ A[lo:hi], rtol=1e-5, atol=1e-5)
        got = P.adjoint(y.to(dev), offset=lo, length=hi - lo, backend=backend).cpu()
        torch.testing.assert_close(got, y @ A[lo:hi].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_rows_give_the_exact_entries(backend):
    """project(eye) is the matrix itself, bit for bit: same index and sign structure on every backend."""
    P = SparseProjection(70, 32, seed=11, density=4)
    got = P.project(torch.eye(40).to(_dev(backend)), offset=25, backend=backend).cpu()
    assert torch.equal(got, P.dense(25, 40))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter computes bf16 wrongly")
    P = SparseProjection(90, 32, seed=2, density=8)
    x = torch.randn(4, 90).to(dtype)
    got = P.project(x.to(_dev(backend)), backend=backend).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ P.dense(), rtol=1e-5, atol=1e-5)
    y = torch.randn(2, 32).to(dtype)
    got = P.adjoint(y.to(_dev(backend)), backend=backend).cpu()
    torch.testing.assert_close(got, y.float() @ P.dense().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adjointness_on_blocks(backend):
    P = SparseProjection(600, 64, seed=5, density=8)
    g = torch.Generator().manual_seed(1)
    dev = _dev(backend)
    for lo, hi in [(0, 600), (3, 517), (599, 600)]:
        x = torch.randn(2, hi - lo, generator=g, dtype=torch.float64)
        y = torch.randn(2, 64, generator=g, dtype=torch.float64)
        lhs = (P.project(x.float().to(dev), lo, backend=backend).cpu().double() * y).sum(1)
        rhs = (x * P.adjoint(y.float().to(dev), lo, hi - lo, backend=backend).cpu().double()).sum(1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_block_additivity_and_chunking(backend, monkeypatch):
    import npeff_lens.projection as proj

    P = SparseProjection(50_001, 1024, seed=9)
    x = torch.randn(3, 50_001)
    whole = P.project(x, backend=backend)
    cuts = [0, 1, 700, 701, 20_000, 50_001]
    parts = sum(P.project(x[:, a:b], a, backend=backend) for a, b in zip(cuts, cuts[1:]))
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)
    # tiny internal chunks (a partition inside the call) must not change the result
    monkeypatch.setattr(proj, "_CPU_CHUNK_ELEMS", 12 * 1024 * 4)
    torch.testing.assert_close(P.project(x, backend=backend), whole, rtol=1e-4, atol=1e-4)
    y = torch.randn(3, 1024)
    a_small = P.adjoint(y, 10, 40_000, backend=backend)
    monkeypatch.setattr(proj, "_CPU_CHUNK_ELEMS", 1 << 22)
    torch.testing.assert_close(a_small, P.adjoint(y, 10, 40_000, backend=backend), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("numba" not in BACKENDS, reason="needs numba")
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 17, 32])
@pytest.mark.parametrize("tiny", [False, True])
def test_numba_tiles_chunks_and_partial_regions_match_dense(rows, tiny, monkeypatch):
    """The numba kernels' column tiles, region chunks and row padding (rows % 8 != 0) against x @ dense, for
    blocks that start/end inside a region, lie inside one region, or end in the partial last region."""
    import npeff_lens.projection as proj

    if tiny:  # one region per chunk, 8-column tiles: every chunk and tile edge is crossed
        monkeypatch.setattr(proj, "_CPU_CHUNK_BYTES", 1)
        monkeypatch.setattr(proj, "_CPU_TILE_BYTES", 1)
    P = SparseProjection(1003, 100, seed=11, density=4)  # s = 25, partial last region of 3; 100 = 12 tiles + 4
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1003, generator=g)
    y = torch.randn(rows, 100, generator=g)
    for lo, hi in [(0, 1003), (7, 8), (3, 20), (24, 26), (30, 991), (975, 1003), (1001, 1003)]:
        A = P.dense(lo, hi - lo).double()
        got = P.project(x[:, lo:hi], lo, backend="numba")  # a strided view for rows > 1
        torch.testing.assert_close(got.double(), x[:, lo:hi].double() @ A, rtol=1e-5, atol=1e-5)
        got = P.adjoint(y, lo, hi - lo, backend="numba")
        torch.testing.assert_close(got.double(), y.double() @ A.T, rtol=1e-5, atol=1e-5)
    # half inputs are cast in chunks of whole regions; the result does not depend on the chunking
    monkeypatch.setattr(proj, "_CPU_CHUNK_ELEMS", 40)
    xh = x.half()
    torch.testing.assert_close(
        P.project(xh[:, 5:1000], 5, backend="numba").double(),
        xh[:, 5:1000].double() @ P.dense(5, 995).double(),
        rtol=1e-5,
        atol=1e-5,
    )
    # an input whose last dimension is not contiguous
    xt = x.t().contiguous().t()
    torch.testing.assert_close(P.project(xt, backend="numba"), P.project(x, backend="torch"), rtol=1e-5, atol=1e-5)


def test_interpreter_blocks_add_up():
    if "triton" not in BACKENDS:
        pytest.skip("no triton")
    P = SparseProjection(300, 64, seed=1, density=8)
    x = torch.randn(2, 300)
    dev = _dev("triton")
    parts = P.project(x[:, :131].to(dev), 0, backend="triton") + P.project(x[:, 131:].to(dev), 131, backend="triton")
    torch.testing.assert_close(parts.cpu(), P.project(x, backend="torch"), rtol=1e-5, atol=1e-5)


def _region_order_sum(P, x, offset):
    """x A in fp32, summed region by region for each output: the order of the Triton forward with one split."""
    rows, L = x.shape
    s = P.region_size
    k0, k1 = offset // s, (offset + L - 1) // s + 1
    row, sign = project_entries(P.n_in, P.n_out, s, P.seed, k0, k1)
    i = row - offset
    ok = (i >= 0) & (i < L)
    acc = torch.zeros(rows, P.n_out)
    for t in range(k1 - k0):
        acc += torch.where(ok[t], x[:, i[t].clamp(0, L - 1)], 0.0) * sign[t].float()
    return acc * P.scale


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_triton_row_major_and_rows_minor_inputs_match_cpu(rows):
    """The Triton kernels read x and y through strides on both axes: a row-major input (copied to rows-minor once),
    one already rows-minor (a transposed view of [L, rows]) and one strided along L give the same bits, equal to
    the CPU reference; blocks start and end inside regions, lie inside one region, or end in the partial last one.
    33 rows span two row blocks, the second with one row."""
    P = SparseProjection(203, 64, seed=13, density=8)  # s = 8: 26 regions, the last of 3 inputs
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 203, generator=g)
    y = torch.randn(rows, 64, generator=g)
    dev = _dev("triton")
    exact = not torch.cuda.is_available()  # the interpreter: one split (region order) and sequential atomics
    xd = x.to(dev)
    x_minor = xd.t().contiguous().t()
    for lo, hi in [(0, 203), (5, 198), (9, 14), (196, 203)]:
        A = P.dense(lo, hi - lo).double()
        views = {"row-major": xd[:, lo:hi], "rows-minor": x_minor[:, lo:hi]}
        assert (rows == 1 or views["rows-minor"].stride(0) == 1) and views["row-major"].stride(-1) == 1
        got = {k: P.project(v, lo, backend="triton").cpu() for k, v in views.items()}
        assert torch.equal(got["row-major"], got["rows-minor"])
        torch.testing.assert_close(got["row-major"].double(), x[:, lo:hi].double() @ A, rtol=1e-5, atol=1e-5)
        if exact:
            assert torch.equal(got["row-major"], _region_order_sum(P, x[:, lo:hi], lo))
        # strided along L (every other input of the block): rows-minor stays a view, row-major is copied
        n = len(range(lo, hi, 2))
        for v in (xd[:, lo:hi:2], x_minor[:, lo:hi:2]):
            got_s = P.project(v, lo, backend="triton").cpu()
            torch.testing.assert_close(got_s.double(), x[:, lo:hi:2].double() @ A[:n], rtol=1e-5, atol=1e-5)
        # adjoint: row-major and rows-minor y, row-major output; and <x A, y> = <x, A y>
        outs = [P.adjoint(v, lo, hi - lo, backend="triton").cpu() for v in (y.to(dev), y.to(dev).t().contiguous().t())]
        assert outs[0].shape == (rows, hi - lo) and outs[0].is_contiguous()
        if exact:  # on a GPU the atomics add colliding columns in any order
            assert torch.equal(outs[0], outs[1])
        torch.testing.assert_close(outs[0].double(), y.double() @ A.T, rtol=1e-5, atol=1e-5)
        lhs = (got["row-major"].double() * y.double()).sum(1)
        torch.testing.assert_close(lhs, (x[:, lo:hi].double() * outs[0].double()).sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or the Triton interpreter")
def test_triton_row_blocks_and_region_chunks_give_the_exact_entries(monkeypatch):
    """Small row blocks (11 rows in blocks of 4, the last partial; 8 rows in two blocks read in aligned runs of 4)
    and adjoint region chunks of 3 (26 regions: a partial last chunk): project(eye), given rows-minor, is the
    matrix bit for bit, and the adjoint of unit vectors gives its columns bit for bit."""
    from npeff_lens.triton_kernels import projection as tk

    monkeypatch.setattr(tk, "MAX_BLOCK_R", 4)
    P = SparseProjection(203, 64, seed=17, density=8)
    monkeypatch.setattr(tk, "K_CHUNK_BYTES", 4 * P.region_size * 4 * 3)
    dev = _dev("triton")
    lo, L = 3, 11  # starts inside a region and ends inside another
    eye = torch.eye(L, device=dev)
    got = P.project(eye.t(), lo, backend="triton").cpu()
    assert torch.equal(got, P.dense(lo, L))
    # 8 rows-minor rows: two row blocks of 4 read as aligned runs of 4
    got = P.project(eye[:8].t().contiguous().t(), lo, backend="triton").cpu()
    assert torch.equal(got, P.dense(lo, L)[:8])
    cols = torch.tensor([0, 5, 17, 63, 31, 8, 40, 2, 9, 60, 33])
    unit = torch.eye(64)[cols]
    A = P.dense(0, 203)
    assert torch.equal(P.adjoint(unit.to(dev), backend="triton").cpu(), A.T[cols])
    assert torch.equal(P.adjoint(unit.to(dev), lo, 190, backend="triton").cpu(), A[lo : lo + 190].T[cols])
    assert torch.equal(P.adjoint(unit[:8].to(dev), lo, 190, backend="triton").cpu(), A[lo : lo + 190].T[cols[:8]])


def test_deterministic_across_processes_and_seeds():
    P = SparseProjection(10_007, 512, seed=42)
    x = torch.arange(3 * 10_007, dtype=torch.float32).reshape(3, -1).sin()
    out = P.project(x)
    assert torch.equal(out, P.project(x))
    code = (
        "import torch; from npeff_lens.projection import SparseProjection as S; "
        "x = torch.arange(3 * 10_007, dtype=torch.float32).reshape(3, -1).sin(); "
        "print(S(10_007, 512, seed=42).project(x).numpy().tobytes().hex())"
    )
    hexed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert hexed == out.numpy().tobytes().hex()
    other = SparseProjection(10_007, 512, seed=43)
    assert not torch.equal(other.dense(0, 300), P.dense(0, 300))
    # the hash is not shift-invariant: column 0 of seed 42 is not column 1 of seed 42
    D = P.dense(0, 2000)
    assert not torch.equal(D[:, 0], D[:, 1])


def test_norms_and_inner_products_preserved_statistically():
    """For full regions and fixed x, xA_j = c * sum_k e_kj x_{k s + p_kj}, c^2 = s / n_out, with e = +-1 and p uniform
    and independent: E (xA_j)^2 = c^2 sum_k (1/s) sum_{i in k} x_i^2 = ||x||^2 / n_out, so E ||xA||^2 = ||x||^2.
    Var ||xA||^2: columns are independent, Var (xA_j)^2 <= E (xA_j)^4 <= 3 (E (xA_j)^2)^2 + c^4 sum_k m4_k with
    m4_k = mean_{i in k} x_i^4; so sd(||xA||^2) <= sqrt(n_out * (3 ||x||^4 / n_out^2 + c^4 sum_k m4_k)).
    For Gaussian x with n_in = 2^16, n_out = 1024, s = 32 that is ~0.055 ||x||^2; we assert within 5 sd.
    Inner products: <xA, zA> has mean <x, z> and (polarisation) the same order of spread."""
    n_in, n_out = 1 << 16, 1024
    P = SparseProjection(n_in, n_out, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, n_in, generator=g, dtype=torch.float64)
    z = 0.6 * x + 0.8 * torch.randn(8, n_in, generator=g, dtype=torch.float64)
    px, pz = P.project(x.float()).double(), P.project(z.float()).double()
    nx = (x * x).sum(1)
    s = P.region_size
    m4 = (x.reshape(8, -1, s) ** 4).mean(2).sum(1)
    sd = torch.sqrt(n_out * (3 * nx**2 / n_out**2 + (s / n_out) ** 2 * m4))
    ratio_err = ((px * px).sum(1) - nx).abs() / sd
    assert ratio_err.max() < 5, ratio_err
    # a wrong scale (e.g. sqrt(1/n_out)) is off by a factor s and would fail by hundreds of sd
    assert (sd / nx).max() < 0.07
    ip, ip_true = (px * pz).sum(1), (x * z).sum(1)
    nz = (z * z).sum(1)
    # Var <xA, zA> <= (||x||^2 ||z||^2 + <x,z>^2) / n_out * (1 + small): 5 sd
    sd_ip = torch.sqrt((nx * nz + ip_true**2) / n_out * 1.2)
    assert ((ip - ip_true).abs() / sd_ip).max() < 5
    # and the mean over the 8 rows: sum of squared norms within 5 sd of the sum
    assert ((px * px).sum() - nx.sum()).abs() < 5 * torch.sqrt((sd**2).sum())


def test_bad_inputs_raise_value_error():
    P = SparseProjection(100, 64, seed=0, density=8)
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="outside"):
        P.project(x, offset=95)
    with pytest.raises(ValueError, match="outside"):
        P.project(x, offset=-1)
    with pytest.raises(ValueError, match="outside"):
        P.adjoint(torch.randn(64), offset=100, length=1)
    with pytest.raises(ValueError, match="outside"):
        P.adjoint(torch.randn(64), offset=50, length=51)
    with pytest.raises(ValueError, match="length"):
        P.adjoint(torch.randn(64), offset=0, length=-1)
    with pytest.raises(ValueError, match="n_out"):
        P.adjoint(torch.randn(2, 63))
    with pytest.raises(ValueError, match="density"):
        SparseProjection(100, 16, density=32)
    with pytest.raises(ValueError, match="float32"):
        P.project(torch.ones(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="float32"):
        P.project(torch.ones(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="device"):
        P.project(torch.ones(2, 10, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        P.project(x, backend="cuda")
    with pytest.raises(ValueError, match="seed"):
        SparseProjection(100, 64, seed=-1)
    with pytest.raises(ValueError, match="n_in"):
        SparseProjection(0, 64)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            P.project(x.cuda(), backend="torch")
    # an empty block at the end is fine and contributes nothing
    assert torch.equal(P.project(torch.ones(2, 0), offset=100), torch.zeros(2, 64))


def test_config_roundtrip_and_repr():
    P = SparseProjection(1000, 128, seed=4, density=None)
    assert P.density == 128 and P.region_size == 1  # dense +-1 mode
    cfg = P.state_dict()
    assert cfg == {"kind": "sparse", "n_in": 1000, "n_out": 128, "seed": 4, "density": 128}
    Q = SparseProjection.from_config(cfg)
    assert Q == P and torch.equal(Q.dense(0, 50), P.dense(0, 50))
    assert repr(P) == "SparseProjection(n_in=1000, n_out=128, seed=4, density=128)"
    with pytest.raises(ValueError, match="kind"):
        SparseProjection.from_config({**cfg, "kind": "dense"})
    # dense mode has every entry +-1/sqrt(n_out)
    assert torch.equal(P.dense(0, 10).abs(), torch.full((10, 128), 1 / math.sqrt(128)))


# ------------------------------------------------------------------------------------------------ the interface
PROJECTIONS = {
    "sparse": lambda: SparseProjection(1000, 64, seed=5, density=8),
    "sparse-dense-mode": lambda: SparseProjection(37, 16, seed=1, density=None),
    "kron": lambda: KroneckerProjection([(12, 9), (20,), (6, 4, 5), (7, 3)], 48, seed=2, k=4, density=8),
}


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_projections_implement_the_interface(name):
    """Both projections are a ``Projection``; ``dense()`` is the matrix ``project`` and ``adjoint`` apply, block by
    block at random offsets and lengths, and ``⟨Φx, y⟩ = ⟨x, Φᵀy⟩``; the state dict rebuilds the same matrix."""
    P = PROJECTIONS[name]()
    assert isinstance(P, Projection) and not isinstance(object(), Projection)
    A = P.dense().double()
    assert A.shape == (P.n_in, P.n_out)
    again = projection_from_config(json.loads(json.dumps(P.state_dict())))
    assert type(again) is type(P) and again == P
    torch.testing.assert_close(again.dense().double(), A, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, P.n_out, generator=g, dtype=torch.float64)
    torch.testing.assert_close(P.adjoint(y.float()).double(), y @ A.T, rtol=1e-5, atol=1e-5)
    for _ in range(8):
        off = int(torch.randint(0, P.n_in, (1,), generator=g))
        L = int(torch.randint(1, P.n_in - off + 1, (1,), generator=g))
        block = A[off : off + L]
        x = torch.randn(3, L, generator=g, dtype=torch.float64)
        torch.testing.assert_close(P.dense(off, L).double(), block, rtol=0, atol=0)
        px = P.project(x.float(), offset=off).double()
        aty = P.adjoint(y.float(), offset=off, length=L).double()
        torch.testing.assert_close(px, x @ block, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aty, y @ block.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((px * y).sum(-1), (x * aty).sum(-1), rtol=1e-5, atol=1e-5)


def test_acceptance_million_inputs_8192_outputs():
    P = SparseProjection(1_000_003, 8192, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1_000_003, generator=g)
    y = P.project(x)
    assert y.shape == (4, 8192) and torch.isfinite(y).all()
    ratio = (y * y).sum(1) / (x * x).sum(1)
    assert ((ratio - 1).abs() < 0.1).all()
    # blocks of a real parameter layout add up to the whole
    parts = P.project(x[:, :400_000], 0) + P.project(x[:, 400_000:], 400_000)
    torch.testing.assert_close(parts, y, rtol=1e-4, atol=1e-3)
    back = P.adjoint(y[:2])
    assert back.shape == (2, 1_000_003)
    # <xA, y> = <x, A^T y> at scale
    torch.testing.assert_close((y[:2] * y[:2]).sum(1).double(), (x[:2] * back).sum(1).double(), rtol=1e-4, atol=1e-2)
    # the torch fallback (no numba) agrees on a slice
    torch.testing.assert_close(
        P.project(x[:, 123:50_123], 123, backend="torch"), P.project(x[:, 123:50_123], 123), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_kernel_matches_cpu_structure_bit_for_bit():
    P = SparseProjection(1_000_003, 8192, seed=3)
    for off in [0, 123_457, 1_000_003 - 700]:
        eye = torch.eye(700, device="cuda")
        assert torch.equal(P.project(eye, off).cpu(), P.dense(off, 700))
    row, sign = project_entries(P.n_in, 8192, P.region_size, 3, 1000, 1010, device="cuda")
    row_c, sign_c = project_entries(P.n_in, 8192, P.region_size, 3, 1000, 1010)
    assert torch.equal(row.cpu(), row_c) and torch.equal(sign.cpu(), sign_c)
    x = torch.randn(16, 1_000_003)
    torch.testing.assert_close(P.project(x.cuda()).cpu(), P.project(x), rtol=1e-4, atol=1e-3)
    y = torch.randn(16, 8192)
    torch.testing.assert_close(P.adjoint(y.cuda(), 5, 300_000).cpu(), P.adjoint(y, 5, 300_000), rtol=1e-4, atol=1e-4)
    xb = torch.randn(8, 50_000).bfloat16()
    torch.testing.assert_close(P.project(xb.cuda(), 77).cpu(), P.project(xb, 77), rtol=1e-4, atol=1e-3)
