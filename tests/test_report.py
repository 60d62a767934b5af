"""The component dashboard (npeff_lens.report) on a tiny-llama run built through the CLI: the JSON behind the
pages (strict JSON, the documented fields, token shares that reproduce the stored loadings), and the static
site in headless chromium from file:// with every non-file request aborted: all components listed, sorting
and filtering, a component page with highlighted tokens and a plotly histogram, no console errors, nothing
fetched from the network."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from npeff_lens.cli import main
from npeff_lens.report import build, report_data

WORDS = "great dull moving boring fun sad happy awful wonderful terrible brilliant good bad film movie".split()
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
N_COMPONENTS = 4
N_METHOD = 3  # clusters / SAE latents / SNMF features fitted by `npeff compare`
METHODS = ("grad-cluster", "sae", "snmf")

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:label .* tokens after the prompt"),
]


def _reviews(n, seed=0):
    rng = random.Random(seed)
    return [
        (" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))), rng.choice(["sad", "bad"])) for _ in range(n)
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """collect (CSV, tiny-llama) -> decompose -> perturb -> compare (gradient clusters, a TopK SAE), as a user
    would."""
    from npeff_lens.runs import run_perturbation

    root = tmp_path_factory.mktemp("report")
    csv = root / "reviews.csv"
    csv.write_text("review,sentiment\n" + "\n".join(f"{t},{s}" for t, s in _reviews(32)) + "\n")
    collect = ["collect", "--model", "tiny-llama", "--dataset", str(csv), "--text-column", "review",
               "--label-column", "sentiment", "--template", "Review: {text} Sentiment:", "--labels", " bad",
               " sad", "--proj-dim", "256", "--dtype", "float32", "--out", str(root / "tree" / "pefs"),
               "--split", "none", "--no-progress"]  # fmt: skip
    assert main(collect) == 0
    decompose = ["decompose", "--store", str(root / "tree" / "pefs"), "--components", str(N_COMPONENTS),
                 "--steps", "60", "--warmup-steps", "10", "--out", str(root / "tree" / "npeff"),
                 "--no-progress"]  # fmt: skip
    assert main(decompose) == 0
    run_perturbation(root / "tree" / "npeff", magnitude=0.5, top_k=4, n_baseline=8, recovery="adjoint",
                     out=root / "tree" / "perturb", progress=False)  # fmt: skip
    compare = ["compare", str(root / "tree" / "npeff"), "--components", str(N_METHOD), "--k", "4",
               "--sae-tokens", "2000", "--no-progress"]  # fmt: skip
    assert main(compare) == 0
    index = build(root / "tree" / "npeff", root / "site", k=6, n_attributed=4, progress=False)
    return root, index


def _strict(path: Path):
    def refuse(c):
        raise ValueError(f"{path} holds {c}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# --------------------------------------------------------------------------------------------------
# The data behind the pages.
# --------------------------------------------------------------------------------------------------


def test_index_json_lists_every_component_with_perturbation_and_compare(run):
    root, index_html = run
    site = index_html.parent
    assert index_html == root / "site" / "index.html" and index_html.is_file()
    index = _strict(site / "data" / "index.json")
    assert index["format"] == "npeff_lens.report" and index["kind"] == "index"
    assert [r["feature_index"] for r in index["components"]] == list(range(N_COMPONENTS))
    assert index["run"]["model"]["name"] == "tiny-llama" and index["run"]["n_examples"] == 32
    assert index["run"]["projection_dim"] == 256
    assert index["perturbation"]["path"].endswith("perturb/perturbation.json")  # found as a sibling run
    pert = json.loads((root / "tree" / "perturb" / "perturbation.json").read_text())["components"]
    for row, rec in zip(index["components"], pert):
        assert row["kl_ratio"] == pytest.approx(rec["kl_ratio"])
        assert (site / row["page"]).is_file() and (site / row["data"]).is_file()
    assert set(index["compare"]["methods"]) == {"npeff", *METHODS}
    assert index["compare"]["pages"] == {m: f"methods/{m}/index.html" for m in METHODS}
    assert sum(r["coefficient_mass"] for r in index["components"]) == pytest.approx(1.0)


def test_component_json_neuronpedia_fields_and_exact_token_shares(run):
    import torch

    from npeff_lens.runs import load_run

    root, index_html = run
    est, store = load_run(root / "tree" / "npeff")
    for j in range(N_COMPONENTS):
        c = _strict(index_html.parent / "data" / f"component_{j:05d}.json")
        assert c["feature_index"] == j and c["kind"] == "component" and c["n_prompts_total"] == 32
        assert sum(c["freq_hist_data_bar_heights"]) == round(c["frac_nonzero"] * 32)
        assert len(c["correlated_features_indices"]) == N_COMPONENTS - 1 and j not in c["correlated_features_indices"]
        assert c["perturbation"]["component"] == j and "kl_top_plus" in c["perturbation"]
        acts = c["activations"]
        coeffs = [a["coefficient"] for a in acts]
        assert coeffs == sorted(coeffs, reverse=True) and len(acts) <= 6
        assert sum(x["count"] for x in c["label_prediction_counts"]) == len(acts)
        for a in acts:
            G = store.load_pefs([a["example_index"]])
            want = float((G[0].double() @ est.components_[j].double()).square().sum())
            assert a["stored_loading"] == pytest.approx(want, rel=1e-6)
            if a["rank"] >= 4:  # only the top n_attributed are attributed
                assert a["values"] is None
                continue
            assert len(a["tokens"]) == len(a["values"]) == len(a["token_ids"]) > 0
            assert a["loading"] == pytest.approx(want, rel=1e-4)
            assert sum(a["values"]) + sum(a["remainder"].values()) == pytest.approx(1.0, abs=1e-4)
            assert a["values"][a["qualifying_token_index"]] == max(a["values"])
            assert a["text"] in "".join(a["tokens"])
        assert torch.isfinite(torch.tensor(coeffs)).all()


def test_pages_reference_only_local_files(run):
    _, index_html = run
    site = index_html.parent
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000  # bundled once, not per page
    pages = [index_html, *sorted((site / "components").glob("*.html"))]
    assert len(pages) == N_COMPONENTS + 1
    for m in METHODS:
        method_pages = [site / "methods" / m / "index.html", *sorted((site / "methods" / m / "components").glob("*"))]
        assert len(method_pages) == N_METHOD + 1
        pages += method_pages
    for page in pages:
        html = page.read_text()
        assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html, page
        for src in [s.split('"')[1] for s in html.split("src=")[1:]]:
            assert (page.parent / src).resolve().is_file(), (page, src)


def test_without_attributions_and_with_a_given_perturbation_file(run, tmp_path):
    root, _ = run
    index, comps = report_data(
        root / "tree" / "npeff", k=4, attribute=False, perturbation=root / "tree" / "perturb", progress=False
    )
    assert index["attribution_note"] and all(a["values"] is None for c in comps for a in c["activations"])
    assert index["perturbation"]["path"] == str(root / "tree" / "perturb" / "perturbation.json")
    with pytest.raises(FileNotFoundError, match="no perturbation results"):
        report_data(root / "tree" / "npeff", perturbation=tmp_path / "nowhere", attribute=False)


@pytest.mark.parametrize("method", METHODS)
def test_method_index_lists_every_cluster_and_latent(run, method):
    import re

    _, index_html = run
    site = index_html.parent
    page = site / "methods" / method / "index.html"
    html = page.read_text()
    index = _strict(site / "data" / "methods" / method / "index.json")
    assert index["kind"] == "index" and index["method"] == method and index["run"]["n_components"] == N_METHOD
    assert [r["feature_index"] for r in index["components"]] == list(range(N_METHOD))
    assert [int(j) for j in re.findall(r'data-component="(\d+)"', html)] == list(range(N_METHOD))
    assert 'href="../../index.html"' in html  # back to the main index
    assert f'href="methods/{method}/index.html"' in index_html.read_text()  # and from it
    for r in index["components"]:
        assert (page.parent / r["page"]).is_file() and (site / r["data"]).is_file()
        c = _strict(site / r["data"])
        assert c["kind"] == "component" and c["method"] == method and c["n_prompts_total"] == 32
        assert len(c["correlated_features_indices"]) == N_METHOD - 1
        assert sum(x["count"] for x in c["label_prediction_counts"]) == c["n_top"] == len(c["activations"])
        if method == "grad-cluster":
            assert all(a["values"] is None for a in c["activations"])
            assert "No token highlighting" in (page.parent / r["page"]).read_text()


@pytest.mark.parametrize("method", ["sae", "snmf"])
def test_sae_and_snmf_pages_highlight_the_per_token_values(run, method):
    import re

    import torch

    from npeff_lens.baselines.sae import TopKSAEBaseline
    from npeff_lens.baselines.snmf import SNMFBaseline

    root, index_html = run
    site = index_html.parent
    load = TopKSAEBaseline.load if method == "sae" else SNMFBaseline.load
    sae = load(root / "tree" / "npeff" / "compare" / method / method)
    n_checked = 0
    for j in range(N_METHOD):
        c = _strict(site / "data" / "methods" / method / f"component_{j:05d}.json")
        html = (site / "methods" / method / "components" / f"component_{j:05d}.html").read_text()
        blocks = re.findall(r'<div class="tokens">(.*?)</div>', html, flags=re.S)
        assert len(blocks) == len(c["activations"])
        for a, block in zip(c["activations"], blocks):
            acts = sae.token_activations(a["example_index"])[:, j].double()
            assert a["coefficient"] == pytest.approx(float(acts.max()), rel=1e-5)  # max over its tokens
            want = acts / acts.max()  # documented: activation / its max over the example's tokens
            assert a["shares"] == pytest.approx(acts.tolist(), rel=1e-5)
            assert a["values"] == pytest.approx(want.tolist(), rel=1e-5)
            assert a["values"][a["qualifying_token_index"]] == 1.0
            shown = [float(v) for v in re.findall(r'<span class="tok"[^>]*data-value="([^"]+)"', block)]
            assert shown == pytest.approx(want.tolist(), rel=1e-5) and len(a["tokens"]) == len(shown)
            assert torch.equal(torch.tensor(a["token_ids"]), sae.token_ids_[sae.example_index_ == a["example_index"]])
            n_checked += 1
    assert n_checked > 0


# --------------------------------------------------------------------------------------------------
# The site in a browser.
# --------------------------------------------------------------------------------------------------


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def _visible_components(page) -> list[int]:
    return page.eval_on_selector_all(
        "#components tbody tr", "rows => rows.filter(r => !r.hidden).map(r => Number(r.dataset.component))"
    )


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")
def test_site_in_headless_chromium_offline(run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    _, index_html = run
    index = json.loads((index_html.parent / "data" / "index.json").read_text())
    requests, errors = [], []
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.route(
            "**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort()
        )
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index_html.as_uri())

        assert sorted(_visible_components(page)) == list(range(N_COMPONENTS))  # every component listed
        assert page.inner_text("#count") == f"{N_COMPONENTS} of {N_COMPONENTS} components"
        assert page.locator("#compare tbody tr").count() == 1 + len(METHODS)

        # sorting: coefficient mass ascending, then descending; back to the component order
        mass = {r["feature_index"]: r["coefficient_mass"] for r in index["components"]}
        header = page.locator("#components th", has_text="coefficient mass")
        header.click()
        assert _visible_components(page) == sorted(mass, key=lambda j: (mass[j], j))
        assert header.get_attribute("aria-sort") == "ascending"
        header.click()
        assert _visible_components(page) == sorted(mass, key=lambda j: mass[j], reverse=True)
        page.locator("#components th", has_text="component").first.click()
        assert _visible_components(page) == list(range(N_COMPONENTS))

        # filtering: a text box and a tuned-only toggle
        tuned = [r["feature_index"] for r in index["components"] if r["tuned_label"] or r["tuned_prediction"]]
        page.check("#tuned-only")
        assert _visible_components(page) == tuned
        page.uncheck("#tuned-only")
        page.fill("#filter", "no such component anywhere")
        assert _visible_components(page) == []
        page.fill("#filter", "")
        assert len(_visible_components(page)) == N_COMPONENTS

        # a component page: highlighted tokens of its top examples, a histogram drawn by the local plotly
        page.click('#components a[href="components/component_00001.html"]')
        page.wait_for_selector("#hist .main-svg")
        assert "Component 1" in page.inner_text("h1")
        spans = page.locator("#examples .example .tokens span.tok")
        assert spans.count() > 0
        styles = spans.evaluate_all("els => els.map(e => e.style.backgroundColor)")
        assert all(s.startswith("rgba(") for s in styles) and len(set(styles)) > 1
        first = json.loads((index_html.parent / "data" / "component_00001.json").read_text())["activations"][0]
        assert page.locator("#examples .example").first.locator("span.tok").count() == len(first["tokens"])
        page.screenshot(path=str(tmp_path / "component.png"), full_page=True)

        # the SAE's latents: from the main index's methods table to the SAE's index, then into a latent
        page.goto(index_html.as_uri())
        page.click('#compare a[href="methods/sae/index.html"]')
        assert "TopK SAE latents" in page.inner_text("h1")
        assert sorted(_visible_components(page)) == list(range(N_METHOD))
        sae_data = index_html.parent / "data" / "methods" / "sae"
        latent = next(
            j for j in range(N_METHOD) if json.loads((sae_data / f"component_{j:05d}.json").read_text())["activations"]
        )
        page.click(f'#components a[href="components/component_{latent:05d}.html"]')
        page.wait_for_selector("#hist .main-svg")
        assert f"Latent {latent}" in page.inner_text("h1")
        acts = json.loads((sae_data / f"component_{latent:05d}.json").read_text())["activations"]
        assert page.locator("#examples .example").count() == len(acts)
        first = page.locator("#examples .example").first.locator("span.tok")
        assert first.count() == len(acts[0]["tokens"])
        assert first.evaluate_all("els => els.every(e => e.style.backgroundColor.startsWith('rgba('))")
        page.click("nav a >> nth=0")  # back to the SAE's index
        assert "TopK SAE latents" in page.inner_text("h1")
        page.goto(index_html.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        if os.environ.get("NPEFF_REPORT_SCREENSHOT"):
            shutil.copy(tmp_path / "report.png", os.environ["NPEFF_REPORT_SCREENSHOT"])
        browser.close()
    assert not errors, errors
    assert requests and all(u.startswith("file:") for u in requests), [u for u in requests if not u.startswith("file:")]
    assert (tmp_path / "report.png").stat().st_size > 10_000
