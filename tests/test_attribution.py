"""Exact token attributions (npeff_lens.attribution): per-token shares plus the labelled remainder reproduce
an example's loading Σ_rows ((G_row A)·h)² computed from the row *stored* in the PEF store, on every backend,
projected and unprojected, with SVD rank reduction; and for a single linear layer each token's term equals a
brute-force per-token gradient (the weight duplicated per position) dotted with the back-projection A h."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import model_cache

from npeff_lens.attribution import TokenAttributor, attribute_tokens, stored_loadings
from npeff_lens.collect import collect_pefs
from npeff_lens.pef import PEFComputer
from npeff_lens.projection import SparseProjection
from npeff_lens.tasks import LabelTokens

pytestmark = pytest.mark.filterwarnings("ignore:label .* tokens after the prompt")

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = [" sad", " bad", " awful"]  # one token each in the tiny tokenizer
TEXTS = ["a great film .", "bad", "yes no maybe good fun", "the movie is awful and sad", "fun fun", "dull"]


model = model_cache()  # model(arch, backend="hf"), loaded once


def _store(adapter, path, **kw):
    kw = {"proj_dim": None, "dtype": "float32", "progress": False, "batch_size": 4, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect_pefs(adapter, TEXTS, LabelTokens(TEMPLATE, LABELS), path, **kw)


def _directions(G: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Unit PEF-space vectors: the summed stored rows of examples 0, 2, 3, and a random one."""
    gen = torch.Generator().manual_seed(seed)
    H = torch.stack([G[0].sum(0), G[2].sum(0), G[3].sum(0), torch.randn(G.shape[2], generator=gen, dtype=G.dtype)])
    return H / H.norm(dim=1, keepdim=True)


CASES = [  # (arch, backend, collect options)
    ("tiny-llama", "hf", {"params": ["model.layers.*", "model.norm.weight"], "proj_dim": 256}),
    ("tiny-llama", "hf", {"params": ["model.layers.*"]}),  # unprojected: A = I
    ("tiny-llama", "hf", {"proj_dim": 128, "rank": 2}),  # SVD rank reduction below r = 3
    ("tiny-gpt2", "hf", {"params": ["transformer.h.*", "transformer.wpe.weight"], "proj_dim": 256}),
    ("tiny-llama", "bridge", {"proj_dim": 256}),
    ("tiny-llama", "hooked", {"proj_dim": 256}),  # einsum weights: all in the remainder
    ("tiny-llama", "hooked", {}),
    # the Kronecker projection: the back-projection A h is its adjoint, the same identity holds
    ("tiny-llama", "hf", {"params": ["model.layers.*", "model.norm.weight"], "proj_dim": 256, "projection": "kron"}),
    ("tiny-gpt2", "hf", {"params": ["transformer.*"], "proj_dim": 256, "projection": "kron", "kron_k": 4}),
]


@pytest.mark.parametrize(
    "arch,backend,options", CASES, ids=[f"{a}-{b}-{'-'.join(map(str, o.values()))}"[:80] for a, b, o in CASES]
)
def test_shares_sum_to_the_stored_loading(arch, backend, options, tmp_path):
    adapter = model(arch, backend)
    store = _store(adapter, tmp_path / "s", **options)
    G = store.load_pefs()
    H = _directions(G)
    attributor = TokenAttributor.from_manifest(store.manifest, H, adapter=adapter)
    pairs = [(k, i) for k in range(len(H)) for i in range(len(TEXTS))]
    got = attributor.attribute_pairs(pairs, [TEXTS[i] for _, i in pairs], batch_size=4)
    hooked_share = 0.0
    for (k, i), a in zip(pairs, got):
        assert (a.component, a.example) == (k, i)
        want = float(stored_loadings(G[i : i + 1], H[k])[0])
        total = float(a.shares.sum()) + sum(a.remainder.values())
        assert total == pytest.approx(want, rel=1e-4, abs=1e-9 * float(G[i].square().sum())), (k, i, a.remainder)
        assert a.loading == pytest.approx(want, rel=1e-4, abs=1e-9 * float(G[i].square().sum()))
        assert (
            len(a.tokens)
            == len(a.token_ids)
            == a.shares.numel()
            == len(adapter.tokenize([TEMPLATE.replace("{text}", TEXTS[i])])["input_ids"][0])
        )
        assert torch.allclose(a.log_probs.exp().sum(), torch.tensor(1.0), atol=1e-5)
        hooked_share += float(a.shares.abs().sum())
    if backend == "hooked":  # HookedTransformer's weights are einsum parameters: nothing hooked
        assert hooked_share == 0.0
    else:
        assert hooked_share > 0.0
    if "norm.weight" in str(options.get("params")):  # norm weights are hooked: attributed to tokens, no remainder
        assert all(a.remainder["fallback"] == 0 for a in got)


@pytest.mark.parametrize(
    "arch,weight", [("tiny-llama", "model.layers.1.mlp.down_proj"), ("tiny-gpt2", "transformer.h.1.mlp.c_fc")]
)
@pytest.mark.parametrize("proj_dim", [None, 64])
def test_single_layer_equals_brute_force_per_token_gradients(arch, weight, proj_dim):
    adapter = model(arch)
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    module = adapter.module.get_submodule(weight)
    named = [(weight + ".weight", module.weight)]
    n = module.weight.numel()
    projection = SparseProjection(n, proj_dim, seed=3, density=8) if proj_dim else None
    computer = PEFComputer(adapter, task, named, projection)
    h = torch.randn(2, proj_dim or n, generator=torch.Generator().manual_seed(1))
    prompt = task.format(TEXTS[3])
    got = computer.token_contributions([prompt], h)
    assert got["fallback"].abs().max() == 0 and got["untokenised"].abs().max() == 0

    # brute force: one copy of the weight per position, so that autograd gives each token's gradient
    batch = adapter.tokenize([prompt])
    T = batch["input_ids"].shape[1]
    copies = [module.weight.detach().clone().requires_grad_(True) for _ in range(T)]
    linear = isinstance(module, torch.nn.Linear)

    def per_position(x):
        ys = [x[:, t] @ (copies[t].T if linear else copies[t]) for t in range(x.shape[1])]
        y = torch.stack(ys, 1)
        return y if module.bias is None else y + module.bias

    back = h if projection is None else projection.adjoint(h)  # A h, "k n"
    module.forward = per_position
    try:
        with torch.enable_grad():
            rows = task.pef_rows(task.log_probs(adapter, batch))[0]
            for j in range(rows.shape[0]):
                grads = torch.autograd.grad(rows[j], copies, retain_graph=True)
                want = torch.stack([back @ g.reshape(-1) for g in grads], 1)  # "k t"
                torch.testing.assert_close(got["tokens"][0, :, j], want, rtol=1e-4, atol=1e-6 * want.abs().max())
    finally:
        del module.forward
    # and the per-token terms sum to the projected per-example gradient's row · h
    G, _ = computer.compute([prompt])
    torch.testing.assert_close(got["tokens"][0].sum(-1), h @ G[0].T, rtol=1e-4, atol=1e-6)


def test_assign_splits_each_example_along_its_own_direction():
    adapter = model("tiny-llama")
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    named = adapter.named_parameters(include=["model.layers.*"])
    n = sum(p.numel() for _, p in named)
    computer = PEFComputer(adapter, task, named, SparseProjection(n, 128, seed=0, density=8))
    H = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    prompts = task.prompts(TEXTS[:4])
    every = computer.token_contributions(prompts, H)
    own = computer.token_contributions(prompts, H, assign=[2, 0, 2, 1])
    for key in ("tokens", "fallback", "untokenised"):
        torch.testing.assert_close(own[key][:, 0], every[key][torch.arange(4), torch.tensor([2, 0, 2, 1])])
    with pytest.raises(ValueError, match="one direction index per prompt"):
        computer.token_contributions(prompts, H, assign=[0])
    with pytest.raises(ValueError, match="directions must be"):
        computer.token_contributions(prompts, H[:, :5])


def test_attribute_tokens_on_a_saved_run_defaults_to_the_top_examples(tmp_path):
    from npeff_lens.runs import decompose_store

    adapter = model("tiny-llama")
    store = _store(adapter, tmp_path / "pefs", proj_dim=128)
    est = decompose_store(store, tmp_path / "npeff", n_components=2, n_steps=20, n_warmup_steps=5, progress=False)
    got = attribute_tokens(tmp_path / "npeff", 1, adapter=adapter, k=3)
    top = torch.argsort(est.coefficients_[:, 1], descending=True)[:3].tolist()
    assert [a.example for a in got] == [i for i in top if est.coefficients_[i, 1] > 0]
    G = store.load_pefs([a.example for a in got])
    want = stored_loadings(G, est.components_[1])
    torch.testing.assert_close(torch.tensor([a.loading for a in got], dtype=torch.float64), want, rtol=1e-4, atol=0)
    assert all(abs(sum(a.fractions()) + sum(a.remainder.values()) / a.loading - 1) < 1e-4 for a in got)
