"""Locating a component in the model: how the energy (squared L2 norm) of its parameter-space direction splits
over layers, modules, attention heads and MLP neurons.

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

import contextlib
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .layout import unflatten
from .pef import PEFComputer
from .perturb import check_adapter
from .projection import Projection, projection_from_config
from .selectivity import ParameterDirection, UnreachableTargetError, component_selectivity

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
    "GradientSpan",
    "SpanDirection",
    "group_numels",
    "equal_size_control",
    "located_selectivity",
    "location_words",
    "FIT_CAUTION",
]

# Total-variation distance from the parameter shares below which a location is at chance: the demo's sparse
# projection (n/d ~ 1,000, every group x1.0) sits far below it, a Kronecker location whose top 5 % of groups hold
# 3.5x their share (the README's) far above (that excess alone is > 0.1).
CHANCE_DISTANCE = 0.05
# Below this share of a component reproduced by its top examples' gradients (GradientSpan's fit), a location
# describes only part of the component and says so.
FIT_CAUTION = 0.5

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


# weights laid out [in, out] (GPT-2's Conv1D, TransformerLens' W_in / W_out) rather than torch's Linear [out, in]
_IN_OUT = re.compile(r"(?:^|\.)(?:c_fc|c_proj)\.|W_in$|W_out$")
N_NEURONS = 32  # the neurons kept per component, by energy


def _neuron_axis(entry: Mapping[str, Any], kind: str) -> int | None:
    """The axis of an MLP weight (or bias) that indexes the hidden neurons, or None: rows of gate / up and
    columns of down for Linear weights ([out, in]), the other way round for [in, out] layouts; a gate / up bias
    has one entry per neuron, a down bias none."""
    shape = list(entry["shape"])
    if kind not in ("gate", "up", "down") or not shape or len(shape) > 2:
        return None
    if len(shape) == 1:
        return 0 if kind in ("gate", "up") else None
    in_out = bool(_IN_OUT.search(entry["name"]))
    return (1 if in_out else 0) if kind in ("gate", "up") else (0 if in_out else 1)


def component_locations(
    direction: torch.Tensor,
    layout: Sequence[Mapping[str, Any]],
    heads: Mapping[str, int] | None = None,
    *,
    terms: bool = False,
    n_neurons: int | None = N_NEURONS,
) -> dict[str, Any]:
    """The location of one flat direction ``[n]`` over ``layout`` (``name, shape, offset, numel`` entries):
    ``groups`` and ``heads`` sorted by energy, ``top5pct``, ``energy`` (total). See the module docstring.

    ``neurons``: the top ``n_neurons`` MLP neurons by energy (None: all of them).
    ``terms=True``: ``direction`` already holds each parameter's (possibly signed) share of a total, such as a
    loading split over parameters; groups sum the shares instead of the squares, and a fraction may be negative."""
    flat = direction.detach().double().flatten()
    total_numel = sum(int(e["numel"]) for e in layout)
    if flat.shape[0] != total_numel:
        raise ValueError(f"the direction has {flat.shape[0]} entries; the layout covers {total_numel}")
    mass = flat if terms else flat.square()
    total = float(mass.sum())
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"the direction has energy {total}: no location")
    groups: dict[tuple, list[float]] = {}  # (layer, kind) -> [energy, numel]
    head_rows: dict[tuple, list[float]] = {}
    neuron_energy: dict[tuple, torch.Tensor] = {}  # (layer, n_neurons) -> [energy per neuron, numel per neuron]
    for e in layout:
        lo, n = int(e["offset"]), int(e["numel"])
        part = mass[lo : lo + n]
        layer, kind = parameter_group(e["name"])
        g = groups.setdefault((layer, kind), [0.0, 0])
        g[0] += float(part.sum())
        g[1] += n
        split = _head_split(e, kind, heads)
        if split is not None:
            n_heads, axis = split
            # the head axis first: [H, ...] (TransformerLens) or [H * d_head, ...] in head-major blocks (HF)
            per_head = part.view(*e["shape"]).movedim(axis, 0).reshape(n_heads, -1).sum(1)
            for h, v in enumerate(per_head.tolist()):
                r = head_rows.setdefault((layer, kind, h), [0.0, 0])
                r[0] += v
                r[1] += n // n_heads
        axis = _neuron_axis(e, kind)
        if axis is not None:
            per = part.view(*e["shape"]).movedim(axis, 0).reshape(e["shape"][axis], -1)
            acc = neuron_energy.setdefault((layer, per.shape[0]), torch.zeros(2, per.shape[0], dtype=torch.float64))
            acc[0] += per.sum(1)
            acc[1] += per.shape[1]

    def row(key, energy, numel, names):
        frac = energy / total
        return {**dict(zip(names, key)), "energy": energy, "fraction": frac, "enrichment": frac / (numel / total_numel)}

    group_rows = sorted(
        (row(k, v[0], v[1], ("layer", "module")) for k, v in groups.items()), key=lambda r: -r["energy"]
    )
    head_list = sorted(
        (row(k, v[0], v[1], ("layer", "module", "head")) for k, v in head_rows.items()), key=lambda r: -r["energy"]
    )
    neurons = [
        (layer, i, float(v), float(c))
        for (layer, _), acc in neuron_energy.items()
        for i, (v, c) in enumerate(zip(acc[0].tolist(), acc[1].tolist()))
    ]
    neurons.sort(key=lambda t: -t[2])
    top = max(1, math.ceil(0.05 * len(group_rows)))
    return {
        "energy": total,
        "top5pct": sum(r["fraction"] for r in group_rows[:top]),
        "n_groups": len(group_rows),
        "groups": group_rows,
        "heads": head_list,
        "attention_heads": _attention_heads(head_rows, total, total_numel),
        "n_neurons": len(neurons),
        "neurons": [row((layer, i), v, c, ("layer", "neuron")) for layer, i, v, c in neurons[:n_neurons]],
    }


def _attention_heads(head_rows: Mapping[tuple, list[float]], total: float, total_numel: int) -> list[dict]:
    """Per (layer, query head): its q and o rows plus its share of the key / value head it reads (grouped-query
    attention: a key / value head serves n_heads / n_kv_heads query heads, and its energy and parameters are split
    evenly among them), sorted by energy. Empty where the weights were not split by head."""
    by_layer: dict = {}
    for (layer, module, head), (energy, numel) in head_rows.items():
        by_layer.setdefault(layer, {}).setdefault(module, {})[head] = (energy, numel)
    out = []
    for layer, mods in by_layer.items():
        n_q = len(mods.get("q") or mods.get("o") or {})
        if not n_q:
            continue
        group = max(1, n_q // (len(mods.get("k") or mods.get("v") or {}) or n_q))
        for h in range(n_q):
            parts = [mods.get(m, {}).get(h, (0.0, 0)) for m in ("q", "o")]
            parts += [tuple(x / group for x in mods.get(m, {}).get(h // group, (0.0, 0))) for m in ("k", "v")]
            energy, numel = sum(p[0] for p in parts), sum(p[1] for p in parts)
            frac = energy / total
            out.append(
                {
                    "layer": layer,
                    "head": h,
                    "kv_head": h // group,
                    "energy": energy,
                    "fraction": frac,
                    "enrichment": frac / (numel / total_numel) if numel else 0.0,
                }
            )
    return sorted(out, key=lambda r: -r["energy"])


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


def chance_caution(
    location: Mapping[str, Any], projection: str | None = None, brief: bool = False, method: str | None = None
) -> str:
    """What a location at chance (:func:`at_chance`) means, in one line: ``projection`` is the run's kind
    (``"sparse"``, ``"kron"``, None: unprojected); ``method``: how it was located (``"span"``, ``"recovered"``;
    None: recovered, as before locations recorded it); ``brief``: the number alone, for a second component at
    chance."""
    head = f"at chance ({share_distance(location):.1%} in total variation from the parameter shares)"
    if brief:
        return f"{head}, as above"
    if projection == "sparse" and method in (None, "recovered"):
        return (
            f"{head}: under the sparse projection a component's recovered direction spreads over parameters by "
            "their size, so these groups say nothing about it; locate it from its top examples' gradients "
            "(the span method, the default) instead"
        )
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


# ----------------------------------------------------------------------------------------------
# Locating a component from its top examples' exact gradients.
# ----------------------------------------------------------------------------------------------


@dataclass
class SpanDirection:
    """A component's parameter-space direction rebuilt from its top examples' exact gradients
    (:meth:`GradientSpan.direction`).

    ``direction``: flat ``[n]`` over the layout, ``Σ_rows α_row g_row`` (``g_row``: an example's LRM-PEF row, the
    gradient of one of the task's per-example scalars); ``fit``: the share of the component's squared norm that
    the projected rows reproduce, ``1 − ‖Φ Gᵀα − h‖² / ‖h‖²`` (1: the component lies in their span; low: the top
    examples do not make it up, and the location says little); ``coefficients``: ``α`` ``[examples, rows]``."""

    direction: torch.Tensor
    fit: float
    coefficients: torch.Tensor


class GradientSpan:
    """Where a component lives, read from the exact gradients of the examples that load on it most.

    NPEFF fits each component ``h`` (in the projected space, ``d`` numbers) to the PEFs of the examples that load
    on it, so ``h`` lies (nearly) in the span of those examples' projected PEF rows ``Φ g_row``. This class
    recomputes the rows of a few top examples, solves ``min_α ‖Σ α_row Φ g_row − h‖`` (``d`` equations, as many
    unknowns as rows), and returns ``Σ α_row g_row`` in parameter space: one backward pass of the weighted sum of
    the task's per-example scalars (no per-example gradient of the whole model is kept). Unlike recovering ``h``
    from ``d`` numbers alone (back-projection, :mod:`npeff_lens.recovery`), whose energy spreads over the
    parameters by their size under the sparse projection, the rebuilt direction carries the examples' own
    structure: which layers, modules, heads and neurons their gradients use.

    ``adapter`` / ``task``: the model and task the PEFs were collected with; ``layout``: the store's parameter
    layout; ``projection``: the store's projection (an operator, its config dict, or None for unprojected PEFs);
    ``max_length``: the collection's. Cost per component: the top examples' PEF rows again (one forward and one
    backward per row group, as in collection) and one more backward pass for the direction.

    >>> span = GradientSpan(adapter, task, manifest["layout"], manifest["projection"])  # doctest: +SKIP
    >>> loc = component_locations(span.direction(est.components_[3], prompts[:16]).direction, layout)  # doctest: +SKIP
    """

    def __init__(
        self,
        adapter,
        task,
        layout: Sequence[Mapping[str, Any]],
        projection: Projection | Mapping[str, Any] | None,
        *,
        max_length: int | None = None,
        batch_size: int = 8,
    ):
        check_adapter(adapter, layout)
        params = dict(adapter.all_named_parameters())
        self.named = [(e["name"], params[e["name"]]) for e in layout]
        if isinstance(projection, Mapping):
            projection = projection_from_config(projection)
        self.adapter, self.task = adapter, task.bind(adapter)
        self.layout, self.projection = list(layout), projection
        self.computer = PEFComputer(adapter, self.task, self.named, projection)
        self.max_length, self.batch_size = max_length, batch_size

    @property
    def dim(self) -> int:
        """The projected dimension ``d`` (the number of parameters for unprojected PEFs)."""
        return self.computer.dim

    def rows(self, prompts: Sequence[str]) -> torch.Tensor:
        """The projected PEF rows ``[len(prompts), r, d]`` of ``prompts``, as collection computes them (full rank)."""
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            pefs, _ = self.computer.compute(list(prompts[lo : lo + self.batch_size]), max_length=self.max_length)
            out.append(pefs.detach().cpu())
        return torch.cat(out)

    def combine(self, prompts: Sequence[str], weights: torch.Tensor) -> torch.Tensor:
        """``Σ_i Σ_row weights[i, row] · g_(i, row)``: the flat ``[n]`` (float64) gradient of the weighted sum of the
        task's per-example scalars, one backward pass per batch. An example with non-finite logits adds nothing."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        params = [p for _, p in self.named]
        total = [torch.zeros(p.numel(), dtype=torch.float64) for p in params]
        with _requiring_grad(params), torch.enable_grad():
            for lo in range(0, len(prompts), self.batch_size):
                batch = self.adapter.tokenize(list(prompts[lo : lo + self.batch_size]), max_length=self.max_length)
                log_probs = self.task.log_probs(self.adapter, batch)
                ok = torch.isfinite(log_probs).all(-1)
                safe = torch.where(ok[:, None], log_probs, torch.zeros_like(log_probs).detach())
                rows = self.task.pef_rows(safe)
                w = weights[lo : lo + rows.shape[0]].to(rows.device) * ok[:, None].to(rows.dtype)
                grads = torch.autograd.grad((rows * w).sum(), params, allow_unused=True)
                for acc, g in zip(total, grads):
                    if g is not None:
                        acc += g.detach().reshape(-1).double().cpu()
        return torch.cat(total)

    def direction(self, component: torch.Tensor, prompts: Sequence[str], rcond: float = 1e-10) -> SpanDirection:
        """The direction in the span of ``prompts``' PEF rows whose projection best reproduces ``component``
        (``[d]``, one row of ``NPEFF.components_``). See :class:`SpanDirection`."""
        h = torch.as_tensor(component).double().flatten().cpu()
        if h.shape[0] != self.dim:
            raise ValueError(f"the component has {h.shape[0]} dims; the PEFs have {self.dim}")
        rows = self.rows(prompts)  # [m, r, d]
        m, r, _ = rows.shape
        P = rows.reshape(m * r, -1).double()
        # least squares through the Gram matrix (m·r unknowns, d equations): cheap for any d
        gram, b = P @ P.T, P @ h
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > rcond * max(float(evals.max()), 0.0)
        alpha = evecs[:, keep] @ ((evecs[:, keep].T @ b) / evals[keep]) if bool(keep.any()) else torch.zeros_like(b)
        hh = float(h @ h)
        fit = float(b @ alpha) / hh if hh > 0 else 0.0
        coefficients = alpha.reshape(m, r)
        return SpanDirection(self.combine(prompts, coefficients), min(1.0, max(0.0, fit)), coefficients)


@contextlib.contextmanager
def _requiring_grad(params):
    saved = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in saved:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# Whether a location is causal.
# ----------------------------------------------------------------------------------------------


def group_numels(layout: Sequence[Mapping[str, Any]]) -> dict[tuple, int]:
    """``{(layer, module): number of parameters}`` over ``layout``, in the layout's order."""
    out: dict[tuple, int] = {}
    for e in layout:
        g = parameter_group(e["name"])
        out[g] = out.get(g, 0) + int(e["numel"])
    return out


def equal_size_control(layout: Sequence[Mapping[str, Any]], groups, seed: int = 0) -> list[tuple]:
    """Groups drawn at random from those not in ``groups``, one per group of ``groups`` and of the same parameter
    count where one is left (another layer's matrix of the same shape, whatever its module), else the closest in
    size: a control with the located groups' parameter count, exactly when the model's shapes allow."""
    numel = group_numels(layout)
    keep = [tuple(g) for g in groups if tuple(g) in numel]
    others = [g for g in numel if g not in set(keep)]
    random.Random(seed).shuffle(others)
    out: list[tuple] = []
    for g in sorted(keep, key=lambda g: -numel[g]):  # the largest first: they have the fewest matches
        left = [o for o in others if o not in out]
        if not left:
            break
        out.append(min(left, key=lambda o: abs(numel[o] - numel[g])))  # the first of the closest size, at random
    return out


def located_selectivity(
    adapter,
    task,
    prompts: Sequence[str],
    layout: Sequence[Mapping[str, Any]],
    direction: torch.Tensor,
    groups,
    measure: Sequence[int],
    *,
    seed: int = 0,
    target_kl: float = 0.01,
    n_baseline: int = 32,
    reference=None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Whether a location is causal: the selectivity (:func:`npeff_lens.selectivity.component_selectivity`: the
    mean KL on the ``measure`` examples at the perturbation size that moves ``n_baseline`` random examples by
    ``target_kl``) of the flat parameter-space ``direction`` perturbed whole (``full``), restricted to ``groups``
    (``top``: (layer, module) pairs, :func:`restricted`) and restricted to random other groups of about the same
    parameter count (``control``, :func:`equal_size_control`).

    Returns ``{full, top, control}`` (each ``{status, selectivity, ...}``; status ``unreachable`` when no size
    reaches ``target_kl``), ``top_groups``, ``control_groups``, ``top_params``, ``control_params``, and ``kept`` /
    ``control_kept``: the selectivity of the restricted direction over the full one's (None when not measured).
    Locate with one set of a component's examples and measure on others: a direction built from the measured
    examples' own gradients moves them by construction."""
    groups = [tuple(g) for g in groups]
    control = equal_size_control(layout, groups, seed=seed)
    numel = group_numels(layout)
    out: dict[str, Any] = {
        "top_groups": [list(g) for g in groups],
        "control_groups": [list(g) for g in control],
        "top_params": sum(numel.get(g, 0) for g in groups),
        "control_params": sum(numel.get(g, 0) for g in control),
    }
    for name, kept in (("full", None), ("top", groups), ("control", control)):
        if kept is not None and not kept:
            out[name] = {"status": "none", "error": "no other group to draw a control from"}
            continue
        flat = direction if kept is None else restricted(direction, layout, kept)
        try:
            pd = ParameterDirection(adapter, unflatten(flat.float(), layout))
            r = component_selectivity(
                adapter,
                task,
                prompts,
                pd,
                list(measure),
                target_kl=target_kl,
                n_baseline=n_baseline,
                seed=seed,
                reference=reference,
                batch_size=batch_size,
            )
            out[name] = {"status": "ok", **r}
        except UnreachableTargetError as e:
            out[name] = {"status": "unreachable", "error": str(e)}
        except ValueError as e:  # a zero direction on these groups
            out[name] = {"status": "zero", "error": str(e)}
    full = out["full"].get("selectivity")
    for name in ("top", "control"):
        part = out[name].get("selectivity")
        out[f"{name}_kept" if name == "control" else "kept"] = part / full if full and part is not None else None
    return out


# ----------------------------------------------------------------------------------------------
# A location in words.
# ----------------------------------------------------------------------------------------------


def location_words(
    location: Mapping[str, Any],
    projection: str | None = None,
    *,
    said: bool = False,
    fit_caution: float | None = None,
    k: int | None = None,
    n: int = 5,
) -> dict[str, Any]:
    """A component's entry of ``locations.json`` in the words ``npeff top --where``, the report and ``npeff explain``
    all show: ``{located, method, where, groups, heads, neurons, fit, fit_caution, at_chance, chance, causal,
    cautions, lines}``.

    ``where``: its top ``n`` groups and the share of the energy in its top 5 % of groups (without groups: the entry's
    note); ``groups`` / ``heads`` / ``neurons``: the top ``n`` of each, ``"layer 1 down 62% (x4.1)"``, ``"layer 0
    head 3 31% (x2.0)"`` (per query head, q and o with its share of its key / value head; per module and head in
    files written before that), ``"layer 1 neuron 17 1.2% (x9.3)"``; ``fit``: the share of the component its top
    examples' gradients reproduce (span only, else None), with ``fit_caution`` (text) when below ``fit_caution``
    (default :data:`FIT_CAUTION`);
    ``at_chance`` (:func:`at_chance`) with ``chance`` (:func:`chance_caution`; ``projection``: the run's kind,
    ``said``: one at chance was already explained in full); ``causal``: the causal check in a sentence, if recorded;
    ``cautions``: the two cautions that apply; ``lines``: ``(label, text)`` in the order ``npeff top --where``
    prints them. ``k``: how many top examples located it, for the ranks the causal check
    measured on (default: the entry's examples)."""
    method = location.get("method") or "recovered"  # files written before the span method record none
    examples = list(location.get("examples") or [])
    out: dict[str, Any] = {"located": "groups" in location, "method": method, "groups": [], "heads": []}
    out.update(neurons=[], fit=location.get("fit"), fit_caution=None, at_chance=False, chance=None, causal=None)
    out["cautions"] = []
    if "groups" not in location:
        out["where"] = str(location.get("note") or location.get("status") or "not located")
        out["lines"] = [("where", out["where"])]
        return out
    out["groups"] = top_groups(location, n)
    neurons = location.get("neurons") or []
    out["where"] = f"{'; '.join(out['groups'])}; top 5% of groups: {location['top5pct']:.0%} of the energy"
    heads = location.get("attention_heads") or location.get("heads") or []
    out["heads"] = [_head_words(r) for r in heads[:n]]
    out["neurons"] = [_row_words(r, f"layer {r['layer']} neuron {r['neuron']}", ".1%") for r in neurons[:n]]
    fit = out["fit"]
    if fit is not None and fit < (FIT_CAUTION if fit_caution is None else fit_caution):
        out["fit_caution"] = (
            f"its top examples' gradients reproduce {fit:.0%} of the component; the location describes that part only"
        )
    out["at_chance"] = at_chance(location)
    if out["at_chance"]:
        out["chance"] = chance_caution(location, projection, brief=said, method=method)
    out["cautions"] = [c for c in (out["fit_caution"], out["chance"]) if c]
    if location.get("causal"):
        out["causal"] = _causal_words(location["causal"], k if k is not None else len(examples))
    lines = [("where", out["where"])]
    lines += [(what, "; ".join(out[what])) for what in ("heads", "neurons") if out[what]]
    lines += [("causal", out["causal"])] if out["causal"] else []
    out["lines"] = lines + [("caution", c) for c in out["cautions"]]
    return out


def _causal_words(causal: Mapping[str, Any], k: int) -> str:
    """:func:`located_selectivity`'s record (``runs.locate(causal=True)``) in a sentence; ``k``: how many top
    examples located the component (0: unknown)."""
    if causal.get("status") != "ok":
        return f"not measured: {causal.get('note') or causal.get('status')}"
    m = len(causal.get("measured_on") or [])
    on = f"examples ranked {k + 1} to {k + m}" if k else f"{m} examples other than those that located it"
    full = causal.get("full") or {}
    if full.get("status") != "ok":
        return f"not measured: the whole direction is {full.get('status')} on {on}"

    def kept(name: str, key: str) -> str:
        value = causal.get(key)
        return f"{value:.0%}" if value is not None else f"none ({(causal.get(name) or {}).get('status')})"

    return (
        f"its top {len(causal.get('top_groups') or [])} group(s) alone ({causal.get('top_params', 0):,} parameters) "
        f"keep {kept('top', 'kept')} of the whole direction's selectivity ({full['selectivity']:.3g}), random groups "
        f"of as many parameters ({causal.get('control_params', 0):,}) {kept('control', 'control_kept')}; measured on "
        f"{on}"
    )


def _row_words(r: Mapping[str, Any], what: str, frac: str = ".0%") -> str:
    return f"{what} {r['fraction']:{frac}} (x{r['enrichment']:.1f})"


def _head_words(r: Mapping[str, Any]) -> str:
    """A query head (``attention_heads``: q and o with its share of its key / value head) or, in files written
    before those, one module's head (``heads``)."""
    module = f" {r['module']}" if "module" in r else ""
    return _row_words(r, f"layer {r['layer']}{module} head {r['head']}")
