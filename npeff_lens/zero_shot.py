"""Zero-shot label-token classification: the sanity check that a model and a task agree before
any Fisher is computed (``npeff demo --smoke`` and the real-model tests use it)."""

from __future__ import annotations

import torch


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
