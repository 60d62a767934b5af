"""PEF collection: exactness against brute-force Fishers, projection, EPS, SVD, resume, bad input.

Everything runs on the randomly initialised tiny models on CPU. Brute-force Fishers are built from
explicit ``autograd.grad`` loops, ``F = sum_y p(y|x) grad log p(y|x) grad log p(y|x)^T = B^T B`` with
``B[y] = sqrt(p(y|x)) grad log p(y|x)``; ``G^T G`` is compared with ``B^T B`` column block by column
block, so that no n x n matrix of the default parameter selection is ever materialised.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from helpers import model_cache

from npeff_lens.collect import collect_pefs
from npeff_lens.errors import SettingError, as_flag
from npeff_lens.models import adapt, tiny_model
from npeff_lens.pef import PEFComputer
from npeff_lens.projection import SparseProjection
from npeff_lens.store import PEFStore, StoreMismatchError
from npeff_lens.tasks import ClassifierHead, LabelTokens, NextToken

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = [" sad", " bad", " awful"]  # one token each in the tiny tokenizer
TEXTS = ["a great film .", "bad", "yes no maybe good fun", "the movie is awful and sad"]
ARCHS = ("tiny-llama", "tiny-gpt2")
BACKENDS = ("hf", "bridge", "hooked", "nnsight")
MLP_DOWN = ["model.layers.1.mlp.down_proj.weight"]  # 2048 parameters of tiny-llama


model = model_cache()  # model(arch, backend="hf"), loaded once


@functools.cache
def classifier():
    m, tok = tiny_model("tiny-bert-classifier")
    return adapt(m, tok)


def brute_rows(adapter, task, named, prompt: str) -> torch.Tensor:
    """``B [outcomes, n]``: row y is ``sqrt(p(y|x)) grad log p(y|x)`` from one autograd.grad per outcome."""
    params = [p for _, p in named]
    with torch.enable_grad():
        lp = task.log_probs(adapter, adapter.tokenize([prompt]))[0]
        rows = []
        for y in range(lp.shape[0]):
            gs = torch.autograd.grad(lp[y], params, retain_graph=True, allow_unused=True)
            g = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(gs, params)])
            rows.append(lp[y].detach().exp().sqrt() * g)
    return torch.stack(rows).double()


def full_vocab_rows(adapter, named, prompt: str) -> torch.Tensor:
    """``brute_rows`` for ``NextToken`` (all |V| outcomes) with the |V| backward passes batched
    (``is_grads_batched``: autograd vmapped over one-hot output gradients)."""
    params = [p for _, p in named]
    with torch.enable_grad():
        lp = NextToken().log_probs(adapter, adapter.tokenize([prompt]))[0]
        eye = torch.eye(lp.shape[0], dtype=lp.dtype)
        gs = torch.autograd.grad(lp, params, grad_outputs=eye, is_grads_batched=True)
    g = torch.cat([gi.reshape(lp.shape[0], -1) for gi in gs], dim=1)
    return (lp.detach().exp().sqrt()[:, None] * g).double()


def gram_error(G: torch.Tensor, B: torch.Tensor, n_cols: int = 1024) -> tuple[float, float]:
    """Errors of ``G^T G`` against ``F = B^T B`` without forming the n x n matrices:

    - ``||G^T G - F||_F / ||F||_F`` over all n^2 entries, from r x r Grams
      (``||G^T G - B^T B||_F^2 = ||G G^T||^2 - 2 ||G B^T||^2 + ||B B^T||^2``, in float64);
    - ``max |G^T G - F| / max |F|`` over the columns of a fixed random sample of ``n_cols`` coordinates
      (and all rows), ``max |F| = max diag F`` (F is PSD).
    """
    G, B = G.double(), B.double()

    def sq(M):
        return (M * M).sum()

    ff = sq(B @ B.T)
    d2 = sq(G @ G.T) - 2 * sq(G @ B.T) + ff
    fro = (d2.clamp(min=0).sqrt() / ff.sqrt()).item()
    cols = torch.randperm(G.shape[1], generator=torch.Generator().manual_seed(0))[:n_cols]
    d = G.T @ G[:, cols] - B.T @ B[:, cols]
    return fro, d.abs().max().item() / (B * B).sum(0).max().item()


def assert_exact(G, B, tol=1e-5, what=""):
    fro, mx = gram_error(G, B)
    assert fro < tol and mx < tol, (what, fro, mx)


def collect(adapter, texts, task, path, **kw):
    kw.setdefault("proj_dim", None)
    kw.setdefault("dtype", "float32")
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = collect_pefs(adapter, list(texts), task, path, **kw)
    return store


# ---------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_label_tokens_exact_every_backend(arch, backend, tmp_path):
    adapter = model(arch, backend)
    task = LabelTokens(TEMPLATE, LABELS)
    # batch_size 2 over prompts of different lengths: right padding is exercised
    store = collect(adapter, TEXTS[:3], task, tmp_path / "s")
    G = store.load_pefs()
    assert G.shape == (3, len(LABELS), store.manifest["n_params"])
    named = adapter.named_parameters()
    assert sum(p.numel() for _, p in named) == G.shape[2]
    for i, text in enumerate(TEXTS[:3]):
        B = brute_rows(adapter, task, named, task.format(text))
        assert_exact(G[i], B, what=(arch, backend, i))
    meta = store.read_metadata()
    assert [m["index"] for m in meta] == [0, 1, 2]
    assert all(m["flag"] is None for m in meta)


def test_classifier_head_exact(tmp_path):
    adapter = classifier()
    task = ClassifierHead("{text}")
    store = collect(adapter, TEXTS[:3], task, tmp_path / "s")
    G = store.load_pefs()
    named = adapter.named_parameters()
    assert G.shape == (3, 3, sum(p.numel() for _, p in named))
    for i, text in enumerate(TEXTS[:3]):
        B = brute_rows(adapter, task, named, text)
        assert_exact(G[i], B, what=i)
    assert store.manifest["outcomes"] == task.outcome_names()


@pytest.mark.parametrize("arch,backend", [("tiny-gpt2", "hf"), ("tiny-llama", "hooked")])
def test_loop_engine_equals_hooks(arch, backend, tmp_path):
    adapter = model(arch, backend)
    task = LabelTokens(TEMPLATE, LABELS)
    hooks = collect(adapter, TEXTS[:3], task, tmp_path / "hooks").load_pefs()
    loop = collect(adapter, TEXTS[:3], task, tmp_path / "loop", engine="loop").load_pefs()
    scale = loop.abs().max().item()
    torch.testing.assert_close(hooks, loop, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------------
# Random projection
# ---------------------------------------------------------------------------------------------------


def _jl_error(G: torch.Tensor, P: torch.Tensor) -> float:
    """max over example pairs (i <= j) of ``max |G_i A (G_j A)^T - G_i G_j^T| / (||G_i|| ||G_j||)``."""
    G, P = G.double(), P.double()
    norms = G.flatten(1).norm(dim=1)
    worst = 0.0
    for i in range(len(G)):
        for j in range(i, len(G)):
            e = (P[i] @ P[j].T - G[i] @ G[j].T).abs().max().item() / (norms[i] * norms[j]).item()
            worst = max(worst, e)
    return worst


def test_projection_matches_sparse_projection_and_jl(tmp_path):
    adapter = model("tiny-llama")
    task = LabelTokens(TEMPLATE, LABELS)
    params = ["model.layers.*.mlp.*"]
    texts = TEXTS + ["Lisbon is Portugal", "what is the capital of France ?"]
    G = collect(adapter, texts, task, tmp_path / "full", params=params).load_pefs()
    n = G.shape[2]
    assert n == 2 * 3 * 32 * 64
    errs = {}
    for d in (64, 4096):
        store = collect(adapter, texts, task, tmp_path / f"d{d}", params=params, proj_dim=d, seed=3)
        P = store.load_pefs()
        assert P.shape == (len(texts), 3, d)
        assert store.manifest["projection"] == {"kind": "sparse", "n_in": n, "n_out": d, "seed": 3, "density": 32}
        ref = SparseProjection(n, d, seed=3, density=32).project(G.reshape(-1, n)).reshape(len(texts), 3, d)
        torch.testing.assert_close(P, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        # JL: averaged over a few projection seeds (the collector's own projection is the seed-3 one)
        per_seed = [_jl_error(G, P)]
        for s in (11, 12):
            Ps = SparseProjection(n, d, seed=s, density=32).project(G.reshape(-1, n)).reshape(len(texts), 3, d)
            per_seed.append(_jl_error(G, Ps))
        errs[d] = per_seed
        # each entry of G_i A A^T G_j^T has std <= sqrt(2/d) ||G_i|| ||G_j||; the max over ~200 entries stays
        # below ~4.5 std
        assert max(per_seed) <= 6.0 / math.sqrt(d), (d, per_seed)
    assert sum(errs[4096]) < sum(errs[64]) / 3, errs


# ---------------------------------------------------------------------------------------------------
# Expectation projection (NextToken)
# ---------------------------------------------------------------------------------------------------


def test_next_token_expectation_projection(tmp_path):
    adapter = model("tiny-llama")
    named = adapter.named_parameters(include=MLP_DOWN)
    texts = ["Review: a great film .", "The country of Lisbon is"]
    V = adapter.vocab_size
    assert V == 384
    Fs = [full_vocab_rows(adapter, named, t) for t in texts]
    Fs = [B.T @ B for B in Fs]  # [2048, 2048] each, over the full vocabulary

    def rel(Fa, F):
        return ((Fa - F).norm() / F.norm()).item()

    sums = [torch.zeros_like(F) for F in Fs]
    single = []
    seeds = range(24)
    for s in seeds:
        task = NextToken("{text}", expectation_projections=8, seed=s).bind(adapter)
        G, _ = PEFComputer(adapter, task, named, None).compute(texts)
        for i, F in enumerate(Fs):
            Fa = G[i].double().T @ G[i].double()
            single.append(rel(Fa, F))
            sums[i] += Fa
    avg = [rel(S / len(seeds), F) for S, F in zip(sums, Fs)]
    mean_single = sum(single) / len(single)
    # error of the mean over 24 seeds ~ mean single-seed error / sqrt(24) ~ 0.2x
    assert max(avg) < 0.35 * mean_single, (avg, mean_single)

    # r' = |V| with an orthogonal A: exact, through the collector (one example: |V| backward passes)
    task = NextToken("{text}", expectation_projections=V, projection="orthogonal")
    store = collect(adapter, texts[:1], task, tmp_path / "orth", params=MLP_DOWN)
    G = store.load_pefs()
    assert G.shape == (1, V, 2048)
    F = Fs[0]
    err = ((G[0].double().T @ G[0].double() - F).abs().max() / F.abs().max()).item()
    assert err < 1e-4, err
    meta = store.read_metadata()
    assert len(meta[0]["topk_ids"]) == 5 and meta[0]["prediction"] == meta[0]["topk_ids"][0]


# ---------------------------------------------------------------------------------------------------
# SVD rank reduction (App. C)
# ---------------------------------------------------------------------------------------------------


def test_rank_reduction_keeps_top_eigenpairs(tmp_path):
    adapter = model("tiny-llama")
    labels = [" good", " bad", " fun", " sad", " happy"]
    task = LabelTokens(TEMPLATE, labels, multi_token="first")  # five outcomes; the paper's first-token rule
    G = collect(adapter, TEXTS, task, tmp_path / "full", params=MLP_DOWN)
    full_meta, G = G.read_metadata(), G.load_pefs().double()
    k = 2
    store = collect(adapter, TEXTS, task, tmp_path / "r2", params=MLP_DOWN, rank=k)
    R = store.load_pefs().double()
    assert R.shape == (len(TEXTS), k, 2048)
    for i in range(len(TEXTS)):
        _, S, Vh = torch.linalg.svd(G[i], full_matrices=False)
        assert S[k - 1] > 1.01 * S[k]  # a well-defined top-k
        ref = Vh[:k].T @ torch.diag(S[:k] ** 2) @ Vh[:k]
        err = ((R[i].T @ R[i] - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (i, err)
        # the rows are orthogonal with norms sigma_1 >= sigma_2
        torch.testing.assert_close(R[i] @ R[i].T, torch.diag(S[:k] ** 2), rtol=1e-5, atol=1e-6 * S[0].item() ** 2)
    # pef_norm is that of the unreduced PEF
    assert [m["pef_norm"] for m in store.read_metadata()] == pytest.approx([m["pef_norm"] for m in full_meta], rel=1e-6)

    # r = 5 < rank = 7: all of G^T G is kept, padded with zero rows
    store = collect(adapter, TEXTS, task, tmp_path / "r7", params=MLP_DOWN, rank=7)
    R = store.load_pefs().double()
    assert R.shape == (len(TEXTS), 7, 2048)
    assert (R[:, 5:] == 0).all()
    for i in range(len(TEXTS)):
        ref = G[i].T @ G[i]
        assert ((R[i].T @ R[i] - ref).abs().max() / ref.abs().max()).item() < 1e-5

    # after a random projection: the top-k of the projected G
    Pfull = collect(adapter, TEXTS, task, tmp_path / "p", params=MLP_DOWN, proj_dim=64).load_pefs().double()
    R = collect(adapter, TEXTS, task, tmp_path / "p2", params=MLP_DOWN, proj_dim=64, rank=k).load_pefs().double()
    for i in range(len(TEXTS)):
        _, S, Vh = torch.linalg.svd(Pfull[i], full_matrices=False)
        ref = Vh[:k].T @ torch.diag(S[:k] ** 2) @ Vh[:k]
        assert ((R[i].T @ R[i] - ref).abs().max() / ref.abs().max()).item() < 1e-5


# ---------------------------------------------------------------------------------------------------
# Resume after a crash
# ---------------------------------------------------------------------------------------------------

RESUME_TEXTS = [f"review {i} : a {['great', 'dull', 'sad', 'fun'][i % 4]} film" + " ." * (i % 3) for i in range(40)]
RESUME_KW = dict(proj_dim=64, n=40, batch_size=4, flush_every=8, shard_size=8, progress=False)

_CHILD = """
import sys, time, warnings
warnings.simplefilter("ignore")
import npeff_lens as nl
from npeff_lens.collect import collect_pefs
from npeff_lens.store import PEFStore
from npeff_lens.tasks import LabelTokens

_append = PEFStore.append
def slow_append(self, *a, **k):
    time.sleep(0.3)
    return _append(self, *a, **k)
PEFStore.append = slow_append
adapter = nl.load_model("tiny-llama")
print("started", flush=True)
collect_pefs(adapter, {texts!r}, LabelTokens({template!r}, {labels!r}), sys.argv[1], **{kw!r})
print("finished", flush=True)
"""


def test_resume_after_sigkill(tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(texts=RESUME_TEXTS, template=TEMPLATE, labels=LABELS, kw=RESUME_KW))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    index = out / "index.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if index.exists() and len(index.read_bytes().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the child exited early: {proc.communicate()}"
        assert time.time() < deadline, "the child never committed two shards"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    done = len(PEFStore(out))
    assert 16 <= done < 40, done  # really interrupted, mid-run

    adapter = model("tiny-llama")
    task = LabelTokens(TEMPLATE, LABELS)
    resumed = collect_pefs(adapter, RESUME_TEXTS, task, out, **RESUME_KW)
    ref = collect_pefs(adapter, RESUME_TEXTS, LabelTokens(TEMPLATE, LABELS), tmp_path / "ref", **RESUME_KW)
    resumed, ref = PEFStore(out), PEFStore(tmp_path / "ref")
    assert len(resumed) == len(ref) == 40
    resumed.verify()
    for dt in (torch.float16, torch.float32):
        assert torch.equal(resumed.load_pefs(dtype=dt), ref.load_pefs(dtype=dt))
    meta = resumed.read_metadata()
    assert meta == ref.read_metadata()
    assert [m["index"] for m in meta] == list(range(40))
    assert [m["text"] for m in meta] == RESUME_TEXTS
    assert resumed.manifest["count"] == 40
    # rerunning a finished collection is a no-op
    again = collect_pefs(adapter, RESUME_TEXTS, task, out, **RESUME_KW)
    assert len(again) == 40


def test_other_configuration_into_existing_store_is_an_error(tmp_path):
    adapter = model("tiny-llama")
    task = LabelTokens(TEMPLATE, LABELS)
    kw = dict(params=MLP_DOWN, proj_dim=64, dtype="float16")
    collect(adapter, TEXTS, task, tmp_path / "s", **kw)
    for change in (
        dict(proj_dim=128),
        dict(seed=1),
        dict(dtype="float32"),
        dict(rank=2),
        dict(params=["model.layers.0.mlp.down_proj.weight"]),
    ):
        with pytest.raises((StoreMismatchError, ValueError)):
            collect(adapter, TEXTS, task, tmp_path / "s", **{**kw, **change})
    with pytest.raises(StoreMismatchError):
        collect(adapter, TEXTS, LabelTokens(TEMPLATE, [" film", " bad"]), tmp_path / "s", **kw)
    with pytest.raises(StoreMismatchError):
        collect(adapter, TEXTS[:3], task, tmp_path / "s", **kw)  # another dataset
    assert len(PEFStore(tmp_path / "s")) == len(TEXTS)  # untouched


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def test_bad_input(tmp_path):
    adapter = model("tiny-llama")
    task = LabelTokens(TEMPLATE, LABELS)
    with pytest.raises(ValueError, match="empty"):
        collect(adapter, [], task, tmp_path / "a")
    with pytest.raises(ValueError, match="n must be"):
        collect(adapter, TEXTS, task, tmp_path / "b", n=len(TEXTS) + 1)
    with pytest.raises(ValueError, match=r"\{text\}"):
        LabelTokens("Review: no slot", LABELS)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        collect(adapter, TEXTS, LabelTokens(TEMPLATE, [" bad", ""]), tmp_path / "c")
    # " bad" and " badly" both start with the token " bad" in the tiny tokenizer
    assert adapter.continuation_token_ids("x:", " badly")[0] == adapter.continuation_token_ids("x:", " bad")[0]
    named = r"label ' badly' is 3 tokens after the prompt \(\[' bad', 'l', 'y'\]\).*multi_token='first'"
    with pytest.raises(SettingError, match=named) as e:
        collect(adapter, TEXTS, LabelTokens(TEMPLATE, [" bad", " badly"]), tmp_path / "d")
    assert "or --label-first-token to let its first token ' bad' stand for it" in e.value.render(as_flag)
    with pytest.raises(ValueError, match="share a first token"):
        collect(adapter, TEXTS, LabelTokens(TEMPLATE, [" bad", " badly"], multi_token="first"), tmp_path / "d")


def test_collection_logs_what_it_did_and_its_errors_name_settings(tmp_path, caplog, capsys, monkeypatch):
    """collect_pefs prints nothing: rows left out, labels mapped by position, flagged examples and the store's size
    are INFO records of the ``npeff_lens.collect`` logger, naming no flag; its errors name the settings in Python
    words and render as the command line's flags."""
    import datasets

    from npeff_lens import collect as collect_module

    adapter = model("tiny-llama")
    data = datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 2, 7, 1]})  # 7: no outcome of three
    kw = dict(params=MLP_DOWN, proj_dim=None, batch_size=2, progress=False, drop_invalid=True)
    with caplog.at_level(logging.INFO, logger="npeff_lens"):
        store = collect_pefs(adapter, data, _OneHot(TEMPLATE, LABELS), tmp_path / "s", **kw)
    said = [r.getMessage() for r in caplog.records if r.name == "npeff_lens.collect"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "npeff_lens.collect")
    assert said == [
        "left out 1 invalid row(s) of 'user' (rows 2)",
        "integer labels map to the task's outcomes by position: label 0 → ' sad', 1 → ' bad', 2 → ' awful' "
        "(label names map them by name)",
        "3 example(s) flagged (zero or non-finite PEF, stored as zeros); see the store's metadata 'flag' column",
        f"3 examples in {store.path}; labels: awful 1, bad 1, sad 1",
    ]
    assert not any("--" in m for m in said) and capsys.readouterr().err == ""

    with pytest.raises(SettingError) as e:
        collect(adapter, TEXTS, LabelTokens(TEMPLATE, LABELS), tmp_path / "n", n=len(TEXTS) + 1)
    assert str(e.value).startswith("n must be in [1, 4]") and e.value.render(as_flag).startswith("--n must be in")
    monkeypatch.setattr(collect_module, "_available_memory", lambda: 2**12)  # less than two batches of PEFs
    with pytest.raises(SettingError) as e:
        collect(adapter, TEXTS, LabelTokens(TEMPLATE, LABELS), tmp_path / "raw", params=MLP_DOWN)
    assert "unprojected PEFs (proj_dim 0) of 2,048 parameters" in str(e.value) and "--" not in str(e.value)
    flags = e.value.render(as_flag)
    assert "unprojected PEFs (--proj-dim 0) of 2,048" in flags and flags.endswith("select fewer parameters (--params)")


class _NaNForSecond(LabelTokens):
    """LabelTokens whose log-probabilities are NaN for the second example of every batch."""

    def log_probs(self, adapter, batch):
        lp = super().log_probs(adapter, batch)
        if lp.shape[0] < 2:
            return lp
        mask = torch.zeros_like(lp, dtype=torch.bool)
        mask[1] = True
        return torch.where(mask, torch.full_like(lp, float("nan")), lp)


def test_nonfinite_logits_flagged_and_others_unaffected(tmp_path):
    adapter = model("tiny-llama")
    kw = dict(params=MLP_DOWN, batch_size=2)
    clean = collect(adapter, TEXTS, LabelTokens(TEMPLATE, LABELS), tmp_path / "clean", **kw)
    store = collect(adapter, TEXTS, _NaNForSecond(TEMPLATE, LABELS), tmp_path / "nan", **kw)
    G, ref = store.load_pefs(), clean.load_pefs()
    assert torch.isfinite(G).all()
    meta = store.read_metadata()
    assert [m["flag"] for m in meta] == [None, "nonfinite_logits", None, "nonfinite_logits"]
    for i in (1, 3):
        assert (G[i] == 0).all() and meta[i]["pef_norm"] == 0 and meta[i]["prediction"] == -1
    for i in (0, 2):
        torch.testing.assert_close(G[i], ref[i], rtol=1e-5, atol=1e-7)


def test_nonfinite_logits_flagged_and_stored_as_zeros(tmp_path):
    """The part of the contract that holds today: the non-finite example itself is flagged and zeroed."""
    adapter = model("tiny-llama")
    task = _NaNForSecond(TEMPLATE, LABELS)
    store = collect(adapter, TEXTS[:2], task, tmp_path / "nan", params=MLP_DOWN, batch_size=2)
    G = store.load_pefs()
    assert torch.isfinite(G).all()
    assert (G[1] == 0).all()
    meta = store.read_metadata()
    assert meta[1]["flag"] == "nonfinite_logits" and meta[1]["pef_norm"] == 0 and meta[1]["prediction"] == -1
    assert meta[1]["prediction_name"] is None


class _OneHot(LabelTokens):
    """A saturated (one-hot) prediction: p = softmax(1e4 * logits) is exactly one-hot, so the PEF is 0."""

    def log_probs(self, adapter, batch):
        logits = adapter.prediction_logits(batch)
        return (1e4 * logits[:, self.token_ids].float()).log_softmax(-1)


def test_zero_pef_is_flagged(tmp_path):
    adapter = model("tiny-llama")
    store = collect(adapter, TEXTS[:3], _OneHot(TEMPLATE, LABELS), tmp_path / "s", params=MLP_DOWN)
    G = store.load_pefs()
    assert (G == 0).all()
    for m in store.read_metadata():
        assert m["flag"] == "zero_pef" and m["pef_norm"] == 0
        assert sorted(m["probs"]) == [0.0, 0.0, 1.0]


NORMS = ["*norm*", "*ln_*", "*ln?.*", "*LayerNorm*"]  # norm weights and biases under every backend's names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_norm_parameters_hooked_and_exact(arch, backend):
    """RMSNorm / LayerNorm weights and biases get per-example gradients from their hooks (``Σ_t dL/dy_t ⊙ x̂_t``),
    equal to brute-force autograd, and never take the per-example autograd fallback."""
    adapter = model(arch, backend)
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    named = adapter.named_parameters(include=NORMS)
    assert named and all(p.ndim == 1 for _, p in named)
    computer = PEFComputer(adapter, task, named, None)
    G, _ = computer.compute([task.format(t) for t in TEXTS[:3]])
    assert not computer.fallback and not computer.demoted
    assert {s.kind for ss in computer.hooked_modules.values() for s in ss} == {"norm"}
    for i, text in enumerate(TEXTS[:3]):
        assert_exact(G[i], brute_rows(adapter, task, named, task.format(text)), what=(arch, backend, i))


def test_parameters_outside_hookable_modules_are_named_once_in_the_log(caplog):
    """A HookedTransformer's einsum weights take the exact fallback, and the log says which and what to do; a model
    hooked throughout logs nothing."""
    hooked = model("tiny-llama", "hooked")
    task = LabelTokens(TEMPLATE, LABELS).bind(hooked)
    with caplog.at_level(logging.INFO, logger="npeff_lens"):
        computer = PEFComputer(hooked, task, hooked.named_parameters(include=["blocks.1.attn.*W_*"]), None)
    assert computer.fallback and not computer.hooked_modules
    (record,) = [r for r in caplog.records if "fallback" in r.getMessage()]
    assert "blocks.1.attn.W_Q" in record.getMessage() and "backend 'hf' or 'bridge'" in record.getMessage()
    caplog.clear()
    hf = model("tiny-llama", "hf")
    with caplog.at_level(logging.INFO, logger="npeff_lens"):
        PEFComputer(hf, task, hf.named_parameters(include=["model.layers.1.self_attn.*"]), None)
    assert not [r for r in caplog.records if "fallback" in r.getMessage()]


def test_norm_parameters_of_a_bert_classifier():
    adapter = classifier()
    task = ClassifierHead().bind(adapter)
    named = adapter.named_parameters(include=["*LayerNorm*"])
    computer = PEFComputer(adapter, task, named, None)
    G, _ = computer.compute(TEXTS[:3])
    assert len(named) == 2 * 5 and not computer.fallback and not computer.demoted
    for i, text in enumerate(TEXTS[:3]):
        assert_exact(G[i], brute_rows(adapter, task, named, text), what=i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_kron_collection_equals_projected_brute_force(arch, backend, tmp_path):
    """With ``projection="kron"`` the collector sketches each weight from its factors and never forms the
    per-example gradient; the result equals the same operator applied to brute-force per-example gradients
    (every parameter: embeddings, norms, biases and fallback kinds included)."""
    from npeff_lens.projection import KroneckerProjection, projection_from_config

    adapter = model(arch, backend)
    task = LabelTokens(TEMPLATE, LABELS)
    store = collect(
        adapter, TEXTS[:3], task, tmp_path / "s", proj_dim=256, density=8, projection="kron", kron_k=4, params=["*"]
    )
    P = projection_from_config(store.manifest["projection"])
    assert isinstance(P, KroneckerProjection) and P.k == 4
    named = adapter.named_parameters(include=["*"])
    assert [list(p.shape) for _, p in named] == [list(s) for s in P.shapes]
    G = store.load_pefs()
    for i, text in enumerate(TEXTS[:3]):
        ref = P.project(brute_rows(adapter, task, named, task.format(text)).float())
        assert (G[i] - ref).norm() <= 1e-5 * ref.norm(), (arch, backend, i)
