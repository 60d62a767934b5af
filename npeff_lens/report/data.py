"""The data behind the report: the index and one record per component (schema: the package docstring)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from difflib import SequenceMatcher
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..analysis import active, active_threshold, top_examples, tunings
from ..baselines import REGISTRY
from ..io import read_json
from ..locations import at_chance, chance_caution, location_words, share_distance, top_groups
from ..rundir import load_run

__all__ = [
    "LOCATIONS_FILE",
    "N_BINS",
    "RunView",
    "SAETokenValues",
    "Stats",
    "component_name",
    "component_record",
    "example_record",
    "find_methods",
    "find_perturbation",
    "histogram",
    "how_to_locate",
    "index_record",
    "input_token_mask",
    "load_method",
    "load_view",
    "located_k",
    "locations_summary",
    "method_index_record",
    "method_view",
    "read_compare",
    "read_locations",
    "read_perturbation",
    "statistics",
    "summary_row",
    "top_indices",
]

FORMAT = "npeff_lens.report"
FORMAT_VERSION = 1
N_BINS = 40  # histogram bins of a component's active coefficients
N_NEAREST = 5


def component_name(j: int) -> str:
    """``component_00003``: the stem of a component's page and JSON file."""
    return f"component_{j:05d}"


@dataclass
class RunView:
    """A fitted decomposition and its store's metadata, loaded once."""

    decomposition_dir: Path
    est: Any
    store: Any
    meta: list[dict]
    coeffs: torch.Tensor  # "example component" float64
    labels: list | None
    predictions: list
    outcomes: list | None
    method: str | None = None  # None: NPEFF; else a baseline of ``npeff compare`` ("grad-cluster", "sae")
    template: str | None = None  # the task's prompt template (``{text}`` where the example goes)

    @property
    def manifest(self) -> dict:
        return self.est.manifest_ or {}


def load_view(decomposition_dir, store=None) -> RunView:
    """The decomposition in ``decomposition_dir``, its store (default: the one its run names) and the store's
    example metadata, loaded once."""
    est, store = load_run(decomposition_dir, store)
    meta = store.read_metadata()
    labels, preds = store.example_labels(meta), store.example_predictions(meta)
    outcomes = (est.manifest_ or {}).get("outcomes") or store.manifest.get("outcomes")
    coeffs = torch.as_tensor(est.coefficients_).double()
    template = (((est.manifest_ or {}).get("task") or store.manifest.get("task")) or {}).get("template")
    return RunView(Path(decomposition_dir), est, store, meta, coeffs, labels, preds, outcomes, template=template)


# ----------------------------------------------------------------------------------------------
# Perturbation results and method comparisons written by other steps.
# ----------------------------------------------------------------------------------------------


def _points_at(run_dir: Path, target: Path) -> bool:
    rec = read_json(run_dir / "run.json")
    src = rec.get("source") or {}
    for cand in (run_dir / src["relative"] if "relative" in src else None, src.get("absolute")):
        if cand is not None and Path(cand).exists() and Path(cand).resolve() == target.resolve():
            return True
    return False


def find_perturbation(decomposition_dir, given=None) -> Path | None:
    """``perturbation.json`` of a perturbation run made from this decomposition: ``given`` (the file or its
    directory), else a sibling directory whose ``run.json`` (step ``perturb``) has it as ``source`` (the
    newest, if several)."""
    if given is not None:
        p = Path(given)
        p = p / "perturbation.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"no perturbation results at {p}")
        return p
    d = Path(decomposition_dir)
    found = []
    for sib in d.resolve().parent.iterdir():
        table = sib / "perturbation.json"
        if sib.is_dir() and table.is_file() and (sib / "run.json").is_file():
            try:
                if read_json(sib / "run.json").get("step") == "perturb" and _points_at(sib, d):
                    found.append(table)
            except (ValueError, OSError):
                continue
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_perturbation(path: Path | None) -> tuple[dict | None, dict[int, dict]]:
    """``(summary, {component: record})`` of a perturbation table (``(None, {})`` without one)."""
    if path is None:
        return None, {}
    table = read_json(path)
    records = {int(r["component"]): r for r in table.get("components", []) if r.get("component") is not None}
    return {**(table.get("summary") or {}), "path": str(path)}, records


def read_compare(decomposition_dir) -> dict | None:
    """``compare/compare.json`` (``npeff compare``), methods with their scalar fields; ``None`` without one."""
    path = Path(decomposition_dir) / "compare" / "compare.json"
    if not path.is_file():
        return None
    methods = read_json(path).get("methods") or {}
    rows = {}
    for name, fields in methods.items():
        if isinstance(fields, dict):
            rows[str(name)] = {k: v for k, v in fields.items() if v is None or isinstance(v, (int, float, str, bool))}
    pages = {m: f"methods/{m}/index.html" for m in find_methods(decomposition_dir)}
    return {"path": str(path), "methods": rows, "pages": pages}


# ----------------------------------------------------------------------------------------------
# Where each component lives: ``locations.json`` of :func:`npeff_lens.runs.locate`, read, never computed here.
# ----------------------------------------------------------------------------------------------

LOCATIONS_FILE = "locations.json"
MODULES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "attn_norm", "mlp_norm", "other")
N_HEADS_SHOWN = 8
N_NEURONS_SHOWN = 8


def how_to_locate(decomposition_dir, model: str | None = None) -> dict:
    """The commands that write ``locations.json`` (:func:`npeff_lens.runs.locate`): ``{cli, python}``."""
    d = str(decomposition_dir)
    adapter = f", adapter=npeff_lens.models.load_model({model!r})" if model else ""
    return {"cli": f"npeff top {d} --where", "python": f"npeff_lens.runs.locate({d!r}{adapter})"}


def read_locations(decomposition_dir, n_components: int) -> tuple[dict | None, str | None]:
    """``({path, key, components: {j: location}}, note)`` from ``locations.json``; ``(None, why)`` without a
    usable one. A file older than the decomposition's ``npeff.safetensors`` is read with a note."""
    d = Path(decomposition_dir)
    path = d / LOCATIONS_FILE
    if not path.is_file():
        return None, f"Where each component lives is not computed for this run (no {path})."
    try:
        table = read_json(path)
        comps = {int(c["component"]): c for c in table["components"]}
    except (ValueError, KeyError, TypeError, OSError) as e:
        return None, f"{path} is unreadable ({e})."
    if sorted(comps) != list(range(n_components)):
        return None, (
            f"{path} locates {len(comps)} components, the decomposition has {n_components} (written for "
            "another decomposition?): not shown."
        )
    note = None
    fitted = d / "npeff.safetensors"
    if fitted.is_file() and fitted.stat().st_mtime > path.stat().st_mtime:
        note = f"{path} is older than the decomposition: it may describe an earlier fit."
    return {"path": str(path), "key": table.get("key"), "components": comps}, note


def is_located(location: dict | None) -> bool:
    """Whether an entry of ``locations.json`` has a location (a component with nothing to locate, ``status``
    ``"dead"`` or ``"none"``, has only its ``note``)."""
    return location is not None and "groups" in location


def located_k(key: dict | None) -> int | None:
    """How many top examples located each component (``key``: ``locations.json``'s), for the ranks its causal
    check measured on; None when not recorded."""
    key = key or {}
    return (key.get("causal") or {}).get("k") or key.get("k")


def parameter_shares(locations: dict[int, dict]) -> dict[tuple, float]:
    """``{(layer, module): share of the parameters}``, read off ``fraction / enrichment`` (the same layout for
    every located component)."""
    shares: dict[tuple, float] = {}
    for loc in locations.values():
        for g in loc.get("groups") or []:
            key = (g["layer"], g["module"])
            if key not in shares and g.get("enrichment"):
                shares[key] = g["fraction"] / g["enrichment"]
    return shares


def _axes(locations: list[dict]) -> tuple[list, list[str]]:
    """``(layers, modules)`` present: layers ascending (``None``, outside the layers, last), modules in
    :data:`MODULES` order."""
    keys = {(g["layer"], g["module"]) for loc in locations for g in loc.get("groups") or []}
    layers = sorted({k[0] for k in keys}, key=lambda x: (x is None, x if x is not None else 0))
    modules = [m for m in MODULES if any(k[1] == m for k in keys)]
    modules += sorted({k[1] for k in keys} - set(modules))
    return layers, modules


def location_grid(location: dict) -> dict:
    """A component's energy as a layers × modules grid: ``{layers, modules, fraction, enrichment}``
    (``fraction[layer][module]``, ``None`` where the layer has no such module)."""
    layers, modules = _axes([location])
    cell = {(g["layer"], g["module"]): g for g in location["groups"]}
    return {
        "layers": layers,
        "modules": modules,
        "fraction": [[cell[(ly, m)]["fraction"] if (ly, m) in cell else None for m in modules] for ly in layers],
        "enrichment": [[cell[(ly, m)]["enrichment"] if (ly, m) in cell else None for m in modules] for ly in layers],
    }


def mean_enrichment(location: dict) -> float:
    """The enrichment of the groups weighted by their fraction of the energy, ``Σ_g f_g² / s_g`` (``s_g``: the
    group's share of the parameters): 1 for a direction spread in proportion to the groups' sizes (a large n/d
    back-projection), 1 + the χ² divergence of the fractions from the shares in general; unlike the largest
    enrichment, not moved by a small group's (a norm's) noise."""
    return sum(g["fraction"] * (g.get("enrichment") or 0.0) for g in location["groups"])


def component_location(location: dict | None, projection: str | None = None, key: dict | None = None) -> dict | None:
    """A component record's ``location`` (the package docstring's schema) from its entry of ``locations.json``
    (``projection``: the run's kind, for the caution at chance; ``key``: the file's). An entry with nothing to
    locate keeps its ``status`` and ``note`` and has no groups, heads, neurons or grid."""
    if location is None:
        return None
    words = location_words(location, projection, k=located_k(key))
    out = {
        "located": is_located(location),
        "method": words["method"],
        "status": location.get("status") or ("located" if is_located(location) else "none"),
        "note": location.get("note"),
        "examples": location.get("examples"),
        "fit": location.get("fit"),
        "fit_caution": words["fit_caution"],
        "at_chance": words["at_chance"],
        "chance": words["chance"],
        "words": {k: words[k] for k in ("where", "groups", "heads", "neurons", "causal")},
        "causal": location.get("causal"),
    }
    if not is_located(location):
        return out
    return {
        **out,
        "share_distance": share_distance(location),
        "top5pct": location.get("top5pct"),
        "energy": location.get("energy"),
        "n_groups": location.get("n_groups", len(location["groups"])),
        "mean_enrichment": mean_enrichment(location),
        "top_groups": top_groups(location, 5),
        "groups": location["groups"],
        "heads": (location.get("heads") or [])[:N_HEADS_SHOWN],
        "attention_heads": (location.get("attention_heads") or [])[:N_HEADS_SHOWN],
        "n_neurons": location.get("n_neurons"),
        "neurons": (location.get("neurons") or [])[:N_NEURONS_SHOWN],
        "grid": location_grid(location),
    }


def _by_layer(j: int, location: dict, layers: list, shares: dict) -> dict:
    """A component's row of the index's components × layers map (``fraction`` etc. all ``None`` when not
    located)."""
    li = {ly: n for n, ly in enumerate(layers)}
    frac, share, best = [0.0] * len(layers), [0.0] * len(layers), [None] * len(layers)
    for g in location.get("groups") or []:
        n = li[g["layer"]]
        frac[n] += g["fraction"]
        share[n] += shares.get((g["layer"], g["module"]), 0.0)
        if best[n] is None or g["fraction"] > best[n][1]:
            best[n] = (g["module"], g["fraction"])
    if not is_located(location):
        frac = share = [None] * len(layers)
    return {
        "component": j,
        "status": location.get("status") or ("located" if is_located(location) else "none"),
        "note": location.get("note"),
        "at_chance": is_located(location) and at_chance(location),
        "fraction": frac,
        "enrichment": [f / s if s else None for f, s in zip(frac, share)],
        "module": [b[0] if b else None for b in best],
    }


def locations_summary(
    located: dict | None, alive: list[int], note: str | None, how: dict, projection: str | None = None
) -> dict:
    """The index's ``locations``: ``{path, key, note, how, layers, modules, mean_fraction (over the alive located
    components, layers × modules), by_layer: [{component, status, note, at_chance, fraction, enrichment, module}]
    (per layer: the component's energy there, its enrichment, the module holding most of it), max_mean_enrichment
    (the largest :func:`mean_enrichment` of a component), at_chance (the components whose location is at chance,
    :func:`~npeff_lens.locations.at_chance`), chance (what that means, in words), not_located: [{component,
    status, note}]}``; only ``{note, how}`` without ``locations.json`` (``how``: :func:`how_to_locate`)."""
    if located is None:
        return {"note": note, "how": how}
    comps = located["components"]
    placed = {j: loc for j, loc in comps.items() if is_located(loc)}
    shares = parameter_shares(placed)
    layers, modules = _axes(list(placed.values()))
    live = [j for j in alive if j in placed] or sorted(placed)
    mean = [[0.0] * len(modules) for _ in layers]
    present = [[False] * len(modules) for _ in layers]
    li, mi = {ly: n for n, ly in enumerate(layers)}, {m: n for n, m in enumerate(modules)}
    for j in live:
        for g in placed[j]["groups"]:
            mean[li[g["layer"]]][mi[g["module"]]] += g["fraction"] / len(live)
            present[li[g["layer"]]][mi[g["module"]]] = True
    by_layer = [_by_layer(j, comps[j], layers, shares) for j in sorted(comps)]
    chance = [r["component"] for r in by_layer if r["at_chance"]]
    first = placed[chance[0]] if chance else None
    return {
        "path": located["path"],
        "key": located["key"],
        "note": note,
        "how": how,
        "layers": layers,
        "modules": modules,
        "mean_fraction": [[v if p else None for v, p in zip(r, q)] for r, q in zip(mean, present)],
        "by_layer": by_layer,
        "max_mean_enrichment": max((mean_enrichment(loc) for loc in placed.values()), default=None),
        "at_chance": chance,
        "live_at_chance": bool(live) and all(j in chance for j in live),
        "chance": chance_caution(first, projection, method=first.get("method")) if first else None,
        "not_located": [
            {k: r[k] for k in ("component", "status", "note")} for r in by_layer if r["status"] != "located"
        ],
    }


# ----------------------------------------------------------------------------------------------
# Baselines fitted by ``npeff compare``, read as decompositions.
# ----------------------------------------------------------------------------------------------


def find_methods(decomposition_dir) -> dict[str, Path]:
    """``{method: fitted directory}`` of the baselines ``npeff compare`` saved beside this decomposition."""
    base = Path(decomposition_dir) / "compare"
    return {name: m.fitted_dir(base) for name, m in REGISTRY.items() if m.folder and m.fitted_dir(base).is_dir()}


def load_method(method: str, path: Path):
    """The fitted baseline saved in ``path`` (:func:`find_methods`), on the CPU."""
    return REGISTRY[method].load(path, device="cpu")


def method_view(view: RunView, method: str, fitted) -> tuple[RunView, set]:
    """``(view, dead)``: the NPEFF run's examples and metadata with the baseline's coefficients ``[m, C]``.
    Dead: a SAE's ``dead_latents_`` (active on fewer than ``k_top`` examples), a cluster without members."""
    coeffs = torch.as_tensor(fitted.coefficients_).double()
    if coeffs.shape[0] != view.coeffs.shape[0]:
        raise ValueError(f"{method} has {coeffs.shape[0]} examples; the decomposition has {view.coeffs.shape[0]}")
    if hasattr(fitted, "dead_latents_"):
        dead = {int(j) for j in fitted.dead_latents_.tolist()}
    else:
        dead = {int(j) for j in torch.nonzero(active(coeffs).sum(0) == 0).flatten().tolist()}
    return replace(view, est=fitted, coeffs=coeffs, method=method), dead


class SAETokenValues:
    """Per-example token values of SAE latents (or SNMF features: the same ``token_activations``, ``token_range``,
    ``token_ids_``): ``provider(latent, example)`` -> the ``example_record`` fields.

    ``shares``: the latent's activation on each of the example's tokens (``token_activations``);
    ``values``: the same divided by their max over the example's tokens (in [0, 1]; all 0 when the latent is
    silent on the example); ``loading``: that max (the example's coefficient); ``remainder``: ``None``.
    """

    def __init__(self, sae, decode):
        self.sae, self.decode = sae, decode
        self._acts: dict[int, torch.Tensor] = {}

    def __call__(self, j: int, i: int) -> dict:
        if i not in self._acts:
            self._acts[i] = self.sae.token_activations(i).double()
        col = self._acts[i][:, j]
        s, t = self.sae.token_range(i)
        ids = [int(x) for x in self.sae.token_ids_[s:t].tolist()]
        top = float(col.max()) if col.numel() else 0.0
        values = (col / top if top > 0 else torch.zeros_like(col)).tolist()
        return {
            "tokens": [self.decode(x) for x in ids],
            "token_ids": ids,
            "values": values,
            "shares": col.tolist(),
            "remainder": None,
            "loading": top,
            "qualifying_token_index": int(col.argmax()) if col.numel() else None,
        }


# ----------------------------------------------------------------------------------------------
# Per-component statistics.
# ----------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """What the index and every component page share, computed once for all components."""

    k: int
    top: torch.Tensor  # "component k" example indices, by decreasing coefficient
    tuned_label: list
    tuned_prediction: list
    cosine: torch.Tensor  # "component component" cosine of coefficient columns
    mass: torch.Tensor  # "component": share of the total coefficient mass
    frac_nonzero: torch.Tensor  # "component": share of the examples active on it (analysis.active)
    dead: set
    threshold: torch.Tensor  # "component": analysis.active_threshold of the coefficients


def statistics(view: RunView, k: int, dead: set | None = None) -> Stats:
    """The :class:`Stats` of every component over its top ``k`` examples (``dead``: components known dead, e.g. a
    SAE's ``dead_latents_``; a component with no active example is dead as well)."""
    c = view.coeffs
    C = c.shape[1]
    tuned_label = tunings(c, view.labels, k=k) if view.labels is not None else [None] * C
    tuned_prediction = tunings(c, view.predictions, k=k)
    unit = c / c.norm(dim=0).clamp_min(1e-300)
    total = float(c.sum()) or 1.0
    if dead is None:
        dead = set(int(j) for j in getattr(view.est, "dead_components_", torch.zeros(0)).tolist())
    threshold = active_threshold(c)
    on = active(c, threshold)
    dead = set(dead) | {int(j) for j in (on.sum(0) == 0).nonzero().flatten().tolist()}  # no active example: dead
    return Stats(
        k=k,
        top=top_examples(c, k=k),
        tuned_label=tuned_label,
        tuned_prediction=tuned_prediction,
        cosine=unit.T @ unit,
        mass=c.sum(0) / total,
        frac_nonzero=on.double().mean(0) if c.shape[0] else torch.zeros(C, dtype=torch.float64),
        dead=dead,
        threshold=threshold,
    )


def top_indices(view: RunView, stats: Stats, j: int, n: int | None = None) -> list[int]:
    """The component's top examples that are active on it (at most ``n``; :func:`~npeff_lens.analysis.active`)."""
    t = float(stats.threshold[j])
    idx = [int(i) for i in stats.top[j].tolist() if view.coeffs[i, j] > t]
    return idx if n is None else idx[:n]


def _counts(values) -> list[list]:
    return [[v, n] for v, n in Counter(values).most_common()]


def summary_row(view: RunView, stats: Stats, j: int, perturbation: dict | None, location: dict | None = None) -> dict:
    """One component's line in the index (``location``: its entry of ``locations.json``, if any)."""
    top = top_indices(view, stats, j)
    p = perturbation or {}
    return {
        "feature_index": j,
        "alive": j not in stats.dead,
        "tuned_label": stats.tuned_label[j],
        "tuned_prediction": stats.tuned_prediction[j],
        "top_labels": _counts(view.labels[i] for i in top) if view.labels is not None else [],
        "top_predictions": _counts(view.predictions[i] for i in top),
        "n_top": len(top),
        "coefficient_mass": float(stats.mass[j]),
        "max_coefficient": float(view.coeffs[:, j].max()),
        "frac_nonzero": float(stats.frac_nonzero[j]),
        "kl_ratio": p.get("kl_ratio"),
        "pef_norm_ratio": p.get("pef_norm_ratio"),
        "top5pct": location.get("top5pct") if location else None,
        "top_group": top_groups(location, 1)[0] if is_located(location) else None,
        "location_status": _location_status(location),
        "page": f"components/{component_name(j)}.html",
        "data": f"data/{component_name(j)}.json"
        if view.method is None
        else f"data/methods/{view.method}/{component_name(j)}.json",
    }


def _location_status(location: dict | None) -> str | None:
    """``"located"``, ``"at chance"`` (:func:`~npeff_lens.locations.at_chance`), the entry's ``status``
    (``"dead"``, ``"none"``) without a location, or None without an entry."""
    if location is None:
        return None
    if not is_located(location):
        return location.get("status") or "none"
    return "at chance" if at_chance(location) else "located"


def histogram(
    values: torch.Tensor, threshold: float, n_bins: int = N_BINS
) -> tuple[list[float], list[int], list[float]]:
    """``(bin centres, counts, edges)`` of the active coefficients, those above ``threshold`` (the component's
    :func:`~npeff_lens.analysis.active_threshold`; linear bins from 0 to the max)."""
    nz = values[values > threshold].double()
    if nz.numel() == 0:
        return [], [], []
    hi = float(nz.max())
    edges = torch.linspace(0.0, hi, n_bins + 1, dtype=torch.float64)
    counts = torch.histc(nz, bins=n_bins, min=0.0, max=hi)
    centres = (edges[:-1] + edges[1:]) / 2
    return centres.tolist(), [int(v) for v in counts.tolist()], edges.tolist()


def _probs(meta: dict, outcomes) -> dict:
    if "probs" in meta:
        names = list(outcomes) if outcomes and len(outcomes) == len(meta["probs"]) else range(len(meta["probs"]))
        return {"outcomes": [str(n) for n in names], "probs": list(meta["probs"])}
    if "topk_ids" in meta:
        return {"topk_ids": list(meta["topk_ids"]), "topk_probs": list(meta["topk_probs"])}
    return {}


def _text_spans(template: str, text: str) -> list[tuple[int, int]]:
    """Character spans of the example's text in ``template.replace("{text}", text)`` (:meth:`.Task.format`)."""
    spans, pos = [], 0
    for piece in template.split("{text}")[:-1]:
        pos += len(piece)
        spans.append((pos, pos + len(text)))
        pos += len(text)
    return spans


def input_token_mask(tokens: list[str], text: str | None, template: str | None) -> list[bool] | None:
    """Per token of a prompt, ``True`` when it holds a character of the example's own text, ``False`` for the
    template's tokens (and special tokens such as a BOS, which are not in the prompt string).

    The prompt is ``template`` with ``{text}`` replaced by ``text`` (by the beginning of it the tokens hold, when
    its prompt was shortened to fit a max_length); the decoded tokens, joined, are aligned with
    it character by character (directly when the prompt is a substring of the join, else by
    :class:`difflib.SequenceMatcher`, for tokenizers whose single-token decoding drops spaces or splits a
    character's bytes). A token straddling the boundary (``" great"`` after ``"Review:"``) counts as input; a
    token none of whose characters are in the prompt stands for the prompt characters between its neighbours
    (a BOS: none, so template; one byte of an ``é`` split over two tokens: the ``é``, so input).
    ``None`` when the template or the text is unknown, or when the alignment finds less than half of the
    text's characters the tokens reach (a tokenizer that rewrites the text)."""
    if template is None or text is None or "{text}" not in template or not tokens:
        return None
    text = _kept_text(tokens, text, template)
    mask = _input_token_mask(tuple(tokens), text, template)  # an example is shown on several components' pages
    return None if mask is None else list(mask)


def _kept_text(tokens: list[str], text: str, template: str) -> str:
    """The beginning of ``text`` that the tokens hold when its prompt was fitted to a max_length
    (:meth:`.Task.fitted_prompts`: the text's last tokens left out, the template kept), else ``text``."""
    head, _, tail = template.partition("{text}")
    joined = "".join(tokens)
    if "{text}" in tail or template.replace("{text}", text) in joined or not joined.endswith(tail):
        return text
    start = joined.find(head)
    kept = joined[start + len(head) : len(joined) - len(tail)] if start >= 0 else None
    return kept if kept and text.startswith(kept) else text


@lru_cache(maxsize=4096)
def _input_token_mask(tokens: tuple[str, ...], text: str, template: str) -> tuple[bool, ...] | None:
    prompt = template.replace("{text}", text)
    spans = _text_spans(template, text)
    joined = "".join(tokens)
    to_prompt: list[int | None] = [None] * len(joined)  # character of the join -> character of the prompt
    at = joined.find(prompt)
    if at >= 0:
        to_prompt[at : at + len(prompt)] = range(len(prompt))
    else:
        for a, b, n in SequenceMatcher(None, joined, prompt, autojunk=False).get_matching_blocks():
            to_prompt[a : a + n] = range(b, b + n)
    mapped = [c for c in to_prompt if c is not None]
    reach = max(mapped, default=-1)  # a prompt truncated at max_length ends early
    wanted = sum(max(0, min(hi, reach + 1) - lo) for lo, hi in spans)
    found = sum(1 for c in mapped if any(lo <= c < hi for lo, hi in spans))
    if wanted and found < 0.5 * wanted:
        return None

    def inside(c: int) -> bool:
        return any(lo <= c < hi for lo, hi in spans)

    mask, pos, last = [], 0, -1
    for tok in tokens:
        chars = [c for c in to_prompt[pos : pos + len(tok)] if c is not None]
        pos += len(tok)
        if chars:
            mask.append(any(inside(c) for c in chars))
            last = max(last, *chars)
            continue
        # nothing of it in the prompt (a BOS; a character's bytes split over tokens): it stands for the gap
        # between the prompt characters around it
        after = next((c for c in to_prompt[pos:] if c is not None), len(prompt))
        mask.append(any(inside(c) for c in range(last + 1, after)))
    return tuple(mask)


def example_record(
    view: RunView, j: int, i: int, rank: int, stored: float | None, attribution=None, token_values: dict | None = None
) -> dict:
    """One top example in SAEDashboard / Neuronpedia's ``activations`` shape (tokens and per-token values):
    from NPEFF's ``attribution``, or ``token_values`` (the token fields, e.g. :class:`SAETokenValues`'s)."""
    m = view.meta[i]
    rec = {
        "rank": rank,
        "example_index": i,
        "coefficient": float(view.coeffs[i, j]),
        "text": m.get("text"),
        "label": view.labels[i] if view.labels is not None else None,
        "prediction": view.predictions[i],
        **_probs(m, view.outcomes),
        "pef_norm": m.get("pef_norm"),
        "flag": m.get("flag"),
        "stored_loading": stored,
        "tokens": None,
        "token_ids": None,
        "values": None,
        "shares": None,
        "remainder": None,
        "loading": None,
        "qualifying_token_index": None,
    }
    if attribution is not None:
        shares = attribution.shares
        total = attribution.loading
        rec.update(
            tokens=list(attribution.tokens),
            token_ids=list(attribution.token_ids),
            values=attribution.fractions(),
            shares=shares.tolist(),
            remainder={k: (v / total if total > 0 else 0.0) for k, v in attribution.remainder.items()},
            loading=total,
            qualifying_token_index=int(shares.argmax()) if shares.numel() else None,
        )
    elif token_values is not None:
        rec.update(token_values)
    rec.update(input_tokens=None, input_share=None, template_share=None)
    if rec["tokens"] is not None:
        mask = input_token_mask(rec["tokens"], rec["text"], view.template)
        rec["input_tokens"] = mask
        if mask is not None and rec["remainder"] is not None:  # shares of the loading: they add up
            rec["input_share"] = sum(v for v, m in zip(rec["values"], mask) if m)
            rec["template_share"] = sum(v for v, m in zip(rec["values"], mask) if not m)
    return rec


def component_record(
    view,
    stats: Stats,
    j: int,
    *,
    perturbation=None,
    examples: list[dict] | None = None,
    note: str | None = None,
    token_values=None,
    location: dict | None = None,
    location_key: dict | None = None,
    n_attributed: int | None = None,
) -> dict:
    """A component's JSON (the package docstring's ``component`` schema) over ``view.coeffs`` (NPEFF's or a
    baseline's, :func:`method_view`). ``examples``: the top examples' records; by default built here, with
    ``token_values(j, example)`` (a per-example token-value provider, e.g. :class:`SAETokenValues`) if given;
    ``location``: the component's entry of ``locations.json`` (``location_key``: the file's ``key``);
    ``n_attributed``: how many examples were attributed (``None``: not NPEFF's token attributions)."""
    top = top_indices(view, stats, j)
    if examples is None:
        examples = [
            example_record(view, j, i, rank, None, token_values=token_values(j, i) if token_values else None)
            for rank, i in enumerate(top_indices(view, stats, j, stats.k))
        ]
    centres, heights, edges = histogram(view.coeffs[:, j], float(stats.threshold[j]))
    others = [o for o in torch.argsort(stats.cosine[j], descending=True).tolist() if o != j][:N_NEAREST]
    pairs = Counter((view.labels[i] if view.labels is not None else None, view.predictions[i]) for i in top)
    if examples:  # one "top examples" bin, as Neuronpedia groups its activations
        lo, hi = min(e["coefficient"] for e in examples), max(e["coefficient"] for e in examples)
        examples = [{**e, "bin_min": lo, "bin_max": hi, "bin_contains": len(examples)} for e in examples]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "component",
        "method": view.method,
        **summary_row(view, stats, j, perturbation, location),
        "k": stats.k,
        "n_attributed": n_attributed,
        "n_prompts_total": view.coeffs.shape[0],
        "freq_hist_data_bar_values": centres,
        "freq_hist_data_bar_heights": heights,
        "freq_hist_bin_edges": edges,
        "label_prediction_counts": [
            {"label": lab, "prediction": pred, "count": n} for (lab, pred), n in pairs.most_common()
        ],
        "correlated_features_indices": others,
        "correlated_features_cosine": [float(stats.cosine[j, o]) for o in others],
        "perturbation": perturbation,
        "activations": examples,
        "attribution_note": note,
        "location": component_location(location, _projection_kind(view) if location else None, location_key),
    }


def _projection_kind(view: RunView) -> str | None:
    """The run's projection kind (``"sparse"``, ``"kron"``; None: unprojected)."""
    return (view.manifest.get("projection") or {}).get("kind")


def _summary(view: RunView, stats: Stats) -> dict:
    """The index's ``summary``: fractions of the components tuned to the label / the prediction (§3.1)."""
    C = view.coeffs.shape[1]
    return {
        "k": stats.k,
        "tuned_label": sum(t is not None for t in stats.tuned_label) / C if view.labels is not None else None,
        "tuned_prediction": sum(t is not None for t in stats.tuned_prediction) / C,
        "n_alive": C - len(stats.dead),
        "n_dead": len(stats.dead),
    }


def index_record(
    view: RunView, stats: Stats, rows: list[dict], *, perturbation, compare, note, locations=None, n_attributed=None
) -> dict:
    """The index JSON (the package docstring's ``index`` schema)."""
    man = view.manifest
    est = view.est
    C = view.coeffs.shape[1]
    proj = man.get("projection")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "index",
        "npeff_lens_version": __version__,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": {
            "decomposition": str(view.decomposition_dir.resolve()),
            "store": str(getattr(view.store, "path", "")),
            "model": man.get("model"),
            "task": man.get("task"),
            "outcomes": view.outcomes,
            "params": (man.get("config") or {}).get("params"),
            "n_params": man.get("n_params"),
            "projection_dim": proj.get("n_out") if proj else None,
            "projection": proj,
            "pef_rows": man.get("pef_rows"),
            "n_examples": view.coeffs.shape[0],
            "label_counts": dict(sorted(Counter(map(str, view.labels)).items())) if view.labels else None,
            "n_components": C,
            "reconstruction_err": getattr(est, "reconstruction_err_", None),
            "n_iter": getattr(est, "n_iter_", None),
        },
        "summary": _summary(view, stats),
        "perturbation": perturbation,
        "compare": compare,
        "attribution_note": note,
        "n_attributed": n_attributed,
        "locations": locations,
        "components": rows,
    }


def method_index_record(npeff_index: dict, view: RunView, stats: Stats, rows: list[dict], note: str | None) -> dict:
    """A baseline's index JSON: NPEFF's ``index`` schema, with ``method`` and its own components and summary."""
    C = view.coeffs.shape[1]
    fitted = view.est
    return {
        **npeff_index,
        "method": view.method,
        "run": {
            **npeff_index["run"],
            "decomposition": str(find_methods(view.decomposition_dir)[view.method].resolve()),
            "n_components": C,
            "reconstruction_err": None,
            "n_iter": getattr(fitted, "n_iter_", None),
        },
        "summary": _summary(view, stats),
        "perturbation": None,
        "attribution_note": note,
        "n_attributed": None,
        "locations": None,
        "components": rows,
    }
