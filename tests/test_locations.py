"""Where a component lives: parameter names parsed into (layer, module) for every layout kind, energies that add
up, heads split as the weights are laid out, and a planted direction found where it was put."""

import pytest
import torch

from npeff_lens.locations import (
    CHANCE_DISTANCE,
    at_chance,
    component_locations,
    parameter_group,
    restricted,
    share_distance,
    top_group_keys,
    top_groups,
)
from npeff_lens.models import load_model, parameter_layout


@pytest.mark.parametrize(
    "name, group",
    [
        ("model.layers.3.self_attn.q_proj.weight", (3, "q")),
        ("model.layers.3.self_attn.o_proj.weight", (3, "o")),
        ("model.layers.3.mlp.gate_proj.weight", (3, "gate")),
        ("model.layers.3.mlp.down_proj.weight", (3, "down")),
        ("model.layers.3.input_layernorm.weight", (3, "attn_norm")),
        ("model.layers.3.post_attention_layernorm.weight", (3, "mlp_norm")),
        ("transformer.h.2.attn.c_attn.weight", (2, "qkv")),
        ("transformer.h.2.attn.c_proj.bias", (2, "o")),
        ("transformer.h.2.mlp.c_fc.weight", (2, "up")),
        ("transformer.h.2.mlp.c_proj.weight", (2, "down")),
        ("transformer.h.2.ln_2.weight", (2, "mlp_norm")),
        ("blocks.4.attn.W_K", (4, "k")),
        ("blocks.4.attn.b_O", (4, "o")),
        ("blocks.4.mlp.W_out", (4, "down")),
        ("bert.encoder.layer.1.attention.self.value.weight", (1, "v")),
        ("bert.encoder.layer.1.intermediate.dense.weight", (1, "up")),
        ("bert.encoder.layer.1.output.dense.weight", (1, "down")),
        ("model.norm.weight", (None, "other")),
        ("classifier.weight", (None, "other")),
    ],
)
def test_names_parse_into_layer_and_module(name, group):
    assert parameter_group(name) == group


def _layout(model="tiny-llama"):
    return parameter_layout(load_model(model).named_parameters())


def _planted(layout, where, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(sum(e["numel"] for e in layout))
    for e in layout:
        if where(e["name"]):
            x[e["offset"] : e["offset"] + e["numel"]] = torch.randn(e["numel"], generator=g)
    return x


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_a_direction_planted_in_one_layer_is_located_there(model):
    layout = _layout(model)
    layer = 1
    loc = component_locations(_planted(layout, lambda n: parameter_group(n)[0] == layer), layout)
    in_layer = sum(r["fraction"] for r in loc["groups"] if r["layer"] == layer)
    assert in_layer >= 0.9 and abs(sum(r["fraction"] for r in loc["groups"]) - 1) < 1e-9
    assert all(r["layer"] == layer for r in loc["groups"] if r["fraction"] > 0)
    # the enrichment of the planted layer's groups: their fraction over their share of the parameters, > 1
    assert all(r["enrichment"] > 1 for r in loc["groups"] if r["layer"] == layer)
    assert top_groups(loc, 2)[0].startswith(f"layer {layer} ")


def test_heads_split_the_rows_of_q_k_v_and_the_columns_of_o():
    layout = _layout("tiny-llama")  # 4 heads of 8 dims, 2 key/value heads; q [32, 32], k [16, 32], o [32, 32]
    q = next(e for e in layout if e["name"] == "model.layers.0.self_attn.q_proj.weight")
    o = next(e for e in layout if e["name"] == "model.layers.0.self_attn.o_proj.weight")
    x = torch.zeros(sum(e["numel"] for e in layout))
    x[q["offset"] : q["offset"] + q["numel"]].view(32, 32)[16:24] = 1.0  # the rows of head 2
    x[o["offset"] : o["offset"] + o["numel"]].view(32, 32)[:, 8:16] = 2.0  # the columns of head 1
    loc = component_locations(x, layout, heads={"n_heads": 4, "n_kv_heads": 2})
    nonzero = {(r["module"], r["head"]): r["energy"] for r in loc["heads"] if r["energy"] > 0}
    assert nonzero == {("q", 2): 8 * 32.0, ("o", 1): 32 * 8 * 4.0}
    assert len([r for r in loc["heads"] if r["module"] == "k"]) == 2 * 2  # two layers of 2 key/value heads
    for (layer, module), energy in {(r["layer"], r["module"]): r["energy"] for r in loc["groups"]}.items():
        per_head = [r["energy"] for r in loc["heads"] if (r["layer"], r["module"]) == (layer, module)]
        if per_head:
            assert sum(per_head) == pytest.approx(energy)


def test_transformer_lens_weights_split_by_their_head_axis():
    layout = [
        {"name": "blocks.0.attn.W_Q", "shape": [2, 4, 3], "offset": 0, "numel": 24},
        {"name": "blocks.0.attn.W_O", "shape": [2, 3, 4], "offset": 24, "numel": 24},
    ]
    x = torch.zeros(48)
    x[12:24] = 1.0  # W_Q's head 1
    loc = component_locations(x, layout)
    assert {(r["module"], r["head"]): r["fraction"] for r in loc["heads"] if r["energy"]} == {("q", 1): 1.0}


def test_a_zero_direction_or_a_wrong_layout_is_an_error():
    layout = _layout()
    with pytest.raises(ValueError, match="energy 0"):
        component_locations(torch.zeros(sum(e["numel"] for e in layout)), layout)
    with pytest.raises(ValueError, match="entries; the layout covers"):
        component_locations(torch.ones(5), layout)


def test_restricting_a_direction_keeps_its_top_groups_exactly_and_zeroes_the_rest():
    layout = _layout()
    x = torch.randn(sum(e["numel"] for e in layout), generator=torch.Generator().manual_seed(0))
    loc = component_locations(x, layout)
    keys = top_group_keys(loc)
    first = loc["groups"][0]
    assert len(keys) == max(1, -(-loc["n_groups"] * 5 // 100)) and keys[0] == (first["layer"], first["module"])
    kept = restricted(x, layout, keys)
    for e in layout:
        part, orig = kept[e["offset"] : e["offset"] + e["numel"]], x[e["offset"] : e["offset"] + e["numel"]]
        assert torch.equal(part, orig) if parameter_group(e["name"]) in keys else not part.any()
    # its energy is what top5pct says the top groups hold
    assert float(kept.double().square().sum() / x.double().square().sum()) == pytest.approx(loc["top5pct"])
    with pytest.raises(ValueError, match="none of the groups"):
        restricted(x, layout, [(99, "q")])


def test_head_counts_come_from_a_configuration_alone(tmp_path):
    from npeff_lens.models import head_counts

    assert head_counts("tiny-llama") == {"n_heads": 4, "n_kv_heads": 2}
    assert head_counts("tiny-gpt2") == {"n_heads": 4, "n_kv_heads": 4}
    assert head_counts("some-org/some-model") is None  # a hub id: nothing is fetched
    assert head_counts(str(tmp_path)) is None  # a directory without a config


def test_gpt2_conv1d_output_projection_splits_by_its_rows():
    """GPT-2's attn.c_proj is a Conv1D, [in, out]: a head's inputs are its rows (a Linear's are its columns)."""
    layout = _layout("tiny-gpt2")  # 4 heads of 8 dims; c_proj [32, 32]
    o = next(e for e in layout if e["name"] == "transformer.h.0.attn.c_proj.weight")
    x = torch.zeros(sum(e["numel"] for e in layout))
    x[o["offset"] : o["offset"] + o["numel"]].view(32, 32)[0:8] = 1.0  # the inputs of head 0
    loc = component_locations(x, layout, heads={"n_heads": 4, "n_kv_heads": 4})
    assert {(r["module"], r["head"]): r["fraction"] for r in loc["heads"] if r["energy"]} == {("o", 0): 1.0}


def test_a_planted_direction_back_projected_at_large_n_over_d_is_at_chance():
    """Under the sparse projection the back-projection A·(xA) of a direction x planted in one group is x plus noise
    spread over the parameters by their counts, with (n/d) times its energy: at n/d = 1152 every group reads x1.0
    and the location is at chance; at n/d = 2.25 the planted group stands out."""
    from npeff_lens.projection import SparseProjection

    layout = _layout()
    n = sum(e["numel"] for e in layout)
    x = _planted(layout, lambda name: parameter_group(name) == (1, "q"))
    assert share_distance(component_locations(x, layout)) > 0.9  # exact: all of it in 1/18 of the parameters
    for d, chance in ((16, True), (8192, False)):
        op = SparseProjection(n, d, seed=0, density=min(d, 32))
        loc = component_locations(op.adjoint(op.project(x[None]))[0], layout)
        assert at_chance(loc) == chance, (d, share_distance(loc))
        top = loc["groups"][0]
        if chance:
            assert share_distance(loc) < CHANCE_DISTANCE / 2 and abs(top["enrichment"] - 1) < 0.1
        else:
            assert (top["layer"], top["module"]) == (1, "q") and top["enrichment"] > 4
    # exact on hand-made rows: shares 1/2, 1/4, 1/4 (the last group without energy), fractions 3/4, 1/4, 0
    rows = [{"fraction": 0.75, "enrichment": 1.5}, {"fraction": 0.25, "enrichment": 1.0},
            {"fraction": 0.0, "enrichment": 0.0}]  # fmt: skip
    assert share_distance({"groups": rows}) == pytest.approx(0.5 * (0.25 + 0 + 0.25))
