"""Collection's device path, as the collection loop runs it: each batch is finished where it was computed (flags,
zeroed PEFs, norms, rank reduction), copied to the host once (on CUDA into pinned memory, behind an event), and
read only after the next batch has been queued. Needs torch and transformers only, so benchmarks/gpu.py runs this
file on a CUDA host, where the same batches computed on CUDA must give the CPU's PEFs and metadata."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LABELS, TEMPLATE, random_texts

from npeff_lens.collect import PendingBatch, finish_batch
from npeff_lens.layout import parameter_layout
from npeff_lens.models import load_model
from npeff_lens.pef import PEFComputer
from npeff_lens.projection import KroneckerProjection, SparseProjection
from npeff_lens.tasks import LabelTokens

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _computer(device: str, projection: str):
    adapter = load_model("tiny-llama", device=device)
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    named = adapter.named_parameters()
    shapes = [tuple(e["shape"]) for e in parameter_layout(named)]
    n = sum(p.numel() for _, p in named)
    proj = SparseProjection(n, 64, seed=0, density=4) if projection == "sparse" else KroneckerProjection(shapes, 64)
    return PEFComputer(adapter, task, named, proj), task


def _spoiled(pefs, log_probs, k: int):
    """Batch k with planted faults: batch 1 has a non-finite PEF entry (example 1) and non-finite logits
    (example 2), batch 2 a PEF of zeros (example 0)."""
    pefs, log_probs = pefs.clone(), log_probs.clone()
    if k == 1:
        pefs[1, 0, 3] = float("inf")
        log_probs[2, 0] = float("nan")
    if k == 2:
        pefs[0] = 0
    return pefs, log_probs


def _expected(raw_pefs, raw_log_probs, rank):
    """What finishing must give, from the raw batch on the CPU, by other means than the code under test: zeroed
    rows of non-finite examples, ‖G Gᵀ‖_F, the argmax, exp of the log-probabilities, and for the rank reduction
    the Gram's top eigenvalues (‖G'‖² = their sum)."""
    ok = torch.isfinite(raw_log_probs).all(-1) & torch.isfinite(raw_pefs).flatten(1).all(-1)
    g = torch.where(ok[:, None, None], raw_pefs, 0.0).double()
    gram = g @ g.transpose(1, 2)
    return {
        "pefs": g.float(),
        "norm": gram.flatten(1).norm(dim=1).tolist(),
        "top": torch.linalg.eigvalsh(gram).flip(-1)[:, : rank or gram.shape[1]].sum(-1).tolist(),
        "prediction": [int(p.argmax()) if torch.isfinite(p).all() else -1 for p in raw_log_probs],
        "probs": raw_log_probs.exp().tolist(),
    }


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("projection", ["sparse", "kron"])
@pytest.mark.parametrize("device", DEVICES)
def test_batches_finished_in_collection_order_equal_the_cpu_s_one_at_a_time(device, projection, rank):
    batches = [random_texts(4, seed=k, max_words=8) for k in range(3)]
    ref_comp, ref_task = _computer("cpu", projection)
    reference = []
    for k, chunk in enumerate(batches):
        raw = _spoiled(*ref_comp.compute(ref_task.prompts(chunk)), k)
        reference.append((finish_batch(*raw, {"text": chunk}, 4 * k, ref_task, rank, 5), _expected(*raw, rank)))

    comp, task = _computer(device, projection)
    results, waiting = [], None
    for k, chunk in enumerate(batches):  # the next batch is queued before the previous one is read
        started = PendingBatch(*_spoiled(*comp.compute(task.prompts(chunk)), k), {"text": chunk}, 4 * k, task, rank, 5)
        if waiting is not None:
            results.append(waiting.result())
        waiting = started
    results.append(waiting.result())

    flags = [[m["flag"] for m in meta] for _, meta in results]
    assert flags == [[None] * 4, [None, "nonfinite_grad", "nonfinite_logits", None], ["zero_pef", None, None, None]]
    for k, ((pefs, meta), ((ref_pefs, ref_meta), expected)) in enumerate(zip(results, reference)):
        assert pefs.device.type == "cpu" and pefs.shape == (4, rank or 2, 64)
        assert torch.isfinite(pefs).all()
        assert [m["index"] for m in meta] == list(range(4 * k, 4 * k + 4))
        assert [m["text"] for m in meta] == batches[k]
        assert [m["prediction"] for m in meta] == expected["prediction"]
        assert [m["pef_norm"] for m in meta] == pytest.approx(expected["norm"], rel=1e-4, abs=1e-6)
        for m, probs in zip(meta, expected["probs"]):
            assert m["probs"] == pytest.approx(probs, rel=1e-4, abs=1e-6, nan_ok=True)
        if rank is None:
            torch.testing.assert_close(pefs, expected["pefs"], rtol=1e-4, atol=1e-5)
        else:  # the top eigenvalues' energy, whatever the eigenvectors' signs
            got = pefs.double().square().sum((1, 2)).tolist()
            assert got == pytest.approx(expected["top"], rel=1e-4, abs=1e-8)
        if device == "cpu":  # the same computation: the same bits as finishing one batch at a time
            assert torch.equal(pefs, ref_pefs) and json.dumps(meta) == json.dumps(ref_meta)  # NaN as NaN
        elif rank is None:
            torch.testing.assert_close(pefs, ref_pefs, rtol=1e-4, atol=1e-5)
        else:  # sign-invariant: cuSOLVER and LAPACK may flip an eigenvector
            gram = pefs.transpose(1, 2) @ pefs
            torch.testing.assert_close(gram, ref_pefs.transpose(1, 2) @ ref_pefs, rtol=1e-4, atol=1e-5)
    assert results[1][0][1:3].abs().sum() == 0  # the flagged examples are stored as zeros


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_results_are_read_after_the_copy_behind_a_busy_device():
    """The device is kept busy before the batch is finished, so its copy is still queued when ``PendingBatch``
    returns: ``result()`` must wait for it (a missing or early event would read the pinned buffer too soon)."""
    x = torch.randn(3, 2, 4096, device="cuda")
    torch.cuda._sleep(2_000_000_000)  # about a second of device time ahead of the copy
    log_probs = torch.randn(3, 2, device="cuda").log_softmax(-1)
    batch = PendingBatch(x, log_probs, {"text": ["a", "b", "c"]}, 0, LabelTokens(TEMPLATE, LABELS), None, 5)
    assert batch.in_flight and not batch.event.query()  # returned before the device got to the copy
    assert all(t.is_pinned() for t in batch.tensors)
    pefs, meta = batch.result()
    torch.testing.assert_close(pefs, x.cpu())
    assert [m["index"] for m in meta] == [0, 1, 2]
