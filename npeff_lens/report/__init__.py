"""The component dashboard (``npeff report``): a static site with an index and one page per component of a fitted
NPEFF run.

>>> from npeff_lens.report import build
>>> build("runs/movie/npeff")            # -> runs/movie/npeff/report/index.html, opens from disk

The site needs no server and no network: pages are pre-rendered HTML, the sort / filter script, the style and
plotly.js (bundled once, from the installed ``plotly`` package) are files under ``assets/``. Each top
example's tokens are highlighted by their exact share of the example's loading on the component
(:mod:`npeff_lens.attribution`), on a colour scale set by the input's own tokens: the prompt template's tokens
(:func:`.data.input_token_mask`) are shown uncoloured, their total share stated per example. Where
``locations.json`` exists (:func:`npeff_lens.runs.locate`, ``npeff top --where``), each component's energy per
layer × module is a heatmap on its page, with its top attention heads and MLP neurons, how well its top examples'
gradients reproduce it (``fit``) and, when measured, whether its top groups carry its effect (``causal``); a
location at chance (:func:`npeff_lens.locations.at_chance`) is said in words instead of drawn. The index summarises
all of them; the report never computes them.

Layout::

    report/index.html                           the components: tunings, top labels / predictions, mass, KL ratio
    report/components/component_00003.html      one page per component
    report/data/index.json                      the data behind index.html
    report/data/component_00003.json            the data behind a component page
    report/assets/{report.css, report.js, plotly.min.js}

JSON schema (``format: "npeff_lens.report"``, ``format_version: 1``; NaN / inf are written as ``null``).
Field names follow SAEDashboard's Neuronpedia export where a counterpart exists (``feature_index``,
``frac_nonzero``, ``freq_hist_data_bar_*``, ``correlated_features_*``, ``activations`` with ``tokens`` /
``values`` / ``bin_*`` / ``qualifying_token_index``, ``n_prompts_total``).

``data/index.json`` (``kind: "index"``)::

    run: {decomposition, store, model: {name, backend}, task, outcomes, params, n_params, projection_dim,
          projection, pef_rows, n_examples, n_components, reconstruction_err, n_iter}
    summary: {k, tuned_label, tuned_prediction (fractions of components, §3.1), n_alive, n_dead}
    perturbation: perturbation.json's summary + {path} | null       (kl_ratio_geomean, pef_norm_ratio_geomean, ...)
    compare: {path, methods: {name: {n_components, alive, tuned_label, ...scalars}}} | null
    attribution_note: str | null                                  (why tokens are not highlighted, if they are not)
    n_attributed: int | null      top examples per component with token attributions (``n_attributed``)
    locations: {note, how: {cli, python}} without a usable DECOMPOSITION_DIR/locations.json (how: the commands
        that write it), else {path, key, note, how, layers (ints; null: outside the layers), modules,
        mean_fraction [layer][module] (over the alive located components; null: no such group), by_layer:
        [{component, status (located / dead / none), note, at_chance, fraction, enrichment, module}] (per layer:
        the component's share of its energy there, that over the layer's share of the parameters, the module with
        most of it; null when not located), max_mean_enrichment, at_chance (components), live_at_chance (every
        alive located one is), chance (the caution, in words), not_located: [{component, status, note}]}
    components: [row]       row = {feature_index, alive, tuned_label, tuned_prediction,
                                   top_labels: [[value, count]], top_predictions: [[value, count]], n_top,
                                   coefficient_mass (share of all coefficients), max_coefficient,
                                   frac_nonzero (share of the examples active on it: analysis.active), kl_ratio,
                                   pef_norm_ratio, top5pct, top_group (locations.json's, else null),
                                   location_status (located / at chance / dead / none, else null), page, data}

``data/component_XXXXX.json`` (``kind: "component"``): the row's fields, and::

    k, n_prompts_total, n_attributed
    location: null | {located, method (span / recovered), status (located / dead / none), note, examples (the
                      top examples that located it, span), fit (the share of the component their gradients
                      reproduce, span; else null), fit_caution, at_chance, chance (the caution, in words), words
                      ({where, groups, heads, neurons, causal}: locations.location_words), causal (locations.json's
                      record, if measured), and when located: share_distance, top5pct, energy, n_groups,
                      mean_enrichment (Σ fraction × enrichment over the groups), top_groups (["layer 1 down 62%
                      (x4.1)", ...]), groups (locations.json's rows), heads (per module and head, the top 8),
                      attention_heads (per query head, the top 8), n_neurons, neurons (the top 8 MLP neurons),
                      grid: {layers, modules, fraction [layer][module], enrichment [layer][module]}}
    freq_hist_data_bar_values / freq_hist_data_bar_heights / freq_hist_bin_edges   histogram of the active
                                                          coefficients, 40 linear bins from 0 to the max
    label_prediction_counts: [{label, prediction, count}]  over the top-k examples active on the component
    correlated_features_indices / correlated_features_cosine   nearest components (cosine of coefficient columns)
    perturbation: the component's perturbation.json record | null   (kl_top_plus, kl_base_plus, kl_top_minus,
                                                                     kl_base_minus, kl_ratio, sign, pef_norm_ratio, ...)
    activations: [example]  the top examples, by decreasing coefficient:
        rank, example_index, coefficient, bin_min, bin_max, bin_contains, text, label, prediction,
        outcomes + probs (or topk_ids + topk_probs), pef_norm, flag,
        stored_loading       Σ_rows ((G_row A)·h)² from the stored PEF
        tokens, token_ids    the prompt's tokens (null when not attributed)
        values               per token, its share of the loading as a fraction (Σ_rows c_row c_row,t / loading)
        shares               the same, unnormalised
        remainder            {label: fraction} for parameters the hooks do not split over tokens
        input_tokens         per token, true for the example's own text, false for the template's tokens
                             (null when unknown; :func:`.data.input_token_mask`)
        input_share, template_share   Σ values over the input's / the template's tokens
                             (input_share + template_share + Σ remainder = 1; null for baselines)
        loading              Σ_rows c_row² (= Σ shares + remainder; equals stored_loading up to the store's dtype)
        qualifying_token_index   the token with the largest share
    attribution_note

Public functions: :func:`build` (the site), :func:`report_data` (the records, without writing anything) and
:func:`methods_data` (the records of the baselines ``npeff compare`` fitted beside the decomposition).
"""

from __future__ import annotations

import re
import warnings
from importlib import resources
from pathlib import Path

import torch

from ..attribution import TokenAttributor, stored_loadings
from ..baselines import REGISTRY
from ..config import ReportConfig
from ..io import atomic_write, to_jsonable, write_json
from ..models import load_model
from ..rundir import resolve_config
from . import data as _data
from . import render as _render

__all__ = ["build", "methods_data", "report_data"]


def _stored_loadings(view, stats, k: int) -> dict[tuple[int, int], float]:
    """``{(component, example): Σ_rows ((G_row A)·h_j)²}`` of each component's top examples, from the store."""
    C = view.coeffs.shape[1]
    wanted = {j: _data.top_indices(view, stats, j, k) for j in range(C)}
    examples = sorted({i for idx in wanted.values() for i in idx})
    if not examples:
        return {}
    pefs = view.store.load_pefs(examples)  # "example rank dim"
    pos = {i: n for n, i in enumerate(examples)}
    comps = torch.as_tensor(view.est.components_)
    out = {}
    for j, idx in wanted.items():
        if idx:
            vals = stored_loadings(pefs[[pos[i] for i in idx]], comps[j])
            out.update({(j, i): float(v) for i, v in zip(idx, vals)})
    return out


def _attributions(view, stats, n_attributed: int, adapter, enabled: bool, show_progress: bool):
    """``({(component, example): TokenAttribution}, note, attributor or None)``: the top ``n_attributed`` of
    each live component."""
    if not enabled or n_attributed <= 0:
        return {}, "Token attributions were not computed (attribute=False)." if not enabled else None, None
    try:
        attributor = TokenAttributor.from_manifest(view.manifest, view.est.components_, adapter)
    except (OSError, ValueError, ImportError, NotImplementedError) as e:
        msg = f"Token attributions unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return {}, msg, None
    texts = [m.get("text") for m in view.meta]
    live = [j for j in range(view.coeffs.shape[1]) if j not in stats.dead]
    pairs = [(j, i) for j in live for i in _data.top_indices(view, stats, j, n_attributed)]
    found = attributor.attribute_pairs(pairs, [texts[i] for _, i in pairs], batch_size=8, progress=show_progress)
    out = {(a.component, a.example): a for a in found}
    remainder = sum(abs(v) for a in out.values() for v in a.remainder.values())
    total = sum(a.loading for a in out.values()) or 1.0
    note = None
    if remainder / total > 0.5:
        note = (
            f"{remainder / total:.0%} of the loadings come from parameters the module hooks do not split over "
            "tokens (e.g. a HookedTransformer's einsum weights): see each example's remainder."
        )
    return out, note, attributor


def _report_config(config: ReportConfig | None, options: dict) -> ReportConfig:
    if "attribute" in options:  # the keyword's name before ReportConfig
        options["attributions"] = options.pop("attribute")
    return resolve_config(ReportConfig, config, options)


def _report(decomposition_dir, cfg: ReportConfig, *, store, adapter):
    """``(view, index, components, attributor)``: :func:`report_data`'s records, and the run they came from."""
    k, n_attributed = cfg.k, cfg.n_attributed
    view = _data.load_view(decomposition_dir, store)
    C = view.coeffs.shape[1]
    stats = _data.statistics(view, k)
    summary, records = _data.read_perturbation(_data.find_perturbation(decomposition_dir, cfg.perturbation))
    located, location_note = _data.read_locations(decomposition_dir, C)
    where, key = (located["components"], located["key"]) if located else ({}, None)
    rows = [_data.summary_row(view, stats, j, records.get(j), where.get(j)) for j in range(C)]
    stored = _stored_loadings(view, stats, k)
    attributions, note, attributor = _attributions(view, stats, n_attributed, adapter, cfg.attributions, cfg.progress)
    shown = n_attributed if attributions else None
    components = []
    for j in range(C):
        examples = [
            _data.example_record(view, j, i, rank, stored.get((j, i)), attributions.get((j, i)))
            for rank, i in enumerate(_data.top_indices(view, stats, j, k))
        ]
        rec = _data.component_record(
            view,
            stats,
            j,
            perturbation=records.get(j),
            examples=examples,
            note=note,
            location=where.get(j),
            location_key=key,
            n_attributed=shown,
        )
        components.append(to_jsonable(rec, f"the record of component {j}"))
    alive = [j for j in range(C) if j not in stats.dead]
    how = _data.how_to_locate(decomposition_dir, (view.manifest.get("model") or {}).get("name"))
    kind = (view.manifest.get("projection") or {}).get("kind")
    index = _data.index_record(
        view,
        stats,
        rows,
        perturbation=summary,
        compare=_data.read_compare(decomposition_dir),
        note=note,
        locations=_data.locations_summary(located, alive, location_note, how, kind),
        n_attributed=shown,
    )
    return view, to_jsonable(index, "the report's index"), components, attributor


def report_data(
    decomposition_dir, config: ReportConfig | None = None, *, store=None, adapter=None, **options
) -> tuple[dict, list[dict]]:
    """``(index, components)``: the JSON records of the report (schema: the module docstring), nothing written.

    ``config`` / ``options``: :class:`~npeff_lens.config.ReportConfig` fields: ``k``, top examples per
    component (tunings, breakdowns, shown examples); ``n_attributed``, how many of them get token attributions
    (one forward + one backward per PEF row for each component's batch); ``perturbation``, a
    ``perturbation.json`` or its directory (default: a sibling perturbation run of this decomposition);
    ``attributions`` (also spelled ``attribute``), ``progress``. ``store``: the PEF store (default: the one the
    decomposition's run.json names); ``adapter``: the model, already loaded (default: loaded by the name the
    store's manifest records).
    """
    cfg = _report_config(config, options)
    _, index, components, _ = _report(decomposition_dir, cfg, store=store, adapter=adapter)
    return index, components


def _decoder(view, adapter):
    """``token id -> str`` with the run's tokenizer (``adapter``'s, else the model the manifest names)."""
    if adapter is None:
        model = view.manifest.get("model") or {}
        try:
            adapter = load_model(model["name"], backend=model.get("backend") or "hf")
        except (KeyError, OSError, ValueError, ImportError) as e:
            warnings.warn(f"no tokenizer for the SAE's tokens ({e}): shown as ids", RuntimeWarning, stacklevel=3)
            return lambda t: f"[{t}]"
    tok = adapter.tokenizer
    return lambda t: tok.decode([t])


def methods_data(view, npeff_index: dict, k: int = 16, adapter=None) -> dict[str, tuple[dict, list[dict]]]:
    """``{method: (index, components)}`` for each baseline ``npeff compare`` fitted beside the decomposition
    (``compare/grad-cluster/clusters``, ``compare/sae/sae``, ``compare/snmf/snmf``), in the NPEFF records' schema;
    a SAE latent's or SNMF feature's top examples carry its per-token values (:class:`.data.SAETokenValues`),
    clusters none."""
    out = {}
    for method, path in _data.find_methods(view.decomposition_dir).items():
        try:
            fitted = _data.load_method(method, path)
            mview, dead = _data.method_view(view, method, fitted)
        except (OSError, ValueError, ImportError, KeyError) as e:
            warnings.warn(f"{method} at {path} not shown: {e}", RuntimeWarning, stacklevel=2)
            continue
        stats = _data.statistics(mview, k, dead=dead)
        m = REGISTRY[method]
        provider, note = None, f"{m.title} have no per-token values: their examples' tokens are not highlighted."
        if m.token_values is not None:  # an activation method's values per token
            provider, note = _data.SAETokenValues(fitted, _decoder(view, adapter)), None
        rows = [_data.summary_row(mview, stats, j, None) for j in range(mview.coeffs.shape[1])]
        comps = [
            to_jsonable(
                _data.component_record(mview, stats, j, note=note, token_values=provider), f"the record of {method} {j}"
            )
            for j in range(mview.coeffs.shape[1])
        ]
        m_index = _data.method_index_record(npeff_index, mview, stats, rows, note)
        out[method] = (to_jsonable(m_index, f"the {method} index"), comps)
    return out


def _write_assets(assets: Path) -> None:
    assets.mkdir(parents=True, exist_ok=True)
    static = resources.files(__package__) / "static"
    for fname in ("report.css", "report.js"):
        atomic_write(assets / fname, (static / fname).read_text(encoding="utf-8"))
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:  # the pages still work; the histograms say plotly.js did not load
        warnings.warn("plotly is not installed: the report has no histograms (pip install plotly)", stacklevel=3)
        return
    js = get_plotlyjs()
    target = assets / "plotly.min.js"
    if not target.is_file() or target.stat().st_size != len(js.encode()):
        atomic_write(target, js)


def _remove_stale(directory: Path, pattern: str, keep: set[str]) -> None:
    """Pages / records of components that no longer exist (a previous report of another decomposition)."""
    for p in directory.iterdir():
        if re.fullmatch(pattern, p.name) and p.name not in keep:
            p.unlink()


def _write_pages(pages: Path, data: Path, index: dict, components: list[dict]) -> None:
    """``pages/index.html``, ``pages/components/component_XXXXX.html`` and their JSON under ``data``."""
    for d in (pages / "components", data):
        d.mkdir(parents=True, exist_ok=True)
    names = [_data.component_name(c["feature_index"]) for c in components]
    _remove_stale(pages / "components", r"component_\d+\.html", {f"{n}.html" for n in names})
    _remove_stale(data, r"component_\d+\.json", {f"{n}.json" for n in names})
    for nm, c in zip(names, components):
        write_json(data / f"{nm}.json", c)
        atomic_write(pages / "components" / f"{nm}.html", _render.render_component(c, index["components"]))
    write_json(data / "index.json", index)
    atomic_write(pages / "index.html", _render.render_index(index))


def build(
    decomposition_dir, out=None, config: ReportConfig | None = None, *, store=None, adapter=None, **options
) -> Path:
    """Write the static component dashboard of a decomposition (``npeff report``) and return its ``index.html``.

    The site has an index of the components (tunings, top labels and predictions, coefficient mass, KL ratio)
    and one page per component with its top examples, whose tokens are highlighted by their share of the
    example's loading. It needs no server: open ``index.html`` from disk. Where ``npeff compare`` fitted
    baselines beside the decomposition, their pages go under ``methods/`` (:func:`methods_data`).

    Args:
        decomposition_dir: the decomposition's directory.
        out: the report's directory (default: ``decomposition_dir/report``).
        config: a :class:`~npeff_lens.config.ReportConfig`; or pass its fields as keyword ``options``
            (``k``, ``n_attributed``, ``perturbation``, ``attributions``, ``progress``; see
            :func:`report_data`).
        store: the PEF store (default: the one the decomposition's ``run.json`` names).
        adapter: the model, already loaded (default: loaded by the name the store's manifest records, when
            token attributions need it).

    Returns:
        The path of the report's ``index.html``.

    Example:
        >>> from npeff_lens.report import build
        >>> build("runs/movie/npeff")                          # runs/movie/npeff/report/index.html
        >>> build("runs/movie/npeff", "site", attributions=False)   # no model needed
    """
    out = Path(decomposition_dir) / "report" if out is None else Path(out)
    cfg = _report_config(config, options)
    view, index, components, attributor = _report(decomposition_dir, cfg, store=store, adapter=adapter)
    methods = {}
    if index.get("compare"):  # baselines' pages beside compare.json; link only the methods whose pages are written
        methods = methods_data(view, index, cfg.k, adapter if attributor is None else attributor.adapter)
        index["compare"]["pages"] = {m: p for m, p in index["compare"]["pages"].items() if m in methods}
    _write_assets(out / "assets")
    for method, (m_index, m_components) in methods.items():
        m_index["compare"] = {**m_index["compare"], "pages": index["compare"]["pages"]}
        _write_pages(out / "methods" / method, out / "data" / "methods" / method, m_index, m_components)
    _write_pages(out, out / "data", index, components)
    return out / "index.html"
