"""The methods NPEFF is compared with, each scored by the same metrics (:mod:`npeff_lens.analysis`).

- :mod:`~npeff_lens.baselines.gradient_clustering` clusters per-example gradients with k-means
  (:class:`~npeff_lens.baselines.gradient_clustering.GradientClustering`). Each example's gradient of
  ``log p(argmax | x)`` is collected by the same engine as the PEFs and normalised to unit length.
- :mod:`~npeff_lens.baselines.sae` trains TopK sparse autoencoders on activations.
- :mod:`~npeff_lens.baselines.snmf` factorises MLP hidden activations by semi-non-negative matrix
  factorisation (Shafran, Geiger and Geva, 2025; :class:`~npeff_lens.baselines.snmf.SNMFBaseline`).
- :mod:`~npeff_lens.baselines.activations` reads a model's activations at a hook (TransformerLens names,
  module paths, ``attn:L``, ``mlp:L``) through any adapter, for the activation-space methods and their steering.

The paper compares with gradient clustering in §5.1 and with SAEs in §5.2.

:data:`REGISTRY` is the one description of every method ``npeff compare`` and the report know, NPEFF included:
what it checks before anything is written, its resume key, how it is fitted on a run's examples, saved and
loaded back, how its seconds are measured, what its coefficients and intervention directions are, what
compare.json records of it, and how the report titles its pages and highlights its tokens. A new method is one
:class:`Method` registered here (and its name in ``config.METHODS``, which lists the ``--methods`` choices
without importing torch; a test keeps the two equal).

scikit-learn and sae-lens load only when a baseline is fitted.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from .activations import default_hook, hook_module, resolve_hook
from .gradient_clustering import GradientClustering, collect_prediction_gradients, prediction_task
from .sae import TopKSAEBaseline
from .snmf import SNMFBaseline, default_layer

__all__ = [
    "DECOMPOSITION",
    "REGISTRY",
    "CompareRun",
    "FitInputs",
    "GradientClustering",
    "Method",
    "SNMFBaseline",
    "TopKSAEBaseline",
    "collect_prediction_gradients",
    "method",
    "prediction_task",
]


@dataclass(frozen=True)
class FitInputs:
    """What a method is fitted on: the run's model and task, its examples' texts, the number of components, the
    comparison's config (``npeff_lens.config.CompareConfig``), the method's folder and the run's parameter
    space (``proj_dim``, ``density``, ``seed``, ``params``, ``exclude`` of its collection).
    ``given``: an estimator the user brought (an SAE from ``--sae-path``), applied instead of trained;
    ``pefs``: the run's PEF store."""

    adapter: Any
    task: Any
    texts: list[str]
    components: int
    config: Any
    out: Path
    space: dict
    given: Any = None
    pefs: Any = None


class CompareRun(Protocol):
    """What a method's hooks read of the run being compared (``npeff compare``'s shared context)."""

    config: Any  # npeff_lens.config.CompareConfig
    components: int  # what each method fits: the config's, else the decomposition's number of components
    decomposition: Any  # the run's NPEFF estimator
    decomposition_run: dict  # the decomposition's run.json ({} without one)
    adapter: Any  # the run's model, loaded on first use
    prompts: list[str]  # the run's prompts, as its collection made them

    def fit_inputs(self, out: Path, given: Any = None) -> FitInputs: ...


def _elapsed(run: CompareRun, seconds: float) -> float | None:
    return seconds


@dataclass(frozen=True)
class Method:
    """One decomposition method.

    ``title``, ``unit``: its report pages' title and what one component is called; ``folder``: where its fit
    is saved inside its folder ``compare/<name>/`` (None: the run's own decomposition, nothing saved);
    ``cls``: its estimator class (``.load(path)``, ``.save(path)``, ``.coefficients_ [m, C]``); ``fit``:
    ``FitInputs ->`` fitted estimator (None: the run's own decomposition, read from the run, not fitted);
    ``space``: where its components act, ``"parameters"`` (a direction in parameter space, recovered and
    perturbed like ``npeff perturb``'s) or ``"activations"`` (a direction added to the activations at the
    estimator's ``hook``); ``directions``: the fitted estimator's direction vectors ``[C, d]``;
    ``parameter_space``: the manifest (``layout``, ``projection``) its parameter directions live in (None: the
    run's); ``key_fields``: the ``CompareConfig`` fields that change its fit; ``key``: ``config ->`` its key
    when the fields depend on the config (None: ``key_fields``); ``defaults``: key fields whose ``None`` means
    a default, ``(run, given) ->`` that default (runs made before stored ``None``); ``older_key``: key fields
    that runs made before the field existed did not store, with the value those runs used; ``prepare``:
    ``run ->`` checks made before anything is written, returning an estimator the user brought (``given``) or
    None; ``seconds``: ``(run, seconds of the fit) ->`` its compare.json ``fit_seconds``; ``describe``: the
    fields of the fitted estimator that compare.json records; ``token_sets``: ``(fitted, j, examples) ->`` the
    sets of tokens component ``j`` is active on in each of those examples (its ``tuned_tokens``; None: not
    tuned to tokens); ``token_values``: what the report highlights per token, as HTML (None: nothing; set on an
    activation-space method, its estimator gives ``token_activations(i)``, ``token_range(i)`` and ``token_ids_``);
    ``remedy``: what to change when its components are degenerate."""

    name: str
    title: str
    unit: str
    folder: str | None
    cls: type | None
    space: Literal["parameters", "activations"]
    fit: Callable[[FitInputs], Any] | None
    directions: Callable[[Any], Any]
    parameter_space: Callable[[Any], dict | None] = field(default=lambda fitted: None)
    key_fields: tuple[str, ...] = ()
    key: Callable[[Any], dict] | None = None
    defaults: dict[str, Callable[[CompareRun, Any], Any]] = field(default_factory=dict)
    older_key: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[CompareRun], Any] | None = None
    seconds: Callable[[CompareRun, float], float | None] = _elapsed
    describe: Callable[[Any], dict] = field(default=lambda fitted: {})
    token_sets: Callable[[Any, int, list[int]], Any] | None = None
    token_values: str | None = None
    remedy: str = "fit fewer components or on more examples"

    @property
    def resolved(self) -> tuple[str, ...]:
        """The key fields that runs made before stored unresolved (``None``: the default the key now holds)."""
        return ("components", *self.defaults)

    def resume_key(self, run: CompareRun, given: Any = None) -> dict:
        """The fields that change its result (it resumes on its own key), each default resolved on ``run``:
        ``components`` is the run's number, a ``defaults`` field left ``None`` its default."""
        cfg = run.config
        key = self.key(cfg) if self.key is not None else {k: getattr(cfg, k) for k in self.key_fields}
        if "components" in key:
            key["components"] = run.components
        for name, default in self.defaults.items():
            if name in key and key[name] is None:
                key[name] = default(run, given)
        return key

    def fitted(self, run: CompareRun, out: Path, given: Any = None):
        """Fitted on the run's examples and saved into ``out / folder`` (the run's decomposition: itself)."""
        if self.fit is None:
            return run.decomposition
        fitted = self.fit(run.fit_inputs(out, given))
        fitted.save(out / self.folder)
        return fitted

    def restore(self, run: CompareRun, out: Path):
        """The estimator :meth:`fitted` saved into ``out`` before (the run's decomposition: itself)."""
        return run.decomposition if self.folder is None else self.load(out / self.folder)

    def load(self, path: Path, device: str | None = None):
        """The estimator saved in ``path`` (its fit's folder, ``compare/<name>/<folder>``); ``device``: where an
        estimator that holds a model (an SAE) is loaded (default: where it was fitted)."""
        load = self.cls.load
        kwargs = {"device": device} if device is not None and "device" in inspect.signature(load).parameters else {}
        return load(Path(path), **kwargs)

    def fitted_dir(self, compare_dir: Path) -> Path:
        """Where ``npeff compare`` saves this method's fit under ``compare_dir`` (``DECOMPOSITION_DIR/compare``)."""
        return Path(compare_dir) / self.name / self.folder


# --- NPEFF: the run's own decomposition ------------------------------------------------------------


def _decomposition_seconds(run: CompareRun, seconds: float) -> float | None:
    """The decomposition's own time from its run.json: the fit's ``fit_seconds``, or for a run written before
    those were recorded ``started`` to ``finished`` (whole seconds); None if neither is there."""
    rec = run.decomposition_run
    if rec.get("fit_seconds") is not None:
        return float(rec["fit_seconds"])
    try:
        t0 = time.mktime(time.strptime(rec["started"], "%Y-%m-%dT%H:%M:%S%z"))
        return time.mktime(time.strptime(rec["finished"], "%Y-%m-%dT%H:%M:%S%z")) - t0
    except (KeyError, ValueError):
        return None


# --- gradient clustering (§5.1) ------------------------------------------------------------------


def _fit_grad_cluster(x: FitInputs):
    cfg = x.config
    store = collect_prediction_gradients(
        x.adapter,
        x.texts,
        x.task,
        x.out / "pefs",
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        **{**x.space, "rank": None},  # one row per example: nothing to reduce
    )
    return GradientClustering(x.components, seed=cfg.seed).fit(store)


# --- SNMF of MLP activations ---------------------------------------------------------------------


def _fit_snmf(x: FitInputs):
    cfg = x.config
    snmf = SNMFBaseline(
        x.components,
        layer=cfg.snmf_layer,
        sparsity=cfg.snmf_sparsity,
        n_iter=cfg.snmf_iterations,
        n_init=cfg.snmf_restarts,
        max_tokens=cfg.snmf_tokens,
        seed=cfg.seed,
        k_top=cfg.k,
        activation_batch_size=cfg.batch_size,
        show_progress=cfg.progress,
        constant_tokens=cfg.constant_tokens,
        max_length=x.space.get("max_length"),
    )
    return snmf.fit(x.adapter, _prompts(x))


# --- TopK SAE (§5.2), trained or the user's ------------------------------------------------------


def _prepare_sae(run: CompareRun) -> TopKSAEBaseline | None:
    """The user's SAE (``--sae-path``) read and checked at its hook, or the ``--sae-hook`` checked: a wrong
    hook or width stops the comparison before anything is written."""
    cfg = run.config
    if cfg.sae_path is None:
        if cfg.sae_hook is not None:
            hook_module(run.adapter, resolve_hook(run.adapter, cfg.sae_hook))
        return None
    sae = TopKSAEBaseline.from_sae_lens(
        cfg.sae_path,
        hook=cfg.sae_hook,
        k=cfg.sae_k,
        k_top=cfg.k,
        activation_batch_size=cfg.batch_size,
        show_progress=cfg.progress,
        constant_tokens=cfg.constant_tokens,
    )
    sae.hook = resolve_hook(run.adapter, sae.hook)
    hook_module(run.adapter, sae.hook)
    sae.check_width(sae.read_activations(run.adapter, run.prompts[:1]).d)
    return sae


def _sae_key(cfg) -> dict:
    """A trained SAE's key is its ``key_fields``; an SAE the user brought is keyed by its folder and where it reads."""
    if cfg.sae_path is not None:
        return {
            "sae_path": cfg.sae_path,
            "sae_hook": cfg.sae_hook,
            "sae_k": cfg.sae_k,
            "keep_constant_tokens": cfg.keep_constant_tokens,
        }
    return {k: getattr(cfg, k) for k in _SAE_KEY_FIELDS}


def _sae_hook(run: CompareRun, given: TopKSAEBaseline | None) -> str:
    """Where the SAE reads when no ``--sae-hook`` is given: the user's SAE's own hook, else the default."""
    return given.hook if given is not None else default_hook(run.adapter)


def _fit_sae(x: FitInputs):
    cfg, prompts = x.config, _prompts(x)
    if x.given is not None:  # the user's SAE: read and encoded, not trained
        return x.given.fit(x.adapter, prompts)
    hook = resolve_hook(x.adapter, cfg.sae_hook or default_hook(x.adapter))
    k = cfg.sae_k or max(1, min(32, x.components // 4))
    sae = TopKSAEBaseline(
        x.components,
        k,
        hook=hook,
        seed=cfg.seed,
        lr=cfg.sae_lr,
        total_tokens=cfg.sae_tokens,
        activation_batch_size=cfg.batch_size,
        show_progress=cfg.progress,
        constant_tokens=cfg.constant_tokens,
        max_length=x.space.get("max_length"),
    )
    return sae.fit(x.adapter, prompts)


def _prompts(x: FitInputs) -> list[str]:
    """The run's prompts, as its collection made them (:meth:`~npeff_lens.tasks.Task.fitted_prompts` at its
    ``max_length``: a text too long lost its last tokens, the template kept)."""
    return x.task.fitted_prompts(x.adapter.tokenizer, x.texts, x.space.get("max_length"))[0]


_SAE_KEY_FIELDS = ("components", "seed", "sae_hook", "sae_k", "sae_tokens", "sae_lr", "keep_constant_tokens")
_ACTIVATION_VALUES = "the {what} on each token of the prompt, divided by its max over the example's tokens"
_BEFORE_CONSTANT_TOKENS = {"keep_constant_tokens": True}  # runs made before the flag read every token

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "npeff",
            "NPEFF components",
            "component",
            None,
            None,
            "parameters",
            None,
            directions=lambda est: est.components_,
            seconds=_decomposition_seconds,
            token_values="each token's exact share of the example's loading "
            "Σ<sub>rows</sub>((G<sub>row</sub>A)·h)² on this component",
        ),
        Method(
            "grad-cluster",
            "Gradient clusters",
            "cluster",
            "clusters",
            GradientClustering,
            "parameters",
            _fit_grad_cluster,
            directions=lambda gc: gc.cluster_centers_,
            parameter_space=lambda gc: getattr(gc, "manifest_", None),  # its own gradients' space
            key_fields=("components", "seed"),
        ),
        Method(
            "sae",
            "TopK SAE latents",
            "latent",
            "sae",
            TopKSAEBaseline,
            "activations",
            _fit_sae,
            directions=lambda sae: sae.sae_.W_dec.detach(),
            key_fields=_SAE_KEY_FIELDS,
            key=_sae_key,
            defaults={"sae_hook": _sae_hook},
            older_key=_BEFORE_CONSTANT_TOKENS,
            prepare=_prepare_sae,
            describe=lambda sae: {"hook": sae.hook, "sae_k": sae.k},
            token_sets=TopKSAEBaseline.active_token_sets,
            token_values=_ACTIVATION_VALUES.format(what="latent's activation (its SAE code)"),
            remedy="train on more tokens (--sae-tokens) or with fewer latents (--components)",
        ),
        Method(
            "snmf",
            "SNMF features (MLP activations)",
            "feature",
            "snmf",
            SNMFBaseline,
            "activations",
            _fit_snmf,
            directions=lambda snmf: snmf.features_,
            key_fields=(
                "components",
                "seed",
                "snmf_layer",
                "snmf_sparsity",
                "snmf_iterations",
                "snmf_restarts",
                "snmf_tokens",
                "keep_constant_tokens",
            ),
            defaults={"snmf_layer": lambda run, given: default_layer(run.adapter)},
            older_key=_BEFORE_CONSTANT_TOKENS,
            describe=lambda snmf: {"hook": snmf.hook},
            token_values=_ACTIVATION_VALUES.format(what="feature's non-negative SNMF coefficient"),
            remedy="use more tokens (--snmf-tokens) or fewer features (--components)",
        ),
    )
}

DECOMPOSITION = next(m.name for m in REGISTRY.values() if m.fit is None)
"""The registry's name of the run's own decomposition (NPEFF: read from the run, not fitted); the report's
root pages are its."""


def method(name: str) -> Method:
    """The registered method ``name`` (a one-line error naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None
