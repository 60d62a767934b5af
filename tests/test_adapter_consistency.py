"""One model, one answer: the same weights give the same prediction probabilities and the same
default parameter selection through every adapter, however the model object was built; loading
through TransformerLens leaves no temporary directories behind."""

import tempfile
from pathlib import Path

import pytest
import torch

import npeff_lens as nl
from npeff_lens.models import tiny_model

PROMPTS = ["Review: a great and moving film . Sentiment:", "Review: bad", "yes no maybe good"]

# HookedTransformer names of a llama block's default parameters and the HF names they stand for.
LLAMA_NAMES = {
    "attn.W_Q": "self_attn.q_proj.weight",
    "attn._W_K": "self_attn.k_proj.weight",
    "attn._W_V": "self_attn.v_proj.weight",
    "attn.W_O": "self_attn.o_proj.weight",
    "mlp.W_in": "mlp.up_proj.weight",
    "mlp.W_gate": "mlp.gate_proj.weight",
    "mlp.W_out": "mlp.down_proj.weight",
}


def hooked_from_hf(hf_model, tokenizer, fold=False):
    """A HookedTransformer built the way a user builds one from a local HF model with TransformerLens's
    own API (config from the saved HF config, weights through its converter)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained import weight_conversions

    with tempfile.TemporaryDirectory() as d:
        hf_model.config.save_pretrained(d)
        cfg_dict = convert_hf_model_config(d)
    fields = HookedTransformerConfig.__dataclass_fields__
    cfg = HookedTransformerConfig(**{k: v for k, v in cfg_dict.items() if k in fields}, device="cpu")
    ht = HookedTransformer(cfg, tokenizer=tokenizer)
    convert = {"llama": weight_conversions.convert_llama_weights, "gpt2": weight_conversions.convert_gpt2_weights}
    ht.load_and_process_state_dict(
        convert[hf_model.config.model_type](hf_model, cfg),
        fold_ln=fold,
        center_writing_weights=fold,
        center_unembed=fold,
        fold_value_biases=fold,
    )
    return ht.eval()


def probs(adapter):
    return adapter.logits(PROMPTS).softmax(-1)


def n_selected(adapter):
    return sum(p.numel() for _, p in adapter.named_parameters())


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_user_built_hooked_transformer_matches_hf(arch):
    hf_model, tok = tiny_model(arch)
    ref = nl.adapt(hf_model, tok)
    hooked = nl.adapt(hooked_from_hf(hf_model, tok))
    # the tokens the HF tokenizer gives: no start token prepended
    assert hooked.tokenize(PROMPTS)["input_ids"].tolist() == ref.tokenize(PROMPTS)["input_ids"].tolist()
    torch.testing.assert_close(probs(hooked), probs(ref), atol=1e-6, rtol=0)
    # no untied copy of the tied unembedding, none of TransformerLens's zero biases
    assert n_selected(hooked) == n_selected(ref)
    names = [n for n, _ in hooked.named_parameters()]
    assert not any(n.startswith(("unembed.", "embed.")) for n in names)


def test_user_built_hooked_llama_selects_the_hf_parameters():
    hf_model, tok = tiny_model("tiny-llama")
    ref, hooked = nl.adapt(hf_model, tok), nl.adapt(hooked_from_hf(hf_model, tok))
    mapped = {}
    for name, p in hooked.named_parameters():
        _, i, rest = name.split(".", 2)
        mapped[f"model.layers.{i}.{LLAMA_NAMES[rest]}"] = p.numel()
    assert mapped == {n: p.numel() for n, p in ref.named_parameters()}


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_adapting_a_loaded_transformer_lens_model_gives_the_same_answer(backend):
    loaded = nl.load_model("tiny-llama", backend=backend)
    again = nl.adapt(loaded.model)  # the TransformerLens object alone, its tokenizer TransformerLens's
    assert again.tokenize(PROMPTS)["input_ids"].tolist() == loaded.tokenize(PROMPTS)["input_ids"].tolist()
    torch.testing.assert_close(probs(again), probs(loaded), atol=1e-6, rtol=0)
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in loaded.named_parameters()]


def test_transformer_lens_tokenizer_when_passed_explicitly():
    hf_model, tok = tiny_model("tiny-llama")
    ht = hooked_from_hf(hf_model, tok)
    with_bos = nl.adapt(ht, ht.tokenizer)
    assert with_bos.tokenize(PROMPTS)["input_ids"][0, 0].item() == tok.bos_token_id
    assert nl.adapt(ht).tokenize(PROMPTS)["input_ids"][0, 0].item() != tok.bos_token_id


def test_folded_hooked_transformer_is_stated_and_keeps_probabilities():
    hf_model, tok = tiny_model("tiny-llama")
    ht = hooked_from_hf(hf_model, tok, fold=True)
    with pytest.warns(RuntimeWarning, match="folded"):
        hooked = nl.adapt(ht)
    torch.testing.assert_close(probs(hooked), probs(nl.adapt(hf_model, tok)), atol=1e-6, rtol=0)
    # the folded unembedding is still recognised as the tied embedding's copy
    assert not any(n.startswith("unembed.W_U") for n, _ in hooked.named_parameters())


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_transformer_lens_loads_leave_no_temporary_directories(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    loaded = nl.load_model("tiny-llama", backend=backend)
    assert loaded.logits(PROMPTS).shape == (len(PROMPTS), 384)  # usable once its directory is gone
    assert nl.adapt(loaded.model).logits(PROMPTS).shape == (len(PROMPTS), 384)
    assert sorted(p.name for p in Path(tmp_path).glob("npeff_tl_*")) == []


@pytest.mark.real_model
def test_smollm2_adapted_hooked_transformer_matches_hf():
    template, labels = "Review: {text}\nSentiment:", [" negative", " positive"]
    prompts = [template.format(text=t) for t in ["a gorgeous film", "dull and lifeless"]]
    hf = nl.load_model("smollm2-135m")
    hooked = nl.load_model("smollm2-135m", backend="hooked")
    label_ids = [hf.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in labels]

    def p_positive(a):
        return a.logits(prompts)[:, label_ids].softmax(-1)[:, 1]

    ref = p_positive(hf)
    for adapter in (hooked, nl.adapt(hooked.model)):
        torch.testing.assert_close(p_positive(adapter), ref, atol=1e-4, rtol=0)
        assert n_selected(adapter) == n_selected(hf)  # 106.2 M: no untied W_U, no zero biases


def test_tokenizer_that_cannot_be_reloaded_is_stated(tmp_path):
    from transformers import AutoTokenizer

    hf_model, tok = tiny_model("tiny-llama")
    tok.save_pretrained(tmp_path / "tok")
    ht = hooked_from_hf(hf_model, AutoTokenizer.from_pretrained(tmp_path / "tok"))
    for f in (tmp_path / "tok").iterdir():
        f.unlink()
    (tmp_path / "tok").rmdir()
    with pytest.warns(RuntimeWarning, match="BOS"):
        hooked = nl.adapt(ht)
    assert hooked.tokenize(PROMPTS)["input_ids"][0, 0].item() == tok.bos_token_id  # TransformerLens's tokens
