"""NPEFF estimator (§2.2, App. D): planted recovery, monotone W step, D.6, streaming, distributed,
checkpoints, persistence and bad input."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from npeff_lens.checkpoints import fingerprint
from npeff_lens.config import DecomposeConfig
from npeff_lens.constraints import _PARAMETER_CONSTRAINTS
from npeff_lens.decomposition import NPEFF, validate_params
from npeff_lens.errors import CorruptFileError, NotFittedError, SettingError
from npeff_lens.nmf import npeff_factorization
from npeff_lens.sources import PEFSource, open_shard


def planted(m=240, C=6, d=48, max_active=3, seed=0, dtype=torch.float64):
    """PEFs ``F_i = sum_j W_ij h_j h_j^T`` with rows ``sqrt(W_ij) h_j`` (zero-padded to r = max_active)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(C, d, generator=g, dtype=dtype)
    H /= H.norm(dim=1, keepdim=True)
    W = torch.zeros(m, C, dtype=dtype)
    G = torch.zeros(m, max_active, d, dtype=dtype)
    for i in range(m):
        k = int(torch.randint(1, max_active + 1, (1,), generator=g))
        idx = torch.randperm(C, generator=g)[:k]
        W[i, idx] = 0.5 + 1.5 * torch.rand(k, generator=g, dtype=dtype)
        for row, j in enumerate(idx):
            G[i, row] = W[i, j].sqrt() * H[j]
    return G, W, H


def pef_norms(G):
    return (G @ G.transpose(1, 2)).square().sum((1, 2)).sqrt()


def brute_force_loss(G, coefficients, components):
    """Mean ||F_i / ||F_i|| - sum_j W_ij h_j h_j^T||_F^2 with explicit d x d matrices (small d)."""
    G = G.double()
    F = G.transpose(1, 2) @ G
    F = F / F.flatten(1).norm(dim=1)[:, None, None]
    h = components.double()
    R = torch.einsum("mc,cd,ce->mde", coefficients.double(), h, h)
    return (F - R).square().sum((1, 2)).mean().item()


class FakeStore:
    """The PEF-store protocol: len, rows, dim, manifest, iter_batches, load_pefs; stores float16."""

    def __init__(self, G, batch=16, manifest=None):
        self.data = G.to(torch.float16)
        self.rows, self.dim = G.shape[1], G.shape[2]
        self.batch = batch
        self.manifest = manifest if manifest is not None else {"projection": {"seed": 3, "dim": self.dim}}
        self.loaded = 0

    def __len__(self):
        return self.data.shape[0]

    def iter_batches(self, batch_size=None):
        b = batch_size or self.batch
        for s in range(0, len(self), b):
            yield s, self.data[s : s + b]

    def load_pefs(self, dtype=torch.float32):
        self.loaded += 1
        return self.data.to(dtype)


FAST = dict(n_steps=150, n_warmup_steps=30, progress=False)


class Stop(Exception):
    """Raised by :func:`stop_at`'s callback: a fit interrupted at a chosen step."""


def stop_at(n: int):
    """A ``callback`` for ``NPEFF`` that stops the fit at step ``n``."""

    def callback(step, loss):
        if step == n:
            raise Stop

    return callback


@pytest.fixture(scope="module")
def planted_fit():
    G, W, H = planted()
    est = NPEFF(6, n_steps=300, n_warmup_steps=50, seed=0, progress=False).fit(G.float())
    return G, W, H, est


def test_planted_recovery(planted_fit):
    G, W, H, est = planted_fit
    assert est.components_.shape == (6, 48) and est.coefficients_.shape == (240, 6)
    assert torch.allclose(est.components_.norm(dim=1), torch.ones(6), atol=1e-5)
    cos = (est.components_.double() @ H.T).abs()  # [fitted, planted]
    perm = cos.argmax(0)
    assert sorted(perm.tolist()) == list(range(6))
    assert cos.max(0).values.min() >= 0.99
    planted_coeffs = W / pef_norms(G)[:, None]  # coefficients of the unit-norm PEFs
    fitted = est.coefficients_.double()[:, perm]
    for j in range(6):
        corr = torch.corrcoef(torch.stack([fitted[:, j], planted_coeffs[:, j]]))[0, 1]
        assert corr >= 0.99
    assert est.reconstruction_err_ < 1e-3
    assert (est.coefficients_ >= 0).all()


def test_loss_matches_brute_force_after_rescaling(planted_fit):
    G, _, _, est = planted_fit
    # The unit-norm rescaling keeps every W_ij h_j h_j^T: the reported loss is the true loss,
    # also for a short fit far from converged.
    assert brute_force_loss(G, est.coefficients_, est.components_) == pytest.approx(est.reconstruction_err_, abs=1e-5)
    assert len(est.loss_history_) == est.n_iter_ + 1 == 351
    short = NPEFF(6, n_steps=5, n_warmup_steps=5, progress=False, dtype=torch.float64).fit(G)
    assert short.reconstruction_err_ > 0.05
    assert brute_force_loss(G, short.coefficients_, short.components_) == pytest.approx(
        short.reconstruction_err_, rel=1e-9
    )


def test_w_step_never_increases_loss(planted_fit):
    _, _, _, est = planted_fit
    before, after_w = est.loss_history_[:-1], est.w_step_loss_history_
    assert (after_w <= before + 1e-6 * before.abs().clamp_min(1)).all()
    assert est.loss_history_[-1] < 0.01 * est.loss_history_[0]


def test_transform_reproduces_coefficients(planted_fit):
    G, _, _, est = planted_fit
    again = est.transform(G.float(), n_steps=1000)
    assert again.shape == est.coefficients_.shape
    scale = est.coefficients_.max()
    assert (again - est.coefficients_).abs().max() <= 1e-2 * scale


def test_deterministic_given_seed():
    G, _, _ = planted(m=60, d=16)
    a = NPEFF(4, seed=3, **FAST).fit(G.float())
    b = NPEFF(4, seed=3, **FAST).fit(G.float())
    assert torch.equal(a.coefficients_, b.coefficients_) and torch.equal(a.components_, b.components_)


def test_random_projection_commutes_d6():
    """App. D.6: with A A^T ~ I, projected PEFs and projected initial H give the same coefficients,
    closer as the projected dimension grows."""
    n, C = 10, 3
    G, _, _ = planted(m=50, C=C, d=n, max_active=2, seed=1)
    g = torch.Generator().manual_seed(0)
    W0 = torch.rand(50, C, generator=g, dtype=torch.float64)
    H0 = torch.randn(C, n, generator=g, dtype=torch.float64) * math.sqrt(2 / (C * n))
    # Few steps: the comparison is of two trajectories of a non-convex problem, and later steps
    # amplify the O(sqrt(n / p)) inner-product errors (a component may die in one and not the other).
    kw = dict(n_steps=10, n_warmup_steps=5, init="custom", dtype=torch.float64, progress=False)
    ref = NPEFF(C, **kw).fit(G, W=W0, H=H0)
    errors = []
    for p in (256, 4096, 65536):
        A = torch.randn(n, p, generator=g, dtype=torch.float64) / math.sqrt(p)  # A A^T ~ I_n
        proj = NPEFF(C, **kw).fit(G @ A, W=W0, H=H0 @ A)
        errors.append(((proj.coefficients_ - ref.coefficients_).abs().max() / ref.coefficients_.max()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_streaming_equals_in_memory():
    G, _, _ = planted(m=90, d=24)
    store = FakeStore(G, batch=16)
    mem = NPEFF(5, seed=1, **FAST).fit(store)
    assert store.loaded == 1
    stream = NPEFF(5, seed=1, memory_budget=0, batch_size=7, **FAST).fit(store)
    assert store.loaded == 1  # the second fit streamed
    assert torch.allclose(stream.coefficients_, mem.coefficients_, rtol=1e-4, atol=1e-5)
    assert torch.allclose(stream.components_, mem.components_, rtol=1e-4, atol=1e-5)
    # The store's float16 values cast to float32 are the data: same as the equivalent tensor.
    tens = NPEFF(5, seed=1, **FAST).fit(store.data.float())
    assert torch.allclose(tens.coefficients_, mem.coefficients_, rtol=1e-4, atol=1e-5)
    assert mem.manifest_ == store.manifest


def _distributed_worker(rank, world, path, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        G = torch.load(os.path.join(path, "G.pt"))
        est = NPEFF(5, seed=2, checkpoint_dir=os.path.join(path, "ckpt"), checkpoint_every=40, **FAST).fit(G)
        if rank == 0:
            torch.save(
                {"W": est.coefficients_, "H": est.components_, "loss": est.loss_history_}, os.path.join(path, "out.pt")
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_equal_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    G, _, _ = planted(m=70, d=20)
    G = G.float()
    G[3] = 0  # an excluded example on rank 0
    torch.save(G, tmp_path / "G.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_distributed_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
        single = NPEFF(5, seed=2, **FAST).fit(G)
    out = torch.load(tmp_path / "out.pt")
    assert torch.allclose(out["W"], single.coefficients_, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out["H"], single.components_, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out["loss"], single.loss_history_, rtol=1e-5, atol=1e-7)
    assert (out["W"][3] == 0).all()
    # The checkpoint the two ranks wrote holds one W file per rank.
    assert len(list((tmp_path / "ckpt").glob("step-*/W-*.safetensors"))) == 4  # 2 ranks x the newest 2 steps


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    G, _, _ = planted(m=50, d=16)
    G = G.float()
    full = NPEFF(4, seed=5, **FAST).fit(G)

    with pytest.raises(Stop):
        NPEFF(4, seed=5, checkpoint_dir=tmp_path, checkpoint_every=20, callback=stop_at(67), **FAST).fit(G)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000040", "step-00000060"]
    resumed = NPEFF(4, seed=5, checkpoint_dir=tmp_path, checkpoint_every=20, **FAST).fit(G)
    assert torch.equal(resumed.coefficients_, full.coefficients_)
    assert torch.equal(resumed.components_, full.components_)
    assert torch.allclose(resumed.loss_history_, full.loss_history_)
    with pytest.raises(ValueError, match="seed: stored 5, now 6"):
        NPEFF(4, seed=6, checkpoint_dir=tmp_path, **FAST).fit(G)


def test_resume_with_another_lr_names_lr(tmp_path):
    G, _, _ = planted(m=30, d=12)
    kw = dict(seed=1, checkpoint_dir=tmp_path, checkpoint_every=5, n_steps=10, n_warmup_steps=5, progress=False)
    NPEFF(3, lr=0.5, **kw).fit(G.float())
    with pytest.raises(ValueError, match="lr") as err:
        NPEFF(3, lr=0.1, **kw).fit(G.float())
    assert "lr: stored 0.5, now 0.1" in str(err.value) and str(tmp_path) in str(err.value)
    assert "warmup_lr" not in str(err.value) and "seed" not in str(err.value)  # only the differing field
    NPEFF(3, lr=0.5, **kw).fit(G.float())  # the checkpoint is left intact: the same fit still resumes


def test_save_load_round_trip(tmp_path, planted_fit):
    G, _, _, _ = planted_fit
    store = FakeStore(G.float())
    est = NPEFF(6, seed=0, **FAST).fit(store)
    est.save(tmp_path / "dec")
    loaded = NPEFF.load(tmp_path / "dec")
    for name in ("coefficients_", "components_", "loss_history_", "pef_norms_", "excluded_", "dead_components_"):
        assert torch.equal(getattr(loaded, name), getattr(est, name)), name
    assert loaded.get_params() == {**est.get_params(), "dtype": "float32"}
    assert loaded.manifest_ == store.manifest and loaded.n_iter_ == est.n_iter_
    assert torch.allclose(loaded.transform(store, n_steps=50), est.transform(store, n_steps=50))
    other = FakeStore(G.float(), manifest={"projection": {"seed": 4, "dim": 48}})
    with pytest.raises(ValueError, match="projection"):
        loaded.transform(other)


def test_nonfinite_input_raises_clear_error():
    G, _, _ = planted(m=40, d=16)
    G = G.float()
    G[7, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf.*\[7\]"):
        NPEFF(3, **FAST).fit(G)
    with pytest.warns(RuntimeWarning, match="excluded"):
        est = NPEFF(3, nonfinite="exclude", **FAST).fit(G)
    assert est.excluded_[7] and (est.coefficients_[7] == 0).all()
    assert torch.isfinite(est.coefficients_).all() and torch.isfinite(est.components_).all()


def test_divergence_stops_with_step_named():
    G, _, _ = planted(m=40, d=16)
    with pytest.raises(FloatingPointError, match="step"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            NPEFF(3, lr=1e6, warmup_lr=1e6, **FAST).fit(G.float())


def test_zero_norm_pefs_excluded_with_warning():
    G, _, _ = planted(m=40, d=16)
    G = G.float()
    G[[2, 9]] = 0
    with pytest.warns(RuntimeWarning, match="zero or non-finite Frobenius norm"):
        est = NPEFF(3, **FAST).fit(G)
    assert est.excluded_.nonzero().flatten().tolist() == [2, 9]
    assert (est.coefficients_[[2, 9]] == 0).all() and torch.isfinite(est.coefficients_).all()
    assert est.pef_norms_[2] == 0


def test_dead_component_reported():
    G, _, _ = planted(m=40, d=16)
    W0 = torch.rand(40, 3)
    W0[:, 1] = 0  # a multiplicative update keeps a zero column at zero
    with pytest.warns(RuntimeWarning, match="dead"):
        est = NPEFF(3, init="custom", **FAST).fit(G.float(), W=W0)
    assert est.dead_components_.tolist() == [1]


def test_rank_one_2d_input_and_validation():
    G, _, _ = planted(m=30, d=12, max_active=1)
    est = NPEFF(3, **FAST).fit(G[:, 0].float())  # [m, d] means r = 1
    assert est.n_rows_ == 1
    with pytest.raises(ValueError, match="n_components"):
        NPEFF(0).fit(G.float())
    with pytest.raises(ValueError, match="init='custom'"):
        NPEFF(3, **FAST).fit(G.float(), H=torch.zeros(3, 12))
    with pytest.raises(ValueError, match="0 examples"):
        NPEFF(3, **FAST).fit(torch.zeros(0, 1, 12))
    with pytest.raises(NotFittedError, match="not fitted"):
        NPEFF(3).transform(G.float())


@pytest.mark.parametrize(
    "name, value",
    [
        ("n_components", 0),  # integer below the minimum
        ("n_components", 2.0),  # not an integer
        ("n_steps", -1),
        ("n_warmup_steps", True),  # a bool is not an integer
        ("checkpoint_every", 0),
        ("memory_budget", -1),
        ("seed", "0"),
        ("verbose", -1),
        ("lr", -1.0),  # positive finite number
        ("lr", 0),
        ("warmup_lr", float("inf")),
        ("warmup_lr", float("nan")),
        ("lr", "0.5"),
        ("eps", -1e-12),  # non-negative number
        ("eps", float("nan")),
        ("init", "zeros"),  # choices
        ("nonfinite", None),
        ("batch_size", 0),  # optional integer
        ("batch_size", 1.5),
        ("progress", "yes"),  # bool
        ("dtype", "int32"),  # floating torch dtype
        ("dtype", "no_such_dtype"),
        ("storage_dtype", "int8"),  # None or a floating torch dtype
        ("storage_dtype", 3),
        ("no_such_parameter", 1),  # not an NPEFF parameter
    ],
)
def test_validate_params_names_the_parameter(name, value):
    with pytest.raises(ValueError) as err:
        validate_params({name: value})
    assert str(err.value).startswith(name + " "), str(err.value)
    assert str(err.value).split(" ", 1)[0] == name
    if name in _PARAMETER_CONSTRAINTS:  # the estimator checks the same table
        G, _, _ = planted(m=10, d=8)
        with pytest.raises(ValueError, match=f"^{name} "):
            NPEFF(3, **FAST).set_params(**{name: value}).fit(G.float())


def test_validate_params_accepts_valid_values(tmp_path):
    assert set(_PARAMETER_CONSTRAINTS) == set(NPEFF._param_names())
    validate_params({})
    validate_params(NPEFF(3).get_params())
    validate_params(
        {
            "n_components": 1,
            "n_steps": 0,
            "n_warmup_steps": 0,
            "lr": 2,
            "warmup_lr": 1e-3,
            "seed": -7,
            "eps": 0,
            "init": "custom",
            "nonfinite": "exclude",
            "dtype": "float64",
            "device": "cpu",
            "memory_budget": 0,
            "batch_size": None,
            "checkpoint_dir": tmp_path,
            "checkpoint_every": 1,
            "callback": print,
            "progress": False,
            "verbose": True,
        }
    )
    validate_params({"dtype": torch.bfloat16, "batch_size": 3, "device": None, "checkpoint_dir": None})
    validate_params({"storage_dtype": None})
    validate_params({"storage_dtype": "bfloat16"})
    validate_params({"storage_dtype": torch.float16})
    with pytest.raises(ValueError, match=r"^lr must be a positive finite number; got -1\.0$"):
        validate_params({"lr": -1.0})


def test_the_decompose_step_has_the_estimators_defaults():
    """DecomposeConfig writes NPEFF's defaults as literals (so that the config module needs no torch): equal."""
    import dataclasses
    import inspect

    signature = inspect.signature(NPEFF.__init__).parameters
    for f in dataclasses.fields(DecomposeConfig):
        if f.name in signature and f.default is not dataclasses.MISSING and f.name not in ("dtype", "progress"):
            assert f.default == signature[f.name].default, f.name
    assert str(signature["dtype"].default) == f"torch.{DecomposeConfig.__dataclass_fields__['dtype'].default}"


def test_an_estimator_from_a_config_checks_what_changed_after():
    """A config's values were checked when it was built, and new ones when they are given; fit checks them all."""
    est = NPEFF.from_config(DecomposeConfig(n_components=2, n_steps=3, n_warmup_steps=1), progress=False)
    x = torch.rand(6, 2, 5)
    est.fit(x)
    est.n_steps = 3.0  # equal to the checked 3, but not an integer
    with pytest.raises(ValueError, match=r"^n_steps must be"):
        est.fit(x)
    est.n_steps = 3
    est.set_params(lr=-1.0)
    with pytest.raises(ValueError, match=r"^lr must be a positive finite number"):
        est.fit(x)
    with pytest.raises(ValueError, match=r"^checkpoint_every must be"):
        NPEFF.from_config(DecomposeConfig(n_components=2), checkpoint_every=0)


# ----------------------------------------------------------------------------------------------
# bfloat16 storage of the PEFs, fp32 accumulation
# ----------------------------------------------------------------------------------------------


def noisy_planted(seed=1, noise=0.1):
    """``planted()`` plus one noise row per example, so that the best loss is well above rounding (~0.1)."""
    G, W, H = planted()
    g = torch.Generator().manual_seed(seed)
    extra = noise * torch.randn(G.shape[0], 1, G.shape[2], generator=g, dtype=G.dtype)
    return torch.cat([G, extra], 1).float(), W, H


def matched_cosines(A, B):
    """|cos| between the rows of A and B, paired greedily by the largest remaining |cos| (one-to-one)."""
    cos = (A.double() / A.double().norm(dim=1, keepdim=True)) @ (B.double() / B.double().norm(dim=1, keepdim=True)).T
    cos = cos.abs()
    out = []
    for _ in range(min(cos.shape)):
        i, j = divmod(int(cos.argmax()), cos.shape[1])
        out.append(float(cos[i, j]))
        cos[i, :], cos[:, j] = -1, -1
    return torch.tensor(out)


@pytest.fixture(scope="module")
def storage_fits():
    G, _, H = noisy_planted()
    kw = dict(n_steps=300, n_warmup_steps=50, seed=0, progress=False)
    return G, H, NPEFF(6, **kw).fit(G), NPEFF(6, storage_dtype=torch.bfloat16, **kw).fit(G)


def test_bf16_storage_matches_the_fp32_fit(storage_fits):
    G, H, full, half = storage_fits
    cos = matched_cosines(half.components_, full.components_)
    assert len(cos) == 6 and cos.min() >= 0.99
    assert matched_cosines(half.components_, H.float()).min() >= 0.99  # and the planted components
    assert half.reconstruction_err_ > 0.05  # the noise floor, far above bf16 rounding
    assert half.reconstruction_err_ == pytest.approx(full.reconstruction_err_, rel=1e-3)
    # The loss of the bf16 fit's components on the exact data is as good as the fp32 fit's.
    exact = brute_force_loss(G, half.coefficients_, half.components_)
    assert exact == pytest.approx(brute_force_loss(G, full.coefficients_, full.components_), rel=1e-3)
    # The fit really saw rounded PEFs: the norms are those of the bf16 values.
    assert not torch.equal(half.pef_norms_, full.pef_norms_)
    assert torch.allclose(half.pef_norms_, pef_norms(G.bfloat16().double()), rtol=1e-6)


def test_bf16_storage_keeps_the_working_dtype(storage_fits):
    G, _, _, half = storage_fits
    for name in ("components_", "coefficients_"):
        assert getattr(half, name).dtype == torch.float32, name
    assert half.transform(G, n_steps=5).dtype == torch.float32
    full_bytes = G.numel() * 4
    # A budget between the bf16 and the fp32 size: bf16 storage holds G, fp32 storage streams it.
    kw = dict(storage_dtype="bfloat16", memory_budget=full_bytes * 3 // 4)
    _, shard, _ = open_shard(G, 6, **kw)
    assert shard.in_memory and shard.G.dtype == torch.bfloat16 and shard.resident_bytes == full_bytes // 2
    assert shard.scale.dtype == torch.float32 and shard.dtype == torch.float32
    blocks = list(shard.blocks())
    assert all(b.dtype == torch.float32 and sc.dtype == torch.float32 for _, b, sc in blocks)
    assert torch.equal(torch.cat([b for _, b, _ in blocks]), G.bfloat16().float())
    _, shard32, _ = open_shard(G, 6, **{**kw, "storage_dtype": None})
    assert not shard32.in_memory and shard32.G is None and shard32.resident_bytes == full_bytes


def test_bf16_storage_streamed_equals_in_memory():
    G, _, _ = noisy_planted()
    store = FakeStore(G, batch=16)
    kw = dict(seed=1, storage_dtype=torch.bfloat16, **FAST)
    mem = NPEFF(6, **kw).fit(store)
    assert store.loaded == 1
    stream = NPEFF(6, memory_budget=0, batch_size=7, **kw).fit(store)
    assert store.loaded == 1  # the second fit streamed
    assert torch.equal(stream.pef_norms_, mem.pef_norms_)  # the same bf16 values, block by block
    assert matched_cosines(stream.components_, mem.components_).min() >= 0.9999
    assert torch.allclose(stream.coefficients_, mem.coefficients_, rtol=1e-4, atol=1e-5)
    assert stream.reconstruction_err_ == pytest.approx(mem.reconstruction_err_, rel=1e-5)


def test_bad_storage_dtype_names_it():
    from npeff_lens.config import ConfigError

    G, _, _ = planted(m=10, d=8)
    for value in ("int8", 3, torch.int8):
        with pytest.raises(ValueError, match="^storage_dtype "):
            NPEFF(3, storage_dtype=value, **FAST).fit(G.float())
    with pytest.raises(ConfigError, match="--storage-dtype") as err:
        DecomposeConfig(n_components=2, storage_dtype="int8")
    assert err.value.field == "storage_dtype" and err.value.flag == "--storage-dtype"
    est = NPEFF.from_config(DecomposeConfig(n_components=2, storage_dtype="bfloat16"))
    assert est.storage_dtype == "bfloat16" and est.dtype == "float32"


def test_float16_storage_overflow_names_the_flag_and_bfloat16_holds_the_same_pefs():
    G, _, _ = planted(m=10, d=8)
    G = G.float()
    G[3] *= 1e5  # beyond float16's 65504
    held = r"examples \[3\]\) as held in float16 \(storage_dtype\); if they are finite in the store, "
    held += r"float16 overflowed them .*in bfloat16.* or pass nonfinite='exclude' to drop them"
    with pytest.raises(SettingError, match=held) as err:
        NPEFF(3, storage_dtype="float16", **FAST).fit(G)
    assert err.value.fields == ("storage_dtype", "nonfinite")
    flags = err.value.render(lambda field: "--" + field.replace("_", "-"))
    assert "float16 (--storage-dtype)" in flags and "pass --nonfinite='exclude'" in flags
    assert math.isfinite(NPEFF(3, storage_dtype="bfloat16", **FAST).fit(G).reconstruction_err_)


def test_storage_dtype_params_repr_save_load_and_checkpoints(tmp_path):
    assert "storage_dtype" not in repr(NPEFF(3))
    assert "storage_dtype=torch.bfloat16" in repr(NPEFF(3, storage_dtype=torch.bfloat16))
    assert NPEFF(3).get_params()["storage_dtype"] is None
    # Fingerprints of checkpoints written before storage_dtype existed had no such key: still equal.
    old = {"n_components", "m", "rows", "dim", "seed", "lr", "warmup_lr", "n_warmup_steps", "eps", "dtype", "init"}
    assert set(fingerprint(NPEFF(3).get_params(), 1, 1, 1)) == old
    assert set(fingerprint(NPEFF(3, storage_dtype="float32").get_params(), 1, 1, 1)) == old
    G, _, _ = planted(m=30, d=12)
    G = G.float()
    kw = dict(seed=1, checkpoint_every=5, n_steps=10, n_warmup_steps=5, progress=False)
    full = NPEFF(3, storage_dtype=torch.bfloat16, **kw).fit(G)
    NPEFF(3, checkpoint_dir=tmp_path / "a", **kw).fit(G)  # fp32 storage
    with pytest.raises(ValueError, match="storage_dtype: not in the stored configuration"):
        NPEFF(3, checkpoint_dir=tmp_path / "a", storage_dtype="bfloat16", **kw).fit(G)
    NPEFF(3, checkpoint_dir=tmp_path / "a", storage_dtype="float32", **kw).fit(G)  # the same numerics: resumes
    with pytest.raises(Stop):
        NPEFF(3, storage_dtype="bfloat16", checkpoint_dir=tmp_path / "b", callback=stop_at(7), **kw).fit(G)
    resumed = NPEFF(3, storage_dtype=torch.bfloat16, checkpoint_dir=tmp_path / "b", **kw).fit(G)
    assert torch.equal(resumed.components_, full.components_)
    assert torch.equal(resumed.coefficients_, full.coefficients_)
    full.save(tmp_path / "dec")
    loaded = NPEFF.load(tmp_path / "dec")
    assert loaded.storage_dtype == "bfloat16"
    assert loaded.get_params() == {**full.get_params(), "dtype": "float32", "storage_dtype": "bfloat16"}
    assert torch.equal(loaded.components_, full.components_)


# ----------------------------------------------------------------------------------------------
# The functional solver, the input interface, saving and the estimator's errors
# ----------------------------------------------------------------------------------------------


def test_the_functional_solver_is_the_estimators_fit_bit_for_bit(tmp_path):
    G, _, _ = planted(m=70, d=20)
    G = G.float()
    G[5] = 0  # an excluded example
    kw = dict(seed=4, n_steps=40, n_warmup_steps=10, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = NPEFF(5, **kw).fit(G)
        W, H, n_iter = npeff_factorization(G, 5, **kw)
        fitted = npeff_factorization(FakeStore(G, batch=9), 5, memory_budget=0, batch_size=9, **kw)
    assert torch.equal(W, est.coefficients_) and torch.equal(H, est.components_) and n_iter == est.n_iter_ == 50
    streamed = NPEFF(5, memory_budget=0, batch_size=9, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed.fit(FakeStore(G, batch=9))
    assert torch.equal(fitted.W, streamed.coefficients_) and torch.equal(fitted.H, streamed.components_)
    assert torch.equal(fitted.loss_history, streamed.loss_history_) and fitted.excluded.nonzero().tolist() == [[5]]
    # transform is the solver with the components fixed
    with pytest.warns(RuntimeWarning, match="zero or non-finite Frobenius norm") as seen:
        again = npeff_factorization(G, H=est.components_, update_H=False, n_steps=60, seed=4, progress=False)
    assert seen[0].filename == __file__  # the warning points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(again.W, est.transform(G, n_steps=60)) and again.n_iter == 60
    with pytest.raises(ValueError, match="pass H"):
        npeff_factorization(G, 5, update_H=False)


def test_a_pef_store_is_a_pef_source(tmp_path):
    from npeff_lens.store import PEFStore

    G, _, _ = planted(m=12, d=8)
    store = PEFStore.create(tmp_path / "pefs", {"model": "m"}, rows=G.shape[1], dim=8, dtype="float32")
    store.append(G.float(), [{}] * 12)
    store.flush()
    assert isinstance(store, PEFSource) and isinstance(FakeStore(G), PEFSource)
    assert not isinstance(G, PEFSource)
    with pytest.raises(TypeError, match="lacks"):
        NPEFF(2, **FAST).fit([[1.0]])


def _flip(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_saved_decomposition_is_a_corrupt_file_error(tmp_path, planted_fit):
    _, _, _, est = planted_fit
    est.save(tmp_path / "dec")
    assert torch.equal(NPEFF.load(tmp_path / "dec").components_, est.components_)
    _flip(tmp_path / "dec" / "npeff.safetensors")
    with pytest.raises(CorruptFileError, match=r"npeff\.safetensors is damaged"):
        NPEFF.load(tmp_path / "dec")
    with pytest.raises(ValueError, match="does not hold an NPEFF decomposition"):
        (tmp_path / "dec" / "config.json").write_text('{"class": "GradientClustering"}')
        NPEFF.load(tmp_path / "dec")


def test_a_decomposition_saved_without_a_checksum_still_loads(tmp_path, planted_fit):
    from safetensors.torch import load_file, save_file

    _, _, _, est = planted_fit
    est.save(tmp_path / "dec")
    path = tmp_path / "dec" / "npeff.safetensors"
    save_file(load_file(path), path)  # as written before files carried a checksum
    assert torch.equal(NPEFF.load(tmp_path / "dec").coefficients_, est.coefficients_)


def test_not_fitted_is_one_error_that_is_also_a_value_and_an_attribute_error():
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    est = NPEFF(3)
    with pytest.raises(NotFittedError, match="not fitted"):
        est.save("unused")
    assert not hasattr(est, "components_")


def test_verbose_logs_a_summary_and_prints_nothing(capsys, caplog):
    G, _, _ = planted(m=30, d=12)
    with caplog.at_level("INFO", logger="npeff_lens.decomposition"):
        NPEFF(3, verbose=1, **FAST).fit(G.float())
    assert capsys.readouterr() == ("", "")
    assert any("NPEFF: 180 steps, loss" in r.getMessage() and r.levelname == "INFO" for r in caplog.records)
