"""Locating a run's components in the model (``npeff top --where``), with the answer kept in the run directory.

:func:`locate` computes where each component of a decomposition lives (with :mod:`npeff_lens.locations`) and
writes it to ``DECOMPOSITION_DIR/locations.json``. :func:`location_lines` formats one component's location as
``npeff top --where`` prints it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from . import rundir
from .io import progress, read_json, to_jsonable, write_json
from .layout import validate_layout
from .locations import GradientSpan, component_locations, located_selectivity, location_words, top_group_keys
from .models import head_counts, load_model
from .perturb import Reference
from .projection import projection_from_config
from .recovery import recover_direction
from .rundir import load_run
from .selectivity import top_positive
from .sensing import estimate_lambda_max
from .tasks import task_from_config

__all__ = ["locate", "location_lines", "LOCATIONS_FILE", "LOCATE_METHODS"]

LOCATIONS_FILE = "locations.json"
LOCATE_METHODS = ("span", "recovered")


def locate(
    decomposition_dir,
    *,
    method: str = "span",
    k: int = 16,
    recovery: str = "adjoint",
    reject_threshold: float | None = 0.5,
    causal: bool = False,
    causal_direction: str = "recovered",
    target_kl: float = 0.01,
    n_baseline: int = 32,
    seed: int = 0,
    adapter=None,
    store=None,
    batch_size: int = 8,
    progress_bar: bool = True,
    **solver_options,
) -> dict:
    """Find where each component of a decomposition lives in the model, and keep the answer in the run.

    A component's location is how its parameter-space direction's energy splits over (layer, module) groups,
    attention heads and MLP neurons (:mod:`npeff_lens.locations`). It is written to
    ``DECOMPOSITION_DIR/locations.json``, which a rerun with the same settings on the same fit reads back.

    Args:
        decomposition_dir: the decomposition's directory.
        method: ``"span"`` (the default) rebuilds the direction from the exact gradients of the component's top
            ``k`` examples (:class:`~npeff_lens.locations.GradientSpan`: a few backward passes per component;
            its ``fit`` says how much of the component their span reproduces). ``"recovered"`` recovers it from
            the projected numbers alone, as ``npeff perturb`` does (``recovery``, rejection at
            ``reject_threshold``); under the sparse projection that direction spreads over the parameters by
            their size, so its location is at chance (``benchmarks/README.md``).
        recovery: the recovery method of recovered directions (:data:`~npeff_lens.recovery.RECOVERY_METHODS`).
        causal: also test whether each location is causal (:func:`~npeff_lens.locations.located_selectivity`):
            the direction perturbed whole, on its top 5 % of groups only, and on random groups of the same
            parameter count, each sized to move ``n_baseline`` random examples by ``target_kl`` nats, measured
            on the component's next ``k`` examples (ranks k+1 to 2k). Stored as each component's ``causal``.
        causal_direction: what the causal test perturbs: ``"recovered"`` (as ``npeff perturb`` does) or
            ``"span"`` (the direction ``method="span"`` locates).
        seed: seeds the causal test's random choices.
        adapter: the run's model, already loaded (default: the model the store's manifest names, when needed);
            head counts come from its config.
        store: the PEF store (default: the one the run records).

    Returns:
        ``{"key": ..., "components": [...]}``: the settings' key and one record per component (its status and,
        when located, its groups and heads sorted by energy, its top MLP neurons and its causal test).

    Example:
        >>> from npeff_lens.runs import locate
        >>> where = locate("runs/movie/npeff", k=16)
        >>> where["components"][0]["groups"][:3]    # the (layer, module) groups with most of its energy
    """
    if causal_direction not in ("recovered", "span") or (causal_direction == "span" and method != "span"):
        raise ValueError(
            f"causal_direction must be 'recovered' or (with method='span') 'span', got {causal_direction!r}"
        )
    if method not in LOCATE_METHODS:
        raise ValueError(f"method must be one of {LOCATE_METHODS}, got {method!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    d = Path(decomposition_dir)
    saved = read_json(d / "config.json") if (d / "config.json").exists() else {}  # no store needed for a reread
    heads = _head_counts(adapter, saved.get("manifest") or {})
    fit_id = hashlib.sha256(repr((saved.get("params"), saved.get("fitted"))).encode()).hexdigest()[:16]
    key: dict[str, Any] = {"method": method, "heads": heads, "fit": fit_id}
    if method == "span":
        key["k"] = k
    else:
        key.update(recovery=recovery, reject_threshold=reject_threshold, **to_jsonable(solver_options))
    if causal:
        key["causal"] = {
            "direction": causal_direction,
            "k": k,
            "recovery": recovery,
            "reject_threshold": reject_threshold,
            "target_kl": target_kl,
            "n_baseline": n_baseline,
            "seed": seed,
        }
    path = d / LOCATIONS_FILE
    components = _stored(path, key)
    if components is not None and len(components) == int(saved.get("params", {}).get("n_components", -1)):
        return {"key": key, "components": components}
    est, store = load_run(d, store)
    where = _Locator(est, store, adapter, method, k, heads, batch_size, causal)
    where.recovery = {"method": recovery, "reject_threshold": reject_threshold, **solver_options}
    where.causal_options = {
        "target_kl": target_kl,
        "n_baseline": n_baseline,
        "seed": seed,
        "direction": causal_direction,
    }
    components = list(components or [])  # an interrupted run's components are kept
    todo = range(len(components), where.n_components)
    for j in progress(todo, desc="locating components", unit="component", enabled=progress_bar):
        components.append(where.component(j))
        write_json(path, {"key": key, "components": components})
    return {"key": key, "components": components}


def _stored(path: Path, key: dict) -> list | None:
    """The components ``path`` holds for ``key`` (all of them, or those an interrupted run finished), else None."""
    if not path.exists():
        return None
    try:
        stored = read_json(path)
    except ValueError:
        return None  # damaged: computed again
    return stored.get("components") if stored.get("key") == key else None


class _Locator:
    """What locating one component needs, loaded and checked once (:func:`locate`)."""

    def __init__(self, est, store, adapter, method: str, k: int, heads, batch_size: int, causal: bool):
        manifest = est.manifest_ or {}
        if not manifest.get("layout"):
            raise ValueError("the decomposition records no parameter layout: was it fitted on a PEF store?")
        self.layout, self.comps = manifest["layout"], torch.as_tensor(est.components_).float()
        validate_layout(self.layout)
        self.n_components = self.comps.shape[0]
        self.coeffs = torch.as_tensor(est.coefficients_)
        proj = manifest.get("projection")
        self.op = projection_from_config(proj) if proj is not None else None
        self.method, self.k, self.heads, self.causal = method, k, heads, causal
        self.recovery: dict = {"method": "adjoint", "reject_threshold": 0.5}
        self.causal_options: dict = {}
        self._lambda = None
        self.span = self.reference = None
        if method == "span" or causal:
            if adapter is None:
                model = manifest["model"]
                adapter = load_model(model["name"], backend=model.get("backend") or "hf")
            adapter.eval()
            self.adapter, self.task = adapter, task_from_config(manifest["task"]).bind(adapter)
            self.prompts = rundir.run_prompts(manifest, adapter, self.task, store.metadata["text"])
        if method == "span":
            max_length = (manifest.get("config") or {}).get("max_length")
            self.span = GradientSpan(
                adapter, self.task, self.layout, self.op, max_length=max_length, batch_size=batch_size
            )
        if causal:
            self.reference = Reference(self.adapter, self.task, self.prompts, 32)

    def recovered(self, j: int) -> torch.Tensor:
        """Component ``j``'s direction recovered from its projected numbers (``self.recovery``)."""
        options = dict(self.recovery)
        how = options.pop("method")
        if self._lambda is None and self.op is not None and how not in ("adjoint", "minnorm"):
            self._lambda = estimate_lambda_max(self.op)  # one estimate for all components
        flat, _ = recover_direction(self.comps, j, self.op, method=how, lambda_max=self._lambda, **options)
        return flat

    def component(self, j: int) -> dict[str, Any]:
        ranked = top_positive(self.coeffs, j, 2 * self.k)
        top = ranked[: self.k]
        entry: dict[str, Any] = {"component": j, "method": self.method}
        by_span = self.causal_options.get("direction") == "span"
        recovered = self.recovered(j) if self.method == "recovered" or (self.causal and not by_span) else None
        if self.method == "recovered":
            entry.update(component_locations(recovered, self.layout, self.heads))
        elif not top:
            entry.update(examples=[], status="dead", note="no example loads on this component: nothing to locate")
        else:
            got = self.span.direction(self.comps[j], [self.prompts[i] for i in top])
            entry.update(examples=top, fit=got.fit)
            if by_span:
                recovered = got.direction
            try:
                entry.update(component_locations(got.direction, self.layout, self.heads))
            except ValueError as e:  # the examples' rows are all zero (non-finite logits) or orthogonal to it
                entry.update(status="none", note=str(e))
        if self.causal and "groups" in entry:
            entry["causal"] = self._causal(j, entry, recovered, ranked[self.k :])
        return entry

    def _causal(self, j: int, entry: dict, recovered: torch.Tensor, measure: list[int]) -> dict[str, Any]:
        if not measure:
            return {"status": "excluded", "note": f"no active example beyond the top {self.k} to measure on"}
        opts = self.causal_options
        res = located_selectivity(
            self.adapter,
            self.task,
            self.prompts,
            self.layout,
            recovered.double(),
            top_group_keys(entry),
            measure,
            seed=opts.get("seed", 0) * 100_003 + j,
            target_kl=opts.get("target_kl", 0.01),
            n_baseline=opts.get("n_baseline", 32),
            reference=self.reference,
        )
        return {
            "status": "ok",
            "direction": self.causal_options.get("direction", "recovered"),
            "measured_on": measure,
            **res,
        }


def _head_counts(adapter, manifest: dict) -> dict | None:
    """``{"n_heads", "n_kv_heads"}`` from ``adapter``'s config, else from the configuration of the model the
    manifest names; None when neither gives them."""
    if adapter is None:
        name = (manifest.get("model") or {}).get("name")
        return head_counts(name) if name else None
    config = getattr(getattr(adapter, "model", None), "config", None)
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not n_heads:
        return None
    return {"n_heads": n_heads, "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads}


def location_lines(location: dict, projection: str | None = None, said: bool = False) -> tuple[list[str], bool]:
    """``(lines, at chance)``: a component's location as ``npeff top --where`` prints it (its top groups, attention
    heads and MLP neurons, and a caution when the location says little); ``said``: a location at chance was
    already explained in full above."""
    words = location_words(location, projection, said=said)  # the wording the report and `npeff explain` share
    return [f"  {what}: {text}" for what, text in words["lines"]], words["at_chance"]
