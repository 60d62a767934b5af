"""Real offline weights (SmolLM2-135M). Cheap enough to run in CI; they can fail."""

import pytest
import torch

import npeff_lens as nl
from npeff_lens.zero_shot import held_out_accuracy

pytestmark = pytest.mark.real_model
TEMPLATE, LABELS = "Review: {text}\nSentiment:", [" negative", " positive"]


@pytest.fixture(scope="module")
def smollm2():
    return nl.load_model("smollm2-135m")


def test_smollm2_zero_shot_accuracy(smollm2):
    # Rule: threshold = median logit gap over 100 *training* reviews; accuracy on 200 held-out ones.
    result = held_out_accuracy(smollm2, n=300, n_calibration=100)
    assert result["n_test"] == 200 and result["accuracy"] >= 0.70


def test_smollm2_bridge_matches_hf(smollm2):
    prompts = [TEMPLATE.format(text=t) for t in ["a gorgeous film", "dull and lifeless"]]
    bridge = nl.load_model("smollm2-135m", backend="bridge")
    ref = smollm2.logits(prompts).log_softmax(-1)
    torch.testing.assert_close(bridge.logits(prompts).log_softmax(-1), ref, atol=1e-3, rtol=0)
    assert [n for n, _ in bridge.named_parameters()] == [n for n, _ in smollm2.named_parameters()]
