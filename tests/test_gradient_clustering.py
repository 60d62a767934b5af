"""Gradient clustering (§5.1): the collected row is exactly ∇θ log p(argmax | x), and k-means on unit-normalised
gradients recovers planted clusters, ranks members by proximity to the centroid and round-trips through disk.

Gradients are checked against one plain ``torch.autograd.grad`` per example on the tiny random models (MLP
output weights only, so that it stays fast), unprojected and through ``SparseProjection``.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import npeff_lens as nl
from npeff_lens.analysis import top_examples
from npeff_lens.baselines.gradient_clustering import (
    MINIBATCH_ABOVE,
    GradientClustering,
    collect_prediction_gradients,
    prediction_task,
)
from npeff_lens.errors import CorruptFileError, NotFittedError
from npeff_lens.models import adapt, tiny_model
from npeff_lens.projection import SparseProjection
from npeff_lens.store import PEFStore
from npeff_lens.tasks import ClassifierHead, LabelTokens, NextToken

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = [" bad", " sad", " awful"]  # single tokens in the tiny tokenizer
TEXTS = ["a great film .", "bad", "yes no maybe good fun"]
MLP_OUT = {b: "model.layers.*.mlp.down_proj.weight" for b in ("hf", "bridge", "nnsight")}
MLP_OUT["hooked"] = "blocks.*.mlp.W_out"  # HookedTransformer names its MLP output weight W_out


@functools.cache
def model(arch: str, backend: str = "hf"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "tiny-bert-classifier":
            return adapt(*tiny_model(arch))
        return nl.load_model(arch, backend=backend)


def brute_prediction_gradients(adapter, task, named, texts) -> torch.Tensor:
    """``[m, n]``: per example, ``torch.autograd.grad`` of ``log p(argmax | x)`` w.r.t. the selected parameters."""
    params = [p for _, p in named]
    out = []
    for text in texts:
        with torch.enable_grad():
            lp = task.log_probs(adapter, adapter.tokenize([task.format(text)]))[0]
            gs = torch.autograd.grad(lp[lp.argmax()], params, allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(out).double()


def collect(adapter, texts, task, path, **kw):
    kw = {"proj_dim": None, "dtype": "float32", "progress": False, "batch_size": 2, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect_prediction_gradients(adapter, list(texts), task, path, **kw)


def assert_rows_equal(G: torch.Tensor, ref: torch.Tensor) -> None:
    assert G.shape == (ref.shape[0], 1, ref.shape[1])
    torch.testing.assert_close(G[:, 0].double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------------
# The gradients: the PEF engine with rows="prediction"
# ---------------------------------------------------------------------------------------------------


def test_prediction_task_copies_every_kind():
    nt = NextToken("Q: {text}", expectation_projections=7, seed=3, projection="orthogonal")
    for task in (LabelTokens(TEMPLATE, LABELS), ClassifierHead("{text}"), nt):
        copy = prediction_task(task)
        assert type(copy) is type(task) and copy is not task
        assert copy.rows == "prediction" and task.rows == "fisher"  # the original is untouched
        assert copy.config() == {**task.config(), "rows": "prediction"}
        assert copy.n_rows == 1
    assert prediction_task(nt).expectation_projections == 7 and nt.n_rows == 7


@pytest.mark.parametrize("backend", ["hf", "bridge", "hooked", "nnsight"])
def test_collected_row_is_the_prediction_gradient(backend, tmp_path):
    adapter = model("tiny-llama", backend)
    task = LabelTokens(TEMPLATE, LABELS)
    params = [MLP_OUT[backend]]
    named = adapter.named_parameters(include=params)
    ref = brute_prediction_gradients(adapter, task, named, TEXTS)
    n = ref.shape[1]
    assert n == 2 * 64 * 32  # both layers' MLP output weights

    store = collect(adapter, TEXTS, task, tmp_path / "full", params=params)
    assert store.manifest["task"]["rows"] == "prediction" and store.manifest["pef_rows"] == 1
    assert_rows_equal(store.load_pefs(), ref)
    # the stored prediction is the argmax the gradient was taken at
    with torch.no_grad():
        preds = [int(task.log_probs(adapter, adapter.tokenize([task.format(t)]))[0].argmax()) for t in TEXTS]
    assert [m["prediction"] for m in store.read_metadata()] == preds

    projected = collect(adapter, TEXTS, task, tmp_path / "d64", params=params, proj_dim=64, seed=3)
    assert projected.manifest["projection"]["n_out"] == 64
    assert_rows_equal(projected.load_pefs(), SparseProjection(n, 64, seed=3).project(ref.float()).double())


@pytest.mark.parametrize("kind", ["next-token", "classifier-head"])
def test_prediction_gradient_other_task_kinds(kind, tmp_path):
    if kind == "next-token":  # argmax over the whole vocabulary
        adapter, task, params = model("tiny-llama"), NextToken("{text}", expectation_projections=4), [MLP_OUT["hf"]]
    else:
        adapter, task = model("tiny-bert-classifier"), ClassifierHead("{text}")
        params = ["*.output.dense.weight", "classifier.weight"]
    named = adapter.named_parameters(include=params)
    ref = brute_prediction_gradients(adapter, task, named, TEXTS)
    store = collect(adapter, TEXTS, task, tmp_path / "s", params=params)
    assert_rows_equal(store.load_pefs(), ref)


def test_fit_on_a_collected_store(tmp_path):
    adapter = model("tiny-llama")
    texts = [f"review {i}: a {w} film" for i, w in enumerate(["great", "dull", "sad", "fun", "bad", "good"] * 2)]
    store = collect(adapter, texts, LabelTokens(TEMPLATE, LABELS), tmp_path / "s", params=[MLP_OUT["hf"]], proj_dim=64)
    gc = GradientClustering(3).fit(PEFStore(store.path))
    assert gc.manifest_["projection"]["n_out"] == 64 and gc.cluster_centers_.shape == (3, 64)
    same = GradientClustering(3).fit(store.load_pefs()[:, 0])  # [m, d] tensor: the same clustering
    assert torch.equal(gc.labels_, same.labels_) and torch.equal(gc.cluster_centers_, same.cluster_centers_)


# ---------------------------------------------------------------------------------------------------
# k-means on unit-normalised gradients
# ---------------------------------------------------------------------------------------------------


def planted(m: int = 100, d: int = 64, n: int = 4, noise: float = 0.05, seed: int = 0):
    """``(X [m, d], truth [m], directions [n, d])``: orthonormal directions plus noise, each row rescaled by a
    factor in [1e-3, 1e3] (normalisation must undo it: raw k-means clusters by scale)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, n, generator=g))[0].T
    truth = torch.arange(m) % n
    scale = 10 ** (torch.rand(m, generator=g) * 6 - 3)
    return (directions[truth] + noise * torch.randn(m, d, generator=g)) * scale[:, None], truth, directions


@pytest.mark.parametrize("algorithm", ["full", "minibatch"])
def test_recovers_planted_clusters(algorithm):
    X, truth, directions = planted()
    gc = GradientClustering(4, algorithm=algorithm, batch_size=32, seed=1).fit(X)
    assert gc.algorithm_ == algorithm
    assert adjusted_rand_score(truth.numpy(), gc.labels_.numpy()) == 1.0
    # each centroid points along its planted direction
    for j in range(4):
        u = directions[truth[gc.labels_ == j][0]]
        assert torch.nn.functional.cosine_similarity(gc.cluster_centers_[j], u, dim=0) > 0.99
    assert gc.coefficients_.shape == (100, 4) and gc.n_features_in_ == 64
    assert gc.inertia_ == pytest.approx(float((gc.distances_.double() ** 2).sum()), rel=1e-4)
    # [m, 1, d] and [m, d] are the same input; predict reproduces the fitted labels
    assert torch.equal(
        GradientClustering(4, algorithm=algorithm, batch_size=32, seed=1).fit_predict(X[:, None]), gc.labels_
    )
    assert torch.equal(gc.predict(X), gc.labels_)


def test_coefficients_rank_members_by_proximity_to_centroid():
    X, _, _ = planted(m=40)
    gc = GradientClustering(4).fit(X)
    coeffs, unit = gc.coefficients_, X / X.norm(dim=1, keepdim=True)
    assert ((coeffs > 0).sum(1) == 1).all()  # one cluster per example
    for j in range(4):
        members = (gc.labels_ == j).nonzero()[:, 0]
        dist = (unit[members].double() - gc.cluster_centers_[j].double()).norm(dim=1)
        torch.testing.assert_close(coeffs[members, j].double(), 1 / (1 + dist), rtol=1e-5, atol=0)
        assert (coeffs[gc.labels_ != j, j] == 0).all()
        top = top_examples(coeffs, k=len(members) + 5)[j]
        assert top[: len(members)].tolist() == members[dist.argsort()].tolist()  # closest first
        assert (coeffs[top[len(members) :], j] == 0).all()  # then non-members only
    torch.testing.assert_close(gc.transform(X), coeffs)


def test_zero_and_nonfinite_gradients_are_excluded():
    X, _, _ = planted(m=40)
    bad = [3, 7, 11, 20]
    Xb = X.clone()
    Xb[3] = 0
    Xb[7] = float("nan")
    Xb[11, 5] = float("inf")
    Xb[20, :2] = torch.tensor([float("inf"), -float("inf")])
    with pytest.warns(UserWarning, match="4 of 40"):
        gc = GradientClustering(4).fit(Xb)
    assert gc.excluded_.tolist() == bad
    assert (gc.labels_[bad] == -1).all() and (gc.coefficients_[bad] == 0).all()
    assert torch.isinf(gc.distances_[bad]).all() and (gc.labels_[[i for i in range(40) if i not in bad]] >= 0).all()
    keep = [i for i in range(40) if i not in bad]
    clean = GradientClustering(4).fit(X[keep])  # the others are clustered exactly as without the bad rows
    assert torch.equal(gc.labels_[keep], clean.labels_) and torch.equal(gc.cluster_centers_, clean.cluster_centers_)
    assert (gc.predict(Xb)[bad] == -1).all()


def test_bad_parameters_and_inputs():
    X, _, _ = planted(m=5)
    X[:2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"n_clusters=4 exceeds the 3 examples .*5 given, 2 with a zero"):
            GradientClustering(4).fit(X)
    with pytest.raises(ValueError, match="n_clusters must be an int >= 1, got 0"):
        GradientClustering(0).fit(X)
    with pytest.raises(ValueError, match="algorithm must be"):
        GradientClustering(2, algorithm="elkan").fit(X)
    with pytest.raises(ValueError, match="one gradient per example"):
        GradientClustering(2).fit(torch.randn(6, 3, 8))
    with pytest.raises(NotFittedError, match="not fitted"):
        _ = GradientClustering(2).coefficients_
    assert not hasattr(GradientClustering(2), "coefficients_")  # NotFittedError is an AttributeError
    with pytest.raises(AttributeError, match="not fitted"):
        GradientClustering(2).predict(X)
    # the automatic choice: mini-batch once m x C exceeds 2**27
    assert MINIBATCH_ABOVE == 2**27
    assert GradientClustering(2048).resolve_algorithm(65_536) == "full"
    assert GradientClustering(2048).resolve_algorithm(65_537) == "minibatch"
    assert GradientClustering(2048, algorithm="full").resolve_algorithm(10**6) == "full"


def test_save_load_round_trip(tmp_path):
    X, _, _ = planted(m=40)
    X[5] = 0
    with pytest.warns(UserWarning):
        gc = GradientClustering(4, seed=2, n_init=3, max_iter=50).fit(X)
    gc.manifest_ = {"projection": {"n_out": 64}}
    gc.save(tmp_path / "gc")
    back = GradientClustering.load(tmp_path / "gc")
    for name in ("cluster_centers_", "labels_", "distances_", "excluded_", "coefficients_"):
        assert torch.equal(getattr(back, name), getattr(gc, name)), name
    for name in ("inertia_", "n_iter_", "algorithm_", "fit_seconds_", "n_features_in_", "manifest_"):
        assert getattr(back, name) == getattr(gc, name), name
    assert (
        back.get_params()
        == gc.get_params()
        == {
            "n_clusters": 4,
            "seed": 2,
            "batch_size": None,
            "n_init": 3,
            "max_iter": 50,
            "tol": 1e-4,
            "algorithm": "auto",
        }
    )
    assert torch.equal(back.predict(X), gc.predict(X))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"class": "NPEFF"}')
    with pytest.raises(ValueError, match="does not hold a GradientClustering"):
        GradientClustering.load(tmp_path / "other")


def test_a_damaged_saved_clustering_is_a_corrupt_file_error_and_an_unchecked_one_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    X, _, _ = planted(m=40)
    gc = GradientClustering(4, seed=2).fit(X)
    gc.manifest_ = {}
    path = gc.save(tmp_path / "gc") / "gradient_clustering.safetensors"
    save_file(load_file(path), path)  # as written before files carried a checksum: trusted
    assert torch.equal(GradientClustering.load(tmp_path / "gc").cluster_centers_, gc.cluster_centers_)
    gc.save(tmp_path / "gc")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"gradient_clustering\.safetensors is damaged"):
        GradientClustering.load(tmp_path / "gc")
