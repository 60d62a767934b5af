"""``npeff explain`` (npeff_lens.explain) on a tiny-llama run: a training example's text gets back its stored PEF
bit for bit and the coefficients the fit gave it; the explained share is the fit's per-example loss (checked
against the dense d x d matrices); the top components, their tunings and top examples are the run's; token shares
sum to the loading; an input from outside the run's data is answered; bad inputs are one-line errors; the page
works in headless chromium from file:// with the network blocked and links each component to the run's report."""

from __future__ import annotations

import json
import os
import random
import shlex
import warnings

import pytest
import torch
from helpers import CHROMIUM, HAS_CHROMIUM, offline_page

import npeff_lens as nl
from npeff_lens.analysis import active, active_threshold, top_examples, tunings
from npeff_lens.attribution import stored_loadings
from npeff_lens.cli import main
from npeff_lens.collect import collect_pefs
from npeff_lens.explain import LOW_SHARE, explain, format_explanation, relative_errors, write_page
from npeff_lens.report import build
from npeff_lens.rundir import label_columns, load_run
from npeff_lens.runs import decompose_store
from npeff_lens.tasks import LabelTokens

WORDS = "great dull moving boring fun sad happy awful wonderful terrible brilliant good bad film movie".split()
TEMPLATE = "Review: {text} Sentiment:"
LABELS = [" bad", " sad"]
N, C, K = 32, 4, 6
OUTSIDE = "The capital of France is Paris, and the train leaves at noon."

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:label .* tokens after the prompt"),
]


def _reviews(n, seed=0):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    return texts, [rng.choice(["bad", "sad"]) for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """collect (float16 store, projected to 256) -> decompose -> report, and the explanations of four training
    texts and one text from elsewhere, with the model loaded by name from the run's manifest."""
    import datasets

    root = tmp_path_factory.mktemp("explain")
    texts, labels = _reviews(N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = nl.load_model("tiny-llama")
        store = collect_pefs(
            adapter,
            datasets.Dataset.from_dict({"text": texts, "label": labels}),
            LabelTokens(TEMPLATE, LABELS),
            root / "pefs",
            proj_dim=256,
            batch_size=8,
            progress=False,
        )
        est = decompose_store(store, root / "npeff", n_components=C, n_steps=300, n_warmup_steps=10, progress=False)
        build(root / "npeff", k=K, attribute=False, progress=False)
        asked = [3, 0, 17, 30]
        explanations = explain(root / "npeff", [texts[i] for i in asked] + [OUTSIDE], top=3, n_examples=3, k=K)
    return {"root": root, "store": store, "est": est, "texts": texts, "asked": asked, "ex": explanations}


def test_a_training_text_gets_its_stored_pef_and_the_fits_coefficients(run):
    store, est = run["store"], run["est"]
    G = store.load_pefs(run["asked"])
    refit = est.transform(G)
    for n, i in enumerate(run["asked"]):
        e = run["ex"][n]
        assert store.manifest["config"]["dtype"] == "float16"
        # the collection's computation rounded as stored: padding in the run's batches moves at most one ulp
        torch.testing.assert_close(e.pef, G[n], rtol=2e-3, atol=1e-7)
        assert float((e.pef == G[n]).double().mean()) > 0.98
        assert e.pef_norm == pytest.approx(store.read_metadata(i, i + 1)[0]["pef_norm"], rel=1e-5)
        torch.testing.assert_close(e.coefficients, refit[n].double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(e.coefficients, est.coefficients_[i].double(), rtol=0, atol=5e-3)
        assert e.prediction == store.read_metadata(i, i + 1)[0]["prediction_name"]
        assert list(e.probabilities) == LABELS and sum(e.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_explained_is_one_minus_the_fits_per_example_loss(run):
    store, est = run["store"], run["est"]
    G = store.load_pefs()
    per_example = relative_errors(G, est.components_, est.coefficients_)
    assert float(per_example.mean()) == pytest.approx(est.reconstruction_err_, rel=1e-4)  # the fit's own loss
    H = est.components_.double()
    for n, e in enumerate(run["ex"]):
        g = e.pef.double()
        F = g.T @ g
        F = F / F.norm()  # the unit-norm PEF, dense d x d
        R = torch.einsum("j,jd,je->de", e.coefficients, H, H)
        assert e.relative_error == pytest.approx(float((F - R).square().sum()), rel=1e-6, abs=1e-9)
        assert e.explained == pytest.approx(1 - e.relative_error) and 0 <= e.explained <= 1
        if n < len(run["asked"]):  # the transform's coefficients fit it at least as well as the fit's
            fitted = relative_errors(g[None], H, est.coefficients_[run["asked"][n]][None])
            assert e.relative_error <= float(fitted) + 1e-6
    assert run["ex"][0].run["mean_explained"] == pytest.approx(1 - est.reconstruction_err_)


def test_top_components_tunings_and_examples_are_the_runs(run):
    est, store = load_run(run["root"] / "npeff")
    labels, preds = label_columns(store)
    tuned_label, tuned_pred = tunings(est.coefficients_, labels, k=K), tunings(est.coefficients_, preds, k=K)
    top = top_examples(est.coefficients_, k=3)
    texts = run["texts"]
    for e in run["ex"]:
        order = torch.argsort(e.coefficients, descending=True).tolist()
        on = active(e.coefficients[None], active_threshold(est.coefficients_))[0]  # at the run's scale
        want = [j for j in order[:3] if on[j]]
        assert [c.component for c in e.components] == want and e.top_component.component == want[0]
        assert [c.coefficient for c in e.components] == pytest.approx([float(e.coefficients[j]) for j in want])
        for c in e.components:
            j = c.component
            assert (c.tuned_label, c.tuned_prediction) == (tuned_label[j], tuned_pred[j])
            assert [x["example"] for x in c.examples] == top[j].tolist()
            assert [x["text"] for x in c.examples] == [texts[i] for i in top[j].tolist()]
            assert [x["coefficient"] for x in c.examples] == pytest.approx(est.coefficients_[top[j], j].tolist())
            assert c.page.endswith(f"components/component_{j:05d}.html") and os.path.isfile(c.page)


def test_token_shares_sum_to_the_loading_on_each_component(run):
    est = run["est"]
    for e in run["ex"]:
        for c in e.components:
            assert len(c.tokens) == len(c.shares) == len(c.token_ids) == e.n_tokens
            assert "".join(c.tokens).endswith(e.prompt)
            assert sum(c.shares) + sum(c.remainder.values()) == pytest.approx(1.0, abs=1e-4)
            want = float(stored_loadings(e.pef[None], est.components_[c.component]))
            assert c.loading == pytest.approx(want, rel=5e-3)  # the stored PEF is float16
            token, share = c.top_tokens(1)[0]
            assert share == max(c.shares) and token == c.tokens[c.shares.index(share)]
            assert "".join(t for t, f in zip(c.tokens, c.from_text) if f).strip() == e.text  # the input's tokens
            template = "".join(t for t, f in zip(c.tokens, c.from_text) if not f)
            assert template.split() == TEMPLATE.replace("{text}", "").split()  # " bad" is the text's token
            assert c.template_share == pytest.approx(sum(v for v, f in zip(c.shares, c.from_text) if not f))
            assert all(c.from_text[c.tokens.index(t)] for t, _ in c.top_tokens(3, text_only=True))


def test_an_input_from_outside_the_runs_data_is_answered(run):
    e = run["ex"][-1]
    assert e.text == OUTSIDE and e.flag is None
    assert e.prediction in LABELS and 0 <= e.explained <= 1 and torch.isfinite(e.coefficients).all()
    low = e.explained < LOW_SHARE * e.run["mean_explained"]
    assert low == any("outside the run's data" in n for n in e.notes)
    assert e.components and all(c.loading > 0 for c in e.components)


def test_a_zero_pef_is_answered_with_no_share_and_a_note(run, monkeypatch):
    from npeff_lens.pef import PEFComputer

    compute = PEFComputer.compute

    def one_hot(self, prompts, max_length=None):  # a one-hot prediction has zero Fisher
        pefs, log_probs = compute(self, prompts, max_length=max_length)
        return pefs * (torch.arange(len(prompts)) != 1)[:, None, None], log_probs

    monkeypatch.setattr(PEFComputer, "compute", one_hot)
    texts = [run["texts"][3], run["texts"][0]]
    kept, zero = explain(run["root"] / "npeff", texts, k=K)
    assert zero.flag == "zero_pef" and zero.explained is None and zero.relative_error is None
    assert not zero.coefficients.any() and zero.components == [] and any("zero_pef" in n for n in zero.notes)
    torch.testing.assert_close(kept.coefficients, run["ex"][0].coefficients, rtol=0, atol=1e-6)
    assert kept.flag is None and kept.explained == pytest.approx(run["ex"][0].explained, abs=1e-6)
    assert json.loads(json.dumps(zero.to_dict()))["explained"] is None
    assert "explained: –" in format_explanation(zero)


def test_components_not_active_on_an_input_are_left_out(run, monkeypatch):
    """A coefficient of 0, or a leftover of the multiplicative updates (1e-30), is not listed among an input's top
    components; an input with none active says so."""
    import npeff_lens.explain as ex

    scale = run["est"].coefficients_.double().max(0).values
    rows = torch.zeros(2, C, dtype=torch.float64)
    rows[0, 1], rows[0, 2] = 0.5 * scale[1], 1e-30  # component 1 active; 2 a leftover; 0 and 3 zero
    rows[1, :] = 1e-30
    monkeypatch.setattr(ex, "_coefficients", lambda est, pefs: rows[: pefs.shape[0]].clone())
    one, none = explain(run["root"] / "npeff", [run["texts"][3], run["texts"][0]], top=C, k=K)
    assert [c.component for c in one.components] == [1] and not any("active" in n for n in one.notes)
    assert none.components == [] and any(n.startswith("no component is active on this input") for n in none.notes)
    assert "note: no component is active on this input (active = coefficient above 0.1%" in format_explanation(none)


def test_bad_inputs_are_one_line_errors_of_the_clis_kinds(run, tmp_path):
    from npeff_lens.cli import _user_errors

    d = run["root"] / "npeff"
    cases = [
        (d, "", "text 0 is empty"),
        (d, ["fine", "   \n"], "text 1 is empty"),
        (d, " ".join(["movie"] * 200), "tiny-llama takes at most 128"),
        (tmp_path, "a fine movie", "holds no decomposition"),
        (tmp_path / "nowhere", "a fine movie", "does not exist"),
        (d, [], "no text to explain"),
    ]
    for where, texts, message in cases:
        with pytest.raises(_user_errors(), match=message) as info:
            explain(where, texts)
        assert "\n" not in str(info.value)


def test_json_and_the_terminal_view(run):
    e = run["ex"][0]
    d = json.loads(json.dumps(e.to_dict()), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert d["coefficients"] == pytest.approx(e.coefficients.tolist())
    assert [c["component"] for c in d["components"]] == [c.component for c in e.components]
    assert "attribution" not in d["components"][0] and "pef" not in d
    text = format_explanation(e)
    top = e.top_component
    assert f"prediction: {e.prediction.strip()}" in text and f"{e.explained:.1%}" in text
    assert f"component {top.component} " in text and f"{top.coefficient:.4g}" in text
    assert top.top_tokens(1, text_only=True)[0][0].strip() in text.split(f"component {top.component} ")[1]
    assert " ".join(top.examples[0]["text"].split())[:20] in text


def test_page_without_a_report_has_no_links(run, tmp_path):
    page = write_page(run["ex"][:1], tmp_path / "page.html", report_dir=tmp_path)
    html = page.read_text()
    assert "<a href" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert "<script" not in html and '<link rel="stylesheet"' not in html  # self-contained


@pytest.mark.skipif(not HAS_CHROMIUM, reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")
def test_page_in_headless_chromium_offline(run, tmp_path):
    explanations = run["ex"]
    page_path = write_page(explanations, tmp_path / "out" / "explain.html")
    with offline_page() as (page, requests, errors):
        page.goto(page_path.as_uri())
        sections = page.locator("section.explanation")
        assert sections.count() == len(explanations)
        for n, e in enumerate(explanations):
            section = sections.nth(n)
            assert section.locator(".input").inner_text() == e.text
            shown = section.locator(".component").evaluate_all("els => els.map(e => Number(e.dataset.component))")
            assert shown == [c.component for c in e.components]
            first = section.locator(".component").first
            spans = first.locator(".tokens span.tok")
            assert spans.count() == len(e.top_component.tokens)
            values = spans.evaluate_all("els => els.map(e => Number(e.dataset.value))")
            assert values == pytest.approx(e.top_component.shares, rel=1e-9)
            assert f"{100 * e.explained:.1f}%" in section.inner_text()
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(247, 248, 250)"  # report.css
        top = explanations[0].top_component.component
        sections.first.locator(".component").first.locator("h3 a").click()
        page.wait_for_load_state()
        assert page.url.endswith(f"/report/components/component_{top:05d}.html")
        assert f"Component {top}" in page.inner_text("h1")
        page.screenshot(path=str(tmp_path / "explain.png"), full_page=True)
    assert not errors, errors
    assert requests and all(u.startswith("file:") for u in requests), [u for u in requests if not u.startswith("file:")]


def test_an_unlocated_run_says_in_one_line_how_to_locate_it(run, tmp_path):
    d = run["root"] / "npeff"
    e = run["ex"][0]
    assert e.run["locations"] is None and all(c.location is None for c in e.components)
    lines = [line for line in format_explanation(e).splitlines() if "where:" in line]
    assert lines == [f"  where: components not located for this run: `npeff top {d} --where` writes {d}/locations.json"]
    html = write_page([e], tmp_path / "page.html", report_dir=tmp_path).read_text()
    assert f"npeff top {d} --where" in html and 'data-what="where"' not in html


def test_a_located_run_says_where_each_top_component_lives(run, tmp_path, monkeypatch):
    """With DECOMPOSITION_DIR/locations.json (as `npeff top --where` writes it) the text and the page say where
    each of the input's top components lives, in `npeff top --where`'s words; explain reads the file, never
    locates."""
    import shutil
    from html import escape

    import npeff_lens.locations as locations
    from npeff_lens.locations import location_words
    from npeff_lens.runs import locate

    d = tmp_path / "npeff"
    shutil.copytree(run["root"] / "npeff", d, ignore=shutil.ignore_patterns("report"))
    adapter = nl.load_model("tiny-llama")
    entries = locate(d, store=run["store"], adapter=adapter, k=4, progress_bar=False)["components"]
    monkeypatch.setattr(locations, "component_locations", lambda *a, **k: pytest.fail("located again"))
    [e] = explain(d, run["texts"][3], store=run["store"], adapter=adapter, top=3, k=K)
    assert e.run["locations"] == str(d / "locations.json") and e.run["locations_note"] is None and e.components
    text = format_explanation(e).splitlines()
    html = write_page([e], tmp_path / "page.html").read_text()
    for c in e.components:
        words = location_words(entries[c.component])
        assert c.location["where"] == words["where"] and c.location["heads"] == words["heads"]
        assert words["heads"] and "top 5% of groups" in words["where"]
        at = text.index(next(line for line in text if line.startswith(f"  component {c.component} ")))
        assert text[at + 1] == f"    where: {words['where']}"
        assert text[at + 2] == f"    heads: {'; '.join(words['heads'])}"
        assert f'data-what="where">where: {escape(words["where"])}</div>' in html
        assert f'data-what="heads">heads: {escape("; ".join(words["heads"]))}</div>' in html
    assert "not located" not in "\n".join(text) and 'id="where-note"' not in html
    saved = json.loads(json.dumps(e.to_dict()))
    assert saved["components"][0]["location"]["where"] == e.components[0].location["where"]


@pytest.mark.parametrize("rank", [1, 3])  # App. C: fewer rows than the task's 2, or zero rows padded to 3
def test_a_rank_reduced_run_reproduces_its_stored_rows(tmp_path, rank):
    texts, _ = _reviews(12, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = nl.load_model("tiny-llama")
        store = collect_pefs(
            adapter,
            texts,
            LabelTokens(TEMPLATE, LABELS),
            tmp_path / "pefs",
            proj_dim=128,
            rank=rank,
            dtype="float32",
            progress=False,
        )
        est = decompose_store(store, tmp_path / "npeff", n_components=2, n_steps=40, n_warmup_steps=5, progress=False)
        [e] = explain(tmp_path / "npeff", texts[5], adapter=adapter, top=2, k=4)
    G = store.load_pefs([5])
    assert e.pef.shape == (rank, 128)
    torch.testing.assert_close(e.pef, G[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e.coefficients, est.transform(G)[0].double(), rtol=1e-4, atol=1e-6)
    assert e.components
    for c in e.components:
        assert sum(c.shares) + sum(c.remainder.values()) == pytest.approx(1.0, abs=1e-4)
        assert c.loading == pytest.approx(float(stored_loadings(G, est.components_[c.component])), rel=1e-4)
        assert c.page is None  # the run has no report


def test_the_command_prints_the_top_components_and_writes_the_page_and_json(run, tmp_path, capsys):
    """`npeff explain DIR --text A --text B`: both inputs answered, in the order given; the page and the JSON
    are written into --out."""
    d = run["root"] / "npeff"
    out = tmp_path / "explained"
    argv = ["explain", str(d), "--out", str(out)] + shlex.split(
        "--text 'great fun film' --text 'awful dull movie' --top 2"
    )
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.index("great fun film") < printed.index("awful dull movie")
    assert printed.count("component ") >= 4 and "explained:" in printed
    saved = json.loads((out / "explanations.json").read_text())
    assert [e["text"] for e in saved] == ["great fun film", "awful dull movie"]
    assert all(len(e["components"]) == 2 for e in saved)
    assert "great fun film" in (out / "index.html").read_text()
