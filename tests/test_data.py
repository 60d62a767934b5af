import collections
import json

import datasets
import pytest

import npeff_lens as nl
from npeff_lens.errors import SettingError, as_flag


def test_movie_reviews():
    ds = nl.load_dataset("movie-reviews")
    assert len(ds) == 10_568 and {"text", "label", "label_name"} <= set(ds.column_names)
    counts = collections.Counter(ds["label"])
    assert counts == {1: 5_242, 0: 5_326}
    assert all(n == ("negative", "positive")[l] for l, n in zip(ds["label"][:50], ds["label_name"][:50]))


def test_trec_is_train_5500():
    ds = nl.load_dataset("trec")
    assert len(ds) == 5_452
    # the standard coarse-class counts of train_5500
    assert collections.Counter(ds["label_name"]) == {
        "ENTY": 1250,
        "HUM": 1223,
        "DESC": 1162,
        "NUM": 896,
        "LOC": 835,
        "ABBR": 86,
    }


def test_geo_facts():
    ds = nl.load_dataset("geo-facts")
    assert len(ds) == 39_564 and all(r["target"] in r["targets"] for r in ds.select(range(0, len(ds), 997)))
    counts = {r: ds["relation"].count(r) for r in set(ds["relation"])}
    assert counts == {"city-country": 31_524, "us-place-state": 7_542, "country-capital": 246, "country-continent": 252}
    facts = dict(zip(ds["text"], ds["target"]))
    assert facts["Lyon is a city in the country of"] == "France"
    assert facts["The capital of Japan is"] == "Tokyo"
    assert facts["Kenya is a country in"] == "Africa"
    assert facts["Agoura is a city in the state of"] == "California"
    # a name shared by places in two states has no single answer and is left out
    assert "Springfield is a city in the state of" not in facts
    assert len(facts) == len(ds)  # no prompt twice


def test_splits_deterministic_disjoint_and_shuffled():
    tr, te = nl.load_dataset("movie-reviews", "train", seed=1), nl.load_dataset("movie-reviews", "test", seed=1)
    assert len(tr) + len(te) == 10_568 and len(te) == round(0.2 * 10_568)
    # disjoint rows; a handful of snippets occur twice in the file, so texts may repeat across splits
    assert len(set(tr["text"]) & set(te["text"])) < 20
    assert nl.load_dataset("movie-reviews", "test", seed=1)["text"][:20] == te["text"][:20]
    assert nl.load_dataset("movie-reviews", "test", seed=2)["text"][:20] != te["text"][:20]
    # the files are sorted by label; a split's first rows must be a random sample of both labels
    assert 0.35 < sum(te["label"][:200]) / 200 < 0.65


def test_user_dataset_column_mapping():
    user = datasets.Dataset.from_dict(
        {"sentence": ["a", "b", "c"], "y": [0, 1, 0]},
        features=datasets.Features(
            {"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"])}
        ),
    )
    ds = nl.load_dataset(user, columns={"text": "sentence", "label": "y"})
    assert ds["text"] == ["a", "b", "c"] and ds["label"] == [0, 1, 0] and ds["label_name"] == ["neg", "pos", "neg"]
    with pytest.raises(ValueError, match="no 'text' column"):
        nl.load_dataset(user)
    with pytest.raises(ValueError, match="not in the dataset"):
        nl.load_dataset(user, columns={"text": "nope"})
    with pytest.raises(ValueError, match="empty"):
        nl.load_dataset(datasets.Dataset.from_dict({"text": []}))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="movie-reviews, trec, geo-facts"):
        nl.load_dataset("sst2")


# ---- user files and directories ----------------------------------------------------------------


def _files(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_csv_with_custom_text_column_and_string_labels(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text('id,sentence,sentiment\n1,"great, really",pos\n2,dull,neg\n3,NA,pos\n4,meh,neutral\n')
    ds = nl.load_dataset(str(f), columns={"text": "sentence", "label": "sentiment"})
    assert ds["text"] == ["great, really", "dull", "NA", "meh"]  # "NA" stays a text
    assert ds["label_name"] == ["pos", "neg", "pos", "neutral"]
    assert ds["label"] == [2, 0, 2, 1]  # index in the sorted distinct values
    assert ds.features["label"].names == ["neg", "neutral", "pos"]
    assert ds["id"] == [1, 2, 3, 4]
    # label_names fixes the order; a pathlib.Path works too
    ds = nl.load_dataset(f, columns={"text": "sentence", "label": "sentiment"}, label_names=["neg", "pos", "neutral"])
    assert ds["label"] == [1, 0, 1, 2] and ds["label_name"] == ["pos", "neg", "pos", "neutral"]
    assert ds.features["label"].names == ["neg", "pos", "neutral"]
    with pytest.raises(ValueError, match=r"labels \['neutral'\] that are not in label_names \['neg', 'pos'\]"):
        nl.load_dataset(f, columns={"text": "sentence", "label": "sentiment"}, label_names=["neg", "pos"])
    assert _files(tmp_path) == ["reviews.csv"]  # no cache next to the user's file


def test_tsv(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("text\tlabel\na, b\t1\nc\t0\n")
    ds = nl.load_dataset(f, label_names=["no", "yes"])
    assert ds["text"] == ["a, b", "c"] and ds["label"] == [1, 0] and ds["label_name"] == ["yes", "no"]


def test_json_lines_and_json_list(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "fine", "label": 1}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = nl.load_dataset(tmp_path / "d.jsonl", label_names=["negative", "positive"])
    assert ds["text"] == ["good", "bad", "fine"] and ds["label"] == [1, 0, 1]
    assert ds["label_name"] == ["positive", "negative", "positive"]
    assert ds.features["label"].names == ["negative", "positive"]
    # without names: integers keep their values, label_name is str(label)
    ds = nl.load_dataset(tmp_path / "d.jsonl")
    assert ds["label"] == [1, 0, 1] and ds["label_name"] == ["1", "0", "1"]
    with pytest.raises(ValueError, match=r"labels \[1\] but 1 label names \['negative'\]"):
        nl.load_dataset(tmp_path / "d.jsonl", label_names=["negative"])
    # a JSON list of records, no label column: text only
    (tmp_path / "d.json").write_text(json.dumps([{"q": "who?"}, {"q": "what?"}]))
    ds = nl.load_dataset(str(tmp_path / "d.json"), columns={"text": "q", "label": None})
    assert ds.column_names == ["text"] and ds["text"] == ["who?", "what?"]
    with pytest.raises(ValueError, match="no 'label' column"):
        nl.load_dataset(tmp_path / "d.json", columns={"text": "q"}, label_names=["a", "b"])


def test_parquet(tmp_path):
    datasets.Dataset.from_dict({"body": ["x", "y", "z"], "label": [2, 0, 1]}).to_parquet(tmp_path / "d.parquet")
    ds = nl.load_dataset(tmp_path / "d.parquet", columns={"text": "body"}, label_names=["a", "b", "c"])
    assert ds["text"] == ["x", "y", "z"] and ds["label"] == [2, 0, 1] and ds["label_name"] == ["c", "a", "b"]
    assert "body" not in ds.column_names


def test_save_to_disk_dataset(tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"])})
    user = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(10)], "y": [i % 2 for i in range(10)]}, features
    )
    user.save_to_disk(tmp_path / "saved")
    before = _files(tmp_path)
    ds = nl.load_dataset(tmp_path / "saved", columns={"text": "sentence", "label": "y"})
    assert ds["text"] == [f"s{i}" for i in range(10)] and ds["label"] == [i % 2 for i in range(10)]
    assert ds["label_name"] == ["neg", "pos"] * 5 and ds.features["label"].names == ["neg", "pos"]
    test = nl.load_dataset(tmp_path / "saved", "test", seed=3, columns={"text": "sentence", "label": "y"})
    assert test["text"] == nl.load_dataset(user, "test", seed=3, columns={"text": "sentence", "label": "y"})["text"]
    assert _files(tmp_path) == before  # nothing written into the user's directory


def test_save_to_disk_dataset_dict(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": [f"tr{i}" for i in range(10)], "label": ["a", "b"] * 5}),
            "test": datasets.Dataset.from_dict({"text": ["te0", "te1", "te2"], "label": ["b", "b", "a"]}),
            "validation": datasets.Dataset.from_dict({"text": ["va0"], "label": ["a"]}),
        }
    )
    dd.save_to_disk(tmp_path / "dd")
    # a split the DatasetDict has is returned whole, in order, not split again
    te = nl.load_dataset(tmp_path / "dd", "test", seed=5)
    assert te["text"] == ["te0", "te1", "te2"] and te["label"] == [1, 1, 0] and te["label_name"] == ["b", "b", "a"]
    assert nl.load_dataset(tmp_path / "dd", "validation")["text"] == ["va0"]
    assert nl.load_dataset(tmp_path / "dd", "train")["text"] == [f"tr{i}" for i in range(10)]
    assert nl.load_dataset(tmp_path / "dd")["text"] == [f"tr{i}" for i in range(10)]  # split=None: "train"
    assert nl.load_dataset(dd, "test")["text"] == ["te0", "te1", "te2"]  # in memory the same
    # only "train": split="test" is the seeded test part of it
    datasets.DatasetDict({"train": dd["train"]}).save_to_disk(tmp_path / "only_train")
    te = nl.load_dataset(tmp_path / "only_train", "test", seed=1)
    assert te["text"] == nl.load_dataset(dd["train"], "test", seed=1)["text"] and len(te) == 2
    assert set(te["text"]) < set(dd["train"]["text"])
    datasets.DatasetDict({"dev": dd["test"], "eval": dd["validation"]}).save_to_disk(tmp_path / "no_train")
    with pytest.raises(ValueError, match=r"without a 'train' split; its splits are \['dev', 'eval'\]"):
        nl.load_dataset(tmp_path / "no_train")
    assert nl.load_dataset(tmp_path / "no_train", "eval")["text"] == ["va0"]
    with pytest.raises(ValueError, match=r"without a 'valid' split; its splits are \['train', 'test', 'validation'\]"):
        nl.load_dataset(tmp_path / "dd", "valid")


def test_file_split_deterministic_and_disjoint(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"t{i},{i // 25}\n" for i in range(50)))
    tr, te = nl.load_dataset(f, "train", seed=7), nl.load_dataset(f, "test", seed=7)
    assert len(tr) == 40 and len(te) == 10
    assert not set(tr["text"]) & set(te["text"]) and set(tr["text"]) | set(te["text"]) == {f"t{i}" for i in range(50)}
    assert all(int(t[1:]) // 25 == label for t, label in zip(tr["text"], tr["label"]))
    assert nl.load_dataset(f, "test", seed=7)["text"] == te["text"]
    assert nl.load_dataset(f, "test", seed=8)["text"] != te["text"]
    assert te["text"] != sorted(te["text"], key=lambda t: int(t[1:]))  # shuffled order
    # the same split as the same rows given as a Dataset
    same = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(50)], "label": [i // 25 for i in range(50)]})
    assert nl.load_dataset(same, "test", seed=7)["text"] == te["text"]
    assert len(nl.load_dataset(f, "test", seed=7, test_fraction=0.5)) == 25


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"movie-reviews, trec, geo-facts.*CSV / TSV / JSON Lines / JSON / Parquet"):
        nl.load_dataset("no-such-dataset")
    with pytest.raises(ValueError, match="no such file or directory"):
        nl.load_dataset(tmp_path / "missing.csv")
    (tmp_path / "d.txt").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'.*\.csv, \.tsv, \.jsonl, \.json, \.parquet"):
        nl.load_dataset(tmp_path / "d.txt")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="not written by datasets' save_to_disk"):
        nl.load_dataset(tmp_path / "plain_dir")
    (tmp_path / "d.csv").write_text("sentence,label\nhi,1\n")
    with pytest.raises(ValueError, match=r"no 'text' column \(it has columns \['sentence', 'label'\]\)") as e:
        nl.load_dataset(tmp_path / "d.csv")
    assert "columns={'text': '<your column>'}" in str(e.value) and "--" not in str(e.value)
    assert e.value.render(as_flag).endswith("name yours with --text-column")
    with pytest.raises(ValueError, match=r"columns \['body'\] not in the dataset at"):
        nl.load_dataset(tmp_path / "d.csv", columns={"text": "body"})
    (tmp_path / "e.csv").write_text("text,label\nhi,pos\nho,maybe\n")
    with pytest.raises(ValueError, match=r"labels \['maybe'\] that are not in label_names \['neg', 'pos'\]"):
        nl.load_dataset(tmp_path / "e.csv", label_names=["neg", "pos"])
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="empty"):
        nl.load_dataset(tmp_path / "empty.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="cannot read .* as a JSON Lines file"):
        nl.load_dataset(tmp_path / "bad.jsonl")
    with pytest.raises(TypeError, match="got int"):
        nl.load_dataset(3)


def test_builtin_rejects_columns_and_label_names():
    with pytest.raises(ValueError, match="cannot be used with the built-in dataset 'trec'"):
        nl.load_dataset("trec", columns={"text": "question"})
    with pytest.raises(ValueError, match=r"label_names=\['a', 'b'\] cannot be used") as e:
        nl.load_dataset("trec", label_names=["a", "b"])
    assert e.value.render(as_flag).startswith("--label-names cannot be used with the built-in dataset 'trec'")
    with pytest.raises(SettingError, match=r"columns=\{'text': 'q'\}, columns=\{'label': 'y'\} cannot") as e:
        nl.load_dataset("trec", columns={"text": "q", "label": "y"})
    assert e.value.render(as_flag).startswith("--text-column, --label-column cannot be used")
    # no-op mappings (what the command line passes by default) are fine
    ds = nl.load_dataset("trec", "test", columns={"text": "text", "label": None})
    assert len(ds) == round(0.2 * 5_452) and ds["text"] == nl.load_dataset("trec", "test")["text"]


# --------------------------------------------------------------------------------------------------
# One label mapping: labels are matched to the task's outcomes by name, whatever order either lists them in.
# --------------------------------------------------------------------------------------------------


def _csv(tmp_path, rows, name="data.csv"):
    path = tmp_path / name
    path.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    return path


def test_string_labels_are_numbered_as_the_outcomes_in_any_order(tmp_path):
    from npeff_lens.data import align_labels

    path = _csv(tmp_path, [("good film", "positive"), ("bad film", "negative"), ("fine", "Positive ")])
    ds = nl.load_dataset(path)
    for outcomes in ([" negative", " positive"], [" positive", " negative"]):
        found = align_labels(ds, outcomes)
        aligned = found.dataset
        assert found.dropped == [] and found.by_position is None
        assert aligned["label_name"] == [" positive", " negative", " positive"]  # the outcome, not the spelling
        assert [outcomes[y] for y in aligned["label"]] == [" positive", " negative", " positive"]
        assert aligned.features["label"].names == outcomes


def test_a_typo_an_empty_label_or_an_empty_text_names_the_rows(tmp_path):
    from npeff_lens.data import align_labels

    rows = [("good", "positive"), ("bad", "negative"), ("odd", "postive"), ("   ", "negative"), ("meh", "")]
    ds = nl.load_dataset(_csv(tmp_path, rows))
    with pytest.raises(ValueError) as e:
        align_labels(ds, [" negative", " positive"])
    msg = str(e.value)
    assert "\n" not in msg and "row 2 has a label that names none" in msg and "'postive'" in msg
    assert "row 3 has empty text" in msg and "row 4 has empty label" in msg and "pass drop_invalid=True" in msg
    assert "--" not in msg and e.value.fields == ("labels", "label_names", "drop_invalid")
    flags = e.value.render(as_flag)  # the command line's words: the same message with flags
    assert "(--labels; --label-names for integer labels), or pass --drop-invalid to leave the rows out" in flags
    assert flags.split(":")[0] == msg.split(":")[0] and "row 2 has a label that names none" in flags
    found = align_labels(ds, [" negative", " positive"], drop_invalid=True)
    kept = found.dataset
    assert found.dropped == [2, 3, 4] and kept["text"] == ["good", "bad"] and kept["label"] == [1, 0]
    assert found.rows == [0, 1]


def test_errors_name_settings_in_python_words_and_render_them_as_flags(tmp_path):
    """Column and label errors are SettingErrors: ``str`` names the keyword arguments, ``render(as_flag)`` the
    command line's flags, and text from the data (braces included) is quoted as it is, never read as a setting."""
    path = tmp_path / "d.csv"
    path.write_text("body,y\n{x},{pos}\nb,neg\n")
    with pytest.raises(SettingError) as e:
        nl.load_dataset(path, columns={"text": "body", "label": "why"})
    assert str(e.value).endswith("fix columns={'label': 'why'}")
    assert e.value.render(as_flag).endswith("fix --label-column") and e.value.fields == ("label_column",)
    with pytest.raises(SettingError, match="map two of our columns to the same column") as e:
        nl.load_dataset(path, columns={"text": "body", "label": "body"})
    assert e.value.render(as_flag).startswith("--text-column, --label-column map two")
    with pytest.raises(SettingError, match=r"label_names \['a', 'a'\] has duplicates") as e:
        nl.load_dataset(path, columns={"text": "body", "label": "y"}, label_names=["a", "a"])
    assert e.value.render(as_flag) == "--label-names ['a', 'a'] has duplicates"

    from npeff_lens.data import align_labels

    ds = nl.load_dataset(path, columns={"text": "body", "label": "y"})
    assert ds["text"] == ["{x}", "b"]
    with pytest.raises(SettingError) as e:
        align_labels(ds, [" neg", " {ok}"], source="the dataset '{d}'")
    for text in (str(e.value), e.value.render(as_flag)):
        assert text.startswith("the dataset '{d}': row 0 has a label that names none of the task's outcomes")
        assert "[' neg', ' {ok}']: ['{pos}']" in text


def test_integer_labels_without_names_index_the_outcomes():
    from npeff_lens.data import align_labels

    ds = nl.load_dataset(datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 2]}))
    found = align_labels(ds, [" x", " y", " z"])
    assert found.dataset["label"] == [1, 0, 2] and found.by_position == {0: " x", 1: " y", 2: " z"}
    with pytest.raises(ValueError, match="row 2 has a label outside 0..1"):
        align_labels(ds, [" x", " y"])
    # a classifier head's generic names are positions too
    named = nl.load_dataset(datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["neg", "pos"]}))
    assert align_labels(named, ["LABEL_0", "LABEL_1"]).dataset["label"] == [0, 1]


def test_a_file_that_is_empty_or_not_utf8_says_so(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.csv' is empty \(0 bytes\)"):
        nl.load_dataset(tmp_path / "empty.csv")
    (tmp_path / "latin.csv").write_bytes(b"text,label\ncaf\xe9 au lait,pos\n")
    with pytest.raises(ValueError, match=r"is not UTF-8 text: byte 0xe9 at offset 14 \(line 2\)"):
        nl.load_dataset(tmp_path / "latin.csv")
