"""Explaining new inputs with a fitted run (``npeff explain``): which of its processing strategies were at work on
each.

>>> from npeff_lens.explain import explain, format_explanation, write_page
>>> [e] = explain("runs/demo/npeff", "A gorgeous, witty, seductive movie.")
>>> print(format_explanation(e)); write_page([e], "explain.html")

For each text, on the run's model, task and prompt template (one model load for all texts):

- the prediction and p(y|x) over the task's outcomes;
- its LRM-PEF ``G`` ("rank dim") computed as the run's collection computed its examples': the store's parameters
  and projection (:class:`~npeff_lens.pef.PEFComputer`, as :class:`~npeff_lens.attribution.TokenAttributor`
  rebuilds it from the manifest), its prompt fitted to the run's ``max_length`` as the collection fits its examples'
  (:meth:`~npeff_lens.tasks.Task.fitted_prompts`: the text's last tokens go, the template stays), then the
  collection's own finishing step (flags, SVD rank reduction of App. C) and the store's dtype;
- its coefficients ``w`` ("component") with the components fixed (:meth:`~npeff_lens.decomposition.NPEFF.transform`);
- how much of its PEF they explain. With ``F̂ = GᵀG / ‖GᵀG‖_F``, the unit-norm PEF the fit reconstructs (§2.2)::

      relative_error = ‖F̂ − Σ_j w_j h_j h_jᵀ‖_F²  =  1 − 2 Σ_j w_j ‖G h_j‖² / ‖GᵀG‖_F + wᵀ ((H Hᵀ) ⊙ (H Hᵀ)) w
      explained      = 1 − relative_error

  the per-example term of the fit's loss (``reconstruction_err_`` is its mean over the run's examples), computed from
  ``r x C`` and ``C x C`` matrices as the fit does. Converged coefficients keep it in [0, 1] (``w = 0`` gives
  relative error 1). The run's mean ``1 − reconstruction_err_`` is the yardstick: a text far from the run's data is
  answered all the same, and a share well below that mean says so (``notes``). A zero PEF (a one-hot prediction has
  zero Fisher) has no share: ``explained`` is ``None``;
- its top components by coefficient, each with its tunings (§3.1: the label / prediction shared by >= 95% of the
  component's top ``k`` run examples, as the report computes them), its top run examples, the exact split of the
  text's loading ``Σ_rows ((G_row A)·h_j)²`` over the prompt's tokens (:mod:`npeff_lens.attribution`; shares plus
  the labelled remainder sum to the loading), and where it lives when the run has ``locations.json``
  (:func:`npeff_lens.runs.locate`, ``npeff top DECOMPOSITION_DIR --where``; read, never computed here): its top
  groups, attention heads and MLP neurons in the words of :func:`npeff_lens.locations.location_words`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .analysis import ACTIVE_DEFINITION, active
from .attribution import TokenAttributor
from .collect import finish_batch
from .config import ExplainConfig
from .formatting import MISSING, fmt, pct
from .io import atomic_write, to_jsonable
from .locations import location_words
from .models import load_model
from .report.data import (
    LOCATIONS_FILE,
    component_name,
    how_to_locate,
    input_token_mask,
    load_view,
    located_k,
    read_locations,
    statistics,
    summary_row,
    top_indices,
)
from .report.render import name, tokens_html
from .rundir import resolve_config

__all__ = ["Explanation", "ComponentMatch", "explain", "relative_errors", "format_explanation", "write_page"]

LOW_SHARE = 0.5  # a text whose explained share is below this fraction of the run's mean gets a note
WHERE_SHOWN = ("where", "heads", "caution")  # the lines of a location the terminal view prints (the page: all)


@dataclass
class ComponentMatch:
    """One of an input's top components: its coefficient, what it is tuned to, and where the input loads on it."""

    component: int
    coefficient: float
    alive: bool
    tuned_label: Any
    tuned_prediction: Any
    top_labels: list  # [[label, count]] over the component's top k run examples
    top_predictions: list
    examples: list[dict]  # the component's top run examples: {example, text, coefficient, label, prediction}
    tokens: list[str]  # the prompt's tokens
    token_ids: list[int]
    from_text: list[bool]  # per token: it covers characters of the input text (not only the prompt template)
    shares: list[float]  # per token: Σ_rows c_row c_row,t / loading
    remainder: dict[str, float]  # label -> fraction of the loading (attribution.REMAINDER_LABELS)
    loading: float  # Σ_rows ((G_row A) · h_j)² of the raw (not rank-reduced, not normalised) PEF
    page: str | None = None  # the component's report page, when the run has a report
    location: dict | None = None  # where it lives (locations.location_words), when the run has locations.json
    attribution: Any = field(default=None, repr=False)  # the TokenAttribution

    def top_tokens(self, n: int = 3, text_only: bool = False) -> list[tuple[str, float]]:
        """The ``n`` tokens with the largest share of the loading, ``(token, fraction)``; ``text_only``: among
        the input text's tokens."""
        keep = [t for t in range(len(self.shares)) if self.from_text[t] or not text_only]
        order = sorted(keep, key=lambda t: -self.shares[t])[:n]
        return [(self.tokens[t], self.shares[t]) for t in order]

    @property
    def template_share(self) -> float:
        """The share of the loading on the prompt template's tokens."""
        return sum(v for v, f in zip(self.shares, self.from_text) if not f)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "attribution"}


@dataclass
class Explanation:
    """Which components were at work on one input (the module docstring says how each field is computed)."""

    text: str
    prompt: str
    n_tokens: int  # the prompt's tokens, as the model reads it (its text shortened to the run's max_length, if it was)
    prediction: Any  # the outcome's name (a decoded token for a next-token task)
    probabilities: dict[str, float]  # outcome -> p(y|x) (the top few for a next-token task)
    coefficients: torch.Tensor  # "component"
    explained: float | None
    relative_error: float | None
    pef_norm: float  # ‖GᵀG‖_F of the raw PEF
    flag: str | None  # the collection's flag: zero_pef, nonfinite_logits, nonfinite_grad
    components: list[ComponentMatch]
    run: dict  # decomposition, model, task, outcomes, n_examples, n_components, mean_explained, report, locations,
    # locations_note (why components are not located, or that locations.json is older than the fit), locate
    notes: list[str] = field(default_factory=list)
    pef: torch.Tensor | None = field(default=None, repr=False)  # "rank dim", as the store would hold it
    text_tokens_cut: int = 0  # tokens left out at the text's end so that the prompt fits the run's max_length

    @property
    def top_component(self) -> ComponentMatch | None:
        return self.components[0] if self.components else None

    def to_dict(self) -> dict:
        """Strict JSON (NaN as null); the PEF and the attribution objects are left out."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("pef", "components")}
        out["components"] = [c.to_dict() for c in self.components]
        return to_jsonable(out, "the explanation")


# ----------------------------------------------------------------------------------------------
# Computing explanations
# ----------------------------------------------------------------------------------------------


def relative_errors(pefs, components, coefficients) -> torch.Tensor:
    """``‖F̂_i − Σ_j W_ij h_j h_jᵀ‖_F²`` per example with ``F̂_i = G_iᵀG_i / ‖G_iᵀG_i‖_F`` (NaN for a zero PEF):
    pefs "example rank dim", components "component dim" (unit norm, ``components_``), coefficients "example
    component" -> "example" float64."""
    G = torch.as_tensor(pefs).double()
    G = G[:, None] if G.ndim == 2 else G
    H, W = torch.as_tensor(components).double(), torch.as_tensor(coefficients).double()
    norm = (G @ G.transpose(1, 2)).square().sum((1, 2)).sqrt()  # ‖GᵀG‖_F = ‖G Gᵀ‖_F
    N = (G @ H.T).square().sum(1) / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
    S2 = (H @ H.T).square()
    err = 1 - 2 * (W * N).sum(1) + ((W @ S2) * W).sum(1)
    return torch.where(norm > 0, err, torch.full_like(err, float("nan")))


def _check_texts(texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("no text to explain")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise ValueError(f"text {i} is empty: give the input whose prediction to explain")
    return texts


def _check_lengths(adapter, task, texts: list[str], max_length: int | None):
    """``(prompts, text_tokens_cut, tokens per prompt, notes)``: the prompts the run's collection makes of the texts
    (:meth:`~npeff_lens.tasks.Task.fitted_prompts`: a text too long for the run's ``max_length`` loses its last tokens,
    the template kept), with a note on each shortened one; a prompt longer than the model's context is an error."""
    prompts, cuts = task.fitted_prompts(adapter.tokenizer, texts, max_length)
    lengths = [len(ids) for ids in adapter.tokenizer(prompts)["input_ids"]]
    context = adapter.context_length
    notes: list[list[str]] = []
    for i, n in enumerate(lengths):
        if context is not None and n > context:
            raise ValueError(
                f"text {i} is {n} tokens in the run's prompt template; {adapter.name} takes at most {context}: "
                "shorten it"
            )
        cut = (
            f"the text's last {cuts[i]} token(s) were left out so that its prompt fits the run's "
            f"max_length={max_length} tokens, as its collection shortened its examples (the template kept)"
        )
        notes.append([cut] if cuts[i] else [])
    return prompts, cuts, lengths, notes


def _load(decomposition_dir, store, adapter, device):
    """``(view, attributor)``: the run (report.data's view) and the attributor on its model, loaded once."""
    d = Path(decomposition_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} does not exist: give a directory written by `npeff decompose`")
    view = load_view(d, store)
    manifest = view.manifest
    for key in ("layout", "task", "model"):
        if not manifest.get(key):
            raise ValueError(f"the decomposition {d} records no {key!r}: was it fitted on a PEF store?")
    if adapter is None:
        model = manifest["model"]
        adapter = load_model(model["name"], backend=model.get("backend") or "hf", device=device)
    return view, TokenAttributor.from_manifest(manifest, view.est.components_, adapter)


def _pefs(attributor, texts: list[str], prompts: list[str], cuts: list[int], manifest: dict, batch_size: int):
    """``(pefs "text rank dim" as the store would hold them, per-text metadata rows)`` of the texts' fitted
    ``prompts`` (``cuts``: their ``text_tokens_cut``): the collection's batch computation and finishing step
    (npeff_lens.collect: flags, norms, rank reduction), then the store's dtype."""
    cfg = manifest.get("config") or {}
    computer, task = attributor.computer, attributor.task
    parts, metas = [], []
    for lo in range(0, len(texts), batch_size):
        chunk = texts[lo : lo + batch_size]
        raw, log_probs = computer.compute(prompts[lo : lo + batch_size], max_length=cfg.get("max_length"))
        pefs, meta = finish_batch(
            raw,
            log_probs,
            {"text": chunk},
            lo,
            task,
            cfg.get("rank"),
            cfg.get("top_k_probs", 5),
            cuts[lo : lo + batch_size],
        )
        parts.append(pefs.cpu())
        metas += meta
    pefs = torch.cat(parts)
    dtype = getattr(torch, str(cfg.get("dtype") or "float32"))
    return pefs.to(dtype).float(), metas


def _coefficients(est, pefs: torch.Tensor) -> torch.Tensor:
    """``est.transform`` of the PEFs "text rank dim" that have a finite, non-zero norm; 0 for the others (as the
    fit gives an excluded example), "text component" float64."""
    norms = (pefs.double() @ pefs.double().transpose(1, 2)).flatten(1).norm(dim=1)
    valid = torch.isfinite(norms) & (norms > 0)
    out = torch.zeros(pefs.shape[0], est.components_.shape[0], dtype=torch.float64)
    if bool(valid.any()):
        out[valid] = est.transform(pefs[valid]).double()
    return out


def _outcome(meta: dict, outcomes, tokenizer) -> tuple[Any, dict[str, float]]:
    """``(prediction, {outcome: probability})`` from a collection metadata row (``outcomes``: the task's names)."""
    pred = meta["prediction"]
    if "probs" in meta:
        names = list(outcomes) if outcomes and len(outcomes) == len(meta["probs"]) else range(len(meta["probs"]))
        return meta.get("prediction_name", pred), {str(o): float(p) for o, p in zip(names, meta["probs"])}
    ids, probs = meta.get("topk_ids") or [], meta.get("topk_probs") or []
    return (tokenizer.decode([pred]) if pred >= 0 else None), {tokenizer.decode([i]): p for i, p in zip(ids, probs)}


def explain(
    decomposition_dir,
    texts: str | Sequence[str],
    config: ExplainConfig | None = None,
    *,
    store=None,
    adapter=None,
    device: str = "cpu",
    batch_size: int = 8,
    **options,
) -> list[Explanation]:
    """Explain new texts with a fitted run: which of its components (processing strategies) were at work on each.

    For each text, on the run's model, task and prompt template (the model is loaded once for all texts), it
    computes the text's PEF as the run's collection computed its examples', fits its coefficients with the
    components fixed, and reports its top components by coefficient (active ones only,
    :func:`~npeff_lens.analysis.active` at the run's scale). Each component comes with its tunings over the run's
    top ``k`` examples, its ``n_examples`` top run examples, and the exact split of the text's loading on it
    over the prompt's tokens. The module docstring says how each number is computed.

    Args:
        decomposition_dir: the decomposition's directory.
        texts: one text or a list of texts.
        config: an :class:`~npeff_lens.config.ExplainConfig`; or pass its fields as keyword ``options``
            (``top``, ``n_examples``, ``k``).
        store: the run's PEF store (default: the one the decomposition's ``run.json`` names).
        adapter: the run's model, already loaded (default: loaded once, by the name the manifest records).
        device: where the model is loaded.
        batch_size: texts per forward and backward pass.

    Returns:
        One :class:`Explanation` per text: its prediction and probabilities, its coefficients, the share of its
        PEF the components explain, and its top components (:class:`ComponentMatch`).

    Raises:
        ValueError: an empty text, or a text longer than the model's context (a one-line message).
        FileNotFoundError: the directory does not exist.

    Example:
        >>> from npeff_lens.explain import explain, format_explanation, write_page
        >>> [e] = explain("runs/movie/npeff", "A gorgeous, witty, seductive movie.")
        >>> e.prediction, e.explained, e.top_component.component
        >>> print(format_explanation(e))
        >>> write_page([e], "explain.html")
    """
    shown = resolve_config(ExplainConfig, config, options)
    top, n_examples, k = shown.top, shown.n_examples, shown.k
    texts = _check_texts(texts)
    view, attributor = _load(decomposition_dir, store, adapter, device)
    cfg = view.manifest.get("config") or {}
    prompts, cuts, lengths, notes = _check_lengths(attributor.adapter, attributor.task, texts, cfg.get("max_length"))
    pefs, metas = _pefs(attributor, texts, prompts, cuts, view.manifest, batch_size)
    est = view.est
    coefficients = _coefficients(est, pefs)
    errors = relative_errors(pefs, est.components_, coefficients)
    stats = statistics(view, k)
    on = active(coefficients, stats.threshold)  # judged by the run's scale: the same "active" as its report
    picks = [
        [j for j in torch.argsort(w, descending=True, stable=True)[:top].tolist() if on[i, j]]
        for i, w in enumerate(coefficients)
    ]
    pairs = [(j, i) for i, js in enumerate(picks) for j in js]
    found = attributor.attribute_pairs(pairs, [texts[i] for _, i in pairs]) if pairs else []
    attributions = {(a.component, a.example): a for a in found}
    run = _run_info(view)
    entries, key = _read_locations(view, run)
    out = []
    for i, text in enumerate(texts):
        prediction, probabilities = _outcome(metas[i], view.outcomes, attributor.adapter.tokenizer)
        err = float(errors[i])
        explained = None if err != err else 1.0 - err
        matches = [
            _match(view, stats, j, float(coefficients[i, j]), attributions[(j, i)], n_examples, run) for j in picks[i]
        ]
        for c in matches:
            mask = input_token_mask(c.tokens, text, attributor.task.template)
            c.from_text = mask if mask is not None else [True] * len(c.tokens)  # unknown: every token the input's
        _locate(matches, entries, key, (view.manifest.get("projection") or {}).get("kind"))
        e = Explanation(
            text=text,
            prompt=prompts[i],
            n_tokens=lengths[i],
            prediction=prediction,
            probabilities=probabilities,
            coefficients=coefficients[i],
            explained=explained,
            relative_error=None if explained is None else err,
            pef_norm=float(metas[i]["pef_norm"]),
            flag=metas[i]["flag"],
            components=matches,
            run=run,
            text_tokens_cut=cuts[i],
            notes=notes[i] + _notes(explained, metas[i]["flag"], run, matches),
            pef=pefs[i],
        )
        out.append(e)
    return out


def _run_info(view) -> dict:
    man = view.manifest
    err = getattr(view.est, "reconstruction_err_", None)
    report = Path(view.decomposition_dir) / "report"
    return {
        "decomposition": str(Path(view.decomposition_dir).resolve()),
        "model": (man.get("model") or {}).get("name"),
        "task": man.get("task"),
        "outcomes": view.outcomes,
        "n_examples": int(view.coeffs.shape[0]),
        "n_components": int(view.coeffs.shape[1]),
        "mean_explained": None if err is None else 1.0 - float(err),
        "report": str(report.resolve()) if (report / "index.html").is_file() else None,
    }


def _read_locations(view, run: dict) -> tuple[dict[int, dict], dict | None]:
    """``({component: entry}, key)`` of the run's ``locations.json`` (the report's reader: never computed here);
    sets ``run``'s ``locations`` (its path, or None), ``locations_note`` and ``locate`` (the command that writes
    it)."""
    d = view.decomposition_dir
    located, note = read_locations(d, int(view.coeffs.shape[1]))
    cli = how_to_locate(d)["cli"]
    run["locate"] = cli
    run["locations"] = located["path"] if located else None
    if located is None and not (Path(d) / LOCATIONS_FILE).is_file():
        note = f"components not located for this run: `{cli}` writes {Path(d) / LOCATIONS_FILE}"
    elif located is None:
        note = f"{note} `{cli}` writes it again"
    run["locations_note"] = note.rstrip(".") if note else None
    return (located["components"], located["key"]) if located else ({}, None)


def _locate(matches: list[ComponentMatch], entries: dict[int, dict], key: dict | None, projection) -> None:
    """Each match's ``location`` in words; a location at chance explained in full once per input."""
    said = False
    for c in matches:
        if c.component in entries:
            c.location = location_words(entries[c.component], projection, said=said, k=located_k(key))
            said = said or c.location["at_chance"]


def _match(view, stats, j: int, coefficient: float, attribution, n_examples: int, run: dict) -> ComponentMatch:
    row = summary_row(view, stats, j, None)
    examples = [
        {
            "example": i,
            "text": view.meta[i].get("text"),
            "coefficient": float(view.coeffs[i, j]),
            "label": view.labels[i] if view.labels is not None else None,
            "prediction": view.predictions[i],
        }
        for i in top_indices(view, stats, j, n_examples)
    ]
    total = attribution.loading
    page = _report_page(run["report"], j)
    return ComponentMatch(
        component=j,
        coefficient=coefficient,
        alive=row["alive"],
        tuned_label=row["tuned_label"],
        tuned_prediction=row["tuned_prediction"],
        top_labels=row["top_labels"],
        top_predictions=row["top_predictions"],
        examples=examples,
        tokens=list(attribution.tokens),
        token_ids=list(attribution.token_ids),
        from_text=[True] * len(attribution.tokens),
        shares=attribution.fractions(),
        remainder={key: (v / total if total > 0 else 0.0) for key, v in attribution.remainder.items()},
        loading=total,
        page=page,
        attribution=attribution,
    )


def _notes(explained, flag, run: dict, matches) -> list[str]:
    notes = []
    if flag is not None:
        notes.append(
            f"the collection would flag this input ({flag}): its PEF is zero or not finite, so no component explains it"
        )
    mean = run.get("mean_explained")
    if explained is not None and mean is not None and mean > 0 and explained < LOW_SHARE * mean:
        notes.append(
            f"the components explain {explained:.0%} of this PEF against {mean:.0%} on average over the "
            "run's examples: the input may lie outside the run's data"
        )
    if flag is None and not matches:
        notes.append(f"no component is active on this input ({ACTIVE_DEFINITION})")
    return notes


# ----------------------------------------------------------------------------------------------
# Terminal view
# ----------------------------------------------------------------------------------------------


def _tuning(c: ComponentMatch) -> str:
    tuned = [
        f"{what} {name(v)}"
        for what, v in (("label", c.tuned_label), ("prediction", c.tuned_prediction))
        if v is not None
    ]
    if tuned:
        return "tuned to " + ", ".join(tuned)
    counts = c.top_predictions or c.top_labels
    seen = ", ".join(f"{name(v)} x{n}" for v, n in counts[:3])
    return f"not tuned (top predictions: {seen})" if seen else "not tuned"


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_explanation(e: Explanation, width: int = 100) -> str:
    """A short terminal view: the prediction, the explained share, and per top component its tuning, coefficient,
    where it lives (its top groups and attention heads, when the run has ``locations.json``; else one line on how to
    write it), top attributed tokens and its top run example."""
    probs = " · ".join(f"{name(o)} {p:.2f}" for o, p in e.probabilities.items())
    mean = e.run.get("mean_explained")
    lines = [
        f"{_short(repr(e.text), width)}",
        f"  prediction: {name(e.prediction)}   ({probs})",
        f"  explained: {pct(e.explained)} of its PEF by the run's {e.run['n_components']} components"
        + (f" (run mean {pct(mean)})" if mean is not None else ""),
    ]
    for c in e.components:
        lines.append(f"  component {c.component:<4} coefficient {fmt(c.coefficient, 4)}   {_tuning(c)}")
        if c.location is not None:
            lines += [f"    {what}: {text}" for what, text in c.location["lines"] if what in WHERE_SHOWN]
        toks = " · ".join(f"{t.strip() or repr(t)} {s:+.0%}" for t, s in c.top_tokens(3, text_only=True))
        rest = sum(c.remainder.values())
        extra = [f"prompt template {c.template_share:+.0%}"] + (
            [f"remainder {rest:+.0%}"] if abs(rest) >= 0.005 else []
        )
        lines.append(f"    input tokens: {toks}   ({', '.join(extra)})")
        if c.examples:
            x = c.examples[0]
            tag = (
                f"[{name(x['label'])} → {name(x['prediction'])}]"
                if x["label"] is not None
                else f"[→ {name(x['prediction'])}]"
            )
            lines.append(f"    e.g. {fmt(x['coefficient'], 4)} {tag} {_short(x['text'], max(20, width - 30))}")
    if e.run.get("locations_note"):
        lines.append(f"  where: {e.run['locations_note']}")
    lines += [f"  note: {n}" for n in e.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

_EXTRA_CSS = """
.input { font-size: 16px; margin: 4px 0 10px; }
.component-head { font-size: 14px; margin: 0 0 4px; }
ol.examples { margin: 6px 0 0; padding-left: 22px; }
ol.examples li { margin: 3px 0; }
"""


def _href(page: str | None, out_dir: Path) -> str | None:
    if page is None:
        return None
    return Path(os.path.relpath(Path(page).resolve(), out_dir.resolve())).as_posix()


def _component_pages(e: Explanation, report_dir) -> dict[int, str | None]:
    """Per component of ``e``, its page under ``report_dir`` (default: the run's report) when the file exists."""
    return {c.component: c.page if report_dir is None else _report_page(report_dir, c.component) for c in e.components}


def _report_page(report_dir, j: int) -> str | None:
    """Component ``j``'s page in the report at ``report_dir``, when that file exists."""
    if report_dir is None:
        return None
    path = Path(report_dir) / "components" / f"{component_name(j)}.html"
    return str(path) if path.is_file() else None


def _component_html(c: ComponentMatch, href: str | None) -> str:
    label = f"component {c.component}"
    title = f'<a href="{escape(href)}">{label}</a>' if href else label
    tuned = (("label", c.tuned_label), ("prediction", c.tuned_prediction))
    badges = [f'<span class="badge tuned">{what}: {escape(name(v))}</span>' for what, v in tuned if v is not None]
    if not c.alive:
        badges.append('<span class="badge dead">dead in the run</span>')
    rest = sum(c.remainder.values())
    seen = ", ".join(f"{name(v)} ×{n}" for v, n in c.top_predictions) or MISSING
    meta = (
        f"coefficient <b>{fmt(c.coefficient)}</b> · loading {fmt(c.loading)} (prompt template "
        f"{pct(c.template_share)}, remainder {pct(rest)}) · "
        f"top predictions of the run's top examples {escape(seen)}"
    )
    examples = "".join(
        f"<li>{fmt(x['coefficient'])} · label <b>{escape(name(x['label']))}</b> · prediction "
        f"<b>{escape(name(x['prediction']))}</b> · {escape(_short(x['text'] or '', 300))}</li>"
        for x in c.examples
    )
    where = "".join(
        f'<div class="meta where" data-what="{what}">{what}: {escape(text)}</div>'
        for what, text in (c.location or {}).get("lines", [])
    )
    return (
        f'<div class="example component" data-component="{c.component}"><h3 class="component-head">{title} '
        f'{" ".join(badges)}</h3><div class="meta">{meta}</div>{where}'
        f'<div class="tokens">{tokens_html(c.tokens, c.shares)}</div>'
        f'<div class="meta">Top examples of the run on this component:</div><ol class="examples">{examples}</ol></div>'
    )


def _explanation_html(n: int, e: Explanation, pages: dict, out_dir: Path) -> str:
    probs = " · ".join(f"{escape(name(o))} {p:.2f}" for o, p in e.probabilities.items())
    cards = [
        ("prediction", name(e.prediction)),
        ("explained", pct(e.explained)),
        ("run mean explained", pct(e.run.get("mean_explained"))),
        ("PEF norm", fmt(e.pef_norm)),
    ]
    inner = "".join(f'<div class="stat"><b>{escape(v)}</b>{escape(k)}</div>' for k, v in cards)
    notes = "".join(f'<p class="note">{escape(x)}</p>' for x in e.notes)
    comps = "".join(_component_html(c, _href(pages.get(c.component), out_dir)) for c in e.components)
    comps = comps or f'<p class="muted">no component is active on this input ({escape(ACTIVE_DEFINITION)})</p>'
    return (
        f'<section class="block explanation" id="input-{n}"><h2>Input {n + 1}</h2>'
        f'<div class="text input">{escape(e.text)}</div><p class="sub">p(y|x): {probs}</p>'
        f'<div class="cards">{inner}</div>{notes}<h2>Top components</h2>{comps}</section>'
    )


def write_page(explanations: Sequence[Explanation], out_path, report_dir=None) -> Path:
    """A static, self-contained HTML page (the report's style inlined, no script, no network) of the
    explanations; each component links to its page in ``report_dir`` (default: the run's ``report/``) when that
    page exists. Returns the page's path."""
    out_path = Path(out_path)
    out_dir = out_path.parent
    css = (resources.files("npeff_lens.report") / "static" / "report.css").read_text(encoding="utf-8")
    run = explanations[0].run if explanations else {}
    task = run.get("task") or {}
    outcomes = ", ".join(name(o) for o in (run.get("outcomes") or [])[:8])
    sub = (
        f"model <b>{escape(str(run.get('model')))}</b> · task {escape(str(task.get('kind', '?')))}"
        f"{' · outcomes ' + escape(outcomes) if outcomes else ''} · {fmt(run.get('n_examples'))} run examples · "
        f"{fmt(run.get('n_components'))} components · {escape(str(run.get('decomposition', '')))}"
    )
    sections = "".join(
        _explanation_html(n, e, _component_pages(e, report_dir), out_dir) for n, e in enumerate(explanations)
    )
    legend = (
        "Token highlighting: each token's exact share of the input's loading Σ<sub>rows</sub>((G<sub>row</sub>A)·h)²"
        ' on the component (<span class="tok" style="background-color: rgba(230,110,20,0.6)">adds</span> '
        '<span class="tok" style="background-color: rgba(40,110,220,0.6)">subtracts</span>; hover for the %). '
        "Explained: 1 − ‖F̂ − Σ<sub>j</sub> w<sub>j</sub> h<sub>j</sub>h<sub>j</sub>ᵀ‖²<sub>F</sub> for the unit-norm "
        "PEF F̂ (the fit's per-example loss). Tuned: ≥ 95% of the component's top run examples share the label "
        "(prediction), §3.1."
    )
    note = run.get("locations_note")
    where = f' <span id="where-note">Where: {escape(note)}.</span>' if note else ""
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><title>NPEFF: which components were '
        f'at work</title><link rel="icon" href="data:,"><style>{css}{_EXTRA_CSS}</style></head>\n<body>\n'
        f'<header><h1>Which components were at work</h1><p class="sub">{sub}</p></header><main>'
        f'<p class="legend note">{legend}{where}</p>{sections}</main>\n'
        "<footer>npeff_lens explain · NPEFF (Matena &amp; Raffel): components are rank-1 pseudo-Fisher matrices "
        "h hᵀ with non-negative per-example coefficients.</footer>\n</body></html>\n"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, html)
    return out_path
