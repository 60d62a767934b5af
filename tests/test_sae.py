"""The TopK-SAE baseline (§5.2, App. H): activations through every adapter backend, training with
sae-lens on a planted sparse dictionary, coefficients as per-example maxima, token sets, save/load."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("sae_lens")

from helpers import TEMPLATE, random_texts, saved_without  # noqa: E402

from npeff_lens.baselines.activations import Activations, activations  # noqa: E402
from npeff_lens.baselines.sae import SAE_LENS_INSTALL, TopKSAEBaseline, unit_normalise  # noqa: E402
from npeff_lens.errors import CorruptFileError, NotFittedError, SettingError  # noqa: E402
from npeff_lens.models import load_model  # noqa: E402

PROMPTS = [
    "Review: a great and moving film . Sentiment:",
    "Review: dull",
    "Question: what is the capital of France ? Answer:",
    "The genre of the film is comedy .",
    "yes no maybe good bad fun",
    "a wonderful , brilliant film",
    "terrible",
    "the country of Lisbon is Portugal",
]


def planted(n_dirs=64, d=32, n=8000, max_active=3, seed=0):
    """Tokens that are non-negative combinations of at most ``max_active`` of ``n_dirs`` unit directions."""
    g = torch.Generator().manual_seed(seed)
    dictionary = unit_normalise(torch.randn(n_dirs, d, generator=g))
    which = torch.stack([torch.randperm(n_dirs, generator=g)[:max_active] for _ in range(n)])
    n_active = torch.randint(1, max_active + 1, (n,), generator=g)
    weights = (torch.rand(n, max_active, generator=g) + 0.5) * (torch.arange(max_active)[None] < n_active[:, None])
    return dictionary, (weights[:, :, None] * dictionary[which]).sum(1)


PLANTED_KW = dict(seed=0, batch_size=512, n_epochs=8, lr=5e-3, show_progress=False)


@pytest.fixture(scope="module")
def planted_fit():
    dictionary, x = planted()
    g = torch.Generator().manual_seed(1)
    example_index = torch.arange(x.shape[0]) // 10  # 800 examples of 10 tokens
    token_ids = torch.randint(0, 20, (x.shape[0],), generator=g)
    # Scaled copies: the SAE sees unit-norm tokens whatever the activations' scale (App. H.1).
    scale = torch.rand(x.shape[0], 1, generator=g) * 5 + 0.1
    sae = TopKSAEBaseline(128, 3, **PLANTED_KW).fit_activations(x * scale, example_index, token_ids)
    return dictionary, x * scale, example_index, token_ids, sae


@pytest.fixture(scope="module")
def hidden_states(adapter):
    enc = adapter.tokenize(PROMPTS)
    with torch.no_grad():
        hs = adapter.module(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"].bool()
    return enc, mask, [h[mask] for h in hs]


# --- training ----------------------------------------------------------------------------------------------


def test_recovers_planted_dictionary(planted_fit):
    dictionary, _, _, _, sae = planted_fit
    decoder = sae.sae_.W_dec.detach()
    decoder = decoder / decoder.norm(dim=-1, keepdim=True)
    best = (dictionary @ decoder.T).max(1).values  # each true direction's best-matching latent
    assert best.mean() >= 0.9, best
    assert (best > 0.7).float().mean() >= 0.9
    # A random decoder of the same size is far from it (the bound above is not trivially met).
    rand = unit_normalise(torch.randn(128, 32, generator=torch.Generator().manual_seed(5)))
    assert (dictionary @ rand.T).max(1).values.mean() < 0.7


def test_fit_is_deterministic_for_a_seed():
    _, x = planted(n=2000)
    kw = dict(PLANTED_KW, n_epochs=1)
    a = TopKSAEBaseline(64, 3, **kw).fit_activations(x)
    b = TopKSAEBaseline(64, 3, **kw).fit_activations(x)
    c = TopKSAEBaseline(64, 3, **dict(kw, seed=1)).fit_activations(x)
    assert torch.equal(a.sae_.W_dec, b.sae_.W_dec) and torch.equal(a.coefficients_, b.coefficients_)
    assert not torch.equal(a.sae_.W_dec, c.sae_.W_dec)


def test_coefficients_are_per_example_max_of_encode(planted_fit):
    _, x, example_index, token_ids, sae = planted_fit
    with torch.no_grad():
        z = sae.sae_.encode(unit_normalise(x))
    assert (z >= 0).all() and ((z > 0).sum(-1) <= sae.k).all()
    m = int(example_index.max()) + 1
    brute = torch.stack([z[example_index == e].max(0).values for e in range(m)])
    assert sae.coefficients_.shape == (m, 128)
    torch.testing.assert_close(sae.coefficients_, brute, rtol=0, atol=1e-6)
    # Per-token access agrees with the same encode.
    torch.testing.assert_close(sae.token_activations(3), z[example_index == 3], rtol=0, atol=1e-6)
    latent = int(sae.coefficients_.sum(0).argmax())
    examples = sae.top_examples()[latent].tolist()
    sets = sae.active_token_sets(latent, examples)
    for e, got in zip(examples, sets):
        rows = example_index == e
        assert got == frozenset(token_ids[rows][z[rows, latent] > 0].tolist())
    assert sets[0]  # the latent's top example has it active somewhere
    # Dead latents: active (analysis.active) on fewer than k_top examples.
    from npeff_lens.analysis import active

    n_active = active(brute).sum(0)
    assert torch.equal(sae.alive_, n_active >= sae.k_top)
    assert set(sae.dead_latents_.tolist()) == set(torch.nonzero(n_active < sae.k_top).flatten().tolist())
    # Transforming the same activations again gives the same coefficients.
    torch.testing.assert_close(sae.transform_activations(x, example_index), sae.coefficients_, rtol=0, atol=1e-6)


def test_unsorted_example_index_is_grouped(planted_fit):
    _, x, example_index, _, sae = planted_fit
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(2))
    coef = sae.transform_activations(x[:400][perm], example_index[:400][perm])
    torch.testing.assert_close(coef, sae.coefficients_[:40], rtol=0, atol=1e-6)


def test_saved_layout_is_unchanged(planted_fit, tmp_path):
    """The saved folder is a format that existing runs hold: its file names, the codes file byte for byte (with
    the checksum of its tensors), the JSON's keys; it loads back exactly."""
    import json

    from safetensors.torch import save

    from npeff_lens.saving import checksum

    sae = planted_fit[-1]
    sae.save(tmp_path)
    names = ["cfg.json", "npeff_sae.json", "npeff_sae_codes.safetensors", "sae_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    keys = ("coefficients", "example_index", "token_ids", "positions", "code_latents", "code_values", "constant_prefix")
    tensors = {k: getattr(sae, f"{k}_").contiguous() for k in keys}
    codes = save(tensors, metadata={"crc32": str(checksum(tensors))})
    assert (tmp_path / "npeff_sae_codes.safetensors").read_bytes() == codes
    meta = json.loads((tmp_path / "npeff_sae.json").read_text())
    assert list(meta)[:2] == ["format", "format_version"]  # a JSON object's other keys may come in any order
    assert sorted(meta) == sorted(
        [
            "format",
            "format_version",
            "params",
            "normalisation",
            "pretrained",
            "model_name",
            "d_in",
            "n_tokens",
            "dead_latents",
            "fit_seconds",
            "timings",
        ]
    )
    assert (meta["format"], meta["format_version"], meta["normalisation"]) == (
        "npeff_lens.TopKSAEBaseline",
        1,
        "unit_l2_per_token",
    )
    back = TopKSAEBaseline.load(tmp_path)
    for k in keys:
        assert torch.equal(getattr(back, f"{k}_"), getattr(sae, f"{k}_")), k
    assert back.get_params() == sae.get_params() and torch.equal(back.dead_latents_, sae.dead_latents_)


# --- activations through the adapters ----------------------------------------------------------------------


def _check_against_hf(acts: Activations, enc, mask, expected):
    assert acts.acts.shape == expected.shape
    torch.testing.assert_close(acts.acts, expected, rtol=0, atol=1e-4)
    assert torch.equal(acts.token_ids, enc["input_ids"][mask])
    assert torch.equal(acts.example_index, torch.arange(len(PROMPTS))[:, None].expand_as(mask)[mask])
    assert torch.equal(acts.positions, torch.arange(mask.shape[1])[None].expand_as(mask)[mask])


@pytest.mark.parametrize("backend", ["hf", "nnsight"])
def test_activations_module_path(backend, adapter, hidden_states):
    enc, mask, hs = hidden_states
    model = adapter if backend == "hf" else load_model("tiny-llama", backend=backend)
    got = activations(model, PROMPTS, "model.layers.0", batch_size=3, show_progress=False)
    _check_against_hf(got, enc, mask, hs[1])
    assert got.n_examples == len(PROMPTS) and got.hook == "model.layers.0"


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_activations_transformer_lens_hook(backend, hidden_states):
    enc, mask, hs = hidden_states
    adapter = load_model("tiny-llama", backend=backend)
    got = activations(adapter, PROMPTS, "blocks.1.hook_resid_pre", batch_size=5, show_progress=False)
    _check_against_hf(got, enc, mask, hs[1])


def test_padding_excluded(adapter):
    short, long = "terrible", "Question: what is the capital of France ? Answer:"
    lengths = [len(adapter.tokenize([p])["input_ids"][0]) for p in (short, long)]
    assert lengths[0] < lengths[1]
    got = activations(adapter, [short, long], "model.layers.1.mlp.act_fn", show_progress=False)
    assert len(got) == sum(lengths) and got.d == 64
    assert torch.equal(torch.bincount(got.example_index), torch.tensor(lengths))
    alone = activations(adapter, [short], "model.layers.1.mlp.act_fn", show_progress=False)
    torch.testing.assert_close(got.acts[: lengths[0]], alone.acts, rtol=0, atol=1e-5)


def test_bad_hook_lists_close_names(adapter):
    with pytest.raises(ValueError, match=r"model\.layers\.0") as e:
        activations(adapter, PROMPTS, "model.layer.0", show_progress=False)
    assert "\n" not in str(e.value)
    hooked = load_model("tiny-llama", backend="hooked")
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_pre") as e:
        activations(hooked, PROMPTS, "blocks.1.hook_resid_pr", show_progress=False)
    assert "\n" not in str(e.value)


# --- fit through an adapter, save, load --------------------------------------------------------------------


def test_fit_save_load_round_trip(adapter, tmp_path):
    import sae_lens

    hook = "model.layers.0"
    sae = TopKSAEBaseline(48, 4, hook=hook, batch_size=64, n_epochs=3, k_top=2, show_progress=False)
    sae.fit(adapter, PROMPTS)
    n_tokens = int(adapter.tokenize(PROMPTS)["attention_mask"].sum())
    n_constant = len(PROMPTS) * sae.constant_prefix_.numel()  # the prompts' common prefix is not read
    assert sae.coefficients_.shape == (len(PROMPTS), 48) and sae.n_tokens_ == n_tokens - n_constant
    assert sae.fit_seconds_ > 0 and set(sae.timings_) >= {"activations", "train", "encode"}
    assert sae.sae_.cfg.metadata.hook_name == hook

    sae.save(tmp_path)
    opened = sae_lens.SAE.load_from_disk(tmp_path)
    x = unit_normalise(activations(adapter, PROMPTS, hook, show_progress=False).acts)
    with torch.no_grad():
        assert torch.equal(opened.encode(x), sae.sae_.encode(x))
    assert opened.cfg.metadata.hook_name == hook and opened.cfg.k == 4

    back = TopKSAEBaseline.load(tmp_path)
    assert back.get_params() == sae.get_params()
    for name in ("coefficients_", "example_index_", "token_ids_", "positions_", "code_latents_", "code_values_"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    for name, p in sae.sae_.state_dict().items():
        assert torch.equal(back.sae_.state_dict()[name], p), name
    assert torch.equal(back.dead_latents_, sae.dead_latents_)
    latent = int(sae.coefficients_.sum(0).argmax())
    assert back.active_token_sets(latent, range(len(PROMPTS))) == sae.active_token_sets(latent, range(len(PROMPTS)))
    torch.testing.assert_close(back.transform(adapter, PROMPTS), sae.coefficients_, rtol=0, atol=1e-6)


TEMPLATED = [TEMPLATE.format(text=t) for t in random_texts(24, seed=3, max_words=5)]


def test_constant_prefix_is_left_out_of_training_and_maxima(adapter, monkeypatch):
    """A causal model's activations on the tokens that every prompt starts with (the template's text before
    ``{text}``) are the same in every example: by default they are neither trained on nor any example's max, the
    prefix is recorded for new prompts, and reading them back adds one row, the same for every example."""
    import copy

    hook = "model.layers.0"
    ids = [adapter.tokenize([p])["input_ids"][0].tolist() for p in TEMPLATED]
    n = next(i for i in range(min(map(len, ids))) if len({s[i] for s in ids}) > 1)  # the common prefix, brute force
    assert n >= 2
    acts = activations(adapter, TEMPLATED, hook, show_progress=False)
    assert acts.causal is True
    trained = []
    original = TopKSAEBaseline._train
    monkeypatch.setattr(TopKSAEBaseline, "_train", lambda self, x: trained.append(x) or original(self, x))
    kw = dict(hook=hook, batch_size=32, n_epochs=2, k_top=2, show_progress=False)
    drop = TopKSAEBaseline(16, 2, **kw).fit_activations(acts)
    assert drop.constant_prefix_.tolist() == ids[0][:n]
    assert torch.equal(trained[0], acts.acts[acts.positions >= n])  # no training token inside the prefix
    assert int(drop.positions_.min()) == n and drop.n_tokens_ == len(acts) - n * len(TEMPLATED)
    z = drop.encode(acts.acts)
    for i in range(len(TEMPLATED)):  # each example's max comes from a token after the prefix
        s, t = drop.token_range(i)
        assert (drop.positions_[s:t] >= n).all()
        own = (acts.example_index == i) & (acts.positions >= n)
        torch.testing.assert_close(drop.coefficients_[i], z[own].amax(0), rtol=0, atol=1e-6)

    keep = TopKSAEBaseline(16, 2, constant_tokens="keep", **kw).fit_activations(acts)
    assert torch.equal(trained[1], acts.acts) and keep.constant_prefix_.numel() == 0
    assert int(keep.positions_.min()) == 0 and keep.n_tokens_ == len(acts)
    # The same SAE reading every token: each example's max is its own max or the prefix's, one row for all.
    prefix = z[acts.positions < n].reshape(len(TEMPLATED), n, -1)
    torch.testing.assert_close(prefix, prefix[:1].expand_as(prefix), rtol=0, atol=1e-5)
    every = copy.copy(drop)
    every.constant_prefix_ = torch.zeros(0, dtype=torch.long)
    expected = torch.maximum(drop.coefficients_, prefix[0].amax(0))
    torch.testing.assert_close(every.transform_activations(acts), expected, rtol=0, atol=1e-5)

    # New prompts lose the positions they share with the recorded prefix: one prompt alone, a prompt that
    # starts otherwise (nothing dropped), a prompt that is the prefix (its last token kept).
    torch.testing.assert_close(drop.transform(adapter, [TEMPLATED[5]])[0], drop.coefficients_[5], rtol=0, atol=1e-6)
    other, bare = "Question: dull film", adapter.tokenizer.decode(ids[0][:n])
    alone = activations(adapter, [other, bare], hook, show_progress=False)
    codes = drop.encode(alone.acts)
    expected = torch.stack([codes[alone.example_index == 0].amax(0), codes[-1]])
    torch.testing.assert_close(drop.transform(adapter, [other, bare]), expected, rtol=0, atol=1e-6)


def test_a_bidirectional_model_keeps_every_token():
    """In a bidirectional encoder a shared prefix's activations depend on the rest of the prompt: nothing is
    dropped there."""
    bert = load_model("tiny-bert-classifier")
    acts = activations(bert, TEMPLATED[:6], "bert.encoder.layer.0", show_progress=False)
    assert acts.causal is False
    sae = TopKSAEBaseline(8, 2, batch_size=32, k_top=1, show_progress=False).fit_activations(acts)
    assert sae.constant_prefix_.numel() == 0 and sae.n_tokens_ == len(acts)


def test_an_sae_saved_before_constant_tokens_loads_as_it_was(adapter, tmp_path):
    """A folder saved before the constant prefix was recorded (no ``constant_tokens`` parameter, no
    ``constant_prefix`` tensor) loads as what it was: an SAE that read every token."""
    sae = TopKSAEBaseline(
        8, 2, hook="model.layers.0", batch_size=32, k_top=1, constant_tokens="keep", show_progress=False
    ).fit(adapter, TEMPLATED[:8])
    sae.save(tmp_path)
    saved_without(
        tmp_path, "npeff_sae.json", "npeff_sae_codes.safetensors", param="constant_tokens", tensor="constant_prefix"
    )
    back = TopKSAEBaseline.load(tmp_path)
    assert back.constant_tokens == "keep" and back.constant_prefix_.numel() == 0
    assert torch.equal(back.coefficients_, sae.coefficients_)
    torch.testing.assert_close(back.transform(adapter, TEMPLATED[:8]), sae.coefficients_, rtol=0, atol=1e-6)


def test_a_users_sae_of_another_width_is_one_line(adapter, tmp_path):
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    d = activations(adapter, PROMPTS[:1], "mlp:0", show_progress=False).d
    cfg = sae_lens.TopKSAEConfig(d_in=d + 3, d_sae=8, k=2, metadata=SAEMetadata(hook_name="mlp:0"))
    sae_lens.TopKSAE(cfg).save_model(tmp_path)
    sae = TopKSAEBaseline.from_sae_lens(tmp_path, show_progress=False)
    with pytest.raises(
        ValueError, match=rf"width {d + 3}, but hook 'model.layers.0.mlp.down_proj:input' gives width {d}"
    ) as e:
        sae.fit(adapter, PROMPTS)
    assert "\n" not in str(e.value)


def test_a_damaged_saved_sae_is_a_corrupt_file_error(planted_fit, tmp_path):
    sae = planted_fit[-1]
    sae.save(tmp_path)
    path = tmp_path / "npeff_sae_codes.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"npeff_sae_codes\.safetensors is damaged"):
        TopKSAEBaseline.load(tmp_path)


def test_a_users_sae_without_a_hook_names_the_setting(tmp_path):
    import sae_lens

    sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=4, d_sae=8, k=2)).save_model(tmp_path)
    with pytest.raises(SettingError, match=r"records no hook name: pass hook=\.\.\.$") as e:
        TopKSAEBaseline.from_sae_lens(tmp_path, show_progress=False)
    assert e.value.fields == ("sae_hook",)
    assert e.value.render(lambda field: "--" + field.replace("_", "-")).endswith("pass --sae-hook")


@pytest.mark.parametrize(
    "backend, resolved",
    [
        ("hf", "model.layers.1.self_attn.o_proj:input"),
        ("hooked", "blocks.1.attn.hook_z"),
        ("bridge", "blocks.1.attn.hook_z"),
    ],
)
def test_attention_output_sae(backend, resolved, adapter, tmp_path):
    """An SAE at layer 1's attention output (heads concatenated, before the output projection): ``attn:1``
    resolves to ``hook_z`` (hooked/bridge) or the out-projection's input (hf); it trains, saves, loads, encodes
    the same activations on both backends, and its decoder rows steer at that hook."""
    from npeff_lens.selectivity import steered

    model = adapter if backend == "hf" else load_model("tiny-llama", backend=backend)
    sae = TopKSAEBaseline(24, 3, hook="attn:1", batch_size=32, n_epochs=3, k_top=1, show_progress=False)
    sae.fit(model, PROMPTS)
    assert sae.hook == resolved and sae.d_in_ == 32 and sae.get_params()["hook"] == resolved
    back = TopKSAEBaseline.load(sae.save(tmp_path / backend))
    assert back.hook == resolved and torch.equal(back.coefficients_, sae.coefficients_)
    reference = activations(adapter, PROMPTS, "model.layers.1.self_attn.o_proj:input", show_progress=False)
    torch.testing.assert_close(sae.transform_activations(reference), sae.coefficients_, rtol=1e-4, atol=1e-5)
    enc = model.tokenize(PROMPTS[:2])
    with torch.no_grad():
        before = model.forward_logits(enc["input_ids"], enc["attention_mask"])
        with steered(model, sae.hook, 5 * sae.sae_.W_dec[0].detach()):
            during = model.forward_logits(enc["input_ids"], enc["attention_mask"])
        after = model.forward_logits(enc["input_ids"], enc["attention_mask"])
    assert not torch.allclose(during, before) and torch.equal(after, before)


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_latents=0), "n_latents"),
        (dict(n_latents=-3), "n_latents"),
        (dict(n_latents=8, k=0), "k must"),
        (dict(n_latents=8, k=9), r"k \(9\) must not exceed n_latents \(8\)"),
        (dict(n_latents=8, k=2, batch_size=0), "batch_size"),
        (dict(n_latents=8, k=2, lr=0.0), "lr"),
    ],
)
def test_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        TopKSAEBaseline(**kwargs)
    assert "\n" not in str(e.value)


def test_no_tokens_and_bad_inputs():
    sae = TopKSAEBaseline(8, 2, show_progress=False)
    with pytest.raises(ValueError, match="no tokens") as e:
        sae.fit_activations(torch.zeros(0, 4))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="NaN"):
        sae.fit_activations(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="hook"):
        sae.fit(None, PROMPTS)
    with pytest.raises(NotFittedError, match="not fitted"):
        sae.token_activations(0)
    with pytest.raises(AttributeError, match="not fitted"):
        sae.summary()


def test_missing_sae_lens_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens now raises ImportError
    with pytest.raises(ImportError) as e:
        TopKSAEBaseline(8, 2, show_progress=False).fit_activations(torch.randn(10, 4))
    assert str(e.value) == SAE_LENS_INSTALL == "pip install 'sae-lens>=6.54,<7'"
