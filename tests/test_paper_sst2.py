"""benchmarks/paper_sst2.py end to end on tiny-llama at toy sizes: every stage and ablation runs, a rerun reads
everything back (nothing recomputed), and the numbers it reports are the ones in its run directory."""

import json
import shlex

import pytest
import torch
from helpers import load_script

ARGS = shlex.split(
    "--model tiny-llama --labels ' bad' ' sad' --n-train 48 --n-test 24 --proj-dim 128 --components 4 --steps 20"
    " --n-baseline 12 --perturb-components 2 --recoveries minnorm adjoint --ablation-n 24 --ablation-components 3"
    " --dims 64 128 --component-sizes 3 6 --eps 1 2 --svd-ranks 1 --convergence-n 12"
    " --convergence-params model.layers.0.self_attn.q_proj.weight --convergence-dims 64 256 --convergence-components 3"
    " --quiet --stages collect decompose tunings held-out perturb ablate-d ablate-components ablate-eps convergence"
)


def _script():
    return load_script("benchmarks/paper_sst2.py")


def test_every_stage_on_a_tiny_model_and_a_rerun_only_reads_back(tmp_path, capsys):
    script = _script()
    res = script.main(["--out", str(tmp_path), *ARGS])
    assert res["setup"]["n_train"] == 48 and res["setup"]["components"] == 4
    for key in ("label", "prediction"):
        assert 0 <= res["tunings"][key] <= 1
    h = res["held_out"]
    assert h["n_tuned_prediction"] >= 1 and 0 <= h["same_prediction"] <= 1  # 4 components on a tiny model: tuned
    for rec in ("minnorm-b12", "adjoint-b12"):  # tagged: not the paper's 1,000 baseline examples
        p = res["perturb"][rec]
        assert p["n_components"] == 2 and p["kl_ratio"] > 0 and p["norm_ratio"] > 0 and p["n_baseline"] == 12
    assert set(res["ablate-d"]) == {64, 128} and res["ablate-d"][128]["similarity_to_d128"] == pytest.approx(1.0)
    sizes = res["ablate-components"]["sizes"]
    assert set(sizes) == {3, 6} and "splits_keep_prediction_from_c3" in sizes[6]
    assert res["ablate-eps"]["EPS 2, SVD rank 2"]["similarity"] == pytest.approx(1.0)
    assert {"EPS 2, SVD rank 1", "EPS 1, SVD rank 1"} <= set(res["ablate-eps"])
    conv = res["convergence"]
    exact = torch.load(tmp_path / "convergence" / "exact.pt")  # [examples, rows, parameters]
    assert exact.shape[:2] == (12, 2) and conv["unprojected"]["n_params"] == exact.shape[2]
    assert all(0 < conv[d]["similarity_to_unprojected"] <= 1 + 1e-9 for d in ("64", "256"))
    out = capsys.readouterr().out
    assert "prediction-tuned (§3.1)" in out and "recovery minnorm-b12" in out and "D.6" in out

    times = json.loads((tmp_path / "times.json").read_text())
    again = script.main(["--out", str(tmp_path), *ARGS])  # every stage is read back: no time is recorded again
    assert json.loads((tmp_path / "times.json").read_text()) == times
    for key in ("tunings", "held_out", "ablate-d", "ablate-eps", "convergence"):
        assert again[key] == res[key], key
    for rec in ("minnorm-b12", "adjoint-b12"):  # tagged: not the paper's 1,000 baseline examples
        assert again["perturb"][rec]["kl_ratio"] == res["perturb"][rec]["kl_ratio"]


def test_a_two_label_pef_has_rank_one():
    """Why the SVD-rank ablation runs on a next-token task: with two label tokens (normalised over the labels,
    App. E.1) the rows sqrt(p_y) grad log p_y sum to grad (p_0 + p_1) = 0."""
    import npeff_lens as nl
    from npeff_lens.pef import PEFComputer
    from npeff_lens.projection import SparseProjection
    from npeff_lens.tasks import LabelTokens

    adapter = nl.load_model("tiny-llama")
    adapter.eval()
    task = LabelTokens("Review: {text} Sentiment:", [" bad", " sad"]).bind(adapter)
    named = adapter.named_parameters()
    n = sum(p.numel() for _, p in named)
    computer = PEFComputer(adapter, task, named, SparseProjection(n, 512, seed=0, density=4))
    pefs, _ = computer.compute(task.prompts(["a dull film", "wonderful and moving", "fun"]))
    pefs = pefs.double()
    s = torch.linalg.svdvals(pefs)  # [examples, 2]
    assert (s[:, 1] <= 1e-5 * s[:, 0]).all(), s
