import pytest
import torch

from npeff_lens.analysis import decomposition_similarity, top_examples, tuned_fraction, tuning_summary, tunings


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
