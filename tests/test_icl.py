"""ICL vs zero-shot (§6.2): the tuning classifier on planted tunings (exact predictions, ties, unscored examples,
errors, scikit-learn conventions), the k-shot prompt format, best-of-N ICL on tiny-llama (seeded, selects the best
prefix, predictions equal a brute-force forward), agreement, and the experiment's report."""

import json

import numpy as np
import pytest
import torch
from helpers import WORDS_AND_ARTICLES, random_texts

from npeff_lens.applications.icl import (
    TuningClassifier,
    agreement,
    best_of_n_icl,
    format_table,
    icl_experiment,
    icl_prefix,
    icl_prompts,
    zero_shot_predictions,
)
from npeff_lens.perturb import task_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on a shared machine


# --------------------------------------------------------------------------------------------------
# The tuning classifier.
# --------------------------------------------------------------------------------------------------


def _planted(labels=("a", "b", "c")):
    """60 examples (20 a, 10 b, 30 c) and the labels of each component's top 16: 0: 16 a; 1: 12 a (75%) + 4 c;
    2: 10 b (62.5%) + 6 a; 3: 8 a + 8 c; 4: dead; 5: 11 c (68.75%) + 5 b."""
    a, b, c = labels
    y = [a] * 20 + [b] * 10 + [c] * 30
    coef = torch.zeros(60, 6)

    def put(j, examples):
        for rank, i in enumerate(examples):
            coef[i, j] = 100.0 - rank

    put(0, range(16))  # a x16
    put(1, list(range(12)) + list(range(30, 34)))  # a x12, c x4
    put(2, list(range(20, 30)) + list(range(14, 20)))  # b x10, a x6 -> 10/16: not tuned
    put(3, list(range(8)) + list(range(30, 38)))  # a x8, c x8
    put(5, list(range(30, 41)) + list(range(20, 25)))  # c x11, b x5
    return coef, y


def test_fit_finds_the_planted_tunings():
    coef, y = _planted()
    clf = TuningClassifier(threshold=0.75, k=16).fit(coef, y)
    assert clf.classes_.tolist() == ["a", "b", "c"]
    assert clf.component_labels_ == ["a", "a", None, None, None, None]
    assert clf.tuned_components_.tolist() == [0, 1]
    expected = torch.zeros(3, 6, dtype=torch.float64)
    expected[0, 0] = expected[0, 1] = 1
    assert torch.equal(clf.indicator_, expected)
    assert clf.fallback_class_ == "c" and clf.n_features_in_ == 6
    lower = TuningClassifier(threshold=0.6).fit(coef, y)  # 10/16 and 11/16 now count
    assert lower.component_labels_ == ["a", "a", "b", None, None, "c"]
    assert TuningClassifier(threshold=0.8).fit(coef, y).tuned_components_.tolist() == [0]  # 12/16 < 80%


def test_predict_exact_with_ties_and_unscored_examples():
    coef, y = _planted()
    clf = TuningClassifier(threshold=0.6).fit(coef, y)  # a: 0, 1; b: 2; c: 5
    new = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a
            [0.0, 0.0, 2.0, 9.0, 0.0, 0.0],  # b (component 3 is not tuned)
            [0.6, 0.6, 1.0, 0.0, 0.0, 1.1],  # a: 1.2 > 1.1 > 1.0
            [0.5, 0.0, 0.5, 0.0, 0.0, 0.5],  # a three-way tie -> the first class
            [0.0, 0.0, 0.3, 0.0, 0.0, 0.3],  # b/c tie -> b
            [0.0, 0.0, 0.0, 3.0, 1.0, 0.0],  # no tuned component: the training majority, c
        ],
        dtype=torch.float64,
    )
    assert clf.predict(new).tolist() == ["a", "b", "a", "a", "b", "c"]
    assert clf.n_unscored_ == 1 and clf.unscored(new).tolist() == [False] * 5 + [True]
    assert clf.class_scores(new)[2].tolist() == pytest.approx([1.2, 1.0, 1.1])
    assert clf.score(new, ["a", "b", "a", "c", "c", "c"]) == pytest.approx(4 / 6)


def test_predict_matches_brute_force():
    coef, y = _planted()
    clf = TuningClassifier(threshold=0.6).fit(coef, y)
    rng = np.random.default_rng(0)
    new = rng.exponential(size=(200, 6)) * (rng.random((200, 6)) < 0.4)  # numpy input, many zeros
    expected = []
    for row in new:
        scores = {cls: sum(row[j] for j, t in enumerate(clf.component_labels_) if t == cls) for cls in "abc"}
        best = max(scores.values())
        expected.append("c" if best == 0 else next(cls for cls in "abc" if scores[cls] == best))
    assert clf.predict(new).tolist() == expected
    assert clf.n_unscored_ == sum(all(row[j] == 0 for j in clf.tuned_components_.tolist()) for row in new)


def test_sklearn_conventions():
    from sklearn.base import clone

    from npeff_lens.errors import NotFittedError

    coef, y = _planted(labels=(0, 1, 2))
    clf = TuningClassifier(threshold=0.6, k=16)
    with pytest.raises(NotFittedError):
        clf.predict(coef)
    assert clf.fit(coef, np.array(y)) is clf
    pred = clf.predict(coef[:7])
    assert isinstance(pred, np.ndarray) and pred.shape == (7,) and pred.dtype.kind == "i"
    assert clf.classes_.tolist() == [0, 1, 2]
    assert clf.predict(coef[:0]).shape == (0,)
    twin = clone(clf)
    assert twin.get_params() == {"threshold": 0.6, "k": 16} and not hasattr(twin, "classes_")
    assert repr(twin) == "TuningClassifier(threshold=0.6, k=16)"
    strings = TuningClassifier(threshold=0.6).fit(coef, [str(v) for v in y]).predict(coef[:3])
    assert strings.tolist() == [str(v) for v in clf.predict(coef[:3])]
    torch_labels = TuningClassifier(threshold=0.6).fit(coef, torch.tensor(y)).predict(coef)
    assert torch_labels.tolist() == clf.predict(coef).tolist()


def test_classifier_errors():
    coef, y = _planted()
    with pytest.raises(ValueError, match="no component is tuned"):
        TuningClassifier(threshold=1.0, k=16).fit(coef[:, 1:], y)  # 0 was the only 16/16 one
    with pytest.raises(ValueError, match="no component is tuned"):
        TuningClassifier().fit(torch.zeros(60, 3), y)  # dead components are never tuned
    with pytest.raises(ValueError, match="labels"):
        TuningClassifier().fit(coef, y[:-1])
    with pytest.raises(ValueError, match="threshold"):
        TuningClassifier(threshold=0).fit(coef, y)
    with pytest.raises(ValueError, match="NaN"):
        TuningClassifier().fit(coef * float("nan"), y)
    clf = TuningClassifier().fit(coef, y)
    with pytest.raises(ValueError, match="fitted on 6"):
        clf.predict(coef[:, :5])
    with pytest.raises(ValueError, match="invalid parameter"):
        clf.set_params(alpha=1)


def test_agreement():
    assert agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert agreement(np.array(["x", "y"]), ["x", "y"]) == 1.0
    assert agreement(torch.tensor([1, 2, 3]), [3, 2, 1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same length"):
        agreement([0, 1], [0])
    with pytest.raises(ValueError, match="no predictions"):
        agreement([], [])


# --------------------------------------------------------------------------------------------------
# Prompts and best-of-N ICL on tiny-llama.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    texts = random_texts(70, seed=1, max_words=5, words=WORDS_AND_ARTICLES)
    labels = [int(("good" in t) or ("great" in t) or ("fun" in t)) for t in texts]
    return texts[:50], labels[:50], texts[50:], labels[50:]


def test_prompt_format(task):
    prefix = icl_prefix(task, ["fun film", "dull"], [1, 0])
    assert prefix == "Review: fun film Sentiment: sad\nReview: dull Sentiment: bad\n"
    assert icl_prompts(task, ["the movie"], ["fun film", "dull"], [1, 0], ["  no", "  yes"], separator="\n\n") == [
        "Review: fun film Sentiment:  yes\n\nReview: dull Sentiment:  no\n\nReview: the movie Sentiment:"
    ]
    with pytest.raises(ValueError, match="outcome indices"):
        icl_prefix(task, ["a"], [2])
    with pytest.raises(ValueError, match="integer labels"):
        icl_prefix(task, ["a"], ["sad"])


def test_zero_shot_predictions_match_the_label_token_logits(adapter, task, data):
    texts = data[2]
    logits = adapter.logits(task.prompts(texts))[:, task.token_ids]
    assert zero_shot_predictions(adapter, task, texts, batch_size=7).tolist() == logits.argmax(-1).tolist()


def test_best_of_n_icl_is_seeded_and_selects_the_best_prefix(adapter, task, data):
    train_texts, train_labels, eval_texts, eval_labels = data
    kw = {"shots": 2, "n_prompts": 4, "n_select": 12, "batch_size": 32}
    res = best_of_n_icl(adapter, task, train_texts, train_labels, None, eval_texts, eval_labels, seed=3, **kw)
    again = best_of_n_icl(adapter, task, train_texts, train_labels, None, eval_texts, eval_labels, seed=3, **kw)
    assert res.as_dict() == again.as_dict() and torch.equal(res.log_probs, again.log_probs)
    assert res.predictions.shape == (len(eval_texts),) and res.log_probs.shape == (len(eval_texts), 2)
    assert len(res.selection_accuracies) == 4 and len(res.selection) == 12 and len(res.demonstrations) == 2
    assert not set(res.demonstrations) & set(res.selection)
    assert res.best == int(np.argmax(res.selection_accuracies))
    # brute force: the chosen prefix's accuracy on the selection subset, and its predictions on the eval texts
    demos = ([train_texts[i] for i in res.demonstrations], [train_labels[i] for i in res.demonstrations])
    sel = icl_prompts(task, [train_texts[i] for i in res.selection], *demos)
    sel_acc = task_log_probs(adapter, task, sel).argmax(-1) == torch.tensor([train_labels[i] for i in res.selection])
    assert res.selection_accuracies[res.best] == pytest.approx(float(sel_acc.double().mean()))
    expected = task_log_probs(adapter, task, icl_prompts(task, eval_texts, *demos)).argmax(-1)
    assert res.predictions.tolist() == expected.tolist()
    assert res.accuracy == pytest.approx(float((expected == torch.tensor(eval_labels)).double().mean()))
    assert res.prefix == icl_prefix(task, *demos)
    other = best_of_n_icl(adapter, task, train_texts, train_labels, None, eval_texts, seed=4, **kw)
    assert other.selection != res.selection and other.accuracy is None
    with pytest.raises(ValueError, match="cannot hold"):
        best_of_n_icl(adapter, task, train_texts, train_labels, None, eval_texts, n_select=49, shots=2)


def test_icl_experiment_report(adapter, task, data):
    train_texts, train_labels, eval_texts, eval_labels = data
    train_coef = 0.1 * torch.rand(50, 6, generator=torch.Generator().manual_seed(1))
    train_coef[:, 0] += torch.tensor(train_labels)  # component 0 tuned to label 1
    train_coef[:, 1] += 1 - torch.tensor(train_labels)  # component 1 tuned to label 0
    eval_coef = torch.rand(20, 6, generator=torch.Generator().manual_seed(0))
    out = icl_experiment(
        adapter,
        task,
        train_texts,
        train_labels,
        train_coef,
        eval_texts,
        eval_labels,
        eval_coef,
        shots=2,
        n_prompts=3,
        n_select=10,
        seed=0,
        progress=False,
    )
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert set(out["accuracy"]) == {"classifier", "zero_shot", "icl"}
    pred = out["predictions"]
    assert all(len(p) == 20 for p in pred.values())
    for name in ("classifier", "zero_shot", "icl"):
        assert out["accuracy"][name] == pytest.approx(agreement(pred[name], eval_labels))
    assert out["agreement"]["classifier_icl"] == pytest.approx(agreement(pred["classifier"], pred["icl"]))
    assert out["agreement"]["zero_shot_icl"] == pytest.approx(agreement(pred["zero_shot"], pred["icl"]))
    assert out["icl"]["accuracy"] == out["accuracy"]["icl"]
    clf = TuningClassifier().fit(train_coef, train_labels)
    assert pred["classifier"] == clf.predict(eval_coef).tolist()
    assert out["classifier"]["n_tuned"] == len(out["classifier"]["tuned_components"]) >= 2
    assert pred["zero_shot"] == zero_shot_predictions(adapter, task, eval_texts).tolist()
    assert "tuning classifier" in format_table(out)
