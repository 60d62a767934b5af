"""benchmarks/causal_tracing.py's pure parts, without a model: the per-layer profile of a location, the agreement
maths (Spearman over layers, MLP shares, peaks, the mismatched-pairing null) and the mapping of store examples back
to dataset rows."""

import math
import types

import numpy as np
import pytest
import torch
from helpers import load_script

bench = load_script("benchmarks/causal_tracing.py")


def _layout(n_layers: int) -> list[dict]:
    names = [
        ("self_attn.q_proj", (4, 4)),
        ("self_attn.o_proj", (4, 4)),
        ("mlp.up_proj", (8, 4)),
        ("mlp.down_proj", (4, 8)),
        ("input_layernorm", (4,)),
    ]
    layout, offset = [], 0
    for layer in range(n_layers):
        for name, shape in names:
            numel = math.prod(shape)
            layout.append(
                {"name": f"model.layers.{layer}.{name}.weight", "shape": list(shape), "offset": offset, "numel": numel}
            )
            offset += numel
    layout.append({"name": "model.norm.weight", "shape": [4], "offset": offset, "numel": 4})
    return layout


def test_location_profile_puts_each_group_at_its_layer_and_kind():
    from npeff_lens.locations import component_locations

    layout = _layout(3)
    direction = torch.zeros(sum(e["numel"] for e in layout), dtype=torch.float64)
    planted = {
        "model.layers.1.mlp.up_proj.weight": 3.0,
        "model.layers.1.mlp.down_proj.weight": 1.0,
        "model.layers.2.self_attn.o_proj.weight": 2.0,
        "model.layers.0.input_layernorm.weight": 5.0,
        "model.norm.weight": 7.0,
    }
    for e in layout:
        if e["name"] in planted:  # one entry of sqrt(energy): the group's energy is the planted value
            direction[e["offset"]] = math.sqrt(planted[e["name"]])
    location = bench.location_profile(component_locations(direction, layout), 3)
    total = sum(planted.values())
    np.testing.assert_allclose(location["mlp"], [0, 4 / total, 0])
    np.testing.assert_allclose(location["attn"], [0, 0, 2 / total])  # norms and the final norm left out
    assert bench.mlp_share(location) == pytest.approx(4 / 6)
    assert bench.peak(location["mlp"]) == 1 and bench.peak(location["attn"]) == 2


def test_covered_keeps_the_collected_layers_only():
    profile = {"mlp": np.arange(5.0), "attn": -np.arange(5.0)}
    (got,) = bench.covered([profile], [1, 3])
    np.testing.assert_array_equal(got["mlp"], [1.0, 3.0])
    np.testing.assert_array_equal(got["attn"], [-1.0, -3.0])


def test_spearman_is_one_for_the_same_order_and_not_for_a_shuffle():
    rng = np.random.default_rng(0)
    a = rng.random(30)
    assert bench.spearman(a, a) == pytest.approx(1.0)
    assert bench.spearman(a, 10 * a**3 + 2) == pytest.approx(1.0)  # any increasing map keeps the order
    assert bench.spearman(a, -a) == pytest.approx(-1.0)
    shuffled = a[rng.permutation(30)]
    assert abs(bench.spearman(a, shuffled)) < 0.5
    assert math.isnan(bench.spearman(a, np.ones(30)))  # a flat profile has no order
    with pytest.raises(ValueError):
        bench.spearman(a, a[:10])


def test_mlp_share_counts_negative_effects_as_zero():
    profile = {"mlp": np.array([0.3, -0.5, 0.1]), "attn": np.array([0.2, -1.0, 0.0])}
    assert bench.mlp_share(profile) == pytest.approx(0.4 / 0.6)
    assert math.isnan(bench.mlp_share({"mlp": np.array([-1.0, 0.0]), "attn": np.zeros(2)}))


def test_agreement_of_a_component_with_its_own_profile_and_a_shuffled_null():
    rng = np.random.default_rng(1)
    loc = {"mlp": rng.random(30), "attn": rng.random(30)}
    own = {k: 0.01 * v**2 for k, v in loc.items()}  # tracing's scale, the same order
    rand = {k: v[rng.permutation(30)] for k, v in loc.items()}
    got = bench.agreement(loc, own, rand)
    assert got["rho_mlp"] == pytest.approx(1.0) and got["rho_attn"] == pytest.approx(1.0)
    assert got["rho_mlp_random"] < 0.5 and got["rho_attn_random"] < 0.5
    assert got["rho_mlp_trace_own_random"] == pytest.approx(got["rho_mlp_random"])
    assert got["peak_mlp_npeff"] == got["peak_mlp_trace"] == int(np.argmax(loc["mlp"]))
    assert got["mlp_share_npeff"] == pytest.approx(loc["mlp"].sum() / (loc["mlp"].sum() + loc["attn"].sum()))


def test_mismatched_pairs_each_component_with_the_others_and_summary_counts():
    rng = np.random.default_rng(2)
    locs = [{"mlp": rng.random(12), "attn": rng.random(12)} for _ in range(4)]
    owns = [{k: v.copy() for k, v in loc.items()} for loc in locs]  # each agrees with its own exactly
    other = bench.mismatched(locs, owns, "mlp")
    for j, loc in enumerate(locs):
        expected = np.mean([bench.spearman(loc["mlp"], owns[i]["mlp"]) for i in range(4) if i != j])
        assert other[j] == pytest.approx(expected)
        assert other[j] < 1.0
    rand = {"mlp": rng.random(12), "attn": rng.random(12)}
    rows = []
    for j, (loc, own) in enumerate(zip(locs, owns)):
        row = {"component": j, **bench.agreement(loc, own, rand)}
        row["rho_mlp_other"], row["rho_attn_other"] = other[j], bench.mismatched(locs, owns, "attn")[j]
        rows.append(row)
    s = bench.summarize(rows)
    assert s["rho_mlp"]["median"] == pytest.approx(1.0) and s["rho_mlp"]["n"] == 4
    assert s["mlp_own_beats_random"] == "4/4" and s["attn_own_beats_other"] == "4/4"
    assert s["rho_mlp_random"]["mean"] == pytest.approx(np.mean([r["rho_mlp_random"] for r in rows]))
    assert math.isnan(bench.mismatched(locs[:1], owns[:1], "mlp")[0])


def test_facts_map_store_examples_to_dataset_rows_by_index_then_text():
    data = {"text": ["A is in", "B is in", "C is in"], "subject": ["A", "B", "C"], "target": ["X", " Y", "Z"]}
    # examples 0 and 2 by their index; example 1's index names another text, so it is found by its text
    meta = {"text": ["B is in", "C is in", "A is in"], "index": [1, 0, 0]}
    store = types.SimpleNamespace(metadata=meta)

    class Data(dict):
        def __len__(self):
            return 3

    facts = bench._facts(store, Data(data))
    assert [f["row"] for f in facts] == [1, 2, 0]
    assert [f["answer"] for f in facts] == [" Y", " Z", " X"]  # a space before the answer, never two
    assert [f["subject"] for f in facts] == ["B", "C", "A"]
    with pytest.raises(ValueError, match="not in the dataset"):
        bench._facts(types.SimpleNamespace(metadata={"text": ["D is in"], "index": [5]}), Data(data))
