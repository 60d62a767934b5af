"""The method registry (``npeff_lens.baselines.REGISTRY``) is the one description of a comparison method: a method
registered there alone (here a toy, for the test only) is fitted, resumed and scored by ``compare`` and drawn by the
report. And ``npeff_lens.compare`` is the comparison function whatever was imported before."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import LABELS, TEMPLATE, write_reviews_csv

from npeff_lens import baselines, config
from npeff_lens.analysis import active, degeneracy, method_summary, top_examples
from npeff_lens.baselines import Method
from npeff_lens.cli import main
from npeff_lens.schema import ConfigMismatchError
from npeff_lens.store import PEFStore

ROOT = Path(__file__).resolve().parents[1]
N_COMPONENTS = 3


class RandomLoadings:
    """A toy parameter-space method: ``C`` seeded random unit directions ``h_j`` in the PEFs' projected space; an
    example's coefficient on ``j`` is its loading ``Σ_rows (G_row · h_j)²``, as NPEFF's components load."""

    fits = 0  # how many times a fit ran (a resumed comparison reads the saved one back)

    def __init__(self, n_components: int, seed: int = 0):
        self.n_components, self.seed = n_components, seed

    def fit(self, store) -> RandomLoadings:
        type(self).fits += 1
        pefs = store.load_pefs()  # "example rank dim"
        h = torch.randn(self.n_components, pefs.shape[2], generator=torch.Generator().manual_seed(self.seed))
        self.components_ = h / h.norm(dim=1, keepdim=True)
        self.coefficients_ = torch.einsum("erd,cd->erc", pefs, self.components_).pow(2).sum(1)  # "example component"
        return self

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"components": self.components_, "coefficients": self.coefficients_, "seed": self.seed}, path / "toy.pt"
        )

    @classmethod
    def load(cls, path: Path) -> RandomLoadings:
        saved = torch.load(Path(path) / "toy.pt")
        est = cls(saved["components"].shape[0], saved["seed"])
        est.components_, est.coefficients_ = saved["components"], saved["coefficients"]
        return est


TOY = Method(
    "toy",
    "Random loadings",
    "direction",
    "toy",
    RandomLoadings,
    "parameters",
    lambda x: RandomLoadings(x.components, seed=x.config.seed).fit(x.pefs),
    directions=lambda est: est.components_,
    key_fields=("components", "seed"),
    describe=lambda est: {"toy_seed": est.seed},
    remedy="draw other directions (--seed)",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run: 24 reviews collected with tiny-llama and decomposed into 3 components."""
    root = tmp_path_factory.mktemp("registry")
    csv = write_reviews_csv(root / "reviews.csv", 24)
    collect = [
        *f"collect --model tiny-llama --dataset {csv} --text-column review --label-column sentiment".split(),
        *("--template", TEMPLATE, "--labels", *LABELS),
        *f"--proj-dim 128 --dtype float32 --split none --out {root / 'pefs'} --no-progress".split(),
    ]
    assert main(collect) == 0
    decompose = f"decompose --store {root / 'pefs'} --components {N_COMPONENTS} --steps 30 --warmup-steps 10"
    assert main([*decompose.split(), "--out", str(root / "npeff"), "--no-progress"]) == 0
    return root


@pytest.fixture
def toy(monkeypatch):
    """The toy registered for this test only. ``config.METHODS`` lists the ``--methods`` choices without importing
    torch (the registry's modules do), so a new method is named there too."""
    monkeypatch.setitem(baselines.REGISTRY, TOY.name, TOY)
    monkeypatch.setattr(config, "METHODS", (*config.METHODS, TOY.name))
    monkeypatch.setattr(RandomLoadings, "fits", 0)
    return TOY


def test_a_method_registered_alone_is_compared_resumed_and_reported(run, tmp_path, toy):
    from npeff_lens.report import build
    from npeff_lens.runs import compare, format_compare

    d = tmp_path / "npeff"
    shutil.copytree(run / "npeff", d)
    store = PEFStore(run / "pefs")
    results = compare(d, methods="npeff,toy", k=4, store=store, progress=False)
    table = json.loads((d / "compare" / "compare.json").read_text())
    assert list(table["methods"]) == ["npeff", "toy"] == list(results["methods"])
    row = table["methods"]["toy"]
    assert row["config"] == {"components": N_COMPONENTS, "seed": 0} and row["toy_seed"] == 0
    assert row["fit_seconds"] is not None and RandomLoadings.fits == 1
    # NPEFF's time is its decomposition's own, as that fit recorded it (not whole seconds of two timestamps)
    fitted = json.loads((d / "run.json").read_text())["fit_seconds"]
    assert 0 < fitted == table["methods"]["npeff"]["fit_seconds"]
    assert table["methods"]["npeff"]["peak_rss_mib"] is None  # not measured: the fit was not in this process
    assert row["peak_rss_mib"] > 0
    # the saved fit is the toy's loadings, brute force over the examples and rows
    saved = RandomLoadings.load(d / "compare" / "toy" / "toy")
    pefs = store.load_pefs()
    want = torch.tensor(
        [[sum(float(g @ h) ** 2 for g in pefs[i]) for h in saved.components_] for i in range(len(pefs))]
    )
    torch.testing.assert_close(saved.coefficients_, want, rtol=1e-4, atol=1e-6)
    # scored by the metrics every method gets
    meta = store.metadata
    summary = method_summary(saved.coefficients_, labels=meta["label"], predictions=meta["prediction"], k=4)
    for key, value in {**summary, **degeneracy(saved.coefficients_)}.items():
        assert row[key] == pytest.approx(value), key
    assert "toy" in format_compare(results).splitlines()[2]
    # its directions act in the run's parameter space: the causal test measures them like NPEFF's
    options = dict(k=4, store=store, progress=False)
    sel = dict(selectivity=True, selectivity_components=1, target_kl=0.0002, n_baseline=8)
    measured = compare(d, methods="toy", **options, **sel)["methods"]["toy"]
    assert measured["selectivity_n_evaluated"] == 1 and measured["selectivity"] > 0, measured
    # resumed from its folder; a changed field of its key is named
    again = compare(d, methods="npeff,toy", **options)
    assert again["methods"]["toy"] == results["methods"]["toy"] and RandomLoadings.fits == 1
    with pytest.raises(ConfigMismatchError, match="seed: stored 0, now 1"):
        compare(d, methods="toy", seed=1, **options)
    # the report draws its pages and its row of the comparison
    index = build(d, tmp_path / "site", k=4, attributions=False, progress=False)
    home = index.read_text()
    assert '<tr data-method="toy"><td><a href="methods/toy/index.html">toy</a></td>' in home
    assert '<tr data-method="npeff"><td><b>npeff</b> (this page)</td>' in home
    page = (tmp_path / "site" / "methods" / "toy" / "index.html").read_text()
    assert "<h1>Random loadings</h1>" in page and "<b>toy</b> (this page)" in page
    data = json.loads((tmp_path / "site" / "data" / "methods" / "toy" / "index.json").read_text())
    assert data["method"] == "toy" and len(data["components"]) == N_COMPONENTS
    coeffs = saved.coefficients_.double()
    top, on = top_examples(coeffs, k=4), active(coeffs)
    for j in range(N_COMPONENTS):
        comp = tmp_path / "site" / "methods" / "toy" / "components" / f"component_{j:05d}.html"
        html = comp.read_text()
        assert f"<title>Random loadings: direction {j}</title>" in html
        assert "No token highlighting: a direction has no per-token values" in html
        record = json.loads((tmp_path / "site" / "data" / "methods" / "toy" / f"component_{j:05d}.json").read_text())
        want = [i for i in top[j].tolist() if on[i, j]]
        assert [e["example_index"] for e in record["activations"]] == want and want


def test_comparison_and_report_name_no_method():
    """No method is special-cased by name outside the registry: the comparison and the report read its entries."""
    names = set(baselines.REGISTRY)
    files = [ROOT / "npeff_lens" / "comparison.py", *sorted((ROOT / "npeff_lens" / "report").glob("*.py"))]
    for path in files:
        found = [
            (node.lineno, node.value)
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value in names
        ]
        assert not found, f"{path.name} names methods: {found}"


@pytest.mark.parametrize(
    "code",
    [
        "import npeff_lens as nl; nl.compare; import npeff_lens.comparison as m",
        "import npeff_lens.comparison as m; import npeff_lens as nl; nl.compare",
        "import npeff_lens.runs; import npeff_lens as nl; import npeff_lens.comparison as m",
    ],
)
def test_the_package_s_compare_is_the_function_in_any_import_order(code):
    check = (
        "; import types; print(isinstance(m, types.ModuleType), m.__name__, callable(nl.compare),"
        " isinstance(nl.compare, types.ModuleType), nl.compare is m.compare)"
    )
    out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["True", "npeff_lens.comparison", "True", "False", "True"]
