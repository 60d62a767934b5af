"""A prompt longer than ``max_length`` loses tokens from the end of its text, never from the template
(``Task.fitted_prompts``): the collection stores the prediction, probabilities and PEF of the prompt built from the
shortened text (checked against that prompt tokenised and run by hand), counts the removed tokens in its metadata
and says so in one line; ``max_length=None`` keeps every token; a template longer than ``max_length`` is one error;
``npeff explain``, the activation baselines, ICL and the zero-shot check shorten the same way."""

from __future__ import annotations

import logging
import warnings

import datasets
import pytest
import torch
from helpers import LABELS, TEMPLATE

from npeff_lens.applications.icl import best_of_n_icl
from npeff_lens.baselines import FitInputs, _prompts
from npeff_lens.baselines.activations import activations, default_hook
from npeff_lens.collect import collect_pefs
from npeff_lens.explain import explain
from npeff_lens.rundir import run_prompts, space_options
from npeff_lens.runs import decompose_store
from npeff_lens.store import PEFStore
from npeff_lens.tasks import LabelTokens, shortened_note
from npeff_lens.zero_shot import label_token_scores

MAX = 24
LONG = "a great and moving film , " * 12  # ~70 tokens: the prompt exceeds MAX
SHORT = ["dull film", "happy movie", "sad and awful", "great fun"]
TAIL = " Sentiment:"  # TEMPLATE's tail: where the prediction is read

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:label .* tokens after the prompt"),
]


def _kept(tok, text: str, cut: int) -> str:
    """``text`` without its last ``cut`` tokens (tokenised alone), built independently."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return tok.decode(ids[: len(ids) - cut])


def _by_hand(tok, text: str, cut: int) -> str:
    """The prompt of ``text`` without its last ``cut`` tokens."""
    return TEMPLATE.replace("{text}", _kept(tok, text, cut))


def _label_probs(adapter, task, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return adapter.logits([prompt])[0, task.token_ids].float().softmax(-1)


@pytest.fixture(scope="module")
def collected(tmp_path_factory, adapter, task):
    root = tmp_path_factory.mktemp("fitted")
    texts = [SHORT[0], LONG, *SHORT[1:], LONG] * 2
    data = datasets.Dataset.from_dict({"text": texts, "label": ["bad", "sad"] * (len(texts) // 2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the adapter's truncation (a safety net) must not fire
        warnings.filterwarnings("ignore", "label .* tokens after the prompt")
        store = collect_pefs(
            adapter,
            data,
            task,
            root / "pefs",
            proj_dim=64,
            batch_size=5,
            max_length=MAX,
            dtype="float32",
            progress=False,
        )
    return {"root": root, "store": store, "texts": texts}


def test_fitted_prompts_shorten_the_text_and_keep_the_template(adapter, task):
    tok = adapter.tokenizer
    tail = tok(TAIL, add_special_tokens=False)["input_ids"]
    n_text = len(tok(LONG, add_special_tokens=False)["input_ids"])
    frame = len(tok(task.format(LONG))["input_ids"]) - n_text  # the template's tokens around the text
    for max_length in (9, 12, 20, 31):
        prompts, cuts = task.fitted_prompts(tok, [LONG, *SHORT], max_length)
        ids = tok(prompts[0])["input_ids"]
        assert len(ids) == max_length  # filled to the limit: the tiny tokenizer's text tokens add up
        assert ids[-len(tail) :] == tail
        assert prompts[0] == _by_hand(tok, LONG, cuts[0])
        assert cuts[0] == n_text - (max_length - frame)
        assert prompts[1:] == task.prompts(SHORT) and cuts[1:] == [0] * len(SHORT)
    assert task.fitted_prompts(tok, [LONG], None) == (task.prompts([LONG]), [0])


def test_special_tokens_count(adapter):
    """A tokenizer that adds a BOS: the BOS is one of the max_length tokens."""
    from tokenizers import processors

    tok = adapter.tokenizer.__class__.from_pretrained(adapter.tokenizer.name_or_path)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    task = LabelTokens(TEMPLATE, LABELS)
    prompts, cuts = task.fitted_prompts(tok, [LONG], 16)
    ids = tok(prompts[0])["input_ids"]
    assert ids[0] == bos and len(ids) == 16 and prompts[0].endswith(TAIL)
    assert cuts[0] == task.fitted_prompts(adapter.tokenizer, [LONG], 16)[1][0] + 1  # one text token less


def test_collect_reads_the_prediction_after_the_template(collected, adapter, task, capsys):
    store, texts, tok = collected["store"], collected["texts"], adapter.tokenizer
    meta = store.read_metadata()
    for i, m in enumerate(meta):
        if texts[i] != LONG:
            assert m["text_tokens_cut"] == 0
            continue
        cut = m["text_tokens_cut"]
        prompt = _by_hand(tok, LONG, cut)
        ids = tok(prompt)["input_ids"]
        assert cut > 0 and len(ids) == MAX and tok.decode(ids).endswith(TAIL)  # the template's tail read
        want = _label_probs(adapter, task, prompt)
        torch.testing.assert_close(torch.tensor(m["probs"]), want, rtol=1e-4, atol=1e-6)
        assert m["prediction"] == int(want.argmax())
        # the old right truncation read the token after "film ,": another distribution
        cut_off = tok.decode(tok(task.format(LONG))["input_ids"][:MAX])
        assert not torch.allclose(_label_probs(adapter, task, cut_off), want, atol=1e-3)
    assert store.metadata["text_tokens_cut"] == [m["text_tokens_cut"] for m in meta]

    # its PEF is the fitted prompt's: collected alone, by hand, into another store
    alone = collect_pefs(
        adapter,
        [_kept(tok, LONG, meta[1]["text_tokens_cut"])],
        task,
        collected["root"] / "alone",
        proj_dim=64,
        max_length=None,
        dtype="float32",
        progress=False,
    )
    torch.testing.assert_close(store.load_pefs([1])[0], alone.load_pefs([0])[0], rtol=1e-4, atol=1e-6)


def test_collect_ends_with_one_line_and_none_keeps_every_token(tmp_path, adapter, task, caplog):
    data = [SHORT[0], LONG, SHORT[1], LONG + "sad and awful "]
    with caplog.at_level(logging.INFO, logger="npeff_lens"):
        collect_pefs(adapter, data, task, tmp_path / "a", proj_dim=32, max_length=MAX, progress=False)
    lines = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("2 of 4 inputs were longer than max_length=24 tokens")
    cuts = task.fitted_prompts(adapter.tokenizer, data, MAX)[1]
    assert (
        lines[0] == f"{shortened_note(cuts, MAX)}; the store's metadata 'text_tokens_cut' column "
        "has the count per example"
    )
    assert f"shortened by {min(c for c in cuts if c)}–{max(cuts)} tokens (the template kept)" in lines[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="npeff_lens"):
        full = collect_pefs(adapter, data, task, tmp_path / "b", proj_dim=32, max_length=None, progress=False)
    assert not any("longer than" in r.getMessage() for r in caplog.records)
    meta = full.read_metadata()
    assert [m["text_tokens_cut"] for m in meta] == [0, 0, 0, 0]
    torch.testing.assert_close(
        torch.tensor(meta[1]["probs"]), _label_probs(adapter, task, task.format(LONG)), rtol=1e-4, atol=1e-6
    )


def test_a_template_longer_than_max_length_is_one_clear_error(tmp_path, adapter, task):
    n = len(adapter.tokenizer(TEMPLATE.replace("{text}", ""))["input_ids"])
    with pytest.raises(ValueError, match=rf"template .* alone is {n} tokens .* more than max_length=3"):
        collect_pefs(adapter, SHORT, task, tmp_path / "s", proj_dim=32, max_length=3, progress=False)


def test_a_store_without_the_column_still_loads(tmp_path):
    """A store written before the column existed, then resumed: its older rows read None there, the new ones a
    count (tests/test_old_run.py resumes such a store end to end)."""
    rows = [{"index": i, "text": t, "prediction": 0, "pef_norm": 1.0, "flag": None} for i, t in enumerate(SHORT[:3])]
    with PEFStore.create(tmp_path / "s", {"task": "t"}, rows=1, dim=4, dtype="float32", shard_size=2) as store:
        store.append(torch.ones(2, 1, 4), rows[:2])
        store.flush()
        store.append(torch.ones(1, 1, 4), [{**rows[2], "text_tokens_cut": 5}])
    assert PEFStore(tmp_path / "s").metadata["text_tokens_cut"] == [None, None, 5]


def test_explain_shortens_as_the_collection_did(collected, adapter, task):
    root, store = collected["root"], collected["store"]
    decompose_store(store, root / "npeff", n_components=2, n_steps=40, n_warmup_steps=5, progress=False)
    [e] = explain(root / "npeff", LONG, adapter=adapter, top=2, n_examples=2, k=2)
    m = store.read_metadata(1, 2)[0]
    assert e.text_tokens_cut == m["text_tokens_cut"] > 0 and e.prompt == _by_hand(
        adapter.tokenizer, LONG, e.text_tokens_cut
    )
    assert e.n_tokens == MAX and any(f"last {m['text_tokens_cut']} token(s) were left out" in n for n in e.notes)
    assert list(e.probabilities.values()) == pytest.approx(m["probs"], rel=1e-4, abs=1e-6)
    torch.testing.assert_close(e.pef, store.load_pefs([1])[0], rtol=1e-4, atol=1e-6)
    assert e.components
    for c in e.components:  # the token attributions read the same prompt
        assert len(c.tokens) == MAX and "".join(c.tokens).endswith(TAIL)
        # the kept text's tokens are the input's, "Review", ":", " Sentiment", ":" the template's
        assert c.from_text == [False, False] + [True] * (MAX - 4) + [False, False]


def test_the_activation_reader_reads_the_runs_prompts(collected, adapter, task):
    store, texts, tok = collected["store"], collected["texts"], adapter.tokenizer
    x = FitInputs(adapter, task, texts, 2, None, collected["root"], space_options(store.manifest))
    prompts = _prompts(x)
    assert prompts == run_prompts(store.manifest, adapter, task, texts)
    cut = store.read_metadata(1, 2)[0]["text_tokens_cut"]
    assert prompts[1] == _by_hand(tok, LONG, cut)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no truncation of the fitted prompts
        acts = activations(adapter, prompts[:2], default_hook(adapter), max_length=MAX, show_progress=False)
    assert acts.token_ids[acts.example_index == 1].tolist() == tok(prompts[1])["input_ids"]
    with pytest.warns(UserWarning, match="longer than max_length=24 tokens lost their last tokens"):
        activations(adapter, task.prompts(texts[:2]), default_hook(adapter), max_length=MAX, show_progress=False)


def test_icl_and_zero_shot_shorten_the_query(adapter, task):
    tok = adapter.tokenizer
    train = SHORT * 3
    labels = [0, 1] * 6
    r = best_of_n_icl(
        adapter, task, train, labels, None, [LONG, SHORT[0]], shots=2, n_prompts=2, n_select=4, max_length=40
    )
    assert r.text_tokens_cut[0] > 0 and r.text_tokens_cut[1] == 0
    assert r.shortened.startswith("1 of 2 in-context queries was longer than max_length=40 tokens")
    query, _ = task.fitted_prompts(tok, [LONG], 40, prefix=r.prefix)
    assert len(tok(query[0])["input_ids"]) == 40 and query[0].startswith(r.prefix) and query[0].endswith(TAIL)
    with pytest.raises(ValueError, match="demonstrations and the prompt template alone are .* max_length=5"):
        best_of_n_icl(adapter, task, train, labels, None, [LONG], shots=2, n_prompts=1, n_select=4, max_length=5)

    scores = label_token_scores(adapter, [LONG], TEMPLATE, LABELS, max_length=MAX)
    prompt = task.fitted_prompts(tok, [LONG], MAX)[0][0]
    torch.testing.assert_close(scores[0], adapter.logits([prompt])[0, task.token_ids].float().detach())


def test_resuming_a_store_begun_by_right_truncation_warns(tmp_path, adapter, task, monkeypatch):
    """A store whose rows lack text_tokens_cut (an earlier version cut prompts from the right), resumed: one warning
    that its earlier examples were read without the template's tail."""
    from npeff_lens import collect as collect_module
    from npeff_lens.pef import PEFComputer

    data = [*SHORT, LONG]
    write = collect_module._Writer.write

    def as_before(self, lo, fill, pefs, meta):  # the rows as the earlier version wrote them
        return write(self, lo, fill, pefs, [{k: v for k, v in m.items() if k != "text_tokens_cut"} for m in meta])

    compute, calls = PEFComputer.compute, []

    def fails_second(self, *args, **kwargs):  # the first batch is committed, the second never computed
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return compute(self, *args, **kwargs)

    options = dict(proj_dim=32, max_length=MAX, batch_size=2, progress=False)
    with monkeypatch.context() as m:
        m.setattr(collect_module._Writer, "write", as_before)
        m.setattr(PEFComputer, "compute", fails_second)
        with pytest.raises(RuntimeError, match="stopped"):
            collect_pefs(adapter, data, task, tmp_path / "s", n=5, **options)
    with pytest.warns(UserWarning, match=r"holds 2 examples collected by an earlier version, which cut prompts longer"):
        store = collect_pefs(adapter, data, task, tmp_path / "s", n=5, **options)
    assert store.metadata["text_tokens_cut"][2:] == [0, 0, store.metadata["text_tokens_cut"][4]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete: nothing is collected, nothing to say
        collect_pefs(adapter, data, task, tmp_path / "s", n=5, **options)


def test_the_resume_check_reads_an_example_the_store_holds():
    """A store whose first shard was removed by repair: the check reads past the missing range, never into it."""
    from npeff_lens.collect import _warn_if_resumed_from_right_truncation

    class Repaired:  # examples [0, 2) missing, [2, 4) held without the column
        path, missing = "s", [(0, 2)]

        def __len__(self):
            return 4

        def read_metadata(self, start, stop):
            assert start >= 2, "read a missing example"
            return [{"index": start}]

    with pytest.warns(UserWarning, match="holds 4 examples collected by an earlier version"):
        _warn_if_resumed_from_right_truncation(Repaired(), 24, 10)
