"""The component dashboard (npeff_lens.report) on a tiny-llama run built through the CLI: the JSON behind the
pages (strict JSON, the documented fields, token shares that reproduce the stored loadings, the template /
input split of the prompt's tokens, locations.json read into heatmaps), and the static site in headless
chromium from file:// with every non-file request aborted: all components listed, sorting and filtering, a
component page with highlighted tokens (coloured on the input's own scale) and a plotly histogram, heatmaps of
where components live, no console errors, nothing fetched from the network."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import CHROMIUM, HAS_CHROMIUM, offline_page, reviews_collect_argv

from npeff_lens.cli import main
from npeff_lens.report import build, report_data
from npeff_lens.report.data import input_token_mask
from npeff_lens.report.render import tokens_html

TEMPLATE = "Review: {text} Sentiment:"
WORDS = "great dull moving boring fun sad happy awful wonderful terrible brilliant good bad film movie".split()
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
    from npeff_lens.runs import locate, run_perturbation

    root = tmp_path_factory.mktemp("report")
    csv = root / "reviews.csv"
    csv.write_text("review,sentiment\n" + "\n".join(f"{t},{s}" for t, s in _reviews(32)) + "\n")
    collect = reviews_collect_argv(csv, root / "tree" / "pefs", "--split", "none")
    assert main(collect) == 0
    decompose = shlex.split(f"decompose --components {N_COMPONENTS} --steps 60 --warmup-steps 10 --no-progress")
    decompose += ["--store", str(root / "tree" / "pefs"), "--out", str(root / "tree" / "npeff")]
    assert main(decompose) == 0
    run_perturbation(
        root / "tree" / "npeff",
        magnitude=0.5,
        top_k=4,
        n_baseline=8,
        recovery="adjoint",
        out=root / "tree" / "perturb",
        progress=False,
    )
    compare = ["compare", str(root / "tree" / "npeff")] + shlex.split(
        f"--components {N_METHOD} --k 4 --sae-tokens 2000 --no-progress"
    )
    assert main(compare) == 0
    locate(root / "tree" / "npeff")  # locations.json, as `npeff top --where` writes it
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
            shown = [float(v) for v in re.findall(r'<span class="tok[^"]*"[^>]*data-value="([^"]+)"', block)]
            assert shown == pytest.approx(want.tolist(), rel=1e-5) and len(a["tokens"]) == len(shown)
            assert torch.equal(torch.tensor(a["token_ids"]), sae.token_ids_[sae.example_index_ == a["example_index"]])
            n_checked += 1
    assert n_checked > 0


# --------------------------------------------------------------------------------------------------
# Template and input: which tokens are the example's own, the template's share, the colour scale.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, text, template, want",
    [
        # byte-level BPE: the space before the text is the template's, the token " great" the input's
        (["Review", ":", " great", " fil", "m", " Sent", "iment", ":"], "great film", TEMPLATE,
         [0, 0, 1, 1, 1, 0, 0, 0]),
        # a BOS is not in the prompt string: the template's
        (["<s>", "Review", ":", " great", " Sent", "iment", ":"], "great", TEMPLATE, [0, 0, 0, 1, 0, 0, 0]),
        # single-token decoding that drops the spaces (sentencepiece)
        (["<s>", "Review", ":", "great", "fil", "m", "Sent", "iment", ":"], "great film", TEMPLATE,
         [0, 0, 0, 1, 1, 1, 0, 0, 0]),
        # an é split over two byte tokens that decode to U+FFFD each: both the input's
        (["Review", ":", " caf", "\ufffd", "\ufffd", " Sent", "iment", ":"], "café", TEMPLATE,
         [0, 0, 1, 1, 1, 0, 0, 0]),
        # the text twice in the template; a prompt truncated inside the text
        (["Q: ", "a", " b", "\nA: ", "a", " b", "\nA:"], "a b", "Q: {text}\nA: {text}\nA:", [0, 1, 1, 0, 1, 1, 0]),
        (["Review", ":", " great"], "great film", TEMPLATE, [0, 0, 1]),
        (["great", " film"], "great film", "{text}", [1, 1]),
    ],
)  # fmt: skip
def test_input_tokens_are_told_from_the_template_tokens(tokens, text, template, want):
    assert input_token_mask(tokens, text, template) == [bool(w) for w in want]


def test_input_token_mask_is_none_when_it_cannot_be_known():
    assert input_token_mask(["Review", ":", " great"], "great", None) is None  # no template recorded
    assert input_token_mask(["Review", ":", " great"], None, TEMPLATE) is None
    assert input_token_mask(["x", "y", "z", " Sent", "iment", ":"], "great film", TEMPLATE) is None  # not the prompt


def test_template_share_is_the_loading_off_the_input_tokens(run):
    import re

    root, index_html = run
    site = index_html.parent
    n_checked = 0
    for j in range(N_COMPONENTS):
        c = _strict(site / "data" / f"component_{j:05d}.json")
        html = (site / "components" / f"component_{j:05d}.html").read_text()
        shown = [float(v) for v in re.findall(r'data-template-share="([^"]+)"', html)]
        attributed = [a for a in c["activations"] if a["values"] is not None]
        assert len(shown) == len(attributed)
        for a, on_page in zip(attributed, shown):
            mask = a["input_tokens"]
            assert len(mask) == len(a["tokens"]) and any(mask) and not all(mask)
            # the input's tokens spell the review (the space before it is the template's, inside " great")
            assert "".join(t for t, m in zip(a["tokens"], mask) if m).strip() == a["text"]
            assert "".join(t for t, m in zip(a["tokens"], mask) if not m).strip() == "Review: Sentiment:"
            inputs = sum(v for v, m in zip(a["values"], mask) if m)
            remainder = sum(a["remainder"].values())
            assert a["template_share"] == pytest.approx(1 - inputs - remainder, abs=1e-6)
            assert a["input_share"] == pytest.approx(inputs, abs=1e-9)
            assert on_page == pytest.approx(a["template_share"], abs=1e-12)
            assert f"template: <b>{100 * a['template_share']:.1f}%</b> of the loading" in html
            n_checked += 1
        assert f"top {c['n_attributed']} of the {c['k']}" in html and "npeff report --n-attributed N" in html
    assert n_checked > 0


def _spans(html: str) -> list[dict]:
    import re

    out = []
    for attrs in re.findall(r"<span ([^>]*)>", html):
        alpha = re.search(r"rgba\([^)]*,([0-9.]+)\)", attrs)
        out.append(
            {
                "value": float(re.search(r'data-value="([^"]+)"', attrs).group(1)),
                "template": "tmpl" in re.search(r'class="([^"]+)"', attrs).group(1),
                "alpha": float(alpha.group(1)) if alpha else None,
                "title": re.search(r'title="([^"]+)"', attrs).group(1),
            }
        )
    return out


def test_colour_scale_is_set_by_the_input_tokens():
    tokens = ["Review", ":", " dull", " but", " fun", " Sent", "iment", ":"]
    values = [0.55, 0.02, 0.04, -0.06, 0.01, 0.0, 0.0, 0.30]  # template tokens hold most of the loading
    mask = [False, False, True, True, True, False, False, False]
    spans = _spans(tokens_html(tokens, values, input_mask=mask))
    assert [s["template"] for s in spans] == [not m for m in mask]
    assert all(s["alpha"] is None for s in spans if s["template"])  # shown, not coloured
    inputs = [s for s in spans if not s["template"]]
    assert max(s["alpha"] for s in inputs) == 0.85 and inputs[1]["alpha"] == 0.85  # the largest |value|: -0.06
    assert [s["alpha"] for s in inputs] == pytest.approx([0.85 * abs(v) / 0.06 for v in (0.04, -0.06, 0.01)], abs=1e-3)
    assert spans[0]["title"].startswith("+55.0%") and spans[3]["title"].startswith("-6.0%")  # numbers on hover
    # without the split (or without an input token) every token sets the scale, as before
    plain = _spans(tokens_html(tokens, values))
    assert plain[0]["alpha"] == 0.85 and not any(s["template"] for s in plain)


# --------------------------------------------------------------------------------------------------
# Where components live: locations.json in the index and the component pages.
# --------------------------------------------------------------------------------------------------


def test_locations_json_is_shown_as_written(run):
    root, index_html = run
    site = index_html.parent
    located = json.loads((root / "tree" / "npeff" / "locations.json").read_text())["components"]
    index = _strict(site / "data" / "index.json")
    assert index["locations"]["path"] == str(root / "tree" / "npeff" / "locations.json")
    for row, loc in zip(index["components"], located):
        assert row["top5pct"] == pytest.approx(loc["top5pct"])
        g = loc["groups"][0]
        assert row["top_group"].startswith(f"layer {g['layer']} {g['module']} ")
        c = _strict(site / row["data"])
        grid = c["location"]["grid"]
        for g in loc["groups"]:
            n, m = grid["layers"].index(g["layer"]), grid["modules"].index(g["module"])
            assert grid["fraction"][n][m] == pytest.approx(g["fraction"])
            assert grid["enrichment"][n][m] == pytest.approx(g["enrichment"])
        assert sum(v for r in grid["fraction"] for v in r if v is not None) == pytest.approx(1.0)
        by_layer = index["locations"]["by_layer"][row["feature_index"]]
        assert sum(by_layer["fraction"]) == pytest.approx(1.0)
    html = index_html.read_text()
    assert 'id="where-mean"' in html and 'id="where-components"' in html


def _planted_locations(heads=None):
    """locations.json of 4 components over a 3-layer llama layout: 0 in layer 1's MLP (down most), 1 in layer
    0's q, 2 in layer 2's o, 3 spread evenly (enrichment about 1 everywhere: at chance); per head with ``heads``
    (``{n_heads, n_kv_heads}``). Written as before the span method: no ``method`` in the key or the entries."""
    import torch

    from npeff_lens.locations import component_locations

    layout, offset = [], 0
    shapes = {
        "self_attn.q_proj": (16, 16),
        "self_attn.k_proj": (8, 16),
        "self_attn.v_proj": (8, 16),
        "self_attn.o_proj": (16, 16),
        "mlp.gate_proj": (32, 16),
        "mlp.up_proj": (32, 16),
        "mlp.down_proj": (16, 32),
        "input_layernorm": (16,),
        "post_attention_layernorm": (16,),
    }
    names = [f"model.layers.{i}.{m}.weight" for i in range(3) for m in shapes] + ["model.norm.weight"]
    for name in names:
        shape = next((v for k, v in shapes.items() if f".{k}." in name), (16,))
        numel = int(torch.tensor(shape).prod())
        layout.append({"name": name, "shape": list(shape), "offset": offset, "numel": numel})
        offset += numel
    g = torch.Generator().manual_seed(0)

    def direction(weights):
        x = torch.randn(offset, generator=g) * 0.01
        for e in layout:
            for part, w in weights.items():
                if part in e["name"]:
                    x[e["offset"] : e["offset"] + e["numel"]] *= w
        return x

    plans = [
        {"layers.1.mlp.down": 300.0, "layers.1.mlp.up": 80.0},
        {"layers.0.self_attn.q": 200.0},
        {"layers.2.self_attn.o": 200.0},
        {},
    ]
    comps = [{"component": j, **component_locations(direction(w), layout, heads)} for j, w in enumerate(plans)]
    return {"key": {"recovery": "adjoint", "reject_threshold": 0.5, "heads": heads or False}, "components": comps}


def test_a_locations_json_of_another_decomposition_is_not_shown(tmp_path):
    import time

    from npeff_lens.report.data import read_locations

    assert read_locations(tmp_path, 4)[0] is None and "not computed" in read_locations(tmp_path, 4)[1]
    planted = _planted_locations()
    (tmp_path / "locations.json").write_text(json.dumps({**planted, "components": planted["components"][:3]}))
    located, note = read_locations(tmp_path, 4)
    assert located is None and "locates 3 components, the decomposition has 4" in note
    (tmp_path / "locations.json").write_text(json.dumps(planted))
    located, note = read_locations(tmp_path, 4)
    assert sorted(located["components"]) == [0, 1, 2, 3] and note is None
    time.sleep(0.05)
    (tmp_path / "npeff.safetensors").write_bytes(b"refit")  # a decomposition written after the file
    located, note = read_locations(tmp_path, 4)
    assert located is not None and "older than the decomposition" in note


def _paragraph(html: str, tag: str) -> str | None:
    """The text of the element with id ``tag`` (tags dropped, entities decoded); None when absent."""
    import html as html_lib
    import re

    m = re.search(rf'<(\w+)[^>]* id="{tag}"[^>]*>(.*?)</\1>', html, flags=re.S)
    return None if m is None else html_lib.unescape(re.sub(r"<[^>]+>", "", m.group(2)))


def test_a_located_components_page_shows_its_heads_neurons_and_fit(run):
    """`locate` (the span method) on the tiny model: each page names the file's top 5 attention heads (per query
    head, by energy) and MLP neurons, and the share of the component its top examples' gradients reproduce; the map
    is drawn exactly when the location is not at chance."""
    from npeff_lens.locations import at_chance

    root, index_html = run
    site = index_html.parent
    table = json.loads((root / "tree" / "npeff" / "locations.json").read_text())
    assert table["key"]["method"] == "span" and all("groups" in e for e in table["components"])
    for entry in table["components"]:
        j = entry["component"]
        html = (site / "components" / f"component_{j:05d}.html").read_text()
        loc = _strict(site / "data" / f"component_{j:05d}.json")["location"]
        assert loc["method"] == "span" and loc["examples"] == entry["examples"] and loc["fit"] == entry["fit"]
        assert loc["attention_heads"] == entry["attention_heads"][:8] and loc["neurons"] == entry["neurons"][:8]
        heads = entry["attention_heads"][:5]
        assert len(heads) == 5 and [r["energy"] for r in heads] == sorted((r["energy"] for r in heads), reverse=True)
        want = "; ".join(
            f"layer {r['layer']} head {r['head']} {r['fraction']:.0%} (x{r['enrichment']:.1f})" for r in heads
        )
        assert _paragraph(html, "where-heads") == f"Top attention heads: {want}."
        neurons = entry["neurons"][:5]
        want = "; ".join(
            f"layer {r['layer']} neuron {r['neuron']} {r['fraction']:.1%} (x{r['enrichment']:.1f})" for r in neurons
        )
        assert _paragraph(html, "where-neurons") == f"Top MLP neurons (of {entry['n_neurons']:,}): {want}."
        fit = _paragraph(html, "where-fit")
        n = len(entry["examples"])
        said = f"Located from the exact gradients of its top {n} examples, which reproduce {100 * entry['fit']:.1f}%"
        assert fit.startswith(f"{said} of the component.")
        assert ("Caution: its top examples' gradients reproduce" in fit) == (entry["fit"] < 0.5)
        assert ('id="where-grid"' in html) != at_chance(entry)
        assert ('id="where-chance"' in html) == at_chance(entry)
    assert "each component's direction rebuilt from the exact gradients of its top 16 examples" in (
        index_html.read_text()
    )


CAUSAL = {
    "status": "ok",
    "measured_on": [20, 21, 22, 23],
    "top_groups": [[1, "down"]],
    "control_groups": [[0, "up"], [2, "gate"]],
    "top_params": 512,
    "control_params": 1024,
    "full": {"status": "ok", "selectivity": 4.0, "kl_top": 0.04, "kl_baseline": 0.01},
    "top": {"status": "ok", "selectivity": 3.0, "kl_top": 0.03, "kl_baseline": 0.0101},
    "control": {"status": "unreachable", "error": "target KL 0.01 not reached"},
    "kept": 0.75,
    "control_kept": None,
}
DEAD = {
    "component": 1,
    "method": "span",
    "examples": [],
    "status": "dead",
    "note": "no example loads on this component: nothing to locate",
}


def _site_with(run, tmp_path, table: dict) -> Path:
    """The run's report over a copy of its decomposition that holds ``table`` as its locations.json."""
    root, _ = run
    d = tmp_path / "npeff"
    shutil.copytree(root / "tree" / "npeff", d, ignore=shutil.ignore_patterns("compare", "report", "locations.json"))
    (d / "locations.json").write_text(json.dumps(table))
    return build(d, tmp_path / "site", store=root / "tree" / "pefs", attribute=False, progress=False)


def test_a_hand_written_locations_json_shows_its_causal_check_dead_entry_and_chance(run, tmp_path):
    """Component 0 located by the span method with a poor fit and a causal record, 1 dead, 2 written before the
    span method (no method, per-module heads only), 3 at chance."""
    import re

    from npeff_lens.locations import chance_caution

    heads = {"n_heads": 4, "n_kv_heads": 2}
    planted = _planted_locations(heads)["components"]
    old = {k: v for k, v in planted[2].items() if k not in ("attention_heads", "neurons", "n_neurons")}
    comps = [
        {**planted[0], "method": "span", "examples": [3, 1, 4, 0], "fit": 0.3, "causal": CAUSAL},
        DEAD,
        old,
        {**planted[3], "method": "span", "examples": [5, 6, 7, 8], "fit": 0.9},
    ]
    key = {"method": "span", "heads": heads, "fit": "0" * 16, "k": 4, "causal": {"k": 4, "target_kl": 0.01}}
    index_html = _site_with(run, tmp_path, {"key": key, "components": comps})
    site = index_html.parent
    page = [(site / "components" / f"component_{j:05d}.html").read_text() for j in range(4)]
    data = [_strict(site / "data" / f"component_{j:05d}.json")["location"] for j in range(4)]

    # 0: the causal table, its sentence naming the examples measured on (ranks k+1..2k), the caution on the fit
    rows = re.findall(r'<tr data-part="([^"]+)">(.*?)</tr>', page[0], flags=re.S)
    cells = {part: [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)] for part, row in rows}
    assert list(cells) == ["the whole direction", "its top groups only", "random groups, as many parameters"]
    assert cells["the whole direction"][3:] == ["4", "0.04", "0.01", "100.0%"]
    assert cells["its top groups only"][1:] == ["1", "512", "3", "0.03", "0.0101", "75.0%"]
    control = cells["random groups, as many parameters"]
    assert control == ["random groups, as many parameters (unreachable)", "2", "1024", "–", "–", "–", "–"]
    sentence = _paragraph(page[0], "where-causal")
    assert "keep 75% of the whole direction's selectivity (4)" in sentence
    assert "random groups of as many parameters (1,024) none (unreachable)" in sentence
    assert sentence.endswith("measured on examples ranked 5 to 8.")
    assert "Measured on examples 20, 21, 22, 23" in page[0]
    assert "Caution: its top examples' gradients reproduce 30% of the component" in _paragraph(page[0], "where-fit")
    assert 'id="where-grid"' in page[0] and data[0]["causal"] == CAUSAL

    # 1: dead, in words, with nothing drawn; the index keeps its row with the note
    assert _paragraph(page[1], "where-top") == f"Dead: {DEAD['note']}."
    assert 'id="where-grid"' not in page[1] and 'id="where-heads"' not in page[1]
    assert data[1]["located"] is False and data[1]["status"] == "dead" and data[1].get("grid") is None
    index = index_html.read_text()
    assert re.search(rf'<tr class="unlocated" data-component="1">.*?dead: {DEAD["note"]}</td>', index)
    assert 'data-location="dead">dead</td>' in index

    # 2: written before: recovered, its heads per module and head, no neurons, its map drawn
    assert _paragraph(page[2], "where-fit") == "Located from its direction recovered from its projected numbers alone."
    assert _paragraph(page[2], "where-heads").startswith("Top attention heads: layer 2 o head ")
    assert 'id="where-neurons"' not in page[2] and 'id="where-grid"' in page[2]

    # 3: at chance: the caution in words instead of the map, in the page and in the index
    words = chance_caution(planted[3], "sparse", method="span")
    assert words.startswith("at chance (") and f"it is {words}. Its layer × module map is not drawn." in (
        _paragraph(page[3], "where-chance")
    )
    assert 'id="where-grid"' not in page[3] and 'class="heatmap"' not in page[3]
    assert page[3].index('id="where-chance"') < page[3].index('id="where-top"')  # said before the numbers
    assert data[3]["at_chance"] is True and data[3]["chance"] == words
    assert f"Component(s) 3: {words}." in _paragraph(index, "where-chance")
    assert re.search(r'<tr class="[^"]*chance[^"]*" data-component="3">', index)
    assert index.count('class="chance-mark"') == 2  # its map row and its line in the components table
    summary = _strict(site / "data" / "index.json")["locations"]
    assert summary["at_chance"] == [3] and not summary["live_at_chance"]
    assert summary["not_located"] == [{"component": 1, "status": "dead", "note": DEAD["note"]}]


def test_a_locations_json_written_before_the_span_method_still_renders(run, tmp_path):
    """No method, no attention_heads, neurons or fit: recovered, as then; per-module heads; no fit line."""
    planted = _planted_locations({"n_heads": 4, "n_kv_heads": 2})
    for c in planted["components"]:
        for k in ("attention_heads", "neurons", "n_neurons"):
            c.pop(k)
    index_html = _site_with(run, tmp_path, planted)
    index = index_html.read_text()
    assert "direction recovered by back-projection A h; per attention head too" in index
    for j, c in enumerate(planted["components"]):
        html = (index_html.parent / "components" / f"component_{j:05d}.html").read_text()
        heads = _paragraph(html, "where-heads")
        top = c["heads"][0]
        assert heads.startswith(f"Top attention heads: layer {top['layer']} {top['module']} head {top['head']} ")
        assert "recovered from its projected numbers alone" in _paragraph(html, "where-fit")
        assert 'id="where-neurons"' not in html and ('id="where-grid"' in html) == (j != 3)


def _alpha(style: str) -> float:
    import re

    nums = [float(x) for x in re.findall(r"[0-9.]+", style)]
    return nums[3] if len(nums) == 4 else (1.0 if len(nums) == 3 else 0.0)


@pytest.mark.skipif(not HAS_CHROMIUM, reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")
def test_where_heatmaps_and_input_scaled_tokens_in_headless_chromium_offline(run, tmp_path):
    """A copy of the run with a planted locations.json: the index and component heatmaps show the hottest cell
    where the energy was planted; without the file the index says how to write it. Tokens of a planted page:
    the input's largest |share| at full colour, the larger template share uncoloured."""
    root, _ = run
    d = tmp_path / "npeff"
    shutil.copytree(root / "tree" / "npeff", d, ignore=shutil.ignore_patterns("compare", "report", "locations.json"))
    bare = build(d, tmp_path / "bare", store=root / "tree" / "pefs", attribute=False, progress=False)
    bare_html = bare.read_text()
    assert f"npeff top {d} --where" in bare_html and "npeff_lens.runs.locate(" in bare_html
    assert 'id="where-mean"' not in bare_html
    assert "Not computed for this run" in (bare.parent / "components" / "component_00000.html").read_text()

    planted = _planted_locations()
    (d / "locations.json").write_text(json.dumps(planted))
    index_html = build(d, tmp_path / "site", store=root / "tree" / "pefs", attribute=False, progress=False)
    index = _strict(index_html.parent / "data" / "index.json")
    alive = [r["feature_index"] for r in index["components"] if r["alive"]]
    want_mean = {}
    for j in alive:
        for g in planted["components"][j]["groups"]:
            key = ("" if g["layer"] is None else str(g["layer"]), g["module"])
            want_mean[key] = want_mean.get(key, 0.0) + g["fraction"] / len(alive)
    tokens = ["Review", ":", " dull", " but", " fun", " Sent", "iment", ":"]
    values = [0.55, 0.02, 0.04, -0.06, 0.01, 0.0, 0.0, 0.30]
    mask = [False, False, True, True, True, False, False, False]
    planted_tokens = tmp_path / "site" / "tokens.html"
    planted_tokens.write_text(
        '<!doctype html><html><head><link rel="stylesheet" href="assets/report.css"></head><body>'
        f'<div class="tokens">{tokens_html(tokens, values, input_mask=mask)}</div></body></html>'
    )

    cells = (
        "els => els.map(e => [e.dataset.layer, e.dataset.module, e.dataset.component, e.dataset.fraction, "
        "getComputedStyle(e).backgroundColor, e.title])"
    )
    with offline_page() as (page, requests, errors):
        page.goto(index_html.as_uri())
        # the mean layer × module map: every cell the mean over the alive components, the hottest one darkest
        mean = page.locator("#where-mean td.heat:not(.none)").evaluate_all(cells)
        assert {(ly, m): float(f) for ly, m, _, f, _, _ in mean} == pytest.approx(want_mean, abs=1e-9)
        darkest = max(mean, key=lambda c: _alpha(c[4]))
        assert (darkest[0], darkest[1]) == max(want_mean, key=want_mean.get)
        # components × layers: component 0's darkest cell is layer 1, with its enrichment on hover
        row0 = page.locator('#where-components td.heat[data-component="0"]').evaluate_all(cells)
        hot = max(row0, key=lambda c: _alpha(c[4]))
        assert hot[0] == "1" and _alpha(hot[4]) == pytest.approx(0.85, abs=1e-3)
        assert "of its energy (x" in hot[5] and "most in down" in hot[5]
        assert [c[0] for c in sorted(row0, key=lambda c: -float(c[3]))][0] == "1"
        row1 = page.locator('#where-components td.heat[data-component="1"]').evaluate_all(cells)
        assert max(row1, key=lambda c: float(c[3]))[0] == "0"
        # the index table names each component's top group and its top-5% share, in words
        first = page.locator('#components tr[data-component="0"]').inner_text()
        assert "layer 1 down" in first and f"{100 * planted['components'][0]['top5pct']:.1f}%" in first
        # and the evenly spread component is not shown concentrated
        assert planted["components"][3]["top5pct"] < 0.2

        # component 0's page: the layer × module map, darkest at layer 1 down, the top groups in words
        page.click('#where-components a[href="components/component_00000.html"]')
        assert "Component 0" in page.inner_text("h1")
        grid = page.locator("#where-grid td.heat:not(.none)").evaluate_all(cells)
        hot = max(grid, key=lambda c: _alpha(c[4]))
        assert (hot[0], hot[1]) == ("1", "down") and _alpha(hot[4]) == pytest.approx(0.85, abs=1e-3)
        top = planted["components"][0]["groups"][0]
        assert (top["layer"], top["module"]) == (1, "down")
        assert f"(x{top['enrichment']:.1f} its share of the parameters)" in hot[5]
        assert page.inner_text("#where-top").startswith("Most energy: layer 1 down")
        assert len(grid) == sum(1 for g in planted["components"][0]["groups"])
        assert page.locator("#where-chance").count() == 0
        # component 3 is at chance: its row is kept and marked, the index says so in words
        page.goto(index_html.as_uri())
        assert page.locator('#where-components tr.chance[data-component="3"] .chance-mark').count() == 1
        assert page.locator("#where-components tr.chance").count() == 1
        assert "Component(s) 3: at chance (" in page.inner_text("#where-chance")
        assert page.locator('#components td[data-location="at chance"]').count() == 1
        page.goto((index_html.parent / "components" / "component_00003.html").as_uri())  # spread evenly
        assert page.locator("#where-grid").count() == 0 and page.locator("#where table.heatmap").count() == 0
        words = page.inner_text("#where-chance")
        assert words.startswith("This location says nothing about the component: it is at chance (")
        assert page.locator("#where-chance").is_visible()

        # planted tokens: the input's largest |share| (-0.06) at full colour, the template's 0.55 uncoloured
        page.goto(planted_tokens.as_uri())
        toks = page.locator("span.tok").evaluate_all(
            "els => els.map(e => [Number(e.dataset.value), e.dataset.input, getComputedStyle(e).backgroundColor])"
        )
        assert [t[1] == "1" for t in toks] == mask
        own = [t for t in toks if t[1] == "1"]
        assert max(own, key=lambda t: abs(t[0]))[0] == -0.06
        assert _alpha(max(own, key=lambda t: abs(t[0]))[2]) == pytest.approx(0.85, abs=1e-3)
        assert all(_alpha(t[2]) == 0 for t in toks if t[1] == "0")
    assert not errors, errors
    assert requests and all(u.startswith("file:") for u in requests)


# --------------------------------------------------------------------------------------------------
# The site in a browser.
# --------------------------------------------------------------------------------------------------


def _visible_components(page) -> list[int]:
    return page.eval_on_selector_all(
        "#components tbody tr", "rows => rows.filter(r => !r.hidden).map(r => Number(r.dataset.component))"
    )


@pytest.mark.skipif(not HAS_CHROMIUM, reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")
def test_site_in_headless_chromium_offline(run, tmp_path):
    _, index_html = run
    index = json.loads((index_html.parent / "data" / "index.json").read_text())
    with offline_page() as (page, requests, errors):
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
        styles = spans.evaluate_all("els => els.map(e => [e.dataset.input, e.style.backgroundColor])")
        assert all(s.startswith("rgba(") for own, s in styles if own == "1") and len({s for _, s in styles}) > 1
        assert all(s == "" for own, s in styles if own == "0")  # the template's tokens: shown, uncoloured
        acts = json.loads((index_html.parent / "data" / "component_00001.json").read_text())["activations"]
        first = acts[0]
        assert page.locator("#examples .example").first.locator("span.tok").count() == len(first["tokens"])
        shown = "els => els.map(e => [e.dataset.input, Number(e.dataset.value), getComputedStyle(e).backgroundColor])"
        for n, a in enumerate(e for e in acts if e["values"] is not None):  # full colour: the input's largest
            toks = page.locator("#examples .example").nth(n).locator("span.tok").evaluate_all(shown)
            assert [own == "1" for own, _, _ in toks] == a["input_tokens"]
            top = max((t for t in toks if t[0] == "1"), key=lambda t: abs(t[1]))
            assert _alpha(top[2]) == pytest.approx(0.85, abs=1e-3)
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
        assert first.evaluate_all(  # the input's tokens coloured, the template's uncoloured
            "els => els.every(e => e.style.backgroundColor.startsWith('rgba(') === (e.dataset.input === '1'))"
        )
        page.click("nav a >> nth=0")  # back to the SAE's index
        assert "TopK SAE latents" in page.inner_text("h1")
        page.goto(index_html.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        if os.environ.get("NPEFF_REPORT_SCREENSHOT"):
            shutil.copy(tmp_path / "report.png", os.environ["NPEFF_REPORT_SCREENSHOT"])
    assert not errors, errors
    assert requests and all(u.startswith("file:") for u in requests), [u for u in requests if not u.startswith("file:")]
    assert (tmp_path / "report.png").stat().st_size > 10_000
