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
    from npeff_lens.compare import format_compare

    row = {"n_components": 4, "degenerate": "2 of 4 components active on >= 99% of the examples"}
    text = format_compare({"methods": {"npeff": {"n_components": 4, "degenerate": None}, "sae": row}})
    assert "sae: warning: degenerate components: 2 of 4" in text and "--sae-tokens" in text
    assert "npeff: warning" not in text
