"""Analysis metrics (§3.1, §5): hand-computed values, for the three shapes of coefficients the methods produce."""

import numpy as np
import pytest
import torch

from npeff_lens.analysis import (
    alive,
    argmax_shared,
    argmax_shared_fraction,
    coverage,
    decomposition_similarity,
    method_summary,
    token_tuned,
    token_tunings,
    top_examples,
    tuned_fraction,
    tuning_summary,
    tunings,
)


def test_top_examples_hand_computed():
    c = torch.tensor([[0.1, 3.0], [0.5, 1.0], [0.5, 0.0], [0.2, 2.0]])
    top = top_examples(c, k=3)
    assert top.dtype == torch.long
    assert top.tolist() == [[1, 2, 3], [0, 3, 1]]  # tie 0.5 at examples 1, 2 keeps their order
    assert top_examples(c, k=10).shape == (2, 4)
    with pytest.raises(ValueError):
        top_examples(torch.ones(3), k=1)


def test_tunings_hand_computed():
    m = 40
    c = torch.zeros(m, 4)
    c[:, 0] = torch.arange(m, 0, -1).float()  # top 16: examples 0..15
    c[:, 1] = torch.arange(m).float()  # top 16: examples 39..24
    c[:, 2] = torch.arange(m, 0, -1).float().roll(8)  # top 16: examples 8..23
    c[:3, 3] = 1.0  # only 3 examples with a positive coefficient
    labels = ["a"] * 16 + ["b"] * 8 + ["c"] * 15 + ["b"]
    # comp 0: 16/16 a; comp 1: 15/16 c = 93.75% < 95%; comp 2: 8 a + 8 b; comp 3: too few examples.
    result = tunings(c, labels, k=16)
    assert result == ["a", None, None, None]
    assert tunings(c, labels, k=16, threshold=0.9) == ["a", "c", None, None]
    assert tunings(c, torch.tensor([0] * 16 + [1] * 24), k=16)[0] == 0
    assert tuned_fraction(result) == 0.25
    summary = tuning_summary(c, labels=labels, predictions=["a"] * 8 + ["b"] * 32, k=16)
    # predictions: comp 0 -> 8 a / 8 b (no); comp 1 -> all b (yes); comp 2 -> all b (8..23: yes).
    assert summary["label"] == 0.25 and summary["prediction"] == 0.5 and summary["either"] == 0.75
    assert summary["not_enough_examples"] == 1
    with pytest.raises(ValueError, match="labels"):
        tunings(c, labels[:-1])


def test_decomposition_similarity_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    # a0 vs b: cos 1 with b0; a1 vs b: best is b1 with 1/sqrt(2).
    assert decomposition_similarity(a, b) == pytest.approx((1 + 2**-0.5) / 2)
    # b -> a: b0 1, b1 1/sqrt(2), b2 0.
    assert decomposition_similarity(b, a) == pytest.approx((1 + 2**-0.5 + 0) / 3)
    assert decomposition_similarity(b, b[:, [2, 0, 1]]) == pytest.approx(1.0)
    assert decomposition_similarity(torch.zeros(3, 1), b) == 0.0


# ---------------------------------------------------------------------------------------------------
# Metrics shared by every method, on three shapes of coefficients (k = 2 throughout)
# ---------------------------------------------------------------------------------------------------

# Dense, NPEFF-like: every example on every component. Top 2: c0 (e0, e1), c1 (e2, e3), c2 (e5, e3).
DENSE = [
    [0.9, 0.1, 0.3],
    [0.8, 0.2, 0.1],
    [0.1, 0.7, 0.2],
    [0.2, 0.6, 0.5],
    [0.3, 0.3, 0.4],
    [0.05, 0.4, 0.6],
]
# One non-zero per row (gradient clusters), cluster 2 empty. Top 2: c0 (e0, e3), c1 (e2, e4).
CLUSTERS = [
    [1.0, 0, 0],
    [0.5, 0, 0],
    [0, 0.9, 0],
    [0.8, 0, 0],
    [0, 0.6, 0],
    [0, 0.4, 0],
]
# Sparse, SAE-like: c1, c3 dead, c4 fires on one example only. Top 2: c0 (e0, e2), c2 (e2, e5), c4 (e1).
SPARSE = [
    [2.0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1.0],
    [1.0, 0, 3.0, 0, 0],
    [0, 0, 0, 0, 0],
    [0.5, 0, 1.0, 0, 0],
    [0, 0, 2.0, 0, 0],
]
SPARSE_TOKENS = [[{5, 7}, {7}], [], [{1, 2}, {3}], [], [{9}]]  # token sets of each component's top examples

CASES = {
    # name: (coefficients, labels, predictions, alive_min_examples, expected)
    "dense": (
        DENSE,
        ["a", "a", "b", "b", "a", "b"],
        [0, 0, 1, 2, 1, 2],
        1,
        dict(
            alive=[True, True, True],
            argmax_shared=[True, False, True],  # c1: predictions 1, 2
            tuned_label=[True, True, True],
            covered={0, 1, 2, 3, 5},
        ),
    ),
    "clusters": (
        CLUSTERS,
        ["x", "y", "z", "x", "z", "y"],
        [1, 0, 1, 1, 0, 0],
        1,
        dict(
            alive=[True, True, False],
            argmax_shared=[True, False, False],  # c1: predictions 1, 0; c2: no positive example
            tuned_label=[True, True, False],
            covered={0, 3, 2, 4},
        ),
    ),
    "sparse": (
        SPARSE,
        [0, 0, 0, 1, 1, 1],
        [0, 1, 1, 0, 1, 1],
        2,  # §5.2: an SAE latent needs k positive examples
        dict(
            alive=[True, False, True, False, False],  # c4 has 1 < 2 positive examples
            argmax_shared=[False, False, True, False, False],  # c0: predictions 0, 1; c4: too few examples
            tuned_label=[True, False, False, False, False],  # c2: labels 0, 1
            covered={0, 2, 5},
        ),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("as_numpy", [False, True])
def test_shared_metrics_hand_computed(name, as_numpy):
    coeffs, labels, preds, min_examples, exp = CASES[name]
    c = np.array(coeffs, dtype=np.float32) if as_numpy else torch.tensor(coeffs)
    live = alive(c, min_examples)
    assert live.tolist() == exp["alive"]
    assert argmax_shared(c, preds, k=2).tolist() == exp["argmax_shared"]
    n_alive = sum(exp["alive"])

    def frac(flags):
        return sum(f and a for f, a in zip(flags, exp["alive"])) / n_alive

    assert argmax_shared_fraction(c, preds, k=2, min_examples=min_examples) == frac(exp["argmax_shared"])
    assert coverage(c, k=2, min_examples=min_examples) == len(exp["covered"]) / 6
    summary = method_summary(c, labels=labels, predictions=preds, k=2, alive_min_examples=min_examples)
    assert summary == {
        "n_components": len(exp["alive"]),
        "alive": n_alive,
        "k": 2,
        "threshold": 0.95,
        "tuned_label": frac(exp["tuned_label"]),
        "tuned_prediction": frac(exp["argmax_shared"]),  # at k = 2 and 95%, both of the top 2 must agree
        "argmax_shared": frac(exp["argmax_shared"]),
        "coverage": len(exp["covered"]) / 6,
        "tuned_tokens": None,
    }


def test_shared_metrics_explicit_values():
    """The expected fractions of CASES, written out."""
    dense, clusters, sparse = (torch.tensor(x) for x in (DENSE, CLUSTERS, SPARSE))
    assert argmax_shared_fraction(dense, CASES["dense"][2], k=2) == pytest.approx(2 / 3)
    assert argmax_shared_fraction(clusters, CASES["clusters"][2], k=2) == 0.5  # over the 2 alive clusters
    assert argmax_shared_fraction(sparse, CASES["sparse"][2], k=2, min_examples=1) == pytest.approx(1 / 3)
    assert argmax_shared_fraction(sparse, CASES["sparse"][2], k=2, min_examples=2) == 0.5
    assert coverage(dense, k=2) == pytest.approx(5 / 6) and coverage(dense, k=1) == 0.5  # {0, 2, 5}
    assert coverage(clusters, k=2) == pytest.approx(4 / 6) and coverage(clusters, k=3) == 1.0
    assert coverage(sparse, k=2, min_examples=1) == pytest.approx(4 / 6)  # c4's e1 counts when c4 is alive
    assert coverage(sparse, k=2, min_examples=2) == 0.5
    assert alive(sparse).sum() == 3 and alive(dense, min_examples=7).sum() == 0
    # below threshold 1, tuned_prediction and argmax_shared differ: c1's top 2 (preds 1, 2) reach 50%
    loose = method_summary(dense, predictions=CASES["dense"][2], k=2, threshold=0.5)
    assert loose["tuned_prediction"] == 1.0 and loose["argmax_shared"] == pytest.approx(2 / 3)
    assert loose["tuned_label"] is None and loose["tuned_tokens"] is None
    none = method_summary(torch.zeros(4, 3), predictions=[0, 0, 0, 0], k=2)
    assert none["alive"] == 0 and none["argmax_shared"] == 0.0 and none["coverage"] == 0.0


def test_token_tunings_hand_computed():
    # c0: token 7 in both sets; c1, c3: nothing; c2: no common token; c4: one set (fewer than k = 2)
    assert token_tunings(SPARSE_TOKENS) == [7, None, None, None, 9]
    assert token_tunings(SPARSE_TOKENS, k=2) == [7, None, None, None, None]
    assert token_tuned(SPARSE_TOKENS, k=2) == [True, False, False, False, False]
    # the threshold: token 1 in 19 of 20 sets is 95% (tuned), in 18 of 20 is 90% (not)
    sets19 = [frozenset({1, 2})] * 19 + [frozenset({2})]
    sets18 = [frozenset({1})] * 18 + [frozenset({3}), frozenset({4})]
    assert token_tunings([sets18, sets19]) == [None, 2]  # token 2 is in all 20 sets of the second
    assert token_tunings([[{1}] * 19 + [{3}], sets18]) == [1, None]
    assert token_tuned([sets18], threshold=0.9) == [True]
    with pytest.raises(ValueError, match="threshold"):
        token_tunings(SPARSE_TOKENS, threshold=0)

    sparse = torch.tensor(SPARSE)
    kw = dict(labels=CASES["sparse"][1], predictions=CASES["sparse"][2], k=2, alive_min_examples=2)
    summary = method_summary(sparse, token_sets=SPARSE_TOKENS, **kw)
    assert summary["alive"] == 2 and summary["tuned_tokens"] == 0.5  # c0 tuned; c2 not; c4 dead
    flags = [True, True, False, False, True]  # tuned but dead components do not count
    assert method_summary(sparse, token_tuned=flags, **kw)["tuned_tokens"] == 0.5
    with pytest.raises(ValueError, match="not both"):
        method_summary(sparse, token_sets=SPARSE_TOKENS, token_tuned=flags, **kw)
    with pytest.raises(ValueError, match="3 per-component values for 5 components"):
        method_summary(sparse, token_tuned=flags[:3], **kw)


def test_cluster_coefficients_read_like_components():
    """Gradient clusters' coefficients give top examples = members, closest to the centroid first."""
    from npeff_lens.baselines.gradient_clustering import cluster_coefficients

    labels = torch.tensor([1, 0, -1, 1, 0, 1])
    distances = torch.tensor([0.5, 0.2, float("inf"), 0.1, 1.5, 2.0])
    c = cluster_coefficients(labels, distances, 3)
    expected = [[0, 1 / 1.5, 0], [1 / 1.2, 0, 0], [0, 0, 0], [0, 1 / 1.1, 0], [1 / 2.5, 0, 0], [0, 1 / 3, 0]]
    torch.testing.assert_close(c, torch.tensor(expected))
    assert top_examples(c, k=4).tolist()[:2] == [[1, 4, 0, 2], [3, 0, 5, 1]]  # members by distance, then others
    assert alive(c).tolist() == [True, True, False] and coverage(c, k=2) == pytest.approx(4 / 6)


def test_degeneracy_names_always_on_and_near_duplicate_components():
    from npeff_lens.analysis import degeneracy

    g = torch.Generator().manual_seed(0)
    c = torch.rand(200, 5, generator=g) * (torch.rand(200, 5, generator=g) > 0.5)
    healthy = degeneracy(c)
    assert healthy["n_always_on"] == 0 and healthy["n_near_duplicate_pairs"] == 0 and healthy["degenerate"] is None
    c[:, 1] = c[:, 0] * 1.001  # a duplicate of component 0
    c[:, 4] = torch.rand(200, generator=g) + 0.1  # on for every example
    found = degeneracy(c)
    assert found["n_always_on"] == 1 and found["n_near_duplicate_pairs"] == 1
    assert found["max_cosine"] == pytest.approx(1.0)
    assert "1 of 5 components active on >= 99%" in found["degenerate"] and "1 pair(s)" in found["degenerate"]
    # a dead (all-zero) component is not a duplicate of another dead one
    c[:, 2] = c[:, 3] = 0
    assert degeneracy(c)["n_near_duplicate_pairs"] == 1


def test_compare_prints_a_warning_for_degenerate_components():
    from npeff_lens.comparison import format_compare

    row = {"n_components": 4, "degenerate": "2 of 4 components active on >= 99% of the examples"}
    text = format_compare({"methods": {"npeff": {"n_components": 4, "degenerate": None}, "sae": row}})
    assert "sae: warning: degenerate components: 2 of 4" in text and "--sae-tokens" in text
    assert "npeff: warning" not in text


# ---------------------------------------------------------------------------------------------------
# One meaning of "active" (analysis.active) for compare's warnings, the report and the top examples
# ---------------------------------------------------------------------------------------------------


def _leftovers(m=200, C=5, seed=0):
    """NPEFF-like coefficients: each example loads on 2 of the first 4 components (0.05 to 1.05); the multiplicative
    W updates leave 1e-30-sized values everywhere else; component 4 holds leftovers alone (dead)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.zeros(m, C, dtype=torch.bool)
    for i in range(m):
        real[i, torch.randperm(C - 1, generator=g)[:2]] = True
    left = 1e-30 * (0.01 + torch.rand(m, C, generator=g, dtype=torch.float64))
    return torch.where(real, 0.05 + torch.rand(m, C, generator=g, dtype=torch.float64), left), real


def test_npeff_leftovers_are_inactive_and_every_reader_agrees():
    from types import SimpleNamespace

    from npeff_lens.analysis import ACTIVE_DEFINITION, active, active_share, active_threshold, degeneracy
    from npeff_lens.comparison import _CompareContext, format_compare
    from npeff_lens.config import CompareConfig
    from npeff_lens.report.data import RunView, histogram, statistics, top_indices
    from npeff_lens.selectivity import top_positive

    c, real = _leftovers()
    m, C, k = *c.shape, 16
    assert bool((c > 0).all())  # what made every component "active on >= 99% of the examples"
    assert torch.equal(active(c), real) and not real[:, 4].any()
    share = real.double().mean(0)
    torch.testing.assert_close(active_share(c), share)
    # compare: no degeneracy warning, the dead component is not alive, its count is the report's
    labels = ["a" if i % 2 else "b" for i in range(m)]
    ctx = object.__new__(_CompareContext)
    ctx.config, ctx.labels, ctx.predictions = CompareConfig(k=k), labels, labels
    row = ctx.summarize("npeff", SimpleNamespace(coefficients_=c.float()))
    assert row["n_always_on"] == 0 and row["degenerate"] is None and row["alive"] == 4
    assert "warning" not in format_compare({"methods": {"npeff": row}})
    # the report: the share of active examples, the histogram over them, the top examples
    view = RunView(None, SimpleNamespace(dead_components_=torch.tensor([])), None, [], c, labels, labels, None)
    stats = statistics(view, k)
    torch.testing.assert_close(stats.frac_nonzero, share)
    assert stats.dead == {4} == set(range(C)) - set(alive(c).nonzero().flatten().tolist())
    threshold = active_threshold(c)
    for j in range(C):
        want = [i for i in top_examples(c, k)[j].tolist() if real[i, j]]
        assert top_indices(view, stats, j) == want == top_positive(c, j, k) == top_positive(c, j, k, threshold)
        assert sum(histogram(c[:, j], float(stats.threshold[j]))[1]) == int(real[:, j].sum())
    assert tunings(c, labels, k=k)[4] is None and tuning_summary(c, labels, k=k)["not_enough_examples"] == 1
    # still "active on every example" where that is true, and the warning says what active means
    c[:, 0] = 0.5 + torch.rand(m, dtype=torch.float64)
    found = degeneracy(c)
    assert found["n_always_on"] == 1 and ACTIVE_DEFINITION in found["degenerate"] and "0.1%" in ACTIVE_DEFINITION


def test_active_is_relative_to_each_components_scale():
    from npeff_lens.analysis import ACTIVE_FRACTION, active, active_threshold

    # a latent 400x smaller than the largest keeps its small activations (2e-3 of its maximum); 2e-5 is a leftover
    c = torch.tensor([[200.0, 0.5, 0.0], [1.0, 0.01, 0.0], [0.1, 0.001, 0.0], [0.0, 1e-5, 0.0]])
    assert active(c).tolist() == [[True, True, False], [True, True, False], [False, True, False],
                                  [False, False, False]]  # fmt: skip
    # a column whose maximum is below ACTIVE_FRACTION**2 of the method's largest coefficient is dead
    c[:, 1] = torch.tensor([1e-5, 1e-6, 0.0, 0.0])
    assert not active(c)[:, 1].any() and active_threshold(c)[1] == pytest.approx(ACTIVE_FRACTION**2 * 200)
    # new examples are judged by the run's thresholds (a dead or all-zero column: ACTIVE_FRACTION**2 of the largest)
    assert active(torch.tensor([[0.3, 1e-3, 1e-5]]), active_threshold(c)).tolist() == [[True, True, False]]
    assert active(torch.zeros(0, 3)).shape == (0, 3) and active_threshold(torch.zeros(0, 3)).tolist() == [0.0] * 3


def test_a_real_npeff_fit_is_active_where_the_components_were_planted():
    """Each example's PEF is built from 2 of 6 planted directions: active (1e-3 of the maximum) finds those 2,
    where "any positive coefficient" finds nearly all 6 (the multiplicative updates never reach 0)."""
    from npeff_lens.analysis import active, degeneracy
    from npeff_lens.decomposition import NPEFF

    g = torch.Generator().manual_seed(0)
    d, m, K = 64, 400, 6
    H, truth, rows = torch.randn(K, d, generator=g), torch.zeros(m, K, dtype=torch.bool), []
    for i in range(m):
        js, u = torch.randperm(K, generator=g)[:2], torch.rand(2, generator=g)
        truth[i, js] = True
        rows.append(torch.stack([H[js[0]] * u[0], H[js[1]] * u[1], 0.02 * torch.randn(d, generator=g)]))
    est = NPEFF(n_components=K, n_steps=1000, n_warmup_steps=100, seed=0, progress=False).fit(torch.stack(rows))
    c = torch.as_tensor(est.coefficients_).double()
    planted = truth.double() / truth.double().norm(dim=0)
    t = truth[:, ((c / c.norm(dim=0)).T @ planted).argmax(1)]  # each component's planted direction
    on = active(c)
    precision, recall = float((on & t).sum() / on.sum()), float((on & t).sum() / t.sum())
    assert precision > 0.95 and recall > 0.95, (precision, recall)
    assert float((c > 0).double().mean()) > 0.9 and degeneracy(c)["n_always_on"] == 0
