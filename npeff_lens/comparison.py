"""Comparing NPEFF with its baselines on the same examples (``npeff compare``).

:func:`compare` fits gradient clusters, TopK-SAE latents and SNMF features on a decomposition's examples and
scores every method by one set of metrics (and, with ``selectivity``, by one causal test). Each method resumes on
its own under ``DECOMPOSITION_DIR/compare/``. What a method does (its checks, resume key, fit, loading, timing and
directions) is its entry of :data:`npeff_lens.baselines.REGISTRY`. The comparison is §5 of the paper."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import selectivity as sel
from .analysis import active, active_threshold, degeneracy, method_summary, top_examples
from .baselines import REGISTRY, FitInputs, method
from .config import CompareConfig, check_same
from .formatting import fmt
from .io import progress, read_json, to_jsonable, write_json
from .layout import unflatten
from .models import load_model
from .perturb import Reference, check_adapter
from .projection import projection_from_config
from .recovery import recover_direction
from .rundir import RUN_FILE, begin, finish, label_columns, load_run, resolve_config, run_prompts, space_options
from .selectivity import ActivationDirection, ParameterDirection
from .sensing import estimate_lambda_max
from .tasks import task_from_config

__all__ = ["compare", "format_compare"]


def compare(decomposition_dir, config: CompareConfig | None = None, *, store=None, adapter=None, **options) -> dict:
    """Fit the baselines on a decomposition's examples and score them beside NPEFF by one set of metrics
    (``npeff compare``).

    The baselines are gradient clusters, TopK sparse autoencoders on activations and SNMF features
    (:mod:`npeff_lens.baselines`). Each method is fitted on the run's examples, then every method's components
    are scored the same way (:mod:`npeff_lens.analysis`): how many are alive, how many are tuned to a label, a
    prediction or a set of tokens, and how well they cover the examples. With ``selectivity=True`` each is also
    put to one causal test (:mod:`npeff_lens.selectivity`).

    Args:
        decomposition_dir: the NPEFF decomposition's directory.
        config: a :class:`~npeff_lens.config.CompareConfig`; or pass its fields as keyword ``options``
            (``methods``, ``components``, ``k``, ``selectivity``, ``sae_hook``, ...).
        store: the PEF store (default: the one the run records).
        adapter: the run's model, already loaded (default: loaded when a method needs it).

    Returns:
        What it writes to ``decomposition_dir/compare/compare.json``: per method, ``n_components``, ``alive``,
        ``tuned_label``, ``tuned_prediction``, ``tuned_tokens``, ``argmax_shared``, ``coverage``,
        ``fit_seconds`` and ``peak_rss_mib`` (the process's peak resident memory during the fit; None for NPEFF,
        whose fit is the run's own); with ``selectivity=True`` also ``selectivity`` (the geometric
        mean), ``selectivity_per_component``, ``target_kl`` and ``n_baseline``. It lists exactly the methods of
        this call (a method compared earlier and not named now is left out).

    Each method resumes on its own: a finished one is read back, and a different configuration is a
    ``ConfigMismatchError``. Each method's selectivity (``compare/<method>/selectivity/``) resumes the same
    way, component by component.

    Example:
        >>> import npeff_lens as nl
        >>> from npeff_lens.runs import format_compare
        >>> result = nl.compare("runs/movie/npeff", methods=("npeff", "grad-cluster"), selectivity=True)
        >>> print(format_compare(result))

    Notes:
        The baselines and their metrics are §5 of the paper (gradient clustering §5.1, SAEs §5.2).
    """
    cfg = resolve_config(CompareConfig, config, options)
    d = Path(decomposition_dir)
    est, store = load_run(d, store)
    root = d / "compare"
    results = {"config": cfg.key(), "methods": {}}  # exactly this call's methods; each resumes from its folder
    context = _CompareContext(d, est, store, cfg, adapter)
    # each method's checks (a wrong hook, the user's SAE) stop the comparison before anything is written
    given = {name: method(name).prepare(context) for name in cfg.methods if method(name).prepare is not None}
    for name in cfg.methods:
        m, mdir = method(name), root / name
        key = m.resume_key(context, given.get(name))
        rec = begin(
            mdir, f"compare-{name}", _MethodKey(key, resolved=m.resolved, older=m.older_key), context.identity(), d
        )
        if rec["status"] == "done":  # fitted before: read back; the metrics are recomputed (k may differ)
            fitted = m.restore(context, mdir)
        else:
            _reset_peak_rss()
            t0 = time.time()
            fitted = m.fitted(context, mdir, given.get(name))
            # the run's own decomposition is read, not fitted: its memory was not measured here
            rss = _peak_rss_mib() if m.fit is not None else None
            rec.update(fit_seconds=m.seconds(context, time.time() - t0), peak_rss_mib=rss)
            finish(mdir, rec)
        summary = context.summarize(name, fitted)
        summary.update(fit_seconds=rec.get("fit_seconds"), peak_rss_mib=rec.get("peak_rss_mib"))
        if cfg.selectivity:
            summary.update(context.selectivity(name, mdir, fitted))
        results["methods"][name] = to_jsonable({**summary, "config": key})
        write_json(root / "compare.json", results)
    return results


def selectivity_key(cfg: CompareConfig, name: str) -> dict:
    """The fields that change one method's selectivity (resumed per component under this key). Not
    ``selectivity_components``: each component's measurement does not depend on how many are measured, so a
    rerun that asks for more components measures only the new ones."""
    key = {k: getattr(cfg, k) for k in ("k", "target_kl", "n_baseline", "seed")}
    if method(name).space == "parameters":
        key.update(recovery=cfg.recovery, reject_threshold=cfg.reject_threshold)
    return key


@dataclass(frozen=True)
class _MethodKey:
    """One method's resume key, in the shape ``begin`` expects of a config."""

    fields: dict
    ignored: tuple = ()  # fields that older runs stored in the key and no longer change the result
    resolved: tuple = ()  # fields that older runs stored unresolved (None: the default this key resolves)
    older: dict = field(default_factory=dict)  # fields older runs did not store: the value they used

    def key(self) -> dict:
        return to_jsonable(self.fields)

    def check_resume(self, stored: dict, where: str) -> None:
        stored = {**{k: v for k, v in self.older.items() if k in self.fields}, **stored}
        stored = {
            k: self.fields[k] if v is None and k in self.resolved else v
            for k, v in stored.items()
            if k not in self.ignored
        }
        check_same(stored, self.key(), where, hint="rerun with the stored values, or delete that method's folder")


class _CompareContext:
    """The run's model, task, examples and metadata, loaded once and shared by the methods (the
    :class:`~npeff_lens.baselines.CompareRun` their hooks read)."""

    def __init__(self, d: Path, est, store, cfg: CompareConfig, adapter):
        self.d, self.decomposition, self.store, self.config, self._adapter = d, est, store, cfg, adapter
        self._reference, self._prompts, self._task = None, None, None  # _reference: unintervened log-probs
        self.meta = store.metadata
        self.manifest = store.manifest
        self.components = cfg.components or int(est.n_components)
        labels, preds = label_columns(self.store)
        self.labels, self.predictions = labels, self.meta["prediction"]
        for flag, value in (("--components", self.components), ("--k", cfg.k)):
            if value > len(store):
                raise ValueError(f"{flag} {value} exceeds the {len(store)} examples of the run")

    def identity(self) -> dict:
        return {"n_examples": len(self.store), "decomposition_loss": self.decomposition.reconstruction_err_}

    @property
    def decomposition_run(self) -> dict:
        """The decomposition's run.json (``{}`` without one)."""
        return read_json(self.d / RUN_FILE) if (self.d / RUN_FILE).exists() else {}

    @property
    def adapter(self):
        if self._adapter is None:
            model = self.manifest.get("model") or {}
            if not model.get("name"):
                raise ValueError("the store's manifest records no model: pass adapter=")
            self._adapter = load_model(model["name"], backend=model.get("backend") or "hf", device=self.config.device)
        return self._adapter

    @property
    def task(self):
        if self._task is None:
            self._task = task_from_config(self.manifest["task"]).bind(self.adapter)
        return self._task

    @property
    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = run_prompts(self.manifest, self.adapter, self.task, self.meta["text"])
        return self._prompts

    def fit_inputs(self, out: Path, given=None) -> FitInputs:
        """What a method is fitted on, saving into ``out`` (its folder); ``given``: what its ``prepare`` returned."""
        return FitInputs(
            self.adapter,
            self.task,
            list(self.meta["text"]),
            self.components,
            self.config,
            out,
            space_options(self.manifest),
            given=given,
            pefs=self.store,
        )

    def summarize(self, name: str, fitted) -> dict:
        cfg, m = self.config, method(name)
        coeffs = torch.as_tensor(fitted.coefficients_)
        token_tuned = None
        if m.token_sets is not None:  # tuned to tokens: the tokens a component is active on
            top, on = top_examples(coeffs, k=cfg.k), active(coeffs)
            token_tuned = [
                m.token_sets(fitted, j, [int(i) for i in top[j].tolist() if on[i, j]]) for j in range(coeffs.shape[1])
            ]
        summary = method_summary(
            coeffs,
            labels=self.labels,
            predictions=self.predictions,
            k=cfg.k,
            threshold=cfg.threshold,
            alive_min_examples=cfg.k if m.space == "activations" else 1,
            token_sets=token_tuned,
        )
        return {**summary, **degeneracy(coeffs), **m.describe(fitted)}

    # --- selectivity (npeff_lens.selectivity) ------------------------------------------------------
    def selectivity(self, name: str, mdir: Path, fitted) -> dict:
        """The method's selectivity fields of compare.json, resumed component by component from
        ``mdir/selectivity/selectivity.json`` (its run.json holds the selectivity key)."""

        cfg, out = self.config, mdir / "selectivity"
        key = _MethodKey(selectivity_key(cfg, name), ignored=("selectivity_components",))
        rec = begin(out, f"selectivity-{name}", key, self.identity(), self.d)
        done = {}
        if (out / "selectivity.json").exists():
            try:
                done = {int(r["component"]): r for r in read_json(out / "selectivity.json").get("components", [])}
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # a results cache: measure again
                warnings.warn(f"{out / 'selectivity.json'} is damaged ({e}); measured again", RuntimeWarning, 2)
        coeffs = torch.as_tensor(fitted.coefficients_)
        direction = self._directions(name, fitted)
        if self._reference is None:
            self._reference = Reference(self.adapter, self.task, self.prompts, cfg.batch_size)
        n = min(coeffs.shape[1], cfg.selectivity_components or coeffs.shape[1])
        threshold = active_threshold(coeffs)
        bar = progress(range(n), desc=f"selectivity {name}", unit="component", enabled=cfg.progress)
        for j in bar:
            if j in done:
                continue
            # Sizing starts from the previous measured component's size (a good guess: far fewer evaluations),
            # which is in the saved records, so a resumed run starts where the uninterrupted one did.
            start = next((done[i]["scale"] for i in range(j - 1, -1, -1) if done[i]["status"] == "ok"), 1.0)
            done[j] = self._component_selectivity(j, sel.top_positive(coeffs, j, cfg.k, threshold), direction, start)
            write_json(out / "selectivity.json", {"components": [done[i] for i in sorted(done)]})
        records = [done[j] for j in range(n)]
        unreachable = [r for r in records if r["status"] == "unreachable"]
        if unreachable and len(unreachable) == sum(r["status"] != "excluded" for r in records):
            raise sel.UnreachableTargetError(f"{name}: {unreachable[0]['error']}")  # no component gets there
        finish(out, rec)
        per = [r.get("selectivity") for r in records]
        return {
            **sel.summarize(records),
            "selectivity_per_component": per,
            "target_kl": cfg.target_kl,
            "n_baseline": cfg.n_baseline,
        }

    def _component_selectivity(self, j: int, top: list[int], direction, start: float) -> dict:
        """One component's record: ``ok`` (the measurement), ``excluded`` (fewer than k top examples) or
        ``unreachable`` (no size brings the baseline to the target KL; the message names the largest KL)."""

        cfg = self.config
        if len(top) < cfg.k:
            return {"component": j, "status": "excluded", "n_top": len(top)}
        try:
            r = sel.component_selectivity(
                self.adapter,
                self.task,
                self.prompts,
                direction(j),
                top,
                target_kl=cfg.target_kl,
                n_baseline=cfg.n_baseline,
                seed=cfg.seed,
                reference=self._reference,
                batch_size=cfg.batch_size,
                start=start,
            )
        except sel.UnreachableTargetError as e:
            return {"component": j, "status": "unreachable", "n_top": len(top), "error": e.what}
        return {"component": j, "status": "ok", **r}

    def _directions(self, name: str, fitted):
        """``j -> intervention``: a parameter direction (NPEFF components, cluster centroids, recovered like
        ``npeff perturb``'s) or an activation direction (SAE decoder rows, SNMF features) at the method's hook."""
        m = method(name)
        vectors = torch.as_tensor(m.directions(fitted)).float()
        if m.space == "activations":
            return lambda j: ActivationDirection(self.adapter, fitted.hook, vectors[j])
        return self._parameter_directions(vectors, m.parameter_space(fitted) or self.manifest)

    def _parameter_directions(self, vectors: torch.Tensor, manifest: dict):

        cfg, layout = self.config, manifest["layout"]
        check_adapter(self.adapter, layout)
        op = projection_from_config(manifest["projection"]) if manifest.get("projection") else None
        needs_lambda = op is not None and cfg.recovery not in ("adjoint", "minnorm")  # step sizes of the solvers
        lam = estimate_lambda_max(op) * 1.1 if needs_lambda else None

        def direction(j: int):
            flat, _ = recover_direction(
                vectors, j, op, method=cfg.recovery, reject_threshold=cfg.reject_threshold, lambda_max=lam
            )
            return ParameterDirection(self.adapter, unflatten(flat.float(), layout))

        return direction


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415 (Unix only; Linux reads /proc above)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_compare(results: dict) -> str:
    """The comparison as a table, one row per method."""
    cols = (
        "n_components",
        "alive",
        "tuned_label",
        "tuned_prediction",
        "tuned_tokens",
        "argmax_shared",
        "coverage",
        "selectivity",
        "fit_seconds",
        "peak_rss_mib",
    )
    rows = [[m] + [fmt(r.get(c), missing="-") for c in cols] for m, r in results["methods"].items()]
    head = ["method", *cols]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    methods = results["methods"].items()
    lines += [f"{m}: selectivity -, {r['selectivity_note']}" for m, r in methods if r.get("selectivity_note")]
    lines += [
        f"{m}: warning: degenerate components: {r['degenerate']}; {_remedy(m)}"
        for m, r in methods
        if r.get("degenerate")
    ]
    return "\n".join(lines)


def _remedy(name: str) -> str:
    return method(name).remedy if name in REGISTRY else "fit fewer components or on more examples"
