"""Where a component lives: parameter names parsed into (layer, module) for every layout kind, energies that add
up, heads split as the weights are laid out, and a planted direction found where it was put."""

import pytest
import torch

from npeff_lens.layout import parameter_layout
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
from npeff_lens.models import load_model


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
    rows = [
        {"fraction": 0.75, "enrichment": 1.5},
        {"fraction": 0.25, "enrichment": 1.0},
        {"fraction": 0.0, "enrichment": 0.0},
    ]
    assert share_distance({"groups": rows}) == pytest.approx(0.5 * (0.25 + 0 + 0.25))


# --- locating from the top examples' exact gradients (GradientSpan) -----------------------------------------------

SPAN_TEMPLATE, SPAN_LABELS = "Review: {text}\nSentiment:", [" sad", " bad", " awful"]
SPAN_TEXTS = ["a great film .", "bad", "yes no maybe good fun", "the movie is awful and sad", "fun fun", "dull"]


def _span_setup(projection_kind, params=("model.layers.*",)):
    import warnings

    from npeff_lens.projection import KroneckerProjection, SparseProjection
    from npeff_lens.tasks import LabelTokens

    adapter = load_model("tiny-llama")
    named = adapter.named_parameters(include=list(params))
    layout = parameter_layout(named)
    n = sum(e["numel"] for e in layout)
    op = {
        None: None,
        "sparse": SparseProjection(n, 512, seed=0, density=8),
        "kron": KroneckerProjection([tuple(e["shape"]) for e in layout], 512, seed=0, k=8),
    }[projection_kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = LabelTokens(SPAN_TEMPLATE, SPAN_LABELS).bind(adapter)
    return adapter, task, layout, op


@pytest.mark.filterwarnings("ignore:label .* tokens after the prompt")
@pytest.mark.parametrize("projection_kind", [None, "sparse", "kron"])
def test_a_component_in_the_span_of_examples_gradients_is_located_exactly(projection_kind):
    """A component made of three examples' PEF rows (weights planted) is rebuilt in parameter space exactly from its
    projection alone, so its location equals the exact location of the planted parameter-space direction; the
    back-projection of the same component under the sparse projection does not come close."""
    from npeff_lens.locations import GradientSpan

    adapter, task, layout, op = _span_setup(projection_kind)
    prompts = [task.format(t) for t in SPAN_TEXTS[:3]]
    span = GradientSpan(adapter, task, layout, op, batch_size=2)
    beta = torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, 0.0], [0.3, 0.3, -1.0]])
    exact = span.combine(prompts, beta)  # the planted parameter-space direction, Σ β g
    rows = span.rows(prompts)  # projected rows [3, 3, d]
    h = torch.einsum("mr,mrd->d", beta.double(), rows.double())  # its projection: what NPEFF would hold
    got = span.direction(h, prompts)
    assert got.fit == pytest.approx(1.0, abs=1e-6)
    cos = float(got.direction @ exact / (got.direction.norm() * exact.norm()))
    assert cos == pytest.approx(1.0, abs=1e-5)
    truth, found = component_locations(exact, layout), component_locations(got.direction, layout)
    fractions = {(r["layer"], r["module"]): r["fraction"] for r in truth["groups"]}
    assert max(abs(fractions[(r["layer"], r["module"])] - r["fraction"]) for r in found["groups"]) < 1e-5
    if projection_kind == "sparse":  # back-projection: the parameter-share guess, far from the truth
        back = component_locations(op.adjoint(h.float()), layout)
        tv = 0.5 * sum(abs(fractions[(r["layer"], r["module"])] - r["fraction"]) for r in back["groups"])
        assert tv > 0.1


@pytest.mark.filterwarnings("ignore:label .* tokens after the prompt")
def test_the_combined_gradient_is_the_weighted_sum_of_per_example_rows():
    """combine() is Σ w·g: equal to the unprojected rows that collection computes, weighted and summed."""
    from npeff_lens.locations import GradientSpan

    adapter, task, layout, _ = _span_setup(None)
    prompts = [task.format(t) for t in SPAN_TEXTS]
    span = GradientSpan(adapter, task, layout, None, batch_size=4)
    w = torch.randn(len(prompts), 3, generator=torch.Generator().manual_seed(1))
    want = torch.einsum("mr,mrn->n", w.double(), span.rows(prompts).double())
    got = span.combine(prompts, w)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.filterwarnings("ignore:label .* tokens after the prompt")
def test_a_component_outside_the_examples_span_says_so_in_its_fit():
    from npeff_lens.locations import GradientSpan

    adapter, task, layout, op = _span_setup("sparse")
    span = GradientSpan(adapter, task, layout, op)
    h = torch.randn(span.dim, generator=torch.Generator().manual_seed(0))
    assert span.direction(h, [task.format(t) for t in SPAN_TEXTS[:2]]).fit < 0.05
    with pytest.raises(ValueError, match="dims"):
        span.direction(torch.ones(7), [task.format(SPAN_TEXTS[0])])


def test_neurons_split_rows_of_gate_and_up_and_columns_of_down():
    """A direction planted on one MLP neuron of tiny-llama (row 5 of gate and up, column 5 of down, layer 1) puts
    all its energy on that neuron; in tiny-gpt2 (Conv1D: [in, out]) the neuron is column 5 of c_fc and row 5 of
    c_proj."""
    for model, planted in (
        ("tiny-llama", {"mlp.gate_proj.weight": (0, 5), "mlp.up_proj.weight": (0, 5), "mlp.down_proj.weight": (1, 5)}),
        ("tiny-gpt2", {"mlp.c_fc.weight": (1, 5), "mlp.c_fc.bias": (0, 5), "mlp.c_proj.weight": (0, 5)}),
    ):
        layout = _layout(model)
        x = torch.zeros(sum(e["numel"] for e in layout))
        for e in layout:
            for suffix, (axis, i) in planted.items():
                if e["name"].endswith(suffix) and parameter_group(e["name"])[0] == 1:
                    view = x[e["offset"] : e["offset"] + e["numel"]].view(*e["shape"])
                    view.select(axis, i).fill_(1.0) if view.dim() > 1 else view.__setitem__(i, 1.0)
        loc = component_locations(x, layout)
        top = loc["neurons"][0]
        assert (top["layer"], top["neuron"], top["fraction"]) == (1, 5, pytest.approx(1.0)), model
        assert loc["neurons"][1]["energy"] == 0 and loc["n_neurons"] >= 2 * 32
        assert top["enrichment"] > 10


def test_attention_heads_add_q_and_o_to_their_share_of_the_key_value_head():
    """tiny-llama: 4 query heads, 2 key/value heads. Energy 1 on q head 1 and 2 on k head 0 (which query heads 0 and
    1 read) gives query head 1 1 + 2/2 = 2, query head 0 1, heads 2 and 3 nothing."""
    layout = _layout("tiny-llama")
    x = torch.zeros(sum(e["numel"] for e in layout))
    for e in layout:
        if e["name"] == "model.layers.0.self_attn.q_proj.weight":
            x[e["offset"] : e["offset"] + e["numel"]].view(32, 32)[8, 0] = 1.0  # head 1's first row
        if e["name"] == "model.layers.0.self_attn.k_proj.weight":
            x[e["offset"] : e["offset"] + e["numel"]].view(16, 32)[0, 0] = 2.0**0.5  # kv head 0
    loc = component_locations(x, layout, heads={"n_heads": 4, "n_kv_heads": 2})
    got = {(r["layer"], r["head"]): r["energy"] for r in loc["attention_heads"]}
    assert got[(0, 1)] == pytest.approx(2.0) and got[(0, 0)] == pytest.approx(1.0)
    assert got[(0, 2)] == got[(0, 3)] == 0 and loc["attention_heads"][0]["kv_head"] == 0


def test_the_location_benchmarks_row_space_is_an_isometry_on_the_span():
    """benchmarks/locations.py fits unprojected PEFs in their row space: the reduced rows have the PEFs' Gram matrix,
    and a lifted component has the same products with the PEFs and with other lifted components, so NPEFF's loss
    (which reads G Hᵀ and H Hᵀ only) is the same in both spaces."""
    from helpers import load_script

    bench = load_script("benchmarks/locations.py")
    g = torch.Generator().manual_seed(0)
    G = torch.randn(7, 2, 300, generator=g)
    chunks = [G[:3], G[3:5], G[5:]]
    rows, lift = bench._row_space(chunks)
    F, R = G.reshape(14, 300).double(), rows.reshape(14, -1)
    assert torch.allclose(R @ R.T, F @ F.T, atol=1e-8 * float((F @ F.T).abs().max()))
    x, y = torch.randn(3, R.shape[1], generator=g).double(), torch.randn(2, R.shape[1], generator=g).double()
    assert torch.allclose(lift(x) @ F.T, x @ R.T, atol=1e-8)
    assert torch.allclose(lift(x) @ lift(y).T, x @ y.T, atol=1e-8)
