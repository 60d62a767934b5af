"""The parameter layout, which says which parameters a flat vector covers, in what order and at which offsets.

A layout is a list of ``{name, shape, offset, numel}`` entries, offsets contiguous from 0, names as the model
names its parameters. Collection records one in every store manifest (:func:`parameter_layout`); recovery,
perturbation and locations read flat ``[n]`` vectors through it (:func:`unflatten`, :func:`flatten`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["parameter_layout", "validate_layout", "flatten", "unflatten"]


def parameter_layout(named_params: Sequence[tuple[str, torch.Tensor]]) -> list[dict]:
    """Names, shapes and flat offsets of the selected parameters (what every manifest records)."""
    layout, offset = [], 0
    for name, p in named_params:
        layout.append({"name": name, "shape": list(p.shape), "offset": offset, "numel": p.numel()})
        offset += p.numel()
    return layout


def validate_layout(layout: Sequence[Mapping[str, Any]]) -> int:
    """Check a manifest layout (contiguous flat offsets from 0, numel = prod(shape)); returns its total size."""
    if not isinstance(layout, Sequence) or isinstance(layout, (str, bytes)) or len(layout) == 0:
        raise ValueError("layout must be a non-empty list of {name, shape, offset, numel} entries")
    expected, seen = 0, set()
    for i, entry in enumerate(layout):
        missing = {"name", "shape", "offset", "numel"} - set(entry)
        if missing:
            raise ValueError(f"layout entry {i} lacks {sorted(missing)}")
        name, shape, offset, numel = entry["name"], list(entry["shape"]), int(entry["offset"]), int(entry["numel"])
        if name in seen:
            raise ValueError(f"layout names parameter {name!r} twice")
        seen.add(name)
        if math.prod(shape) != numel:
            raise ValueError(f"layout entry {name!r}: shape {shape} has {math.prod(shape)} entries, numel says {numel}")
        if offset != expected:
            raise ValueError(
                f"layout entry {name!r}: offset {offset}, expected {expected} (offsets must be contiguous from 0)"
            )
        expected += numel
    return expected


def unflatten(flat: torch.Tensor, layout: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``[n]`` flat vector → ``{name: tensor of that parameter's shape}`` (views into ``flat``)."""
    total = validate_layout(layout)
    if flat.ndim != 1:
        raise ValueError(f"flat must be a 1-d vector, got shape {list(flat.shape)}")
    if flat.shape[0] != total:
        raise ValueError(f"flat vector has {flat.shape[0]} entries but the layout covers {total}")
    return {e["name"]: flat[int(e["offset"]) : int(e["offset"]) + int(e["numel"])].view(*e["shape"]) for e in layout}


def flatten(named: Mapping[str, torch.Tensor], layout: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``{name: tensor}`` → ``[n]`` flat vector in layout order (inverse of :func:`unflatten`)."""
    validate_layout(layout)
    names = [e["name"] for e in layout]
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"missing parameters for the layout: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    extra = sorted(set(named) - set(names))
    if extra:
        raise ValueError(f"parameters not in the layout: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    parts = []
    for e in layout:
        t = named[e["name"]]
        if list(t.shape) != list(e["shape"]):
            raise ValueError(f"parameter {e['name']!r} has shape {list(t.shape)}, layout says {list(e['shape'])}")
        parts.append(t.reshape(-1))
    return torch.cat(parts)
