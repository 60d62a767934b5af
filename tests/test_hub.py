"""Hub-ready artefacts (npeff_lens.hub): save_pretrained -> from_pretrained is exact; the model card parses with
huggingface_hub and carries the metadata; run / decomposition / pretrained directories all load; offline, a Hub
repo id is a one-line error."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from helpers import reviews_collect_argv, write_reviews_csv

from npeff_lens.cli import main
from npeff_lens.decomposition import NPEFF
from npeff_lens.hub import HubError, from_pretrained, load_decomposition, push_to_hub, save_pretrained

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:label .* tokens after the prompt"),
]


def _assert_same(a: NPEFF, b: NPEFF) -> None:
    for name in NPEFF._TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.n_iter_ == b.n_iter_ and a.reconstruction_err_ == b.reconstruction_err_
    assert a.manifest_ == b.manifest_
    skip = {"callback", "checkpoint_dir", "dtype", "device"}
    assert {k: v for k, v in a.get_params().items() if k not in skip} == {
        k: v for k, v in b.get_params().items() if k not in skip
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_reviews_csv(root / "reviews.csv", 20)
    assert main(reviews_collect_argv(root / "reviews.csv", root / "tree" / "pefs", "--split", "none")) == 0
    decompose = shlex.split("decompose --components 3 --steps 30 --warmup-steps 5 --no-progress")
    assert main([*decompose, "--store", str(root / "tree" / "pefs"), "--out", str(root / "tree" / "npeff")]) == 0
    return root


def test_round_trip_of_an_estimator_is_exact(tmp_path):
    pefs = torch.rand(12, 2, 16, generator=torch.Generator().manual_seed(0))
    est = NPEFF(4, n_steps=15, n_warmup_steps=5, progress=False, device="cpu").fit(pefs)
    manifest = {"model": {"name": "my-org/my-model", "backend": "hf"}, "task": {"kind": "label-tokens"}}
    out = save_pretrained(est, tmp_path / "pretrained", store_manifest=manifest, run_configs={"note": {"a": 1}})
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "npeff.safetensors",
        "run_configs.json",
    ]
    back = from_pretrained(out)
    _assert_same(est, back)
    assert back.manifest_ == manifest and NPEFF.load(out).manifest_ == manifest  # NPEFF.save's own format
    assert json.loads((out / "run_configs.json").read_text()) == {"note": {"a": 1}}
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "my-org/my-model" and card.data.library_name == "npeff_lens"
    assert "Not computed here" in card.text  # no store: no tunings claimed


def test_run_directory_to_a_hub_folder_with_a_model_card(run, tmp_path):
    from huggingface_hub import ModelCard

    root = run
    original = NPEFF.load(root / "tree" / "npeff")
    out = save_pretrained(root / "tree", tmp_path / "hub", repo_id="me/tiny-npeff")  # a run dir: finds npeff/
    for source in (out, root / "tree", root / "tree" / "npeff"):
        _assert_same(original, load_decomposition(source))
    _assert_same(original, from_pretrained(str(out)))
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "npeff_lens" and data["base_model"] == "tiny-llama"
    assert data["datasets"] == ["reviews"]
    assert {"npeff", "interpretability", "label-tokens"} <= set(data["tags"])
    text = card.text
    for fact in (
        "tiny-llama",
        "label-tokens",
        "d = 256",
        "| examples | 20",
        "| components | 3 (",
        "tuned to a label",
        'from_pretrained("me/tiny-npeff")',
        "Review: {text} Sentiment:",
    ):
        assert fact in text, fact
    configs = json.loads((out / "run_configs.json").read_text())
    assert configs["decompose"]["step"] == "decompose" and configs["collect"]["config"]["proj_dim"] == 256
    again = save_pretrained(out, tmp_path / "hub2")  # a pretrained folder is a decomposition too
    assert json.loads((again / "run_configs.json").read_text()) == configs
    _assert_same(original, from_pretrained(again))


def test_offline_hub_ids_are_one_line_errors(run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(HubError) as e:
        from_pretrained("someone/npeff-that-is-not-cached")
    assert "\n" not in str(e.value) and "someone/npeff-that-is-not-cached" in str(e.value)
    with pytest.raises(HubError) as e:
        push_to_hub(run / "tree" / "npeff", "someone/new-repo")
    assert "\n" not in str(e.value) and "someone/new-repo" in str(e.value)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a Hub repo id"):
        from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no NPEFF decomposition"):
        load_decomposition(tmp_path)
