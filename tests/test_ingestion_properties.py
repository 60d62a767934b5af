"""Property-based tests of the ingestion path (files → ``load_dataset`` → ``align_labels``): whatever the label
spellings, the order of the task's labels, the file format and encoding, the same rows get the same outcomes and
the same tunings, every bad row is named by its row in the file (or dropped and counted), and no row is silently
given a class."""

from __future__ import annotations

import json
import os
import re
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npeff_lens as nl
from npeff_lens.analysis import tunings
from npeff_lens.data import align_labels

NAMES = ("positive", "negative", "neutral")
TEXT = st.text(alphabet=st.sampled_from(list("abc xyz,;\"'\t\r\néü字1")), min_size=1, max_size=12).filter(
    lambda t: t.strip() and t == t.strip()
)


@st.composite
def spelling(draw, name: str) -> str:
    """``name`` with any case per letter and spaces around it."""
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    return " " * draw(st.integers(0, 2)) + cased + " " * draw(st.integers(0, 2))


@st.composite
def table(draw):
    """``(rows, bad, k)``: rows ``(text, label cell, outcome index or None)``; ``bad``: the rows that must be refused
    (empty text, empty or unknown label)."""
    k = draw(st.integers(2, 3))
    n = draw(st.integers(2, 10))
    rows, bad = [], []
    for i in range(n):
        y = draw(st.integers(0, k - 1))
        kind = draw(st.sampled_from(["ok"] * 6 + ["empty-text", "empty-label", "unknown-label"]))
        text = "" if kind == "empty-text" else draw(TEXT)
        cell = (
            {"empty-label": "", "unknown-label": "postive"}[kind] if kind in ("empty-label", "unknown-label") else None
        )
        cell = draw(spelling(NAMES[y])) if cell is None else cell
        rows.append((text, cell, None if kind != "ok" else y))
        if kind != "ok":
            bad.append(i)
    return rows, bad, k


def _write(rows, directory: str, fmt: str, encoding: str) -> str:
    path = os.path.join(directory, f"data.{fmt}")
    if fmt == "jsonl":
        lines = [json.dumps({"text": t, "label": c}, ensure_ascii=False) for t, c, _ in rows]
        body = "\n".join(lines) + "\n"
    else:
        sep = "," if fmt == "csv" else "\t"

        def cell(v):
            return '"' + str(v).replace('"', '""') + '"'

        body = "text" + sep + "label\r\n" + "".join(f"{cell(t)}{sep}{cell(c)}\r\n" for t, c, _ in rows)
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(body)
    return path


def _named_rows(message: str) -> set[int]:
    found = set()
    for m in re.finditer(r"rows? ([0-9, ]+?)(?: and \d+ more)? (?:has|have)", message):
        found |= {int(x) for x in m.group(1).split(",")}
    return found


COEFFICIENTS = torch.rand(10, 4, generator=torch.Generator().manual_seed(0)).double()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=table(),
    fmt=st.sampled_from(["csv", "tsv", "jsonl"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]),
    order=st.permutations(range(3)),
    pad=st.sampled_from(["", " "]),
)
def test_messy_files_give_the_same_outcomes_or_name_their_bad_rows(data, fmt, encoding, order, pad):
    rows, bad, k = data
    outcomes = [pad + NAMES[i] for i in order if i < k]
    with tempfile.TemporaryDirectory() as d:
        if fmt == "jsonl" and encoding != "utf-8":
            encoding = "utf-8"  # JSON Lines is UTF-8 by definition
        ds = nl.load_dataset(_write(rows, d, fmt, encoding))
    assert ds["text"] == [t for t, _, _ in rows]  # quotes, separators and carriage returns inside fields survive
    if bad:
        with pytest.raises(ValueError) as e:
            align_labels(ds, outcomes)
        message = str(e.value)
        assert "\n" not in message
        if len(bad) <= 8:
            assert _named_rows(message) == set(bad)
    found = align_labels(ds, outcomes, drop_invalid=True)
    assert found.dropped == bad and found.rows == [i for i in range(len(rows)) if i not in bad]
    kept = [y for _, _, y in rows if y is not None]
    names = [outcomes[v] for v in found.dataset["label"]]
    assert [n.strip() for n in names] == [NAMES[y] for y in kept]  # the outcome each row meant, never another
    assert found.dataset["label_name"] == names
    if len(kept) >= 4:  # tunings over outcome names do not depend on spellings or on the order of the labels
        canonical = [NAMES[y] for y in kept]
        c = COEFFICIENTS[: len(kept)]
        ours = tunings(c, [n.strip() for n in found.dataset["label_name"]], k=3)
        assert ours == tunings(c, canonical, k=3)


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=2, max_size=10),
    names=st.permutations(NAMES),
    order=st.permutations(range(3)),
)
def test_integer_labels_map_by_name_when_named_and_say_so_when_by_position(labels, names, order):
    import datasets

    outcomes = [" " + NAMES[i] for i in order]
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(labels))], "label": labels})
    named = align_labels(nl.load_dataset(ds, label_names=list(names)), outcomes)
    assert named.by_position is None
    assert [outcomes[v].strip() for v in named.dataset["label"]] == [names[y] for y in labels]
    positional = align_labels(nl.load_dataset(ds), outcomes)
    assert positional.by_position == dict(enumerate(outcomes))  # recorded, so collect can print the mapping
    assert positional.dataset["label"] == labels


def test_two_labels_that_differ_only_in_case_are_refused():
    import datasets

    ds = nl.load_dataset(datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["positive", "negative"]}))
    with pytest.raises(ValueError, match=r"' Positive' and ' positive' are the same label name"):
        align_labels(ds, [" Positive", " negative", " positive"])


def test_bad_rows_are_named_by_their_row_in_the_file_not_in_the_split(tmp_path):
    rows = [(f"text {i}", "positive" if i != 7 else "postive") for i in range(20)]
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    ds, source_rows = nl.load_dataset(path, split="train", seed=0, return_rows=True)
    assert [ds["text"][i] for i in range(len(ds))] == [rows[r][0] for r in source_rows]
    if 7 in source_rows:
        with pytest.raises(ValueError, match=r"row 7 has a label that names none"):
            align_labels(ds, [" positive", " negative"], rows=source_rows)


def test_string_labels_that_look_like_integers_are_names_and_a_classlabel_maps_by_name():
    import datasets

    digits = nl.load_dataset(datasets.Dataset.from_dict({"text": list("abcd"), "label": ["1", "2", "3", "3"]}))
    found = align_labels(digits, [" 1", " 2", " 3", " 4"])
    assert found.dataset["label_name"] == [" 1", " 2", " 3", " 3"] and found.by_position is None
    feature = datasets.ClassLabel(names=["pos", "neg"])
    given = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]}).cast_column("label", feature)
    found = align_labels(given, [" neg", " pos"])  # a Dataset given as it is: its ClassLabel's names, by name
    assert found.dataset["label_name"] == [" pos", " neg", " pos"] and found.by_position is None
