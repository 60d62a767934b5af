"""HTML for the report: the index and the component pages, rendered from the JSON records of :mod:`.data`.

Static pages: everything is in the HTML (no ``fetch``, which ``file://`` pages may not use); scripts and
styles are local files under ``assets/``.
"""

from __future__ import annotations

import json
import math
from html import escape

from ..analysis import ACTIVE_DEFINITION
from ..baselines import DECOMPOSITION, REGISTRY
from ..formatting import MISSING, fmt, pct
from .data import N_BINS, component_name

__all__ = ["name", "render_component", "render_index", "tokens_html"]

_COMPARE_COLUMNS = (
    "n_components",
    "alive",
    "tuned_label",
    "tuned_prediction",
    "tuned_tokens",
    "argmax_shared",
    "coverage",
    "selectivity",
    "fit_seconds",
)


def name(v) -> str:
    """A label / prediction for display (``" positive"`` -> ``positive``)."""
    if v is None:
        return MISSING
    s = str(v).strip()
    return s if s else repr(str(v))


def _num(v) -> str:
    """A ``data-value`` for sorting ('' when missing)."""
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else repr(float(v))


def _counts(pairs) -> str:
    return ", ".join(f"{escape(name(v))} ×{n}" for v, n in pairs) or "–"


def _page(title: str, body: str, prefix: str, scripts=("report.js",)) -> str:
    tags = "".join(f'<script src="{prefix}assets/{s}"></script>' for s in scripts)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{escape(title)}</title><link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{prefix}assets/report.css"></head>\n<body>\n{body}\n'
        f"<footer>npeff_lens report · NPEFF (Matena &amp; Raffel): components are rank-1 pseudo-Fisher matrices "
        f"h hᵀ with non-negative per-example coefficients.</footer>\n{tags}\n</body></html>\n"
    )


# ----------------------------------------------------------------------------------------------
# Where components live: heatmaps as tables of coloured cells (readable as numbers, no script needed)
# ----------------------------------------------------------------------------------------------


def _layer_name(layer) -> str:
    return "outside the layers" if layer is None else f"layer {layer}"


def _heat_cell(frac, vmax: float, title: str, attrs: str) -> str:
    """A cell coloured by ``frac / vmax`` (full colour at ``vmax``), its percentage as text, ``title`` on hover."""
    if frac is None:
        return f'<td class="heat none" {attrs} title="{escape(title)}"></td>'
    alpha = 0.85 * frac / vmax if vmax > 0 else 0.0
    text = f"{100 * frac:.0f}" if frac >= 0.005 else ""
    return (
        f'<td class="heat" {attrs} data-fraction="{frac!r}" style="background-color: rgba(230,110,20,{alpha:.3f})" '
        f'title="{escape(title)}">{text}</td>'
    )


def _enrichment(e) -> str:
    return "–" if e is None else f"x{e:.1f}"


def _grid_table(grid: dict, table_id: str, what: str) -> str:
    """A layers × modules heatmap of ``grid`` (``{layers, modules, fraction, enrichment}``)."""
    fr, en = grid["fraction"], grid.get("enrichment")
    vmax = max((v for row in fr for v in row if v is not None), default=0.0)
    head = "".join(f'<th class="num">{escape(m)}</th>' for m in grid["modules"])
    rows = []
    for n, layer in enumerate(grid["layers"]):
        cells = []
        for k, mod in enumerate(grid["modules"]):
            f = fr[n][k]
            e = en[n][k] if en is not None else None
            title = f"{_layer_name(layer)} {mod}: " + (
                "no such parameters"
                if f is None
                else f"{pct(f)} of {what}"
                + (f" ({_enrichment(e)} its share of the parameters)" if en is not None else "")
            )
            attrs = f'data-layer="{"" if layer is None else layer}" data-module="{escape(mod)}"'
            if e is not None:
                attrs += f' data-enrichment="{e!r}"'
            cells.append(_heat_cell(f, vmax, title, attrs))
        label = "–" if layer is None else str(layer)
        rows.append(f'<tr><th title="{escape(_layer_name(layer))}">{label}</th>{"".join(cells)}</tr>')
    return (
        f'<div class="scroll"><table class="heatmap" id="{table_id}"><thead><tr><th>layer ↓ / module →</th>{head}'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _location_key(key: dict | None) -> str:
    """How ``locations.json`` located the components (its ``key``; a file without ``method`` was recovered)."""
    key = key or {}
    if key.get("method") == "span":
        how = f"each component's direction rebuilt from the exact gradients of its top {key.get('k', '?')} examples"
    else:
        how = {"adjoint": "back-projection A h", "minnorm": "minimum-norm recovery"}.get(key.get("recovery"))
        how = "direction recovered by " + escape(how or f"{key.get('recovery', '?')} recovery")
    heads = "per attention head too" if key.get("heads") else "no per-head split (no model configuration at hand)"
    return f"{how}; {heads}"


def _energy_note(method: str | None) -> str:
    """What the maps show, for a location made by ``method`` (``"span"``, ``"recovered"``)."""
    direction = (
        "the component's direction rebuilt from its top examples' exact gradients"
        if method == "span"
        else "the component's direction recovered in parameter space (App. F)"
    )
    return (
        f"Energy: the squared L2 norm of {direction}, summed per layer × module; colour and number: the group's "
        "percentage of it; hover: its enrichment, that percentage over the group's share of the parameters (x1.0: no "
        "more than a random direction puts there; read it before the percentages)."
    )


def _located_from(loc: dict) -> str:
    """How a component was located, and how much of it its top examples' gradients reproduce (span)."""
    if loc["method"] != "span":
        return "Located from its direction recovered from its projected numbers alone."
    n = len(loc.get("examples") or [])
    fit = "" if loc.get("fit") is None else f", which reproduce <b>{pct(loc['fit'])}</b> of the component"
    caution = f' <span class="caution">Caution: {escape(loc["fit_caution"])}.</span>' if loc.get("fit_caution") else ""
    return f"Located from the exact gradients of its top {n} examples{fit}.{caution}"


def _causal_part(label: str, groups, params, part: dict, kept) -> str:
    sel = part.get("selectivity") if part.get("status") == "ok" else None
    status = "" if part.get("status") == "ok" else f" ({escape(str(part.get('status')))})"
    return (
        f'<tr data-part="{escape(label)}"><td>{escape(label)}{status}</td><td class="num">{fmt(groups)}</td>'
        f'<td class="num">{fmt(params)}</td><td class="num" data-value="{_num(sel)}">{fmt(sel)}</td>'
        f'<td class="num">{fmt(part.get("kl_top"))}</td><td class="num">{fmt(part.get("kl_baseline"))}</td>'
        f'<td class="num" data-value="{_num(kept)}">{pct(kept)}</td></tr>'
    )


def _causal(loc: dict) -> str:
    """The causal check (``locate(causal=True)``): a sentence and, when measured, a small table."""
    causal = loc.get("causal")
    if not causal:
        return ""
    sentence = f'<p id="where-causal">Causal check: {escape(loc["words"]["causal"] or "")}.</p>'
    if causal.get("status") != "ok":
        return sentence
    full = causal.get("full") or {}
    parts = [
        ("the whole direction", None, None, full, 1.0 if full.get("status") == "ok" else None),
        ("its top groups only", "top_groups", "top_params", causal.get("top") or {}, causal.get("kept")),
        (
            "random groups, as many parameters",
            "control_groups",
            "control_params",
            causal.get("control") or {},
            causal.get("control_kept"),
        ),
    ]
    rows = "".join(
        _causal_part(label, len(causal.get(groups) or []) if groups else None, causal.get(params), part, kept)
        for label, groups, params, part, kept in parts
    )
    measured = ", ".join(str(i) for i in causal.get("measured_on") or [])
    return (
        f'{sentence}<table id="causal"><thead><tr><th>perturbed along</th><th class="num">groups</th>'
        '<th class="num">parameters</th><th class="num">selectivity</th><th class="num">KL on them</th>'
        f'<th class="num">KL random</th><th class="num">kept</th></tr></thead><tbody>{rows}</tbody></table>'
        '<p class="note">Perturbed along the component\'s parameter-space direction: whole, on its top '
        "groups only, on random other groups of about as many parameters. Selectivity: the mean KL on the "
        "examples measured over the KL of random examples, each perturbation sized to move the random ones by the "
        "same KL; kept: over the whole direction's. Measured on "
        f"examples {escape(measured)} (the component's next top examples, not those that located it).</p>"
    )


def _list(what: str, items: list[str], tag: str, total=None) -> str:
    if not items:
        return ""
    of = f" (of {total:,})" if total else ""
    return f'<p id="{tag}">{what}{of}: {escape("; ".join(items))}.</p>'


def _where_component(c: dict) -> str:
    """The component page's location: how it was located and its fit, its top groups, attention heads and MLP
    neurons in words, its layer × module heatmap (in words instead when at chance) and the causal check."""
    loc = c.get("location")
    if c.get("method") is not None:
        return ""
    if loc is None:
        return (
            '<section class="block" id="where"><h2>Where it lives</h2><p class="muted">Not computed for this run '
            '(<a href="../index.html#where">how</a>).</p></section>'
        )
    head = '<section class="block" id="where"><h2>Where it lives</h2>'
    if not loc.get("located"):
        what = "dead" if loc.get("status") == "dead" else "not located"
        return (
            f'{head}<p id="where-top" class="muted">{what.capitalize()}: {escape(loc["words"]["where"])}.</p></section>'
        )
    words = loc["words"]
    text = (
        f'<p id="where-top">Most energy: {escape("; ".join(loc["top_groups"]))}. The top 5% of its {loc["n_groups"]} '
        f"groups hold <b>{pct(loc['top5pct'])}</b> of the energy.</p>"
        f'<p id="where-fit">{_located_from(loc)}</p>'
        + _list("Top attention heads", words["heads"], "where-heads")
        + _list("Top MLP neurons", words["neurons"], "where-neurons", loc.get("n_neurons"))
    )
    if loc.get("at_chance"):  # said first, instead of the map (and of the note on reading it)
        chance = (
            f'<p id="where-chance" class="caution">This location says nothing about the component: it is '
            f"{escape(loc['chance'])}. Its layer × module map is not drawn.</p>"
        )
        return f"{head}{chance}{text}{_causal(loc)}</section>"
    drawn = _grid_table(loc["grid"], "where-grid", "the energy")
    return f'{head}{text}{drawn}{_causal(loc)}<p class="note">{_energy_note(loc["method"])}</p></section>'


def _components_by_layer(loc: dict, rows: list[dict]) -> str:
    """Components × layers: each component's share of its energy per layer; a row at chance is marked, one not
    located holds its note."""
    layers = loc["layers"]
    vmax = max((v for r in loc["by_layer"] for v in r["fraction"] if v is not None), default=0.0)
    head = "".join(
        f'<th class="num" title="{escape(_layer_name(ly))}">{"–" if ly is None else ly}</th>' for ly in layers
    )
    out = []
    for r in loc["by_layer"]:
        j = r["component"]
        link = f'<a href="{rows[j]["page"]}">{j}</a>'
        if r.get("status", "located") != "located":
            note = escape(f"{r['status']}: {r.get('note') or 'not located'}")
            cell = f'<td class="muted" colspan="{max(1, len(layers))}">{note}</td>'
            out.append(f'<tr class="unlocated" data-component="{j}"><th>{link}</th>{cell}</tr>')
            continue
        cells = []
        for ly, f, e, m in zip(layers, r["fraction"], r["enrichment"], r["module"]):
            title = (
                f"component {j}, {_layer_name(ly)}: {pct(f)} of its energy ({_enrichment(e)} the layer's "
                f"share of the parameters)" + (f"; most in {m}" if m else "")
            )
            attrs = f'data-component="{j}" data-layer="{"" if ly is None else ly}"'
            if e is not None:
                attrs += f' data-enrichment="{e!r}"'
            cells.append(_heat_cell(f, vmax, title, attrs))
        cls = " ".join(c for c, on in (("dead", not rows[j]["alive"]), ("chance", r.get("at_chance"))) if on)
        attrs = f' class="{cls}"' if cls else ""
        mark = _CHANCE_MARK if r.get("at_chance") else ""
        out.append(f'<tr{attrs} data-component="{j}"><th>{link}{mark}</th>{"".join(cells)}</tr>')
    return (
        f'<div class="scroll"><table class="heatmap" id="where-components"><thead><tr><th>component ↓ / layer →</th>'
        f"{head}</tr></thead><tbody>{''.join(out)}</tbody></table></div>"
    )


_CHANCE_MARK = ' <span class="chance-mark" title="at chance: this row says nothing">≈ chance</span>'


def _how_to_locate(how: dict | None) -> str:
    if not how:
        return ""
    return (
        f"Write it with <code>{escape(how['cli'])}</code> (each component's direction rebuilt from the exact "
        "gradients of its top examples, the model run again on them; saved as locations.json in the decomposition's "
        f"directory) or, in Python, <code>{escape(how['python'])}</code> (<code>causal=True</code> also measures "
        'whether its top groups carry its effect; <code>method="recovered"</code> for the direction recovered from '
        "its projected numbers alone), then run <code>npeff report</code> again; the report reads the file and never "
        "computes it."
    )


def _chance_words(loc: dict) -> str:
    """The index's words on the components whose location is at chance, and on those not located."""
    out = ""
    chance = loc.get("at_chance") or []
    if chance:
        which = ", ".join(str(j) for j in chance)
        out += (
            f' <span class="caution" id="where-chance">Component(s) {which}: {escape(loc.get("chance") or "")}. '
            "Their rows below are marked ≈ chance and their pages draw no map.</span>"
        )
    missing = loc.get("not_located") or []
    if missing:
        out += " Not located: " + escape("; ".join(f"{r['component']} ({r['note'] or r['status']})" for r in missing))
        out += "."
    return out


def _where_index(index: dict) -> str:
    loc = index.get("locations")
    if not loc:
        return ""
    if loc.get("layers") is None:
        note = f"{escape(loc.get('note') or '')} {_how_to_locate(loc.get('how'))}"
        return f'<section class="block" id="where"><h2>Where components live</h2><p class="note">{note}</p></section>'
    note = f" {escape(loc['note'])} {_how_to_locate(loc.get('how'))}" if loc.get("note") else ""
    method = (loc.get("key") or {}).get("method")
    out = (
        '<section class="block" id="where"><h2>Where components live</h2>'
        f'<p class="note">From {escape(loc["path"])}: {_location_key(loc.get("key"))}.{note}{_chance_words(loc)}</p>'
    )
    if not loc["layers"]:
        return out + "</section>"
    if loc.get("live_at_chance"):
        mean = (
            '<p class="note" id="where-mean-chance">Every alive component\'s location is at chance, so their mean '
            "over layer × module is too: not drawn.</p>"
        )
    else:
        grid = {"layers": loc["layers"], "modules": loc["modules"], "fraction": loc["mean_fraction"]}
        flat = [
            (v, ly, m)
            for ly, row in zip(loc["layers"], loc["mean_fraction"])
            for v, m in zip(row, loc["modules"])
            if v is not None
        ]
        hottest = ""
        if flat:
            v, ly, m = max(flat, key=lambda t: t[0])
            hottest = f" Hottest on average: <b>{escape(_layer_name(ly))} {escape(m)}</b> ({pct(v)})."
        mean = (
            f"<h3>Mean over the alive components, layer × module</h3>{_grid_table(grid, 'where-mean', 'the energy')}"
            f'<p class="note">{hottest}</p>'
        )
    return (
        f"{out}{mean}<h3>Each component, per layer</h3>{_components_by_layer(loc, index['components'])}"
        f'<p class="note">{_energy_note(method)} Per layer: the sum over its modules (hover: the module with the '
        "most).</p></section>"
    )


# ----------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------


def _run_line(run: dict) -> str:
    model = (run.get("model") or {}).get("name", "?")
    task = run.get("task") or {}
    outcomes = ", ".join(name(o) for o in (run.get("outcomes") or [])[:8])
    parts = [f"model <b>{escape(str(model))}</b>", f"task {escape(str(task.get('kind', '?')))}"]
    if outcomes:
        parts.append(f"outcomes {escape(outcomes)}")
    balance = run.get("label_counts")
    labels = f" (labels: {escape(', '.join(f'{name(k)} {v}' for k, v in balance.items()))})" if balance else ""
    parts.append(f"{run['n_examples']} examples{labels}")
    parts.append(f"{run['n_components']} components")
    if run.get("projection_dim"):
        parts.append(f"projected to d = {run['projection_dim']} from {fmt(run.get('n_params'))} parameters")
    elif run.get("n_params"):
        parts.append(f"{run['n_params']} parameters (unprojected)")
    if run.get("params"):
        parts.append("params " + escape(", ".join(run["params"])))
    return " · ".join(parts)


def _stat_cards(index: dict) -> str:
    s, run, p = index["summary"], index["run"], index.get("perturbation") or {}
    cards = [
        ("tuned to a label", pct(s.get("tuned_label"))),
        ("tuned to a prediction", pct(s.get("tuned_prediction"))),
        ("alive components", f"{s['n_alive']} / {run['n_components']}"),
        ("reconstruction loss", fmt(run.get("reconstruction_err"))),
    ]
    if p:
        cards.append(("KL ratio (geo. mean)", fmt(p.get("kl_ratio_geomean"))))
        cards.append(("PEF-norm ratio (geo. mean)", fmt(p.get("pef_norm_ratio_geomean"))))
    inner = "".join(f'<div class="stat"><b>{escape(v)}</b>{escape(k)}</div>' for k, v in cards)
    return f'<div class="cards">{inner}</div>'


def _method_title(method: str | None) -> tuple[str, str]:
    """``(title, what one component is called)``: ``("NPEFF components", "component")`` for NPEFF."""
    m = REGISTRY[method or DECOMPOSITION]
    return m.title, m.unit


def _prefix(method: str | None) -> str:
    """From an index page to the site root."""
    return "" if method is None else "../../"


def _method_cell(meth: str, compare: dict, here: str | None) -> str:
    pages = compare.get("pages") or {}
    prefix = _prefix(here)
    if meth == (here or DECOMPOSITION):
        return f"<td><b>{escape(meth)}</b> (this page)</td>"
    if meth == DECOMPOSITION and here is not None:
        return f'<td><a href="{prefix}index.html">{escape(meth)}</a></td>'
    if meth in pages:
        return f'<td><a href="{prefix}{escape(pages[meth])}">{escape(meth)}</a></td>'
    return f"<td>{escape(meth)}</td>"


def _compare_table(compare: dict | None, here: str | None = None) -> str:
    if not compare or not compare.get("methods"):
        return ""
    methods = compare["methods"]
    extra = sorted({k for f in methods.values() for k in f} - set(_COMPARE_COLUMNS))
    cols = [c for c in _COMPARE_COLUMNS if any(c in f for f in methods.values())] + extra
    head = "".join(f'<th data-sort="{"str" if c == "method" else "num"}">{escape(c)}</th>' for c in cols)
    rows = []
    for meth, f in methods.items():
        cells = "".join(
            f'<td class="num" data-value="{_num(f.get(c)) if isinstance(f.get(c), (int, float)) else ""}">'
            f"{escape(fmt(f.get(c)))}</td>"
            for c in cols
        )
        rows.append(f'<tr data-method="{escape(meth)}">{_method_cell(meth, compare, here)}{cells}</tr>')
    return (
        '<section class="block" id="compare"><h2>Methods side by side</h2>'
        f'<div class="scroll"><table class="sortable"><thead><tr><th data-sort="str">method</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        f'<p class="note">From {escape(compare.get("path", ""))}.</p></section>'
    )


def _index_row(r: dict, where: bool = False) -> str:
    tuned = r["tuned_label"] is not None or r["tuned_prediction"] is not None
    j = r["feature_index"]
    cells = [
        f'<td class="num" data-value="{j}"><a href="{r["page"]}">{j}</a></td>',
        f'<td data-value="{int(r["alive"])}">{"alive" if r["alive"] else "dead"}</td>',
        f"<td>{escape(name(r['tuned_label'])) if r['tuned_label'] is not None else ''}</td>",
        f"<td>{escape(name(r['tuned_prediction'])) if r['tuned_prediction'] is not None else ''}</td>",
        f"<td>{_counts(r['top_labels'])}</td>",
        f"<td>{_counts(r['top_predictions'])}</td>",
        f'<td class="num" data-value="{_num(r["coefficient_mass"])}">{pct(r["coefficient_mass"])}</td>',
        f'<td class="num" data-value="{_num(r["frac_nonzero"])}">{pct(r["frac_nonzero"])}</td>',
        f'<td class="num" data-value="{_num(r["kl_ratio"])}">{fmt(r["kl_ratio"])}</td>',
        f'<td class="num" data-value="{_num(r["pef_norm_ratio"])}">{fmt(r["pef_norm_ratio"])}</td>',
    ]
    if where:
        status = r.get("location_status")
        top = r.get("top_group") or (status if status not in (None, "located") else None)
        mark = _CHANCE_MARK if status == "at chance" else ""
        cells += [
            f'<td class="num" data-value="{_num(r.get("top5pct"))}">{pct(r.get("top5pct"))}</td>',
            f'<td data-location="{escape(status or "")}">{escape(top or "–")}{mark}</td>',
        ]
    cls = "" if r["alive"] else ' class="dead"'
    return (
        f'<tr{cls} data-component="{j}" data-tuned="{int(tuned)}" data-alive="{int(r["alive"])}">{"".join(cells)}</tr>'
    )


def render_index(index: dict) -> str:
    """The index page of NPEFF's components or, with ``index["method"]``, of a baseline's (``methods/<m>/``)."""
    k = index["summary"]["k"]
    method = index.get("method")
    title, what = _method_title(method)
    nav = "" if method is None else '<nav><a href="../../index.html">← NPEFF components and all methods</a></nav>'
    legend = (
        "KL ratio: mean KL on the top examples over random ones after perturbing θ along the component (§3.3)."
        if method is None
        else f"Examples, labels and predictions are NPEFF's run's; each {what}'s coefficients come from "
        "<code>npeff compare</code>; perturbation (KL ratio) is computed for NPEFF components only."
    )
    where = (index.get("locations") or {}).get("layers") is not None
    columns = [
        (what, "num"),
        ("status", "num"),
        ("tuned label", "str"),
        ("tuned prediction", "str"),
        (f"labels of top {k}", "str"),
        (f"predictions of top {k}", "str"),
        ("coefficient mass", "num"),
        ("active", "num"),
        ("KL ratio", "num"),
        ("PEF-norm ratio", "num"),
    ] + ([("top 5% of groups", "num"), ("most energy", "str")] if where else [])
    head = "".join(f'<th data-sort="{t}"{" class=num" if t == "num" else ""}>{escape(h)}</th>' for h, t in columns)
    rows = "\n".join(_index_row(r, where) for r in index["components"])
    note = index.get("attribution_note")
    body = (
        f'<header>{nav}<h1>{escape(title)}</h1><p class="sub">{_run_line(index["run"])}</p></header><main>'
        f"{_stat_cards(index)}{_compare_table(index.get('compare'), method)}"
        '<section class="block"><div class="controls">'
        '<input id="filter" type="search" placeholder="filter: label, prediction, component…" aria-label="filter">'
        '<label><input type="checkbox" id="tuned-only"> tuned only</label>'
        '<label><input type="checkbox" id="alive-only"> alive only</label><span id="count" class="muted"></span></div>'
        f'<div class="scroll"><table id="components" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{rows}\n</tbody></table></div>"
        f'<p class="note">Tuned: at least 95% of the top {k} examples share the label (prediction), §3.1. '
        f"Coefficient mass: the component's share of all coefficients. Active: the share of the examples with "
        f"{escape(ACTIVE_DEFINITION)}. "
        f"{legend}{' ' + escape(note) if note else ''}"
        f"{' ' + _where_legend() if where else ''}{' ' + _attributed_note(index) if method is None else ''}"
        f"</p></section>{_where_index(index)}</main>"
    )
    return _page(title, body, _prefix(method))


def _where_legend() -> str:
    return (
        "Top 5% of groups: the share of the component's energy in its top 5% of (layer, module) groups; most "
        "energy: its first group, with its enrichment (below: the maps; ≈ chance: a location that says nothing, its "
        "energy spread over the groups by their share of the parameters)."
    )


def _attributed_note(rec: dict) -> str:
    """Why only the top ``n_attributed`` examples have token attributions, and the option that sets it."""
    n = rec.get("n_attributed")
    if n is None:
        return ""
    return (
        f"Token attributions cover each component's top {n} of the {rec['k'] if 'k' in rec else rec['summary']['k']} "
        "examples shown: each attributed example costs a forward and a backward pass of the model per PEF row, for "
        "each component; set the number with <code>npeff report --n-attributed N</code> (Python: "
        "<code>npeff_lens.report.build(..., n_attributed=N)</code>)."
    )


# ----------------------------------------------------------------------------------------------
# Component pages
# ----------------------------------------------------------------------------------------------


def tokens_html(
    tokens: list[str], values: list[float], unit: str = "of the loading", input_mask: list[bool] | None = None
) -> str:
    """Tokens as spans whose background shows their value, e.g. share of the loading (orange +, blue −).

    With ``input_mask`` (per token, ``True`` for the input's own text) the colour scale is set by the input's
    tokens alone (the largest ``|value|`` among them is full colour) and the template's tokens are shown
    outlined, uncoloured, with their value on hover: a template token holding most of the value (an attention
    sink, the prompt's last token) would otherwise leave the input's tokens blank."""
    if input_mask is None or not any(input_mask):  # no split known (or no input token): every token scales
        input_mask = [True] * len(tokens)
    vmax = max((abs(v) for v, own in zip(values, input_mask) if own), default=0.0) or 1.0
    spans = []
    for tok, v, own in zip(tokens, values, input_mask):
        text = escape(tok).replace("\n", "↵\n")
        if not own:
            spans.append(
                f'<span class="tok tmpl" data-value="{v!r}" data-input="0" '
                f'title="{100 * v:+.1f}% {escape(unit)} (template token: not on the colour scale)">{text}</span>'
            )
            continue
        alpha = 0.85 * abs(v) / vmax
        rgb = "230,110,20" if v >= 0 else "40,110,220"
        spans.append(
            f'<span class="tok" style="background-color: rgba({rgb},{alpha:.3f})" '
            f'data-value="{v!r}" data-input="1" title="{100 * v:+.1f}% {escape(unit)}">{text}</span>'
        )
    return "".join(spans)


def _probs_text(e: dict) -> str:
    if e.get("probs") is not None:
        return " ".join(f"p({escape(name(o))})={p:.2f}" for o, p in zip(e["outcomes"], e["probs"]))
    if e.get("topk_ids") is not None:
        return " ".join(f"p(#{i})={p:.2f}" for i, p in zip(e["topk_ids"], e["topk_probs"]))
    return ""


def _example_html(e: dict) -> str:
    meta = [
        f"#{e['rank'] + 1}",
        f"example {e['example_index']}",
        f"coefficient <b>{fmt(e['coefficient'])}</b>",
        f"label <b>{escape(name(e['label']))}</b>",
        f"prediction <b>{escape(name(e['prediction']))}</b>",
        _probs_text(e),
    ]
    mask = e.get("input_tokens")
    if e.get("values") is not None and e.get("remainder") is None:  # a baseline's per-token activations
        meta.append(f"max activation {fmt(e['loading'])}")
        tokens = tokens_html(e["tokens"], e["values"], "of the max activation", mask)
        content = f'<div class="tokens">{tokens}</div>'
    elif e.get("values") is not None:
        rem = sum(v for v in (e.get("remainder") or {}).values())
        meta.append(f"loading {fmt(e['loading'])}")
        if e.get("template_share") is not None:
            meta.append(
                f'<span class="share" data-template-share="{e["template_share"]!r}">template: '
                f"<b>{pct(e['template_share'])}</b> of the loading</span> · input: {pct(e['input_share'])}"
            )
        meta.append(f"remainder {pct(rem)}")
        content = f'<div class="tokens">{tokens_html(e["tokens"], e["values"], input_mask=mask)}</div>'
    else:
        if e.get("stored_loading") is not None:
            meta.append(f"loading {fmt(e['stored_loading'])}")
        content = f'<div class="text">{escape(e.get("text") or "")}</div>'
    return (
        f'<div class="example" id="example-{e["example_index"]}"><div class="meta">{" · ".join(m for m in meta if m)}'
        f"</div>{content}</div>"
    )


def _breakdown(c: dict) -> str:
    counts = c["label_prediction_counts"]
    if not counts:
        return '<p class="muted">no active example</p>'
    labels = sorted({name(x["label"]) for x in counts})
    preds = sorted({name(x["prediction"]) for x in counts})
    cell = {(name(x["label"]), name(x["prediction"])): x["count"] for x in counts}
    head = "".join(f'<th class="num">{escape(p)}</th>' for p in preds)
    rows = "".join(
        f"<tr><th>{escape(lab)}</th>"
        + "".join(f'<td class="num">{cell.get((lab, p), "")}</td>' for p in preds)
        + "</tr>"
        for lab in labels
    )
    return (
        f'<table id="breakdown"><thead><tr><th>label ↓ / prediction →</th>{head}</tr></thead><tbody>{rows}'
        f'</tbody></table><p class="note">Top {c["n_top"]} active examples ({escape(ACTIVE_DEFINITION)}).</p>'
    )


def _nearest(c: dict, rows: list[dict]) -> str:
    out = []
    for o, cos in zip(c["correlated_features_indices"], c["correlated_features_cosine"]):
        r = rows[o]
        tune = " / ".join(name(t) for t in (r["tuned_label"], r["tuned_prediction"]) if t is not None) or ""
        out.append(
            f'<tr><td><a href="{component_name(o)}.html">{o}</a></td><td class="num">{fmt(cos)}</td>'
            f"<td>{escape(tune)}</td></tr>"
        )
    return (
        '<table id="nearest"><thead><tr><th>component</th><th class="num">cosine</th><th>tuned to</th></tr></thead>'
        f'<tbody>{"".join(out)}</tbody></table><p class="note">Cosine of the coefficient vectors (§3).</p>'
    )


def _perturbation(p: dict | None, method: str | None = None) -> str:
    if method is not None:
        return '<p class="muted">Perturbation (<code>npeff perturb</code>) is computed for NPEFF components only.</p>'
    if not p:
        return '<p class="muted">No perturbation results for this run (<code>npeff perturb</code>).</p>'
    if p.get("status") not in (None, "ok"):
        return f'<p class="muted">Perturbation status: {escape(str(p.get("status")))}.</p>'
    rows = "".join(
        f'<tr><td>{s}</td><td class="num">{fmt(p.get("kl_top_" + k))}</td><td class="num">'
        f'{fmt(p.get("kl_base_" + k))}</td><td class="num">{fmt(p.get("kl_ratio_" + k))}</td></tr>'
        for s, k in (("+h", "plus"), ("−h", "minus"))
    )
    return (
        '<table id="perturbation"><thead><tr><th>sign</th><th class="num">KL top</th><th class="num">KL random</th>'
        f'<th class="num">ratio</th></tr></thead><tbody>{rows}</tbody></table>'
        f'<p class="note">KL ratio {fmt(p.get("kl_ratio"))} (sign {escape(str(p.get("sign") or "–"))}); '
        f"PEF-norm ratio {fmt(p.get('pef_norm_ratio'))}; {fmt(p.get('n_top'))} top vs {fmt(p.get('n_base'))} "
        f"random examples; recovery residual {fmt(p.get('recovery_relative_residual'))}.</p>"
    )


def _component_header(c: dict, n_components: int) -> str:
    j = c["feature_index"]
    title, kind = _method_title(c.get("method"))
    nav = [f'<a href="../index.html">← all {escape(title if c.get("method") else "components")}</a>']
    if c.get("method"):
        nav.append('<a href="../../../index.html">NPEFF components and all methods</a>')
    if j > 0:
        nav.append(f'<a href="{component_name(j - 1)}.html">‹ {j - 1}</a>')
    if j + 1 < n_components:
        nav.append(f'<a href="{component_name(j + 1)}.html">{j + 1} ›</a>')
    badges = []
    if not c["alive"]:
        badges.append('<span class="badge dead">dead</span>')
    for what in ("label", "prediction"):
        if c[f"tuned_{what}"] is not None:
            badges.append(f'<span class="badge tuned">{what}: {escape(name(c[f"tuned_{what}"]))}</span>')
    return f"<header><nav>{' · '.join(nav)}</nav><h1>{kind.capitalize()} {j} {' '.join(badges)}</h1></header>"


def _legend(method: str | None) -> str:
    m = REGISTRY[method or DECOMPOSITION]
    if m.token_values is None:
        return f"No token highlighting: a {m.unit} has no per-token values (one vector per example)."
    template = (
        'The prompt template\'s tokens are shown <span class="tok tmpl">outlined</span> and uncoloured (hover for '
        "their value): the colour scale is set per example by the input's own tokens, full colour at the largest "
        "among them."
    )
    if m.space == "activations":
        return (
            f"Token highlighting: {m.token_values} "
            '(<span class="tok" style="background-color: rgba(230,110,20,0.6)">max</span>; hover for the %). '
            f"{template}"
        )
    return (
        f"Token highlighting: {m.token_values} "
        '(<span class="tok" style="background-color: rgba(230,110,20,0.6)">adds</span> '
        '<span class="tok" style="background-color: rgba(40,110,220,0.6)">subtracts</span>; hover for the %). '
        f"{template} Template: the template tokens' total share of the loading; input: the input's tokens'; "
        "remainder: parameters the hooks do not split over tokens (the three add up to 100%)."
    )


def render_component(c: dict, rows: list[dict]) -> str:
    """A component's page from its record (:func:`.data.component_record`) and the index rows."""
    stats = (
        f'<table id="stats"><tbody><tr><th>coefficient mass</th><td class="num">{pct(c["coefficient_mass"])}</td></tr>'
        f'<tr><th>active</th><td class="num">{pct(c["frac_nonzero"])} of {c["n_prompts_total"]}</td></tr>'
        f'<tr><th>max coefficient</th><td class="num">{fmt(c["max_coefficient"])}</td></tr>'
        f"<tr><th>labels of top {c['k']}</th><td>{_counts(c['top_labels'])}</td></tr>"
        f"<tr><th>predictions of top {c['k']}</th><td>{_counts(c['top_predictions'])}</td></tr></tbody></table>"
    )
    hist = json.dumps({"x": c["freq_hist_data_bar_values"], "y": c["freq_hist_data_bar_heights"]})
    hist = hist.replace("</", "<\\/")  # never closes the script element
    examples = "\n".join(_example_html(e) for e in c["activations"]) or '<p class="muted">no top examples</p>'
    method = c.get("method")
    title, what = _method_title(method)
    legend = (
        f'<p class="legend note">{_legend(method)} {escape(c.get("attribution_note") or "")} {_attributed_note(c)}</p>'
    )
    body = (
        f'{_component_header(c, len(rows))}<main><div class="grid">'
        f'<div class="card"><h2>Summary</h2>{stats}</div>'
        f'<div class="card"><h2>Coefficients</h2><div id="hist" class="plot"></div><p class="note">'
        f"{pct(c['frac_nonzero'])} of the examples are active ({escape(ACTIVE_DEFINITION)}); "
        f"{N_BINS} bins over those.</p></div>"
        f'<div class="card"><h2>Top {c["k"]}: label × prediction</h2>{_breakdown(c)}</div>'
        f'<div class="card"><h2>Nearest {what}s</h2>{_nearest(c, rows)}</div>'
        f'<div class="card"><h2>Perturbation (§3.3)</h2>{_perturbation(c.get("perturbation"), method)}</div></div>'
        f"{_where_component(c)}"
        f'<section class="block" id="examples"><h2>Top examples</h2>{legend}{examples}</section></main>'
        f'<script type="application/json" id="hist-data">{hist}</script>'
    )
    page_title = f"NPEFF component {c['feature_index']}" if method is None else f"{title}: {what} {c['feature_index']}"
    return _page(page_title, body, "../" + _prefix(method), scripts=("plotly.min.js", "report.js"))
