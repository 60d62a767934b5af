"""Perturbation experiments (§3.3, App. F): does moving θ along a component's pseudo-Fisher vector
selectively change the predictions of that component's top examples?

For a component ``j`` (§3.3):

1. reject its projected pseudo-Fisher vector ``h_j`` from the dissimilar components (``|cos| < 0.5``) and
   recover it in parameter space with FPC (``μ = 4e-5``, one inner iteration: App. F) —
   :func:`npeff_lens.recovery.recover`;
2. perturb ``θ ± ε ĥ`` with ``ĥ`` the recovered vector at unit L2 norm over *all* selected parameters, so
   ``‖ε ĥ‖₂ = magnitude`` (20 for SmolLM2-135M/SST2, 30 for BERT/SNLI);
3. per example, ``KL(p_perturbed ‖ p_original)`` over the task's outcome set, on the component's top
   examples (16, by coefficient) and on random baseline examples (1,000, disjoint from the top ones);
4. KL ratio = mean KL(top) / mean KL(baseline) for each sign; ``h h^T`` does not know the sign of ``h``, so
   both signs are tried and the larger ratio is reported;
5. the PEF-norm ratio, mean ``‖F(x)‖_F`` over the same two groups: a KL ratio far above it means the top
   examples are not merely more sensitive to every perturbation;
6. geometric means of both ratios across components (Table 3).

Building blocks (usable on any adapter + task): :func:`perturbed` (a context manager that sets
``θ + δ`` from saved copies and restores them bit-exactly), :func:`task_log_probs`, :func:`kl_divergence`,
:func:`perturbation_kl`, :func:`kl_ratios`, :func:`perturb_component`, :func:`summarize`. End to end:
:func:`run_perturbation` (decomposition directory → per-component table), and ``npeff perturb``
(:func:`register_cli`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "NonFiniteLogitsError",
    "unit_direction",
    "perturbed",
    "task_log_probs",
    "kl_divergence",
    "perturbation_kl",
    "kl_ratios",
    "geometric_mean",
    "perturb_component",
    "summarize",
    "baseline_examples",
    "run_perturbation",
    "register_cli",
]

logger = logging.getLogger(__name__)

#: Table columns, in order (CSV header and CLI table).
COLUMNS = (
    "component",
    "status",
    "sign",
    "kl_ratio",
    "kl_ratio_plus",
    "kl_ratio_minus",
    "kl_top_plus",
    "kl_top_minus",
    "kl_base_plus",
    "kl_base_minus",
    "pef_norm_top",
    "pef_norm_base",
    "pef_norm_ratio",
    "n_top",
    "n_base",
    "recovery_norm",
    "recovery_relative_residual",
    "recovery_n_iter",
    "recovery_n_rejected",
    "recovery_nonzero_fraction",
)


class NonFiniteLogitsError(ValueError):
    """The perturbed model produced NaN/inf log-probabilities (the magnitude is too large)."""


# --------------------------------------------------------------------------------------------------
# Parameters: direction → δ, and a perturbation that always restores θ exactly.
# --------------------------------------------------------------------------------------------------


def _direction_norm(direction: Mapping[str, torch.Tensor]) -> float:
    sq = sum(float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2 for t in direction.values())
    return math.sqrt(sq)


def unit_direction(direction: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` scaled to unit L2 norm over the whole flat vector (all tensors together)."""
    if not direction:
        raise ValueError("the direction names no parameters")
    norm = _direction_norm(direction)
    if not math.isfinite(norm):
        raise ValueError("the direction contains NaN or inf")
    if norm == 0.0:
        raise ValueError("the direction is zero; there is nothing to perturb along")
    return {k: v.detach() / norm for k, v in direction.items()}


def _resolve_parameters(adapter, names) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by the (canonical) names the layout uses."""
    params = dict(adapter._all_named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"the model has no parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"(its names look like {list(params)[:4]}); was the decomposition made with another model or backend?"
        )
    return {n: params[n] for n in names}


@contextmanager
def perturbed(adapter, delta: Mapping[str, torch.Tensor]):
    """Within the block, the named parameters hold ``θ + δ``; afterwards (exception or not) they hold
    their original values bit for bit.

    ``θ + δ`` is computed from a saved copy of ``θ`` (in at least fp32, then cast to the parameter's
    dtype) and restoring copies the saved values back: no add-then-subtract drift.
    """
    params = _resolve_parameters(adapter, list(delta))
    for name, p in params.items():
        if tuple(delta[name].shape) != tuple(p.shape):
            raise ValueError(
                f"perturbation for {name!r} has shape {list(delta[name].shape)}, parameter has {list(p.shape)}"
            )
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                work = torch.promote_types(p.dtype, torch.float32)
                p.copy_((saved[name].to(work) + delta[name].to(p.device, work)).to(p.dtype))
        yield adapter
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


# --------------------------------------------------------------------------------------------------
# p(y|x) and KL.
# --------------------------------------------------------------------------------------------------


def _batches(adapter, prompts_or_batches, batch_size: int):
    items = list(prompts_or_batches)
    if items and isinstance(items[0], Mapping):  # already tokenised batches
        yield from items
        return
    for start in range(0, len(items), batch_size):
        yield adapter.tokenize(items[start : start + batch_size])


@torch.no_grad()
def task_log_probs(adapter, task, prompts_or_batches, *, batch_size: int = 32) -> torch.Tensor:
    """``[n, outcomes]`` log p(y|x) (fp32, CPU) of the task's outcome set, without gradients.

    ``prompts_or_batches``: formatted prompts (``task.prompts(texts)``) or tokenised batches.
    """
    parts = [
        task.log_probs(adapter, batch).detach().float().cpu()
        for batch in _batches(adapter, prompts_or_batches, batch_size)
    ]
    if not parts:
        raise ValueError("no prompts to evaluate")
    return torch.cat(parts)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y))`` in fp64: ``[n, outcomes]`` × 2 → ``[n]``.

    Outcomes with ``p(y) = 0`` contribute 0 (also where ``q(y) = 0``)."""
    if log_p.shape != log_q.shape:
        raise ValueError(f"log-prob shapes differ: {list(log_p.shape)} vs {list(log_q.shape)}")
    lp, lq = log_p.double(), log_q.double()
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)  # ≥ 0 exactly; rounding can dip below at tiny KL


def _check_finite(log_probs: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(log_probs).all()):
        raise NonFiniteLogitsError(what)


def perturbation_kl(
    adapter,
    task,
    prompts_or_batches,
    direction: Mapping[str, torch.Tensor],
    magnitude: float,
    *,
    signs: Sequence[int] = (1, -1),
    reference: torch.Tensor | None = None,
    batch_size: int = 32,
    normalize: bool = True,
) -> dict[int, torch.Tensor]:
    """Per-example ``KL(p_{θ+sε ĥ} ‖ p_θ)`` for each sign ``s``: ``{s: [n]}`` (fp64).

    ``ĥ`` is ``direction`` at unit norm over all its tensors (``normalize=False`` uses it as is), so the
    perturbation has L2 norm ``magnitude``. ``reference``: the unperturbed ``[n, outcomes]`` log-probs if
    already computed. Raises :class:`NonFiniteLogitsError` when the perturbed model's outputs are not finite.
    """
    if not math.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"magnitude must be finite and non-negative, got {magnitude}")
    if any(s not in (1, -1) for s in signs):
        raise ValueError(f"signs must be +1 / -1, got {list(signs)}")
    items = list(prompts_or_batches)
    unit = unit_direction(direction) if normalize else {k: v.detach() for k, v in direction.items()}
    if reference is None:
        reference = task_log_probs(adapter, task, items, batch_size=batch_size)
    _check_finite(reference, "the unperturbed model produced non-finite log-probabilities")
    out = {}
    for s in signs:
        delta = {k: v * (s * magnitude) for k, v in unit.items()}
        with perturbed(adapter, delta):
            lp = task_log_probs(adapter, task, items, batch_size=batch_size)
        if lp.shape != reference.shape:
            raise ValueError(f"reference log-probs have shape {list(reference.shape)}, perturbed {list(lp.shape)}")
        _check_finite(
            lp,
            f"perturbing with magnitude {magnitude:g} (sign {'+' if s > 0 else '-'}) gave non-finite "
            "log-probabilities; use a smaller magnitude",
        )
        out[s] = kl_divergence(lp, reference)
    return out


# --------------------------------------------------------------------------------------------------
# Ratios (§3.3) and their aggregation (Table 3).
# --------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0.0:
        return math.nan if num == 0.0 else math.inf
    return num / den


def _mean(x) -> float:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    return float(x.mean()) if x.numel() else math.nan


def kl_ratios(kl_top_plus, kl_top_minus, kl_base_plus, kl_base_minus) -> dict[str, Any]:
    """Means, per-sign KL ratios ``mean(top)/mean(base)``, and the larger one with its sign (§3.3).

    Inputs: per-example KL values (tensors or sequences). A ratio with a zero baseline mean is ``inf``
    (``nan`` if the top mean is also 0); ``sign`` is ``"+"``, ``"-"`` or ``None`` when both ratios are nan.
    """
    rec = {
        "kl_top_plus": _mean(kl_top_plus),
        "kl_top_minus": _mean(kl_top_minus),
        "kl_base_plus": _mean(kl_base_plus),
        "kl_base_minus": _mean(kl_base_minus),
    }
    plus = _ratio(rec["kl_top_plus"], rec["kl_base_plus"])
    minus = _ratio(rec["kl_top_minus"], rec["kl_base_minus"])
    rec["kl_ratio_plus"], rec["kl_ratio_minus"] = plus, minus
    if math.isnan(plus) and math.isnan(minus):
        rec["sign"], rec["kl_ratio"] = None, math.nan
    elif math.isnan(minus) or (not math.isnan(plus) and plus >= minus):
        rec["sign"], rec["kl_ratio"] = "+", plus
    else:
        rec["sign"], rec["kl_ratio"] = "-", minus
    return rec


def geometric_mean(values) -> float:
    """``exp(mean(log v))`` over the non-nan values (``nan`` if none; ``0`` if one is 0; ``inf`` if one is
    inf; ``nan`` if both occur). Negative values raise."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan
    if any(v < 0 for v in vals):
        raise ValueError(f"geometric mean of negative values: {[v for v in vals if v < 0][:5]}")
    has_zero, has_inf = any(v == 0 for v in vals), any(math.isinf(v) for v in vals)
    if has_zero and has_inf:
        return math.nan
    if has_zero:
        return 0.0
    if has_inf:
        return math.inf
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Geometric means across components of the KL ratio and the PEF-norm ratio (Table 3), plus medians.

    Components without a ratio (dead, or nan) are left out and counted in ``n_left_out``."""
    done = [r for r in records if r.get("status", "ok") == "ok"]
    kl = [r["kl_ratio"] for r in done]
    pn = [r.get("pef_norm_ratio", math.nan) for r in done]
    finite_kl = sorted(v for v in kl if not math.isnan(v))
    n_plus = sum(r.get("sign") == "+" for r in done)
    return {
        "n_components": len(records),
        "n_evaluated": len(finite_kl),
        "n_left_out": len(records) - len(finite_kl),
        "kl_ratio_geomean": geometric_mean(kl),
        "pef_norm_ratio_geomean": geometric_mean(pn),
        "kl_ratio_median": finite_kl[len(finite_kl) // 2] if finite_kl else math.nan,
        "fraction_kl_ratio_above_1": (sum(v > 1 for v in finite_kl) / len(finite_kl)) if finite_kl else math.nan,
        "n_sign_plus": n_plus,
        "n_sign_minus": sum(r.get("sign") == "-" for r in done),
    }


# --------------------------------------------------------------------------------------------------
# One component.
# --------------------------------------------------------------------------------------------------


class _Reference:
    """Unperturbed log-probs of prompts by index, computed on first use (θ must be unperturbed then)."""

    def __init__(self, adapter, task, prompts, batch_size):
        self.adapter, self.task, self.prompts, self.batch_size = adapter, task, prompts, batch_size
        self.rows: dict[int, torch.Tensor] = {}

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        todo = sorted({i for i in indices if i not in self.rows})
        if todo:
            lp = task_log_probs(self.adapter, self.task, [self.prompts[i] for i in todo], batch_size=self.batch_size)
            _check_finite(lp, "the unperturbed model produced non-finite log-probabilities")
            self.rows.update(zip(todo, lp))
        return torch.stack([self.rows[i] for i in indices])


def perturb_component(
    adapter,
    task,
    prompts: Sequence[str],
    direction: Mapping[str, torch.Tensor],
    magnitude: float,
    *,
    top: Sequence[int],
    baseline: Sequence[int],
    pef_norms=None,
    reference: torch.Tensor | _Reference | None = None,
    batch_size: int = 32,
    component: int | None = None,
) -> dict[str, Any]:
    """KL ratios of one direction on its top examples vs a baseline set (§3.3): a record with
    ``sign, kl_ratio, kl_ratio_plus/minus, kl_top_plus/minus, kl_base_plus/minus`` (means), ``pef_norm_top,
    pef_norm_base, pef_norm_ratio`` (when ``pef_norms`` ``[len(prompts)]`` is given), ``n_top, n_base``.

    ``prompts``: all formatted prompts; ``top`` / ``baseline`` index into them. ``direction``: the
    parameter-space pseudo-Fisher vector (any norm: it is scaled to ``magnitude``).
    ``reference``: unperturbed log-probs ``[len(prompts), outcomes]`` (or a cache), if already known.
    """
    top, baseline = [int(i) for i in top], [int(i) for i in baseline]
    if not top or not baseline:
        raise ValueError(f"need top and baseline examples (got {len(top)} and {len(baseline)})")
    overlap = set(top) & set(baseline)
    if overlap:
        raise ValueError(f"baseline examples must be disjoint from the top examples; shared: {sorted(overlap)[:5]}")
    idx = top + baseline
    if isinstance(reference, _Reference):
        ref = reference.get(idx)
    elif reference is not None:
        ref = torch.as_tensor(reference)[idx]
    else:
        ref = _Reference(adapter, task, prompts, batch_size).get(idx)
    try:
        kl = perturbation_kl(
            adapter, task, [prompts[i] for i in idx], direction, magnitude, reference=ref, batch_size=batch_size
        )
    except NonFiniteLogitsError as e:
        where = f"component {component}: " if component is not None else ""
        raise NonFiniteLogitsError(f"{where}{e}") from None
    k = len(top)
    rec: dict[str, Any] = {"component": component, "status": "ok"}
    rec.update(kl_ratios(kl[1][:k], kl[-1][:k], kl[1][k:], kl[-1][k:]))
    if pef_norms is not None:
        norms = torch.as_tensor(pef_norms, dtype=torch.float64)
        rec["pef_norm_top"], rec["pef_norm_base"] = _mean(norms[top]), _mean(norms[baseline])
        rec["pef_norm_ratio"] = _ratio(rec["pef_norm_top"], rec["pef_norm_base"])
    else:
        rec["pef_norm_top"] = rec["pef_norm_base"] = rec["pef_norm_ratio"] = math.nan
    rec["n_top"], rec["n_base"] = k, len(baseline)
    return rec


def baseline_examples(m: int, n_baseline: int, exclude: Sequence[int], *, seed: int = 0) -> list[int]:
    """Up to ``n_baseline`` example indices in ``[0, m)`` drawn at random (seeded) outside ``exclude``.

    The same seed gives the same random order for every component; each component's top examples are
    skipped, so the baseline sets of different components share almost all their examples."""
    gen = torch.Generator().manual_seed(int(seed))
    skip = set(int(i) for i in exclude)
    out = []
    for i in torch.randperm(m, generator=gen).tolist():
        if i not in skip:
            out.append(i)
            if len(out) == n_baseline:
                break
    return out


# --------------------------------------------------------------------------------------------------
# End to end: a decomposition directory → per-component table.
# --------------------------------------------------------------------------------------------------


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _open_store(decomposition_dir: Path, store):
    if store is None:
        src = decomposition_dir / "source.json"
        if not src.exists():
            raise FileNotFoundError(
                f"{decomposition_dir} has no source.json naming its PEF store; pass store=PATH (--store PATH)"
            )
        store = json.loads(src.read_text()).get("store")
        if not store:
            raise ValueError(f"{src} does not name a store")
    if isinstance(store, (str, os.PathLike)):
        if not Path(store).exists():
            raise FileNotFoundError(f"PEF store {store} does not exist; pass store=PATH (--store PATH)")
        try:
            from npeff_lens.store import PEFStore
        except ImportError as e:  # pragma: no cover - the store module lands separately
            raise ImportError("npeff_lens.store.PEFStore is needed to open a PEF store") from e
        store = PEFStore(store)
    for attr in ("metadata", "manifest"):
        if getattr(store, attr, None) is None:
            raise ValueError(f"the PEF store has no {attr}")
    return store


def _column(metadata, name: str):
    try:
        names = metadata.column_names
    except AttributeError:
        names = list(metadata.keys()) if isinstance(metadata, Mapping) else []
    return list(metadata[name]) if name in names else None


def _check_manifests(decomp_manifest: Mapping, store_manifest: Mapping) -> None:
    for key in ("projection", "layout"):
        if key not in decomp_manifest:
            raise ValueError(f"the decomposition's manifest records no {key!r}; was it fitted on a PEF store?")
        a, b = _jsonable(decomp_manifest.get(key)), _jsonable(store_manifest.get(key))
        if a != b:
            raise ValueError(
                f"the PEF store's {key} does not match the decomposition's ({_short(b)} != {_short(a)}): "
                "the components live in another space; is this the store the decomposition was fitted on?"
            )


def _short(x, n: int = 160) -> str:
    s = json.dumps(x, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _check_adapter(adapter, layout) -> None:
    params = dict(adapter._all_named_parameters())
    missing = [e["name"] for e in layout if e["name"] not in params]
    if missing:
        raise ValueError(
            f"the model lacks {len(missing)} parameter(s) of the store's layout, e.g. {missing[:3]} "
            f"(its names look like {list(params)[:3]}); load it with the backend the PEFs were collected with"
        )
    for e in layout:
        if list(params[e["name"]].shape) != list(e["shape"]):
            raise ValueError(
                f"parameter {e['name']!r} has shape {list(params[e['name']].shape)} in the model but "
                f"{list(e['shape'])} in the store's layout"
            )


def _component_list(components, n_comp: int) -> list[int]:
    if isinstance(components, bool):
        raise ValueError(f"components must be a count or a list of indices, got {components!r}")
    if isinstance(components, int):
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        if components > n_comp:
            logger.info("asked for the first %d components; the decomposition has %d", components, n_comp)
        return list(range(min(components, n_comp)))
    idx = [int(i) for i in components]
    bad = [i for i in idx if not 0 <= i < n_comp]
    if bad:
        raise ValueError(f"component index {bad[0]} out of range: the decomposition has {n_comp} components")
    if not idx:
        raise ValueError("no components to perturb")
    return idx


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _write_table(out: Path, records, summary, config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "perturbation.json.tmp"
    tmp.write_text(json.dumps({"config": config, "summary": summary, "components": records}, indent=1, default=str))
    os.replace(tmp, out / "perturbation.json")
    tmp = out / "perturbation.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in COLUMNS})
    os.replace(tmp, out / "perturbation.csv")


def run_perturbation(
    decomposition_dir: str | os.PathLike,
    components: int | Sequence[int] = 32,
    *,
    magnitude: float = 20.0,
    top_k: int = 16,
    n_baseline: int = 1000,
    store=None,
    out: str | os.PathLike | None = None,
    backend: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    recover_kwargs: Mapping[str, Any] | None = None,
    recovery: str = "fpc",
    batch_size: int = 32,
    adapter=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perturbation experiment of §3.3 on a saved decomposition; returns the summary (with ``records``).

    Args:
        decomposition_dir: written by ``npeff decompose`` (``config.json``, ``npeff.safetensors``,
            ``source.json`` naming the PEF store).
        components: the first N components, or a list of indices.
        magnitude: L2 norm of the perturbation over all selected parameters (App. F / §3.3: 20 for
            SmolLM2-135M on SST2, 30 for BERT on SNLI).
        top_k: top examples per component, by coefficient (only positive coefficients count).
        n_baseline: random baseline examples, disjoint from the top ones (fewer if the store is smaller:
            the summary's ``baseline_note`` says so).
        store: PEF store path (or an object with ``metadata`` and ``manifest``); default: ``source.json``.
        out: directory for ``perturbation.csv`` / ``perturbation.json`` (rewritten after each component;
            a rerun with the same settings resumes after the components already there).
        backend: model backend; default the one the store's manifest records (else ``"hf"``).
        recover_kwargs: passed to :func:`npeff_lens.recovery.recover` (``mu``, ``reject_threshold``,
            ``inner_iterations``, ...); the defaults are App. F's.
        adapter: an already loaded adapter of the manifest's model (skips ``load_model``).
        recovery: ``"fpc"`` (App. F: compressed sensing, a sparse vector) or ``"adjoint"`` (the
            back-projection ``A h`` of the rejected component: for it ``δᵀF_iδ = ‖G_i A h‖²`` up to the
            scale, i.e. exactly the projected PEF's loading that NPEFF fitted; dense, and cheap).
    """
    if recovery not in ("fpc", "adjoint"):
        raise ValueError(f"recovery must be 'fpc' or 'adjoint', got {recovery!r}")
    from npeff_lens.analysis import top_examples
    from npeff_lens.decomposition import NPEFF
    from npeff_lens.recovery import (
        estimate_lambda_max,
        projection_from_config,
        recover,
        reject,
        unflatten,
        validate_layout,
    )
    from npeff_lens.tasks import task_from_config

    if not math.isfinite(magnitude) or magnitude <= 0:
        raise ValueError(f"magnitude must be positive and finite, got {magnitude}")
    if top_k < 1 or n_baseline < 1:
        raise ValueError(f"top_k and n_baseline must be >= 1 (got {top_k}, {n_baseline})")
    decomposition_dir = Path(decomposition_dir)
    est = NPEFF.load(decomposition_dir)
    coeffs = torch.as_tensor(est.coefficients_).double().cpu()
    comps = torch.as_tensor(est.components_).float()
    m, n_comp = coeffs.shape
    indices = _component_list(components, n_comp)

    store_obj = _open_store(decomposition_dir, store)
    manifest = dict(est.manifest_ or {})
    _check_manifests(manifest, store_obj.manifest)
    layout = manifest["layout"]
    n_params = validate_layout(layout)
    metadata = store_obj.metadata
    texts = _column(metadata, "text")
    if texts is None:
        raise ValueError("the store's metadata has no 'text' column")
    if len(texts) != m:
        raise ValueError(f"the store holds {len(texts)} examples but the decomposition's coefficients cover {m}")
    pef_norms = _column(metadata, "pef_norm")
    if pef_norms is None and getattr(est, "pef_norms_", None) is not None:
        pef_norms = est.pef_norms_  # ‖G^T G‖_F as the fit measured it
    pef_norms = (
        None
        if pef_norms is None
        else torch.as_tensor([math.nan if v is None else v for v in list(pef_norms)], dtype=torch.float64)
    )

    model_cfg = manifest.get("model") or {}
    if "task" not in manifest:
        raise ValueError("the decomposition's manifest records no task")
    if adapter is None:
        from npeff_lens.models import load_model

        if not model_cfg.get("name"):
            raise ValueError("the decomposition's manifest records no model name")
        adapter = load_model(model_cfg["name"], backend=backend or model_cfg.get("backend") or "hf", device=device)
    adapter.eval()
    _check_adapter(adapter, layout)
    task = task_from_config(manifest["task"]).bind(adapter)
    prompts = task.prompts(texts)

    # Recovery setup: one projection and one λ_max estimate shared by all components.
    rkw = dict(recover_kwargs or {})
    proj_cfg = manifest.get("projection")
    if proj_cfg is not None:
        op = projection_from_config(proj_cfg)
        if op.n_in != n_params:
            raise ValueError(f"projection n_in={op.n_in} but the layout covers {n_params} parameters")
        if op.n_out != comps.shape[1]:
            raise ValueError(f"projection n_out={op.n_out} but the components have {comps.shape[1]} dims")
        power_iterations = rkw.pop("power_iterations", 30)
        safety = rkw.pop("lambda_safety", 1.1)
        lambda_max = rkw.pop("lambda_max", None)
        if lambda_max is None and recovery == "fpc":
            lambda_max = estimate_lambda_max(op, n_iter=power_iterations) * safety  # an estimate is from below
    elif comps.shape[1] != n_params:
        raise ValueError(
            f"no projection recorded, yet the components have {comps.shape[1]} dims for {n_params} parameters"
        )
    threshold = rkw.get("reject_threshold", 0.5)

    config = _jsonable(
        {
            "decomposition": str(decomposition_dir.resolve()),
            "components": indices,
            "magnitude": magnitude,
            "top_k": top_k,
            "n_baseline": n_baseline,
            "seed": seed,
            "recover_kwargs": dict(recover_kwargs or {}),
            "model": model_cfg,
            "task": manifest["task"],
            "n_examples": m,
            "recovery": recovery,
        }
    )
    records: dict[int, dict] = {}
    out_path = Path(out) if out is not None else None
    if out_path is not None and (out_path / "perturbation.json").exists():
        try:
            prev = json.loads((out_path / "perturbation.json").read_text())
        except json.JSONDecodeError:
            prev = {}
        if prev.get("config") == {**config, "components": prev.get("config", {}).get("components")}:
            records = {int(r["component"]): r for r in prev.get("components", []) if int(r["component"]) in indices}
            if records:
                logger.info("resuming: %d of %d components already in %s", len(records), len(indices), out_path)

    top = top_examples(coeffs, k=top_k)
    reference = _Reference(adapter, task, prompts, batch_size)
    notes = []
    iterator = indices
    bar = None
    if progress:
        from tqdm.auto import tqdm

        iterator = bar = tqdm(indices, desc="perturbing components", unit="component")
    for j in iterator:
        if j in records:
            continue
        top_j = [int(i) for i in top[j].tolist() if coeffs[i, j] > 0]
        if not top_j:
            records[j] = {
                "component": j,
                "status": "dead",
                "sign": None,
                "kl_ratio": math.nan,
                "pef_norm_ratio": math.nan,
                "n_top": 0,
                "n_base": 0,
            }
            continue
        base_j = baseline_examples(m, n_baseline, top_j, seed=seed)
        if not base_j:
            raise ValueError(f"no baseline examples left: the store holds {m} examples, all among the top {top_k}")
        if len(top_j) < top_k:
            notes.append(f"component {j}: only {len(top_j)} examples with a positive coefficient (top_k={top_k})")
        # §3.3 + App. F: reject h_j from the dissimilar components, recover it in parameter space.
        if threshold is not None:
            _, rejected = reject(comps, j, threshold, return_indices=True)
        else:
            rejected = []
        if proj_cfg is not None and recovery == "adjoint":
            b = reject(comps, j, threshold) if threshold is not None else comps[j]
            flat = op.adjoint(b.float())
            rel_res, last = float("nan"), {}
        elif proj_cfg is not None:
            last: dict = {}
            kw = rkw if "callback" in rkw else {**rkw, "callback": last.update}  # FPC's per-iteration info
            flat = recover(comps, j, projection=op, flat=True, lambda_max=lambda_max, **kw)[j]
            b = reject(comps, j, threshold) if threshold is not None else comps[j]
            rel_res = float((op.project(flat) - b.float()).norm() / b.float().norm().clamp_min(1e-30))
        else:  # unprojected PEFs: the components already live in parameter space
            flat = reject(comps, j, threshold) if threshold is not None else comps[j].clone()
            rel_res, last = 0.0, {}
        flat = flat.float()
        norm = float(flat.norm())
        stats = {
            "recovery_norm": norm,
            "recovery_relative_residual": rel_res,
            "recovery_n_iter": last.get("iteration"),
            "recovery_n_rejected": len(rejected),
            "recovery_nonzero_fraction": float((flat != 0).double().mean()),
        }
        if norm == 0.0 or not math.isfinite(norm):
            raise ValueError(
                f"component {j}: the recovered pseudo-Fisher vector has norm {norm}; cannot perturb along it"
            )
        direction = unflatten(flat, layout)
        rec = perturb_component(
            adapter,
            task,
            prompts,
            direction,
            magnitude,
            top=top_j,
            baseline=base_j,
            pef_norms=pef_norms,
            reference=reference,
            batch_size=batch_size,
            component=j,
        )
        rec.update(stats)
        records[j] = rec
        if bar is not None:
            bar.set_postfix(kl_ratio=_fmt(rec["kl_ratio"]))
        if out_path is not None:
            ordered = [records[i] for i in indices if i in records]
            _write_table(out_path, _jsonable(ordered), _jsonable(summarize(ordered)), config)

    ordered = [records[i] for i in indices]
    summary = summarize(ordered)
    short = [r["n_base"] for r in ordered if r.get("status") == "ok" and r["n_base"] < n_baseline]
    if short:
        notes.append(
            f"the store holds {m} examples: {len(short)} baseline set(s) have only {min(short)} to "
            f"{max(short)} examples (asked for {n_baseline})"
        )
        warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
    summary.update({"magnitude": magnitude, "top_k": top_k, "n_baseline": n_baseline, "notes": notes})
    if out_path is not None:
        _write_table(out_path, _jsonable(ordered), _jsonable(summary), config)
    summary["records"] = ordered
    return summary


# --------------------------------------------------------------------------------------------------
# CLI: npeff perturb.
# --------------------------------------------------------------------------------------------------


def _parse_components(value: str):
    value = value.strip()
    if "," in value or "-" in value[1:]:
        out = []
        for part in value.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        return out
    return int(value)


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-component table and the geometric means, as printed by ``npeff perturb``."""
    cols = (
        "component",
        "sign",
        "kl_ratio",
        "kl_ratio_plus",
        "kl_ratio_minus",
        "kl_top_plus",
        "kl_base_plus",
        "pef_norm_ratio",
        "n_top",
        "n_base",
    )
    rows = [[_fmt(r.get(c)) for c in cols] for r in summary["records"]]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    lines.append(
        f"geometric mean over {summary['n_evaluated']} components: KL ratio {_fmt(summary['kl_ratio_geomean'])}, "
        f"PEF-norm ratio {_fmt(summary['pef_norm_ratio_geomean'])} (magnitude {summary.get('magnitude')})"
    )
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


def _cmd_perturb(args) -> None:
    rkw = {}
    if args.mu is not None:
        rkw["mu"] = args.mu
    if args.reject_threshold is not None:
        rkw["reject_threshold"] = None if args.reject_threshold < 0 else args.reject_threshold
    summary = run_perturbation(
        args.decomposition,
        _parse_components(args.components),
        magnitude=args.magnitude,
        top_k=args.top_k,
        n_baseline=args.n_baseline,
        store=args.store,
        out=args.out,
        backend=args.backend,
        device=args.device,
        seed=args.seed,
        recover_kwargs=rkw or None,
        recovery=args.recovery,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(format_table(summary))
    if args.out:
        print(f"wrote {Path(args.out) / 'perturbation.csv'} and perturbation.json")


def register_cli(subparsers) -> None:
    """Add ``npeff perturb`` to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "perturb",
        help="perturb the model along recovered pseudo-Fisher vectors; KL ratios (§3.3)",
        description="Recover components in parameter space (FPC, App. F), perturb θ ± magnitude·ĥ and compare "
        "KL(p_perturbed‖p) on each component's top examples with random baseline examples.",
    )
    p.add_argument("decomposition", metavar="DECOMP_DIR", help="directory written by `npeff decompose`")
    p.add_argument("--components", default="32", help="first N components (an int), or indices '0,3,7-9'")
    p.add_argument(
        "--magnitude", type=float, default=20.0, help="L2 norm of the perturbation (paper: 20 SST2, 30 SNLI)"
    )
    p.add_argument("--top-k", type=int, default=16, help="top examples per component")
    p.add_argument("--n-baseline", type=int, default=1000, help="random baseline examples")
    p.add_argument("--out", default=None, help="directory for perturbation.csv / perturbation.json")
    p.add_argument("--store", default=None, help="PEF store (default: the one named in DECOMP_DIR/source.json)")
    p.add_argument("--backend", default=None, help="model backend (default: the store's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the baseline examples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mu", type=float, default=None, help="FPC μ (default 4e-5, App. F)")
    p.add_argument(
        "--reject-threshold",
        type=float,
        default=None,
        help="reject from components with |cos| below this (default 0.5; negative: no rejection)",
    )
    p.add_argument(
        "--recovery",
        default="fpc",
        choices=["fpc", "adjoint"],
        help="parameter-space direction: FPC compressed sensing (App. F) or the back-projection A·h",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_perturb)
