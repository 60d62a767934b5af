"""Perturbations (§3.3, App. F): exact restore, KL against the quadratic Fisher prediction, selectivity
along a planted direction, the ratio arithmetic, errors, and the end-to-end run + CLI on tiny-llama."""

import json
import math

import pytest
import torch
from helpers import LABELS, TEMPLATE, WORDS_AND_ARTICLES, random_texts

from npeff_lens.config import PerturbConfig
from npeff_lens.models import load_model
from npeff_lens.perturb import (
    NonFiniteLogitsError,
    baseline_examples,
    geometric_mean,
    kl_divergence,
    kl_ratios,
    perturb_component,
    perturbation_kl,
    perturbed,
    summarize,
    task_log_probs,
    unit_direction,
)
from npeff_lens.runs import run_perturbation
from npeff_lens.tasks import LabelTokens

SUBSET = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]


def _texts(n, seed):
    return random_texts(n, seed, max_words=7, words=WORDS_AND_ARTICLES)


def _lrm_pef(adapter, task, prompt, names):
    """Exact LRM-PEF G(x) [outcomes, n] over ``names``: rows sqrt(p_y) ∇ log p_y (plain autograd)."""
    params = dict(adapter.all_named_parameters())
    ps = [params[n] for n in names]
    lp = task.log_probs(adapter, adapter.tokenize([prompt]))[0]
    rows = []
    for y in range(lp.shape[0]):
        g = torch.autograd.grad(lp[y], ps, retain_graph=True)
        rows.append(lp[y].exp().sqrt().detach() * torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(rows).double()


def _named(flat, adapter, names):
    params = dict(adapter.all_named_parameters())
    out, off = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = flat[off : off + k].view(params[n].shape).float()
        off += k
    return out


def _snapshot(adapter):
    return {n: p.detach().clone() for n, p in adapter.all_named_parameters()}


def _same(adapter, snap):
    return all(torch.equal(p, snap[n]) for n, p in adapter.all_named_parameters())


# --------------------------------------------------------------------------------------------------


def test_perturbed_sets_theta_plus_delta_and_restores_bit_exactly(adapter):
    snap = _snapshot(adapter)
    gen = torch.Generator().manual_seed(0)
    params = dict(adapter.all_named_parameters())
    direction = {n: torch.randn(params[n].shape, generator=gen) for n in SUBSET}
    unit = unit_direction(direction)
    assert math.isclose(math.sqrt(sum(float(v.double().square().sum()) for v in unit.values())), 1.0, rel_tol=1e-6)
    delta = {n: 3.7 * v for n, v in unit.items()}
    with perturbed(adapter, delta):
        diff = torch.cat([(params[n].detach() - snap[n]).reshape(-1) for n in SUBSET])
        assert math.isclose(float(diff.norm()), 3.7, rel_tol=1e-5)  # ‖δ‖₂ = magnitude over all tensors
        untouched = [n for n in params if n not in SUBSET]
        assert all(torch.equal(params[n], snap[n]) for n in untouched)
    assert _same(adapter, snap)
    # Many perturbations in a row: no drift.
    for s in (1, -1, 1, -1):
        with perturbed(adapter, {n: s * 1e-3 * v for n, v in unit.items()}):
            pass
    assert _same(adapter, snap)
    # An exception inside the block still restores.
    with pytest.raises(RuntimeError, match="boom"):
        with perturbed(adapter, delta):
            assert not _same(adapter, snap)
            raise RuntimeError("boom")
    assert _same(adapter, snap)


def test_perturbed_rejects_unknown_names_and_shapes(adapter):
    with pytest.raises(ValueError, match="no parameter"):
        with perturbed(adapter, {"not.a.param": torch.zeros(3)}):
            pass
    with pytest.raises(ValueError, match="shape"):
        with perturbed(adapter, {SUBSET[0]: torch.zeros(3)}):
            pass
    with pytest.raises(ValueError, match="zero"):
        unit_direction({SUBSET[0]: torch.zeros(2)})


def test_kl_matches_quadratic_fisher_prediction(adapter, task):
    """KL(p_{θ+δ} ‖ p_θ) = ½ δᵀ F(x) δ + O(‖δ‖³) with F = GᵀG the exact PEF: checks the KL, its
    direction of application and the magnitude scaling at once."""
    prompts = task.prompts(_texts(6, seed=1))
    G = [_lrm_pef(adapter, task, p, SUBSET) for p in prompts]
    # Half gradient, half random: a random direction alone barely moves this random tiny model.
    gsum = sum(g[0] for g in G)
    r = torch.randn(G[0].shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = gsum / gsum.norm() + r / r.norm()
    h = h / h.norm()
    direction = _named(h * 123.0, adapter, SUBSET)  # any norm: it is rescaled to the magnitude
    eps = 0.1
    predicted = torch.stack([0.5 * (g @ (eps * h)).square().sum() for g in G])
    assert float(predicted.min()) > 1e-5  # large enough for fp32 log-probs to resolve
    kl = perturbation_kl(adapter, task, prompts, direction, eps)
    for s in (1, -1):
        torch.testing.assert_close(kl[s], predicted, rtol=0.05, atol=0)
    # Third-order terms flip with the sign: their average matches the quadratic much more closely.
    torch.testing.assert_close((kl[1] + kl[-1]) / 2, predicted, rtol=0.01, atol=0)
    kl2 = perturbation_kl(adapter, task, prompts, direction, 2 * eps, signs=(1,))
    torch.testing.assert_close(kl2[1] / kl[1], torch.full_like(kl[1], 4.0), rtol=0.1, atol=0)


def test_planted_direction_selectively_changes_its_examples(adapter):
    """Perturbing along the top eigenvector of Σ_A F_i changes group A's predictions far more than
    others' (as the quadratic prediction says), and infinitely more (to second order) than those of a
    group B whose PEF row spaces it was made orthogonal to."""
    task = LabelTokens("{text}", [" bad", " sad"]).bind(adapter)
    # The prediction position's context differs between the groups, so do their PEFs.
    group_a = [t + " great film" for t in _texts(6, seed=10)]
    group_b = [t + " awful movie" for t in _texts(6, seed=11)]
    rand = _texts(12, seed=12)
    ga = torch.cat([_lrm_pef(adapter, task, p, SUBSET) for p in group_a])  # [12, n]
    gb = torch.cat([_lrm_pef(adapter, task, p, SUBSET) for p in group_b])
    gr = torch.cat([_lrm_pef(adapter, task, p, SUBSET) for p in rand])
    top_eig = torch.linalg.svd(ga, full_matrices=False).Vh[0]  # top eigenvector of Σ_A G_iᵀG_i

    # Against B + random prompts: selective, by the ratio the quadratic approximation predicts.
    fisher_a = float((ga @ top_eig).square().sum()) / 6
    fisher_other = float(torch.cat([gb, gr]).matmul(top_eig).square().sum()) / 18
    eps = math.sqrt(2e-3 / fisher_a)  # mean KL on A ≈ 1e-3
    prompts = group_a + group_b + rand
    norms = [1.0] * 6 + [4.0] * 18
    rec = perturb_component(
        adapter,
        task,
        prompts,
        _named(top_eig, adapter, SUBSET),
        eps,
        top=range(6),
        baseline=range(6, 24),
        pef_norms=norms,
        component=7,
    )
    assert rec["component"] == 7 and rec["n_top"] == 6 and rec["n_base"] == 18
    assert rec["kl_ratio"] > 5, rec
    assert rec["kl_ratio"] == pytest.approx(fisher_a / fisher_other, rel=0.2)
    assert rec["kl_ratio"] == max(rec["kl_ratio_plus"], rec["kl_ratio_minus"])
    assert rec["sign"] == ("+" if rec["kl_ratio_plus"] >= rec["kl_ratio_minus"] else "-")
    assert rec["pef_norm_ratio"] == 0.25 and (rec["pef_norm_top"], rec["pef_norm_base"]) == (1.0, 4.0)
    # The record's means are the means of the per-example KLs.
    kl = perturbation_kl(adapter, task, prompts, _named(top_eig, adapter, SUBSET), eps)
    assert math.isclose(rec["kl_top_plus"], float(kl[1][:6].mean()), rel_tol=1e-12)
    assert math.isclose(rec["kl_base_minus"], float(kl[-1][6:].mean()), rel_tol=1e-12)

    # Made orthogonal to B's PEF rows (δᵀ F_B δ = 0): B only sees third-order effects.
    q = torch.linalg.qr(gb.T).Q
    v = top_eig - q @ (q.T @ top_eig)
    v = v / v.norm()
    eps = math.sqrt(2e-3 / (float((ga @ v).square().sum()) / 6))
    rec = perturb_component(
        adapter, task, group_a + group_b, _named(v, adapter, SUBSET), eps, top=range(6), baseline=range(6, 12)
    )
    assert rec["kl_ratio"] > 1000, rec
    assert rec["kl_top_plus"] == pytest.approx(1e-3, rel=0.1)


def test_kl_divergence_reference():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])
    kl = kl_divergence(p.log(), q.log())
    expected = [0.2 * math.log(0.4) + 0.8 * math.log(1.6), 0.0, math.log(1 / 0.9)]
    assert torch.allclose(kl, torch.tensor(expected, dtype=torch.float64), atol=1e-7)


def test_kl_ratios_sign_selection_and_geometric_mean():
    r = kl_ratios([2.0, 4.0], [1.0, 1.0], [1.0, 1.0], [0.5, 0.5])
    assert (r["kl_top_plus"], r["kl_base_plus"], r["kl_top_minus"], r["kl_base_minus"]) == (3.0, 1.0, 1.0, 0.5)
    assert (r["kl_ratio_plus"], r["kl_ratio_minus"], r["sign"], r["kl_ratio"]) == (3.0, 2.0, "+", 3.0)
    r = kl_ratios([1.0], [9.0], [1.0], [1.0])
    assert (r["sign"], r["kl_ratio"], r["kl_ratio_plus"]) == ("-", 9.0, 1.0)
    r = kl_ratios([1.0], [0.0], [0.0], [0.0])  # zero baseline: inf; 0/0: nan
    assert r["kl_ratio_plus"] == math.inf and math.isnan(r["kl_ratio_minus"]) and r["sign"] == "+"
    r = kl_ratios([0.0], [0.0], [0.0], [0.0])
    assert r["sign"] is None and math.isnan(r["kl_ratio"])

    assert math.isclose(geometric_mean([2.0, 8.0]), 4.0)
    assert math.isclose(geometric_mean([1.0, 10.0, 100.0, math.nan]), 10.0)
    assert geometric_mean([0.0, 3.0]) == 0.0 and geometric_mean([math.inf, 3.0]) == math.inf
    assert math.isnan(geometric_mean([])) and math.isnan(geometric_mean([0.0, math.inf]))
    with pytest.raises(ValueError):
        geometric_mean([-1.0, 2.0])

    records = [
        {"status": "ok", "kl_ratio": 4.0, "pef_norm_ratio": 0.5, "sign": "+"},
        {"status": "ok", "kl_ratio": 16.0, "pef_norm_ratio": 2.0, "sign": "-"},
        {"status": "ok", "kl_ratio": 1.0, "pef_norm_ratio": 1.0, "sign": "+"},
        {"status": "dead", "kl_ratio": math.nan, "pef_norm_ratio": math.nan, "sign": None},
    ]
    s = summarize(records)
    assert math.isclose(s["kl_ratio_geomean"], 4.0) and math.isclose(s["pef_norm_ratio_geomean"], 1.0)
    counts = (s["n_components"], s["n_evaluated"], s["n_left_out"], s["n_sign_plus"], s["n_sign_minus"])
    assert counts == (4, 3, 1, 2, 1)
    assert s["kl_ratio_median"] == 4.0


def test_baseline_examples_are_disjoint_seeded_and_capped():
    b = baseline_examples(50, 10, [3, 4, 5], seed=1)
    assert len(b) == 10 and len(set(b)) == 10 and not set(b) & {3, 4, 5}
    assert b == baseline_examples(50, 10, [3, 4, 5], seed=1) and b != baseline_examples(50, 10, [3, 4, 5], seed=2)
    assert sorted(baseline_examples(8, 100, [0, 1], seed=0)) == list(range(2, 8))


def test_huge_magnitude_is_a_clear_error_and_weights_survive(adapter, task):
    snap = _snapshot(adapter)
    prompts = task.prompts(_texts(4, seed=5))
    params = dict(adapter.all_named_parameters())
    direction = {n: torch.ones(p.shape) for n, p in params.items() if ".layers." in n}
    with pytest.raises(NonFiniteLogitsError, match=r"component 3: .*magnitude 1e\+30.*smaller magnitude"):
        perturb_component(adapter, task, prompts, direction, 1e30, top=[0, 1], baseline=[2, 3], component=3)
    assert _same(adapter, snap)
    with pytest.raises(ValueError, match="disjoint"):
        perturb_component(adapter, task, prompts, direction, 1.0, top=[0, 1], baseline=[1, 2])


def test_task_log_probs_batches_agree(adapter, task):
    prompts = task.prompts(_texts(5, seed=6))
    a = task_log_probs(adapter, task, prompts, batch_size=2)
    b = task_log_probs(adapter, task, prompts, batch_size=5)
    assert a.shape == (5, 2) and torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# End to end: collect → NPEFF → run_perturbation / npeff perturb.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decomposition(tmp_path_factory, adapter, task):
    from npeff_lens.collect import collect_pefs
    from npeff_lens.runs import decompose_store

    root = tmp_path_factory.mktemp("perturb_e2e")
    collect_pefs(
        adapter,
        _texts(24, seed=20),
        LabelTokens(TEMPLATE, LABELS),
        root / "store",
        proj_dim=256,
        dtype="float32",
        progress=False,
    )
    est = decompose_store(
        root / "store", root / "decomp", n_components=3, n_steps=50, n_warmup_steps=10, progress=False
    )
    return root, est


def test_run_perturbation_end_to_end(decomposition, adapter, task):
    from npeff_lens.analysis import top_examples
    from npeff_lens.recovery import recover
    from npeff_lens.store import PEFStore

    root, est = decomposition
    out = root / "out"
    summary = run_perturbation(root / "decomp", 2, magnitude=0.5, top_k=4, n_baseline=8, out=out, progress=False)
    records = summary["records"]
    assert [r["component"] for r in records] == [0, 1]
    assert summary["n_evaluated"] == 2
    assert math.isclose(summary["kl_ratio_geomean"], geometric_mean([r["kl_ratio"] for r in records]))
    table = json.loads((out / "perturbation.json").read_text())
    assert [r["component"] for r in table["components"]] == [0, 1]
    csv_lines = (out / "perturbation.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("component,status,sign,kl_ratio") and len(csv_lines) == 3

    # Component 0 recomputed by hand from the building blocks.
    store = PEFStore(root / "store")
    meta = store.metadata
    prompts = task.prompts(meta["text"])
    j = 0
    top = [i for i in top_examples(est.coefficients_, 4)[j].tolist() if est.coefficients_[i, j] > 0]
    base = baseline_examples(len(prompts), 8, top, seed=0)
    direction = recover(
        est.components_,
        j,
        projection=est.manifest_["projection"],
        layout=est.manifest_["layout"],
        method=PerturbConfig().recovery,
    )[j]
    rec = perturb_component(adapter, task, prompts, direction, 0.5, top=top, baseline=base, pef_norms=meta["pef_norm"])
    for key in ("kl_ratio_plus", "kl_ratio_minus", "pef_norm_ratio", "n_top", "n_base"):
        assert rec[key] == pytest.approx(records[0][key], rel=1e-3), key
    assert rec["sign"] == records[0]["sign"]
    if PerturbConfig().recovery == "adjoint":  # the default back-projection is not a fit: no residual, no steps
        assert records[0]["recovery_relative_residual"] is None and not records[0]["recovery_n_iter"]
    else:
        assert records[0]["recovery_relative_residual"] < 0.5 and records[0]["recovery_n_iter"] >= 1

    # A rerun into the same directory resumes: only the new component is perturbed.
    import npeff_lens.perturb as perturb_module

    calls = []
    original = perturb_module.perturb_component
    try:
        perturb_module.perturb_component = lambda *a, **k: calls.append(k["component"]) or original(*a, **k)
        again = run_perturbation(root / "decomp", 3, magnitude=0.5, top_k=4, n_baseline=8, out=out, progress=False)
    finally:
        perturb_module.perturb_component = original
    assert calls == [2] and again["records"][:2] == json.loads(json.dumps(records))

    # The store smaller than the baseline asked for: capped and said so.
    with pytest.warns(RuntimeWarning, match="baseline"):
        s2 = run_perturbation(root / "decomp", [2], magnitude=0.5, top_k=4, n_baseline=1000, progress=False)
    assert s2["records"][0]["n_base"] == 24 - s2["records"][0]["n_top"] and s2["notes"]


def test_run_perturbation_errors(decomposition, tmp_path):
    from npeff_lens.store import PEFStore

    root, _ = decomposition
    with pytest.raises(ValueError, match="out of range"):
        run_perturbation(root / "decomp", [0, 3], magnitude=0.5, progress=False)
    with pytest.raises(NonFiniteLogitsError, match=r"component 0: .*magnitude 1e\+30"):
        run_perturbation(root / "decomp", 1, magnitude=1e30, top_k=4, n_baseline=8, progress=False)

    real = PEFStore(root / "store")

    class Altered:  # the same store with another layout / projection
        def __init__(self, **changes):
            self.metadata, self.manifest = real.metadata, {**real.manifest, **changes}

        def __len__(self):
            return len(real)

    layout = [dict(e) for e in real.manifest["layout"]]
    layout[0]["name"] = "model.layers.9.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=r"(?s)layout\.0\.name: stored .*another space"):
        run_perturbation(root / "decomp", 1, store=Altered(layout=layout), progress=False)
    with pytest.raises(ValueError, match=r"projection\.seed: stored 0, now 1"):
        run_perturbation(
            root / "decomp", 1, store=Altered(projection={**real.manifest["projection"], "seed": 1}), progress=False
        )
    with pytest.raises(ValueError, match="lacks .* parameter"):
        run_perturbation(root / "decomp", 1, adapter=load_model("tiny-gpt2"), progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "npeff.safetensors"):
        (bare / f).write_bytes((root / "decomp" / f).read_bytes())
    with pytest.raises(FileNotFoundError, match="run.json naming its PEF store"):
        run_perturbation(bare, 1, progress=False)


def test_cli_perturb(decomposition, capsys):
    root, _ = decomposition
    from npeff_lens.cli import main

    argv = ["perturb", str(root / "decomp"), "--components", "0,2", "--magnitude", "0.5", "--top-k", "4"]
    assert main([*argv, "--n-baseline", "8", "--out", str(root / "cli_out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "geometric mean over 2 components" in out and "kl_ratio" in out
    table = json.loads((root / "cli_out" / "perturbation.json").read_text())
    assert [r["component"] for r in table["components"]] == [0, 2]


def test_adjoint_recovery_realises_the_projected_loading():
    """With recovery='adjoint' the direction is A·h, so δᵀ(G_iᵀG_i)δ = ‖(G_i A)·h‖²: the projected
    PEF's loading on h, which is what NPEFF fitted."""
    from npeff_lens.projection import SparseProjection

    torch.manual_seed(0)
    proj = SparseProjection(5000, 256, seed=1, density=8)
    G = torch.randn(3, 2, 5000)
    h = torch.randn(256)
    x = proj.adjoint(h)
    lhs = (G @ x).square().sum(-1)
    rhs = (proj.project(G.reshape(6, -1)).reshape(3, 2, -1) @ h).square().sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-6)
