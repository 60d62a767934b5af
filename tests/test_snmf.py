"""SNMF of MLP activations (Shafran, Geiger and Geva, 2025): the semi-NMF solver recovers a planted factorisation,
coefficients are non-negative per-example maxima, activations equal a plain forward hook's on every backend, a
layer without an MLP is one clear line, save/load round-trips."""

from __future__ import annotations

import pytest
import torch
from helpers import saved_without

from npeff_lens.baselines.activations import Activations, activations, attention_output_hook, mlp_hidden_hook
from npeff_lens.baselines.snmf import SNMFBaseline, encode, semi_nmf, winner_take_all
from npeff_lens.errors import CorruptFileError, NotFittedError
from npeff_lens.models import load_model

PROMPTS = [
    "Review: a great and moving film . Sentiment:",
    "Review: dull",
    "The genre of the film is comedy .",
    "yes no maybe good bad fun",
    "terrible",
]


def planted(d=64, k=8, n=4000, keep=0.25, seed=0):
    """Tokens ``Y Zᵀ + noise``: mixed-sign features ``Z [d, k]`` on a quarter of the neurons each (the sparse
    neuron combinations SNMF looks for), non-negative coefficients with two features per token at most.

    Sparse features matter: semi-NMF alone is unique only up to ``F R``, ``G R⁻¹`` with ``R⁻¹ ≥ 0`` (any
    non-negative mixing keeps ``G ≥ 0``), so dense planted features are found only up to such a mixing; the
    winner-take-all sparsity of the features pins them down, as in the paper."""
    g = torch.Generator().manual_seed(seed)
    z = winner_take_all(torch.randn(d, k, generator=g), keep)
    z = z / z.norm(dim=0)
    mask = torch.zeros(n, k).scatter_(1, torch.stack([torch.randperm(k, generator=g)[:2] for _ in range(n)]), 1.0)
    y = (torch.rand(n, k, generator=g) + 0.2) * mask * (torch.rand(n, k, generator=g) < 0.7)
    return z, y, y @ z.T + 0.01 * torch.randn(n, d, generator=g)


def _matched(true: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Per true feature (columns of ``true [d, k]``), the |cosine| of its best match among ``found [k', d]`` rows."""
    f = found / found.norm(dim=1, keepdim=True)
    return (true.T @ f.T).max(1).values


def test_recovers_a_planted_factorisation_with_non_negative_coefficients():
    z, _, acts = planted()
    example_index = torch.arange(acts.shape[0]) // 10
    snmf = SNMFBaseline(8, sparsity=0.25, n_iter=150, show_progress=False).fit_activations(acts, example_index)
    best = _matched(z, snmf.features_)
    assert best.min() >= 0.9, best
    assert (snmf.features_.T.abs() > 0).sum(0).max() <= 16  # winner-take-all: 25% of 64 neurons per feature
    assert (snmf.token_coefficients_ >= 0).all()
    assert snmf.reconstruction_err_ < 0.1
    # acts ≈ token_coefficients_ @ features_ (unit rows; the coefficients carry the scale)
    torch.testing.assert_close(snmf.features_.norm(dim=1), torch.ones(8))
    err = (acts - snmf.token_coefficients_ @ snmf.features_).norm() / acts.norm()
    assert abs(float(err) - snmf.reconstruction_err_) < 1e-3
    # Per-example coefficient = max over the example's tokens
    brute = torch.stack([snmf.token_coefficients_[example_index == e].max(0).values for e in range(400)])
    torch.testing.assert_close(snmf.coefficients_, brute, rtol=0, atol=0)
    # A random dictionary of the same size is far from the planted one (the bound is not trivially met).
    rand = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    assert _matched(z, rand).min() < 0.9


def test_dense_semi_nmf_fits_and_keeps_coefficients_non_negative():
    _, _, acts = planted(n=1000)
    g, f, errors = semi_nmf(acts, 8, n_iter=60, seed=1)
    assert (g >= 0).all() and f.shape == (64, 8)
    assert errors[-1] <= errors[0] + 1e-6 and errors[-1] < 0.1  # the updates do not increase the error
    g2, f2, _ = semi_nmf(acts, 8, n_iter=60, seed=1)
    assert torch.equal(g, g2) and torch.equal(f, f2)  # a seed fixes the fit


def test_encode_and_a_token_subset_agree_with_the_full_fit():
    z, _, acts = planted(n=3000)
    full = SNMFBaseline(8, sparsity=0.25, n_iter=100, show_progress=False).fit_activations(acts)
    sub = SNMFBaseline(8, sparsity=0.25, n_iter=100, max_tokens=1500, show_progress=False).fit_activations(acts)
    assert _matched(z, sub.features_).min() >= 0.9 and (sub.token_coefficients_ >= 0).all()
    assert sub.token_coefficients_.shape == (3000, 8)
    # Encoding the fitted tokens with the features fixed gives back their coefficients.
    again = encode(acts[:500], full.features_, n_iter=200)
    rel = (again - full.token_coefficients_[:500]).norm() / full.token_coefficients_[:500].norm()
    assert rel < 0.05, rel
    assert (full.transform_activations(acts[:20]) >= 0).all()


def _with_a_constant_prefix(m=300, n_text=4):
    """``(activations, y)``: ``m`` examples of two prefix tokens (ids 1, 2: activations ``3 Σ z`` and ``2.7 Σ z``,
    above every text token on every planted feature, as a causal model gives a shared prefix) and ``n_text``
    planted text tokens; ``y [m * n_text, k]`` the text tokens' planted coefficients."""
    z, y, acts = planted(n=m * n_text)
    big = 3 * z.sum(1)
    x = torch.cat([torch.cat([torch.stack([big, 0.9 * big]), acts[n_text * i : n_text * (i + 1)]]) for i in range(m)])
    length = n_text + 2
    pos = torch.arange(length).repeat(m)
    text_ids = torch.randint(10, 50, (m * length,), generator=torch.Generator().manual_seed(0))
    data = Activations(
        x,
        torch.arange(m).repeat_interleave(length),
        torch.where(pos < 2, pos + 1, text_ids),
        pos,
        "planted",
        m,
        causal=True,
    )
    return z, y, data


def _best_cosine(truth: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Per column of ``truth [m, k]``, the cosine of the closest column of ``coefficients [m, k']``."""
    a, b = torch.nn.functional.normalize(truth.T, dim=1), torch.nn.functional.normalize(coefficients.T, dim=1)
    return (a @ b.T).max(1).values


def test_a_constant_prefix_that_wins_every_max_is_left_out():
    """Planted: two prefix tokens that every example shares and that load on every feature more than any text
    token. Read, they win every feature's max in every example (coefficients equal for all examples); left out
    (the default), the coefficients are the planted per-example maxima of the text tokens."""
    import copy

    z, y, data = _with_a_constant_prefix()
    truth = y.reshape(300, 4, -1).amax(1)
    kw = dict(sparsity=0.25, n_iter=100, n_init=1, show_progress=False)
    drop = SNMFBaseline(8, **kw).fit_activations(data)
    assert drop.constant_prefix_.tolist() == [1, 2] and int(drop.positions_.min()) == 2
    assert drop.token_coefficients_.shape[0] == 300 * 4
    assert _matched(z, drop.features_).min() >= 0.99
    assert _best_cosine(truth, drop.coefficients_).min() >= 0.99
    spread = lambda c: (c.max(0).values - c.min(0).values) / c.max(0).values.clamp_min(1e-12)  # noqa: E731
    assert spread(drop.coefficients_).min() > 0.5
    every = copy.copy(drop)  # the same features reading every token: the prefix is every example's max
    every.constant_prefix_ = torch.zeros(0, dtype=torch.long)
    assert spread(every.transform_activations(data)).max() < 1e-5
    keep = SNMFBaseline(8, constant_tokens="keep", **kw).fit_activations(data)
    assert keep.constant_prefix_.numel() == 0 and keep.token_coefficients_.shape[0] == 300 * 6
    assert (spread(keep.coefficients_) < 1e-5).sum() >= 4  # most features: one value for every example
    assert _best_cosine(truth, keep.coefficients_).max() < 0.9


def test_constant_prefix_edge_cases():
    """The common prefix and what is left of each prompt: a template "{text}" with a BOS, no BOS, a prompt that is
    the prefix (its last token kept), one prompt, new prompts against a recorded prefix, a bidirectional model."""
    from npeff_lens.baselines.activations import constant_prefix, without_constant_prefix

    def data(*prompts, causal=True):
        ids = torch.tensor([t for p in prompts for t in p])
        ex = torch.cat([torch.full((len(p),), i) for i, p in enumerate(prompts)])
        pos = torch.cat([torch.arange(len(p)) for p in prompts])
        return Activations(ids[:, None].float(), ex, ids, pos, "h", len(prompts), causal)

    def left(acts, prefix):
        out = without_constant_prefix(acts, torch.tensor(prefix, dtype=torch.long))
        return [out.token_ids[out.example_index == i].tolist() for i in range(acts.n_examples)]

    assert constant_prefix(data([1, 4, 5], [1, 7])).tolist() == [1]  # "{text}": only the BOS
    assert constant_prefix(data([4, 5], [7])).tolist() == []  # no BOS, nothing shared
    both = data([5, 6], [5, 6, 7], [5, 6, 8, 9])
    assert constant_prefix(both).tolist() == [5, 6]
    assert left(both, [5, 6]) == [[6], [7], [8, 9]]  # a prompt that is the prefix keeps its last token
    one = data([3, 1, 4])
    assert constant_prefix(one).tolist() == [3, 1, 4] and left(one, [3, 1, 4]) == [[4]]
    new = data([5, 6, 9], [5, 1], [2], [5, 6, 7, 8])
    assert left(new, [5, 6, 7]) == [[9], [1], [2], [8]]
    assert left(new, []) == [[5, 6, 9], [5, 1], [2], [5, 6, 7, 8]]
    assert constant_prefix(data([1, 4], [1, 7], causal=False)).tolist() == []  # bidirectional: not constant
    assert constant_prefix(data([1, 4], [1, 7], causal=None)).tolist() == []  # unknown model: every token kept


def test_an_snmf_saved_before_constant_tokens_loads_as_it_was(tmp_path):
    _, _, data = _with_a_constant_prefix(m=40)
    snmf = SNMFBaseline(4, n_iter=10, n_init=1, constant_tokens="keep", show_progress=False).fit_activations(data)
    snmf.save(tmp_path)
    saved_without(
        tmp_path, "npeff_snmf.json", "npeff_snmf.safetensors", param="constant_tokens", tensor="constant_prefix"
    )
    back = SNMFBaseline.load(tmp_path)
    assert back.constant_tokens == "keep" and back.constant_prefix_.numel() == 0
    assert torch.equal(back.coefficients_, snmf.coefficients_)
    every = encode(data.acts, back.features_, n_iter=back.encode_iter).reshape(40, 6, -1).amax(1)
    torch.testing.assert_close(back.transform_activations(data), every, rtol=0, atol=1e-5)  # every token read


@pytest.fixture(scope="module")
def hooked_adapter():
    return load_model("tiny-llama", backend="hooked")


def _plain_input_hook(adapter, module, prompts):
    """Per-token inputs of ``module`` (padding removed), read with a plain forward pre-hook."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        enc = adapter.tokenize(prompts)
        with torch.no_grad():
            adapter.forward_logits(enc["input_ids"], enc["attention_mask"])
    finally:
        handle.remove()
    return seen[0][enc["attention_mask"].bool()]


def test_mlp_activations_equal_a_plain_forward_hook_on_hf_and_hooked(adapter, hooked_adapter):
    hook = mlp_hidden_hook(adapter, 1)
    assert hook == "model.layers.1.mlp.down_proj:input"
    got = activations(adapter, PROMPTS, hook, show_progress=False)
    plain = _plain_input_hook(adapter, adapter.module.model.layers[1].mlp.down_proj, PROMPTS)
    torch.testing.assert_close(got.acts, plain, rtol=0, atol=0)
    assert got.acts.shape[1] == 64  # d_mlp of tiny-llama
    assert mlp_hidden_hook(hooked_adapter, 1) == "blocks.1.mlp.hook_post"
    tl = activations(hooked_adapter, PROMPTS, "mlp:1", show_progress=False)
    torch.testing.assert_close(tl.acts, got.acts, rtol=1e-4, atol=1e-5)  # the same weights, converted


def test_attention_output_hooks_read_the_same_activations(adapter, hooked_adapter):
    assert attention_output_hook(adapter, 0) == "model.layers.0.self_attn.o_proj:input"
    assert attention_output_hook(hooked_adapter, 0) == "blocks.0.attn.hook_z"
    hf = activations(adapter, PROMPTS, "attn:0", show_progress=False)
    tl = activations(hooked_adapter, PROMPTS, "attn:0", show_progress=False)  # hook_z [b, p, heads, d_head]
    assert hf.acts.shape == tl.acts.shape == (hf.acts.shape[0], 32)
    torch.testing.assert_close(tl.acts, hf.acts, rtol=1e-4, atol=1e-5)


def test_gpt2_and_bert_hooks(tmp_path):
    gpt2 = load_model("tiny-gpt2")
    assert mlp_hidden_hook(gpt2, 0) == "transformer.h.0.mlp.c_proj:input"
    assert attention_output_hook(gpt2, 1) == "transformer.h.1.attn.c_proj:input"
    assert activations(gpt2, PROMPTS[:2], "mlp:0", show_progress=False).acts.shape[1] == 128  # 4 * n_embd
    bert = load_model("tiny-bert-classifier")
    assert mlp_hidden_hook(bert, 1) == "bert.encoder.layer.1.output.dense:input"
    assert attention_output_hook(bert, 1) == "bert.encoder.layer.1.attention.output.dense:input"


def test_a_layer_without_an_mlp_is_one_line(adapter, hooked_adapter):
    broken = load_model("tiny-llama", backend="hf")
    del broken.module.model.layers[1].mlp
    with pytest.raises(ValueError, match=r"^layer 1 \(model.layers.1\) has no MLP") as e:
        SNMFBaseline(4, layer=1, show_progress=False).fit(broken, PROMPTS)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="layer 5 does not exist: the model has 2 layers"):
        mlp_hidden_hook(adapter, 5)
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        mlp_hidden_hook(hooked_adapter, 7)


def test_fit_on_a_tiny_model_save_and_load(adapter, tmp_path):
    snmf = SNMFBaseline(4, n_iter=20, k_top=2, show_progress=False).fit(adapter, PROMPTS)
    assert snmf.hook == "model.layers.1.mlp.down_proj:input" and snmf.layer == 1  # the middle layer
    assert snmf.coefficients_.shape == (5, 4) and (snmf.coefficients_ >= 0).all()
    snmf.save(tmp_path / "s")
    back = SNMFBaseline.load(tmp_path / "s")
    assert torch.equal(back.coefficients_, snmf.coefficients_) and torch.equal(back.features_, snmf.features_)
    assert back.hook == snmf.hook and back.get_params() == snmf.get_params()
    assert torch.equal(back.token_activations(0), snmf.token_activations(0))
    torch.testing.assert_close(back.transform(adapter, PROMPTS[:2]), snmf.coefficients_[:2], rtol=0.05, atol=1e-3)


def test_saved_layout_is_unchanged_and_a_foreign_folder_is_one_line(tmp_path):
    """The saved folder is a format that existing runs hold: its file names, the tensors file byte for byte (with
    the checksum of its tensors), the JSON's keys in order; it loads back exactly, and a folder of another format is
    refused in one line."""
    import json

    from safetensors.torch import save

    from npeff_lens.saving import checksum

    _, _, acts = planted(n=400)
    snmf = SNMFBaseline(4, n_iter=10, n_init=1, show_progress=False).fit_activations(acts, torch.arange(400) // 4)
    snmf.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["npeff_snmf.json", "npeff_snmf.safetensors"]
    keys = (
        "features",
        "coefficients",
        "token_coefficients",
        "example_index",
        "token_ids",
        "positions",
        "constant_prefix",
    )
    tensors = {k: getattr(snmf, f"{k}_").contiguous() for k in keys}
    expected = save(tensors, metadata={"crc32": str(checksum(tensors))})
    assert (tmp_path / "s" / "npeff_snmf.safetensors").read_bytes() == expected
    meta = json.loads((tmp_path / "s" / "npeff_snmf.json").read_text())
    assert list(meta) == [
        "format",
        "format_version",
        "params",
        "model_name",
        "d_in",
        "n_examples",
        "reconstruction_err",
        "errors",
        "fit_seconds",
        "timings",
    ]
    assert (meta["format"], meta["format_version"]) == ("npeff_lens.SNMFBaseline", 1)
    back = SNMFBaseline.load(tmp_path / "s")
    for k in keys:
        assert torch.equal(getattr(back, f"{k}_"), getattr(snmf, f"{k}_")), k
    assert back.errors_ == snmf.errors_ and torch.equal(back.dead_latents_, snmf.dead_latents_)

    (tmp_path / "s" / "npeff_snmf.json").write_text(json.dumps({**meta, "format": "npeff_lens.TopKSAEBaseline"}))
    with pytest.raises(ValueError, match="does not hold a saved npeff_lens.SNMFBaseline") as e:
        SNMFBaseline.load(tmp_path / "s")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="holds no npeff_snmf.json"):
        SNMFBaseline.load(tmp_path)


def test_a_damaged_saved_snmf_is_a_corrupt_file_error_and_an_unfitted_one_says_so(tmp_path):
    _, _, acts = planted(n=200)
    snmf = SNMFBaseline(4, n_iter=5, n_init=1, show_progress=False)
    with pytest.raises(NotFittedError, match="not fitted"):
        snmf.token_activations(0)
    snmf.fit_activations(acts, torch.arange(200) // 4).save(tmp_path)
    path = tmp_path / "npeff_snmf.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"npeff_snmf\.safetensors is damaged"):
        SNMFBaseline.load(tmp_path)


@pytest.mark.parametrize("bad", [dict(sparsity=0.0), dict(sparsity=1.5), dict(n_iter=0), dict(layer=-1)])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        SNMFBaseline(4, **bad)
