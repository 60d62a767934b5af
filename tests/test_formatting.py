"""Numbers for people (npeff_lens.formatting) and strict JSON (npeff_lens.io.to_jsonable): the values each
writes for representative inputs, None / NaN / ±inf as "no number" everywhere, percentages equal to Python's ``%``
format, the formatter importable with the standard library alone, and JSON that ``allow_nan=False`` accepts
for nested NaN, infinities, tensors and numpy values."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from npeff_lens.formatting import MISSING, fmt, pct
from npeff_lens.io import read_json, to_jsonable, write_json

UNDEFINED = [None, math.nan, math.inf, -math.inf, np.float64("nan"), np.float32("inf")]


@pytest.mark.parametrize(
    ("value", "digits", "want"),
    [
        (0, 3, "0"),
        (0.0, 3, "0"),
        (-0.0, 3, "-0"),
        (-2.5, 3, "-2.5"),
        (-0.000123456, 3, "-0.000123"),
        (1e-5, 3, "1e-05"),
        (1e-5, 4, "1e-05"),
        (0.0123456, 3, "0.0123"),
        (0.0123456, 4, "0.01235"),
        (123456, 3, "123456"),  # an int is a count: never rounded
        (123456.0, 3, "1.23e+05"),
        (123456.0, 4, "1.235e+05"),
        (2.0, 4, "2"),
        (np.float64(0.5), 3, "0.5"),
        (np.float32(0.1), 3, "0.1"),
        (np.int64(7), 3, "7"),
        (True, 3, "yes"),  # not "1" nor "True"
        (False, 3, "no"),
        ("sad", 3, "sad"),
    ],
)
def test_fmt_on_representative_values(value, digits, want):
    assert fmt(value, digits) == want


@pytest.mark.parametrize("value", UNDEFINED)
def test_none_nan_and_infinities_are_missing_in_both_formatters(value):
    assert fmt(value) == pct(value) == MISSING == "–"
    assert fmt(value, 4, missing="") == pct(value, missing="") == ""
    assert fmt(value, missing="nan") == "nan"


@pytest.mark.parametrize(
    ("value", "digits", "want"),
    [
        (0, 1, "0.0%"),
        (0.1234, 1, "12.3%"),
        (-0.05, 1, "-5.0%"),
        (1, 1, "100.0%"),
        (0.1234, 0, "12%"),
        (2.5, 2, "250.00%"),
    ],
)
def test_pct_on_representative_values(value, digits, want):
    assert pct(value, digits) == want


def test_pct_equals_pythons_percent_format():
    rng = random.Random(0)
    for _ in range(2000):
        v = rng.uniform(-2, 2) * 10 ** rng.randint(-6, 3)
        assert pct(v) == f"{v:.1%}" and pct(v, 0) == f"{v:.0%}"


def test_the_formatter_needs_only_the_standard_library():
    path = Path(__file__).resolve().parents[1] / "npeff_lens" / "formatting.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('formatting', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "heavy = {n.split('.')[0] for n in sys.modules} & {'torch', 'numpy', 'npeff_lens'}\n"
        "print(m.fmt(0.5), m.pct(0.5), sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0.5", "50.0%", "[]"]


def test_the_report_explain_and_the_tables_share_the_one_formatter():
    from npeff_lens import formatting
    from npeff_lens.applications.unlearning import format_table as unlearning_table
    from npeff_lens.explain import format_explanation, write_page
    from npeff_lens.perturb import format_table
    from npeff_lens.report.render import render_component
    from npeff_lens.runs import format_compare, run_perturbation

    for f in (unlearning_table, format_explanation, format_table, render_component, format_compare, run_perturbation):
        assert sys.modules[f.__module__].fmt is formatting.fmt, f.__module__
    for f in (write_page, render_component):
        assert sys.modules[f.__module__].pct is formatting.pct, f.__module__


NESTED = {
    "nan": math.nan,
    "inf": [math.inf, -math.inf, 1.5],
    3: {"tensor": torch.tensor([[1.0, math.nan], [math.inf, -2.0]]), "scalar": torch.tensor(0.25)},
    "numpy": (np.float32(0.5), np.int64(7), np.array([np.nan, 2.0]), np.float64("-inf")),
    "bf16": torch.tensor([0.5, float("nan")], dtype=torch.bfloat16),
    "ok": ["text", None, True, 0, -1e-300],
    "path": Path("a") / "b.json",
}
CLEAN = {
    "nan": None,
    "inf": [None, None, 1.5],
    "3": {"tensor": [[1.0, None], [None, -2.0]], "scalar": 0.25},
    "numpy": [0.5, 7, [None, 2.0], None],
    "bf16": [0.5, None],
    "ok": ["text", None, True, 0, -1e-300],
    "path": str(Path("a") / "b.json"),
}


def test_to_jsonable_gives_strict_json_for_nested_nan_infinities_tensors_and_numpy():
    out = to_jsonable(NESTED)
    assert out == CLEAN
    text = json.dumps(out, allow_nan=False)  # raises on any NaN / inf left
    assert json.loads(text) == out
    assert isinstance(out["numpy"][1], int) and isinstance(out["numpy"][0], float)


def test_write_json_stores_what_to_jsonable_returns(tmp_path):
    write_json(tmp_path / "x.json", NESTED)

    def refuse(c):
        raise ValueError(f"not strict JSON: {c}")

    assert (
        json.loads((tmp_path / "x.json").read_text(), parse_constant=refuse) == CLEAN == read_json(tmp_path / "x.json")
    )


def test_to_jsonable_names_what_it_cannot_write():
    with pytest.raises(ValueError, match="the record of component 3 must be JSON-serialisable"):
        to_jsonable({"x": object()}, "the record of component 3")
