"""The data behind the report: the index and one record per component (schema: the package docstring)."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..io import read_json

FORMAT = "npeff_lens.report"
FORMAT_VERSION = 1
NONZERO = 1e-8  # a coefficient above this counts as non-zero (the estimator's dead-component threshold)
N_BINS = 40
N_NEAREST = 5


def component_name(j: int) -> str:
    """``component_00003``: the stem of a component's page and JSON file."""
    return f"component_{j:05d}"


def clean(obj: Any) -> Any:
    """A strict-JSON copy: tensors to lists, NaN / inf to ``None`` (JSON has no NaN; browsers refuse it)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        return clean(obj.item())
    return obj


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

    @property
    def manifest(self) -> dict:
        return self.est.manifest_ or {}


def load_view(decomposition_dir, store=None) -> RunView:
    from ..rundir import load_run

    est, store = load_run(decomposition_dir, store)
    meta = store.read_metadata()
    has_label = any("label_name" in m or "label" in m for m in meta)
    labels = [m.get("label_name", m.get("label")) for m in meta] if has_label else None
    preds = [m.get("prediction_name", m.get("prediction")) for m in meta]
    outcomes = (est.manifest_ or {}).get("outcomes") or store.manifest.get("outcomes")
    coeffs = torch.as_tensor(est.coefficients_).double()
    return RunView(Path(decomposition_dir), est, store, meta, coeffs, labels, preds, outcomes)


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
# Baselines fitted by ``npeff compare``, read as decompositions.
# ----------------------------------------------------------------------------------------------

METHODS = {  # name: (fitted directory under compare/, title, what one component is called)
    "grad-cluster": ("grad-cluster/clusters", "Gradient clusters", "cluster"),
    "sae": ("sae/sae", "TopK SAE latents", "latent"),
    "snmf": ("snmf/snmf", "SNMF features (MLP activations)", "feature"),
}


def find_methods(decomposition_dir) -> dict[str, Path]:
    """``{method: fitted directory}`` of the baselines ``npeff compare`` saved beside this decomposition."""
    base = Path(decomposition_dir) / "compare"
    return {m: base / sub for m, (sub, _, _) in METHODS.items() if (base / sub).is_dir()}


def load_method(method: str, path: Path):
    """The fitted baseline: ``GradientClustering``, ``TopKSAEBaseline`` or ``SNMFBaseline``."""
    if method == "grad-cluster":
        from ..baselines.gradient_clustering import GradientClustering

        return GradientClustering.load(path)
    if method == "snmf":
        from ..baselines.snmf import SNMFBaseline

        return SNMFBaseline.load(path)
    from ..baselines.sae import TopKSAEBaseline

    return TopKSAEBaseline.load(path, device="cpu")


def method_view(view: RunView, method: str, fitted) -> tuple[RunView, set]:
    """``(view, dead)``: the NPEFF run's examples and metadata with the baseline's coefficients ``[m, C]``.
    Dead: a SAE's ``dead_latents_`` (active on fewer than ``k_top`` examples), a cluster without members."""
    coeffs = torch.as_tensor(fitted.coefficients_).double()
    if coeffs.shape[0] != view.coeffs.shape[0]:
        raise ValueError(f"{method} has {coeffs.shape[0]} examples; the decomposition has {view.coeffs.shape[0]}")
    if hasattr(fitted, "dead_latents_"):
        dead = {int(j) for j in fitted.dead_latents_.tolist()}
    else:
        dead = {int(j) for j in torch.nonzero((coeffs > NONZERO).sum(0) == 0).flatten().tolist()}
    return replace(view, est=fitted, coeffs=coeffs, method=method), dead


class SAETokenValues:
    """Per-example token values of SAE latents (or SNMF features: the same ``token_activations``, ``_starts``,
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
        s, t = int(self.sae._starts[i]), int(self.sae._ends[i])
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
    frac_nonzero: torch.Tensor
    dead: set


def statistics(view: RunView, k: int, dead: set | None = None) -> Stats:
    from ..analysis import top_examples, tunings

    c = view.coeffs
    C = c.shape[1]
    tuned_label = tunings(c, view.labels, k=k) if view.labels is not None else [None] * C
    tuned_prediction = tunings(c, view.predictions, k=k)
    unit = c / c.norm(dim=0).clamp_min(1e-300)
    total = float(c.sum()) or 1.0
    if dead is None:
        dead = set(int(j) for j in getattr(view.est, "dead_components_", torch.zeros(0)).tolist())
    return Stats(
        k=k,
        top=top_examples(c, k=k),
        tuned_label=tuned_label,
        tuned_prediction=tuned_prediction,
        cosine=unit.T @ unit,
        mass=c.sum(0) / total,
        frac_nonzero=(c > NONZERO).double().mean(0),
        dead=dead,
    )


def top_indices(view: RunView, stats: Stats, j: int, n: int | None = None) -> list[int]:
    """The component's top examples with a positive coefficient (at most ``n``)."""
    idx = [int(i) for i in stats.top[j].tolist() if view.coeffs[i, j] > NONZERO]
    return idx if n is None else idx[:n]


def _counts(values) -> list[list]:
    return [[v, n] for v, n in Counter(values).most_common()]


def summary_row(view: RunView, stats: Stats, j: int, perturbation: dict | None) -> dict:
    """One component's line in the index."""
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
        "page": f"components/{component_name(j)}.html",
        "data": f"data/{component_name(j)}.json"
        if view.method is None
        else f"data/methods/{view.method}/{component_name(j)}.json",
    }


def histogram(values: torch.Tensor, n_bins: int = N_BINS) -> tuple[list[float], list[int], list[float]]:
    """``(bin centres, counts, edges)`` of the non-zero coefficients (linear bins from 0 to the max)."""
    nz = values[values > NONZERO].double()
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
) -> dict:
    """A component's JSON (the package docstring's ``component`` schema) over ``view.coeffs`` (NPEFF's or a
    baseline's, :func:`method_view`). ``examples``: the top examples' records; by default built here, with
    ``token_values(j, example)`` (a per-example token-value provider, e.g. :class:`SAETokenValues`) if given."""
    top = top_indices(view, stats, j)
    if examples is None:
        examples = [
            example_record(view, j, i, rank, None, token_values=token_values(j, i) if token_values else None)
            for rank, i in enumerate(top_indices(view, stats, j, stats.k))
        ]
    centres, heights, edges = histogram(view.coeffs[:, j])
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
        **summary_row(view, stats, j, perturbation),
        "k": stats.k,
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
    }


def index_record(view: RunView, stats: Stats, rows: list[dict], *, perturbation, compare, note) -> dict:
    """The index JSON (the package docstring's ``index`` schema)."""
    from .. import __version__

    man = view.manifest
    est = view.est
    C = view.coeffs.shape[1]
    tuned = {
        "label": sum(t is not None for t in stats.tuned_label) / C if view.labels is not None else None,
        "prediction": sum(t is not None for t in stats.tuned_prediction) / C,
    }
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
        "summary": {
            "k": stats.k,
            "tuned_label": tuned["label"],
            "tuned_prediction": tuned["prediction"],
            "n_alive": C - len(stats.dead),
            "n_dead": len(stats.dead),
        },
        "perturbation": perturbation,
        "compare": compare,
        "attribution_note": note,
        "components": rows,
    }


def method_index_record(npeff_index: dict, view: RunView, stats: Stats, rows: list[dict], note: str | None) -> dict:
    """A baseline's index JSON: NPEFF's ``index`` schema, with ``method`` and its own components and summary."""
    C = view.coeffs.shape[1]
    tuned = {
        w: (sum(t is not None for t in ts) / C if ts is not None else None)
        for w, ts in (("label", stats.tuned_label if view.labels is not None else None),
                      ("prediction", stats.tuned_prediction))
    }  # fmt: skip
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
        "summary": {
            "k": stats.k,
            "tuned_label": tuned["label"],
            "tuned_prediction": tuned["prediction"],
            "n_alive": C - len(stats.dead),
            "n_dead": len(stats.dead),
        },
        "perturbation": None,
        "attribution_note": note,
        "components": rows,
    }
