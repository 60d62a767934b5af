"""Where a component lives: the energy (squared L2 norm) of its parameter-space direction per parameter group.

A component is a direction ``h`` in (projected) parameter space; recovered in parameter space (App. F;
:func:`npeff_lens.recovery.recover_direction`) it says how much of it sits in each layer and module. This module
turns a flat direction over a store's layout into

- ``groups``: one row per (layer, module) — ``q``, ``k``, ``v``, ``qkv`` (fused), ``o`` of attention; ``gate``,
  ``up``, ``down`` of the MLP; ``attn_norm``, ``mlp_norm``; ``other`` for anything else (embeddings, a final
  norm, a classifier head) — with its ``energy``, its ``fraction`` of the direction's energy and its
  ``enrichment``: that fraction over the group's share of the parameters (1 = no more than a random direction
  puts there; a back-projected direction at large ``n/d`` carries noise spread evenly over the parameters, which
  enrichment discounts);
- ``heads``: the same per attention head, where the head count is known (``heads={"n_heads": H, "n_kv_heads":
  H_kv}``, e.g. from the model's config) and the weight's rows (q, k, v) or columns (o) split evenly by it;
- ``top5pct``: the fraction of the energy in the top 5 % of groups (at least one), how concentrated it is.

:func:`share_distance` measures a location against the guess that needs no component: energy spread over the
groups by their share of the parameters (what a back-projected direction at large ``n/d`` carries); below
:data:`CHANCE_DISTANCE` (:func:`at_chance`) the location says nothing about the component.

:func:`restricted` keeps a direction on chosen groups only (zero elsewhere): perturbing along it tests whether
the location is causal (``benchmarks/locations.py``).

Names are read by pattern, so HF (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.3.attn.c_attn.weight``)
and TransformerLens (``blocks.3.attn.W_Q``) layouts both parse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "parameter_group",
    "component_locations",
    "top_groups",
    "top_group_keys",
    "restricted",
    "share_distance",
    "at_chance",
    "chance_caution",
    "CHANCE_DISTANCE",
]

# Total-variation distance from the parameter shares below which a location is at chance: the demo's sparse
# projection (n/d ~ 1,000, every group x1.0) sits far below it, a Kronecker location whose top 5 % of groups hold
# 3.5x their share (the README's) far above (that excess alone is > 0.1).
CHANCE_DISTANCE = 0.05

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# (module kind, patterns on the part of the name after the layer index), first match wins
_KINDS = (
    ("qkv", (r"c_attn\.", r"query_key_value\.", r"qkv_proj\.", r"Wqkv\.")),
    ("q", (r"q_proj\.", r"\.query\.", r"W_Q$", r"b_Q$")),
    ("k", (r"k_proj\.", r"\.key\.", r"W_K$", r"b_K$")),
    ("v", (r"v_proj\.", r"\.value\.", r"W_V$", r"b_V$")),
    ("o", (r"o_proj\.", r"out_proj\.", r"attn\.c_proj\.", r"attention\.output\.dense\.", r"W_O$", r"b_O$")),
    ("gate", (r"gate_proj\.", r"w1\.")),
    ("up", (r"up_proj\.", r"c_fc\.", r"fc1\.", r"dense_h_to_4h\.", r"intermediate\.dense\.", r"W_in$", r"b_in$")),
    (
        "down",
        (r"down_proj\.", r"mlp\.c_proj\.", r"fc2\.", r"dense_4h_to_h\.", r"^output\.dense\.", r"W_out$", r"b_out$"),
    ),
    ("attn_norm", (r"input_layernorm\.", r"ln_1\.", r"ln1\.", r"attention\.output\.LayerNorm\.")),
    ("mlp_norm", (r"post_attention_layernorm\.", r"ln_2\.", r"ln2\.", r"^output\.LayerNorm\.")),
)
_ATTENTION = ("q", "k", "v", "o", "qkv")


def parameter_group(name: str) -> tuple[int | None, str]:
    """``(layer, module kind)`` of a parameter name (``(None, "other")`` outside the layers)."""
    m = _LAYER.search(name)
    if m is None:
        return None, "other"
    rest = name[m.end() :]
    for kind, patterns in _KINDS:
        if any(re.search(p, rest) for p in patterns):
            return int(m.group(1)), kind
    return int(m.group(1)), "other"


def _head_split(entry: Mapping[str, Any], kind: str, heads: Mapping[str, int] | None):
    """``(n_heads, axis)`` to split a weight by head along, or None."""
    shape = list(entry["shape"])
    if kind not in ("q", "k", "v", "o") or len(shape) < 2:
        return None
    if len(shape) == 3:  # TransformerLens: [n_heads, d_model, d_head] (W_O: [n_heads, d_head, d_model])
        return shape[0], 0
    if not heads:
        return None
    n = heads.get("n_heads") if kind in ("q", "o") else heads.get("n_kv_heads") or heads.get("n_heads")
    # HF Linear weights are [out, in]: q/k/v rows per head, o columns per head; GPT-2's Conv1D (c_proj) is
    # [in, out]: o rows per head
    axis = 1 if kind == "o" and not re.search(r"(?:^|\.)c_proj\.", entry["name"]) else 0
    if not n or shape[axis] % n:
        return None
    return n, axis


def component_locations(
    direction: torch.Tensor, layout: Sequence[Mapping[str, Any]], heads: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The location of one flat direction ``[n]`` over ``layout`` (``name, shape, offset, numel`` entries):
    ``groups`` and ``heads`` sorted by energy, ``top5pct``, ``energy`` (total). See the module docstring."""
    flat = direction.detach().double().flatten()
    total_numel = sum(int(e["numel"]) for e in layout)
    if flat.shape[0] != total_numel:
        raise ValueError(f"the direction has {flat.shape[0]} entries; the layout covers {total_numel}")
    total = float(flat.square().sum())
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"the direction has energy {total}: no location")
    groups: dict[tuple, list[float]] = {}  # (layer, kind) -> [energy, numel]
    head_rows: dict[tuple, list[float]] = {}
    for e in layout:
        lo, n = int(e["offset"]), int(e["numel"])
        part = flat[lo : lo + n]
        layer, kind = parameter_group(e["name"])
        g = groups.setdefault((layer, kind), [0.0, 0])
        g[0] += float(part.square().sum())
        g[1] += n
        split = _head_split(e, kind, heads)
        if split is not None:
            n_heads, axis = split
            # the head axis first: [H, ...] (TransformerLens) or [H * d_head, ...] in head-major blocks (HF)
            per_head = part.view(*e["shape"]).square().movedim(axis, 0).reshape(n_heads, -1).sum(1)
            for h, v in enumerate(per_head.tolist()):
                r = head_rows.setdefault((layer, kind, h), [0.0, 0])
                r[0] += v
                r[1] += n // n_heads

    def row(key, energy, numel, names):
        frac = energy / total
        return {**dict(zip(names, key)), "energy": energy, "fraction": frac,
                "enrichment": frac / (numel / total_numel)}  # fmt: skip

    group_rows = sorted((row(k, v[0], v[1], ("layer", "module")) for k, v in groups.items()),
                        key=lambda r: -r["energy"])  # fmt: skip
    head_list = sorted((row(k, v[0], v[1], ("layer", "module", "head")) for k, v in head_rows.items()),
                       key=lambda r: -r["energy"])  # fmt: skip
    top = max(1, math.ceil(0.05 * len(group_rows)))
    return {
        "energy": total,
        "top5pct": sum(r["fraction"] for r in group_rows[:top]),
        "n_groups": len(group_rows),
        "groups": group_rows,
        "heads": head_list,
    }


def top_groups(location: Mapping[str, Any], k: int = 5) -> list[str]:
    """``"layer 27 v 31% (x4.2)"`` for the ``k`` groups with the most energy."""
    out = []
    for r in location["groups"][:k]:
        where = f"layer {r['layer']} {r['module']}" if r["layer"] is not None else r["module"]
        out.append(f"{where} {r['fraction']:.0%} (x{r['enrichment']:.1f})")
    return out


def share_distance(location: Mapping[str, Any]) -> float:
    """Total-variation distance in [0, 1] between a location's energy fractions and its groups' shares of the
    parameters, ``½ Σ_groups |fraction − share|`` (each share is ``fraction / enrichment``; the groups without
    energy hold the rest of the shares). 0: the energy follows the parameter counts exactly."""
    tv, known = 0.0, 0.0
    for r in location["groups"]:
        if r["enrichment"]:
            share = r["fraction"] / r["enrichment"]
            tv, known = tv + abs(r["fraction"] - share), known + share
    return 0.5 * (tv + max(0.0, 1.0 - known))


def at_chance(location: Mapping[str, Any], distance: float = CHANCE_DISTANCE) -> bool:
    """Whether a location is indistinguishable from the parameter-share guess (:func:`share_distance` below
    ``distance``): every group near x1.0 enrichment."""
    return share_distance(location) < distance


def chance_caution(location: Mapping[str, Any], projection: str | None = None, brief: bool = False) -> str:
    """What a location at chance (:func:`at_chance`) means, in one line: ``projection`` is the run's kind
    (``"sparse"``, ``"kron"``, None: unprojected); ``brief``: the number alone, for a second component at chance."""
    head = f"at chance ({share_distance(location):.1%} in total variation from the parameter shares)"
    if brief:
        return f"{head}, as above"
    if projection == "sparse":
        return (f"{head}: under the sparse projection a component's recovered direction spreads over parameters by "
                "their size, so these groups say nothing about it; use --projection kron (or --proj-dim 0 on a small "
                "model) to locate components")  # fmt: skip
    return f"{head}: the energy spreads over the groups by their share of the parameters; no group stands out"


def top_group_keys(location: Mapping[str, Any], share: float = 0.05) -> list[tuple[int | None, str]]:
    """``(layer, module)`` of the top ``share`` of a location's groups by energy (at least one): the groups
    ``top5pct`` sums over at the default."""
    rows = location["groups"]
    return [(r["layer"], r["module"]) for r in rows[: max(1, math.ceil(share * len(rows)))]]


def restricted(direction: torch.Tensor, layout: Sequence[Mapping[str, Any]], groups) -> torch.Tensor:
    """A copy of the flat ``direction`` that keeps the parameters of ``groups`` (``(layer, module)`` pairs, as
    :func:`parameter_group` names them) and is zero elsewhere; an error when none of them is in ``layout``."""
    keep = {(layer, module) for layer, module in groups}
    out = torch.zeros_like(direction)
    found = False
    for e in layout:
        if parameter_group(e["name"]) in keep:
            lo, n = int(e["offset"]), int(e["numel"])
            out[lo : lo + n] = direction[lo : lo + n]
            found = True
    if not found:
        raise ValueError(f"none of the groups {sorted(keep, key=str)} is in the layout")
    return out
