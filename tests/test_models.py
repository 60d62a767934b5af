"""The adapter contract on tiny random models: every backend gives the same logits and the same
parameter gradients for the same weights."""

import pytest
import torch
from helpers import model_cache

import npeff_lens as nl
from npeff_lens.layout import parameter_layout
from npeff_lens.models import ModelNotFoundError, last_token_positions

PROMPTS = ["Review: a great and moving film . Sentiment:", "Review: bad", "yes no maybe good"]
BACKENDS = ["hf", "bridge", "hooked", "nnsight"]

adapter = model_cache(quiet=False)  # adapter(arch, backend), loaded once


def label_logprob_sum(a):
    """A scalar whose gradient touches every parameter: log p of two label tokens, summed."""
    lp = a.logits(PROMPTS).log_softmax(-1)
    return lp[:, 5].sum() + lp[:, 17].sum()


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_same_logits_every_backend(arch, backend):
    ref = adapter(arch, "hf").logits(PROMPTS)
    out = adapter(arch, backend).logits(PROMPTS)
    assert out.shape == ref.shape == (len(PROMPTS), 384)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_padding_does_not_change_prediction_logits(arch):
    a = adapter(arch, "hf")
    batched = a.logits(PROMPTS)
    single = torch.cat([a.logits([p]) for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    # left padding: the last real token is found and positions are not shifted
    a.tokenizer.padding_side = "left"
    enc = a.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][:, 0] == 0).any()
    left = a.prediction_logits(dict(enc))
    torch.testing.assert_close(left, single, atol=1e-4, rtol=0)


def test_last_token_positions():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_positions(mask).tolist() == [2, 3, 3]
    with pytest.raises(ValueError, match="no tokens"):
        last_token_positions(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_same_gradients_hf_bridge_nnsight(arch, backend):
    ref, other = adapter(arch, "hf"), adapter(arch, backend)
    ref_params = dict(ref.named_parameters())
    other_params = dict(other.named_parameters())
    common = sorted(set(ref_params) & set(other_params))
    if backend == "nnsight" or arch == "tiny-llama":
        assert set(ref_params) == set(other_params)  # same names: the underlying model's
    else:  # the bridge splits GPT-2's fused qkv; the MLP and output projections keep HF names
        assert len(common) >= 8
    g_ref = torch.autograd.grad(label_logprob_sum(ref), [ref_params[n] for n in common])
    g_other = torch.autograd.grad(label_logprob_sum(other), [other_params[n] for n in common])
    for name, a, b in zip(common, g_ref, g_other):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


# HookedTransformer stores weights transposed and split per head; the MLP maps are simple.
HOOKED_MAP = {
    "tiny-llama": [
        ("blocks.{i}.mlp.W_in", "model.layers.{i}.mlp.up_proj.weight", True),
        ("blocks.{i}.mlp.W_gate", "model.layers.{i}.mlp.gate_proj.weight", True),
        ("blocks.{i}.mlp.W_out", "model.layers.{i}.mlp.down_proj.weight", True),
    ],
    "tiny-gpt2": [
        ("blocks.{i}.mlp.W_in", "transformer.h.{i}.mlp.c_fc.weight", False),
        ("blocks.{i}.mlp.W_out", "transformer.h.{i}.mlp.c_proj.weight", False),
        ("blocks.{i}.mlp.b_in", "transformer.h.{i}.mlp.c_fc.bias", False),
    ],
}


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_same_gradients_hooked(arch):
    ref, hooked = adapter(arch, "hf"), adapter(arch, "hooked")
    rp, hp = dict(ref.named_parameters()), dict(hooked.named_parameters())
    pairs = [(t.format(i=i), h.format(i=i), tr) for i in range(2) for t, h, tr in HOOKED_MAP[arch]]
    g_ref = torch.autograd.grad(label_logprob_sum(ref), [rp[h] for _, h, _ in pairs])
    g_hk = torch.autograd.grad(label_logprob_sum(hooked), [hp[t] for t, _, _ in pairs])
    for (t, _h, transpose), a, b in zip(pairs, g_ref, g_hk):
        torch.testing.assert_close(b.T if transpose else b, a, atol=1e-5, rtol=1e-4, msg=t)
    # the selection holds the same number of parameters as the HF model (TL's extra zero biases
    # and its untied W_U are not the model's parameters)
    assert sum(p.numel() for _, p in hooked.named_parameters()) == sum(p.numel() for _, p in ref.named_parameters())


def test_default_selection_and_patterns():
    a = adapter("tiny-llama", "hf")
    names = [n for n, _ in a.named_parameters()]
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    assert names == sorted(names, key=[n for n, _ in a.module.named_parameters()].index)  # fixed order
    mlp = a.named_parameters(include="model.layers.*.mlp.*")
    assert [n for n, _ in mlp] == [n for n in names if ".mlp." in n]
    no_l0 = a.named_parameters(exclude=["model.layers.0.*"])
    assert all(not n.startswith("model.layers.0.") for n, _ in no_l0) and len(no_l0) == len(names) // 2
    emb = a.named_parameters(include=["model.embed_tokens.weight"])
    assert emb[0][1] is a.module.lm_head.weight  # the tied unembedding is the embedding
    with pytest.raises(ValueError, match="no parameters selected"):
        a.named_parameters(include="nothing.*")
    layout = parameter_layout(a.named_parameters())
    assert layout[0]["offset"] == 0 and all(
        l1["offset"] == l0["offset"] + l0["numel"] for l0, l1 in zip(layout, layout[1:])
    )


def test_classifier_and_adapt():
    from transformers import AutoModelForSequenceClassification  # noqa: F401

    model, tok = nl.models.tiny_model("tiny-bert-classifier")
    a = nl.adapt(model, tok)
    assert a.is_classifier and a.logits(PROMPTS).shape == (3, 3)
    # a classifier's logits do not depend on batching
    torch.testing.assert_close(a.logits(PROMPTS), torch.cat([a.logits([p]) for p in PROMPTS]), atol=1e-4, rtol=0)
    assert type(nl.adapt(adapter("tiny-llama", "bridge").model)).__name__ == "BridgeAdapter"
    assert (
        type(nl.adapt(adapter("tiny-llama", "nnsight").model, adapter("tiny-llama", "hf").tokenizer)).__name__
        == "NNsightAdapter"
    )
    assert type(nl.adapt(adapter("tiny-gpt2", "hooked").model)).__name__ == "HookedAdapter"
    with pytest.raises(ValueError, match="tokenizer"):
        nl.adapt(model)
    with pytest.raises(TypeError, match="cannot adapt"):
        nl.adapt(object())


def test_model_errors():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        nl.load_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        nl.load_model("some-org/some-model-that-is-not-cached")
    with pytest.raises(ValueError, match="backend"):
        nl.load_model("tiny-llama", backend="jax")
    with pytest.raises(NotImplementedError, match="bridge"):
        nl.load_model("tiny-bert-classifier", backend="hooked")
