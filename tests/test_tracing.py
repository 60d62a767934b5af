"""Causal tracing (npeff_lens.tracing): a planted model whose one MLP carries the subject to the answer, the
consistency of the patching (everything restored gives the clean run back, no noise gives no effect), the same trace
through every backend, determinism, subject positions, errors, the geo-facts subjects and ``npeff trace``."""

import json
import shlex
import types

import pytest
import torch
from torch import nn

import npeff_lens as nl
from npeff_lens.cli import main
from npeff_lens.models import load_model, tiny_tokenizer
from npeff_lens.models.adapter import HFAdapter
from npeff_lens.tracing import (
    KINDS,
    POSITION_GROUPS,
    causal_trace,
    embedding_std,
    known_facts,
    restored_probability,
    subject_token_positions,
    trace_modules,
)

# The planted model: "film" (token 5) is the subject; the last token is 8.
PROMPT, SUBJECT, ANSWER = "Review: a great film . Sentiment:", "film", " positive"
SUBJECT_POSITION, LAST = 5, 8
MLP_LAYER, ATTN_LAYER = 1, 2
A, B, C = slice(0, 6), slice(6, 10), slice(10, 14)  # embeddings, MLP_LAYER's output, ATTN_LAYER's output


def planted_adapter():
    """A 4-layer Llama in which the subject reaches the answer by one path: the subject's embedding (dims A; every
    other token embeds to zero) -> MLP layer 1 at the subject token, writing dims B -> attention layer 2, whose keys
    and values read B only, moving it to the last token in dims C -> the unembedding, which reads C only. Every
    other MLP and attention block outputs zero and the norms are identities, so restoring any other block changes
    nothing, exactly. The noise also lands in B at the subject token; MLP 1 writes B at 1000x the scale the keys and
    values read it at, so restoring MLP 1 restores the run up to that direct path's share (below 1e-3 here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        (subject,) = tok(" " + SUBJECT, add_special_tokens=False)["input_ids"]
        model.model.embed_tokens.weight[subject, A] = torch.randn(6, generator=g)
        mlp = model.model.layers[MLP_LAYER].mlp
        mlp.gate_proj.weight.copy_(torch.randn(32, 16, generator=g))
        mlp.up_proj.weight.copy_(torch.randn(32, 16, generator=g))
        mlp.down_proj.weight[B] = torch.randn(4, 32, generator=g) * 1000
        attn = model.model.layers[ATTN_LAYER].self_attn
        attn.q_proj.weight.copy_(torch.randn(16, 16, generator=g))
        attn.k_proj.weight[:, B] = torch.randn(16, 4, generator=g) / 30000
        attn.v_proj.weight[:, B] = torch.randn(16, 4, generator=g) / 30000
        attn.o_proj.weight[C] = torch.randn(4, 16, generator=g)
    for layer in model.model.layers:
        layer.input_layernorm, layer.post_attention_layernorm = nn.Identity(), nn.Identity()
    model.model.norm = nn.Identity()
    adapter = nl.adapt(model, tok)
    (answer, *_) = adapter.continuation_token_ids(PROMPT, ANSWER)
    with torch.no_grad():  # the answer's logit is 8 along the clean output; the others small
        h = model(**adapter.tokenize([PROMPT]), output_hidden_states=True).hidden_states[-1][0, -1, C]
        model.lm_head.weight[:, C] = torch.randn(len(tok), 4, generator=g) / h.norm()
        model.lm_head.weight[answer, C] = 8 * h / h.square().sum()
    return adapter


@pytest.fixture(scope="module")
def planted():
    return planted_adapter()


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch, backend="hf"):
        if (arch, backend) not in cache:
            cache[arch, backend] = load_model(arch, backend=backend)
        return cache[arch, backend]

    return get


FACTS = (
    ["The country of Lisbon is", "The capital of France is", "Review: a great film . Sentiment:"],
    ["Lisbon", "France", "great film"],
    [" Portugal", " Paris", " positive"],
)


def test_the_planted_mlp_is_where_the_trace_puts_the_effect(planted):
    trace = causal_trace(planted, [PROMPT], [SUBJECT], [ANSWER], kinds=KINDS, n_samples=8)
    total = float(trace.total_effects[0])
    assert trace.subject_positions == [[SUBJECT_POSITION]]
    assert total > 0.2, "the corruption must take the answer away"
    effect = trace.indirect_effects[0]  # [kind, layer]
    hidden, mlp, attn = (KINDS.index(k) for k in ("hidden", "mlp", "attn"))
    assert float(effect[mlp, MLP_LAYER]) == pytest.approx(total, rel=1e-3)
    others = effect.clone()
    others[mlp, MLP_LAYER] = 0
    # the residual stream at the subject token carries it until attention layer 2 has read it
    assert float(effect[hidden, 0]) == pytest.approx(total, rel=1e-5)
    assert float(effect[hidden, 1]) == pytest.approx(total, rel=1e-5)
    others[hidden, :2] = 0
    assert others.abs().max() < 1e-6
    assert torch.equal(trace.average_indirect_effect(), effect)


def test_every_position_finds_the_attention_that_moves_it(planted):
    trace = causal_trace(planted, [PROMPT], [SUBJECT], [ANSWER], kinds=("mlp", "attn"), positions="all", n_samples=8)
    total = float(trace.total_effects[0])
    effect = trace.indirect_effects[0]  # [kind, layer, position]
    assert effect.shape == (2, 4, LAST + 1)
    assert float(effect[0, MLP_LAYER, SUBJECT_POSITION]) == pytest.approx(total, rel=1e-3)
    assert float(effect[1, ATTN_LAYER, LAST]) == pytest.approx(total, rel=1e-5)
    others = effect.clone()
    others[0, MLP_LAYER, SUBJECT_POSITION] = others[1, ATTN_LAYER, LAST] = 0
    assert others.abs().max() < 1e-6
    groups = trace.average_indirect_effect()  # [kind, layer, group]
    assert groups.shape == (2, 4, len(POSITION_GROUPS))
    last_subject, last_token = POSITION_GROUPS.index("last subject token"), POSITION_GROUPS.index("last token")
    assert float(groups[0, MLP_LAYER, last_subject]) == pytest.approx(total, rel=1e-3)
    assert float(groups[1, ATTN_LAYER, last_token]) == pytest.approx(total, rel=1e-5)
    assert torch.isnan(groups[:, :, POSITION_GROUPS.index("middle subject tokens")]).all()  # a one-token subject


def test_a_window_restores_the_layers_around_each_layer(planted):
    trace = causal_trace(planted, [PROMPT], [SUBJECT], [ANSWER], kinds=("mlp",), window=3, n_samples=4)
    total = float(trace.total_effects[0])
    # window 3 around layer l restores layers l-1..l+1: layers 0, 1 and 2 reach MLP layer 1, layer 3 does not
    assert trace.indirect_effects[0][0].tolist() == pytest.approx([total, total, total, 0.0], rel=1e-3, abs=1e-6)


def test_restored_probability_is_the_trace_of_one_restoration(planted):
    trace = causal_trace(planted, [PROMPT], [SUBJECT], [ANSWER], kinds=("mlp", "attn"), n_samples=6, batch_size=5)
    one = restored_probability(planted, PROMPT, SUBJECT, ANSWER, [("mlp", MLP_LAYER, [SUBJECT_POSITION])], n_samples=6)
    assert one["p_clean"] == pytest.approx(float(trace.p_clean[0]), rel=1e-6)
    assert one["p_corrupted"] == pytest.approx(float(trace.p_corrupted[0]), rel=1e-6)
    assert one["p_restored"] == pytest.approx(float(trace.p_restored[0][0, MLP_LAYER]), rel=1e-6)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_restoring_everything_gives_the_clean_run_and_no_noise_no_effect(models, arch):
    adapter = models(arch)
    n = trace_modules(adapter).n_layers
    prompt, subject, answer = (f[0] for f in FACTS)
    every_layer = [("hidden", layer, None) for layer in range(n)]
    every_block = [(k, layer, None) for k in ("mlp", "attn") for layer in range(n)]
    for restore in (every_layer, every_block, [("hidden", n - 1, None)]):
        r = restored_probability(adapter, prompt, subject, answer, restore, noise=10.0, n_samples=4)
        assert abs(r["p_corrupted"] - r["p_clean"]) > 1e-3 * r["p_clean"], "the noise must change the answer"
        assert r["p_restored"] == pytest.approx(r["p_clean"], rel=1e-5)
    trace = causal_trace(adapter, *FACTS, noise=0.0, kinds=KINDS, positions="all", n_samples=2, batch_size=7)
    assert torch.allclose(trace.p_corrupted, trace.p_clean, rtol=1e-5, atol=0)
    assert max(float(e.abs().max()) for e in trace.indirect_effects) <= 1e-5 * float(trace.p_clean.min())


def test_deterministic_under_the_seed_and_the_same_through_every_backend(models):
    def trace(backend="hf", **options):
        return causal_trace(models("tiny-llama", backend), *FACTS, kinds=KINDS, n_samples=3, **{"seed": 7, **options})

    hf, same, rebatched, other = trace(), trace(), trace(batch_size=5), trace(seed=8)
    assert torch.equal(same.p_corrupted, hf.p_corrupted)
    assert all(torch.equal(a, b) for a, b in zip(same.p_restored, hf.p_restored))
    assert torch.allclose(torch.stack(rebatched.p_restored), torch.stack(hf.p_restored), rtol=1e-5, atol=0)
    assert not torch.allclose(other.p_corrupted, hf.p_corrupted, rtol=1e-6, atol=0)
    # a fact's noise depends on (seed, its index) alone: tracing it alone, at the same scale, gives the same numbers
    first = causal_trace(
        models("tiny-llama"),
        [FACTS[0][0]],
        [FACTS[1][0]],
        [FACTS[2][0]],
        kinds=KINDS,
        n_samples=3,
        seed=7,
        embedding_std=hf.embedding_std,
    )
    assert torch.allclose(first.p_restored[0], hf.p_restored[0], rtol=1e-5, atol=0)
    for backend in ("nnsight", "hooked", "bridge"):
        through = trace(backend)
        assert through.embedding_std == pytest.approx(hf.embedding_std, rel=1e-6)
        torch.testing.assert_close(torch.stack(through.p_restored), torch.stack(hf.p_restored), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(through.p_corrupted, hf.p_corrupted, rtol=1e-4, atol=1e-9)


def test_subject_positions_come_from_the_offsets():
    tok = tiny_tokenizer()
    prompt = "The country of Lisbon is"  # 'The' 'Ġco' 'unt' 'ry' 'Ġof' 'ĠLis' 'bon' 'Ġis'
    assert subject_token_positions(tok, prompt, "Lisbon") == [5, 6]
    assert subject_token_positions(tok, prompt, "Lis") == [5]
    assert subject_token_positions(tok, prompt, "country") == [1, 2, 3]
    assert subject_token_positions(tok, prompt, "ry of Lis") == [3, 4, 5]

    class Slow:  # the same tokenizer without offsets: the slow tokenizers' path
        is_fast = False

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": tok(text, add_special_tokens=add_special_tokens)["input_ids"]}

    for subject in ("Lisbon", "Lis", "country", "The"):
        assert subject_token_positions(Slow(), prompt, subject) == subject_token_positions(tok, prompt, subject)
    assert subject_token_positions(tok, prompt, "Lisb") == [5, 6]
    with pytest.raises(ValueError, match="merges text across the subject"):
        subject_token_positions(Slow(), prompt, "Lisb")  # 'Lisb' ends inside the token 'bon'


def test_bad_facts_are_clear_errors(models):
    adapter = models("tiny-llama")
    with pytest.raises(ValueError, match=r"fact 1: the subject 'Berlin' is not in the prompt 'The capital of"):
        causal_trace(adapter, FACTS[0][:2], ["Lisbon", "Berlin"], FACTS[2][:2])
    with pytest.raises(ValueError, match="one subject and one answer per prompt"):
        causal_trace(adapter, FACTS[0], FACTS[1][:2], FACTS[2])
    with pytest.raises(ValueError, match="kinds must be distinct names among hidden, mlp, attn"):
        causal_trace(adapter, *FACTS, kinds=("mlp", "resid"))
    with pytest.raises(ValueError, match="positions must be"):
        causal_trace(adapter, *FACTS, positions="subject")
    with pytest.raises(ValueError, match="causal language model"):
        trace_modules(models("tiny-bert-classifier"))
    with pytest.raises(ValueError, match="its list of decoder layers was not found. Supported: HuggingFace causal LMs"):
        trace_modules(HFAdapter(_NoLayers(), tiny_tokenizer(), name="no-layers"))


class _NoLayers(nn.Module):
    """A causal LM in name only: an embedding and nothing a trace could restore."""

    config = types.SimpleNamespace(architectures=["NoLayersForCausalLM"])

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 2)

    def get_input_embeddings(self):
        return self.emb


def test_the_embedding_scale_and_known_facts(models):
    adapter = models("tiny-llama")
    emb = adapter.module.get_input_embeddings().weight.detach()
    ids = adapter.tokenize(["The country of Lisbon is"])["input_ids"][0]
    assert embedding_std(adapter, ["The country of Lisbon is"], ["Lisbon"]) == pytest.approx(
        float(emb[ids[5:7]].std()), rel=1e-6
    )
    top = adapter.logits([FACTS[0][0]])[0].argmax()
    answer = adapter.tokenizer.decode([int(top)])
    assert known_facts(adapter, [FACTS[0][0], FACTS[0][0]], [answer, " Portugal"]) == [
        adapter.continuation_token_ids(FACTS[0][0], answer)[0] == int(top),
        False,
    ]


def test_geo_facts_subjects_are_the_templates_subjects():
    from npeff_lens.assets import MissingAssetError
    from npeff_lens.data import GEO_RELATIONS

    try:
        ds = nl.load_dataset("geo-facts")
    except MissingAssetError as e:
        pytest.skip(f"geo-facts assets not installed: {e}")
    rows = ds.select(range(0, len(ds), 211))
    for text, subject, relation in zip(rows["text"], rows["subject"], rows["relation"]):
        assert text == GEO_RELATIONS[relation].format(subject)
    assert dict(zip(ds["text"], ds["subject"]))["Lyon is a city in the country of"] == "Lyon"


def test_trace_help_lists_every_flag_with_help(capsys):
    import dataclasses

    from npeff_lens.commands import TRACE_KINDS, TraceCommand

    assert TRACE_KINDS == KINDS
    with pytest.raises(SystemExit):
        main(["trace", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TraceCommand):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert f.metadata["help"] and " ".join(f.metadata["help"].split()).replace("%%", "%")[:40] in out, flag
    for flag in (
        "--model --dataset --n --split --data-seed --noise --samples --positions --seed --out --batch-size --device"
        " --no-progress"
    ).split():
        assert flag in out


def test_trace_command_writes_trace_json(tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    rows = [{"text": p, "subject": s, "target": a.strip()} for p, s, a in zip(*FACTS)]
    facts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "trace"
    argv = shlex.split("trace --model tiny-gpt2 --split none --n 2 --samples 3 --kinds mlp attn")
    argv += ["--dataset", str(facts), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer" in printed and "mlp" in printed and "attn" in printed and "trace.json" in printed
    result = json.loads((out / "trace.json").read_text())
    assert result["n_facts"] == 2 and result["n_layers"] == 2 and result["kinds"] == ["mlp", "attn"]
    fact = result["facts"][1]
    assert fact["subject"] == "France" and fact["answer"] == " Paris" and fact["subject_positions"] == [4, 5, 6]
    effects = [[r["indirect_effect"][k] for r in result["facts"]] for k in ("mlp", "attn")]
    for k, per_fact in zip(("mlp", "attn"), effects):  # the average is the mean of the facts' effects
        mean = [sum(v) / 2 for v in zip(*per_fact)]
        assert result["average_indirect_effect"][k] == pytest.approx(mean, rel=1e-9, abs=1e-15)
    assert main([*argv[:-3], "--noise", "-1", "--out", str(out)]) == 2
    assert "--noise" in capsys.readouterr().err
    rows[0]["subject"] = "Madrid"
    facts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(argv) == 2
    assert "fact 0: the subject 'Madrid' is not in the prompt" in capsys.readouterr().err
