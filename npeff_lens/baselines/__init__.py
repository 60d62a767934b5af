"""Baselines that NPEFF is compared with (§5), each scored by the same metrics (``npeff_lens.analysis``):

- ``gradient_clustering``: gradient clustering (§5.1): the gradient of ``log p(argmax | x)`` per example,
  collected by the same engine as the PEFs, unit-normalised and clustered with k-means
  (:class:`~npeff_lens.baselines.gradient_clustering.GradientClustering`).
- ``sae``: TopK sparse autoencoders on activations (§5.2).
- ``activations``: reading a model's activations at a hook (TransformerLens names, module paths, ``attn:L``,
  ``mlp:L``) through any adapter, for the activation-space methods and their steering.
- ``snmf``: semi-non-negative matrix factorisation of MLP hidden activations (Shafran, Geiger and Geva, 2025)
  (:class:`~npeff_lens.baselines.snmf.SNMFBaseline`).

:data:`REGISTRY` names every method ``npeff compare`` and the report know, NPEFF included: how it is fitted
on a run's examples, loaded back, what its coefficients and intervention directions are, and how the report
calls it. A new method is one :class:`Method` registered here (and its name in ``config.METHODS``, which a
test keeps equal to the registry's).

Names are imported lazily, so ``import npeff_lens.baselines`` costs nothing; scikit-learn and sae-lens
load only when a baseline is fitted.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..io import lazy_exports

_LAZY = {
    "GradientClustering": "npeff_lens.baselines.gradient_clustering",
    "collect_prediction_gradients": "npeff_lens.baselines.gradient_clustering",
    "prediction_task": "npeff_lens.baselines.gradient_clustering",
    "SNMFBaseline": "npeff_lens.baselines.snmf",
    "TopKSAEBaseline": "npeff_lens.baselines.sae",
}

__all__ = sorted([*_LAZY, "Method", "FitInputs", "REGISTRY", "method"])


__getattr__ = lazy_exports(__name__, _LAZY)


@dataclass(frozen=True)
class FitInputs:
    """What a method is fitted on: the run's model and task, its examples' texts, the number of components, the
    comparison's config (``npeff_lens.config.CompareConfig``), the method's folder and the run's parameter
    space (``proj_dim``, ``density``, ``seed``, ``params``, ``exclude`` of its collection).
    ``given``: an estimator the user brought (an SAE from ``--sae-path``), applied instead of trained."""

    adapter: Any
    task: Any
    texts: list[str]
    components: int
    config: Any
    out: Path
    space: dict
    given: Any = None


@dataclass(frozen=True)
class Method:
    """One decomposition method.

    ``folder``: where its fit is saved inside its folder ``compare/<name>/``; ``cls``: its estimator class as
    ``module:Name`` (``.load(path)``, ``.save(path)``, ``.coefficients_ [m, C]``); ``fit``: ``FitInputs ->``
    fitted estimator (saved by the caller); ``space``: where its components act, ``"parameters"`` (a direction in
    parameter space, recovered and perturbed like ``npeff perturb``'s) or ``"activations"`` (a direction added to
    the activations at the estimator's ``hook``); ``directions``: the fitted estimator's direction vectors
    ``[C, d]``; ``key_fields``: the ``CompareConfig`` fields that change its fit; ``describe``: the fields of
    the fitted estimator that compare.json records; ``token_values``: what the report highlights per token
    (None: nothing); ``remedy``: what to change when its components are degenerate."""

    name: str
    title: str
    unit: str
    folder: str | None
    cls: str | None
    space: Literal["parameters", "activations"]
    fit: Callable[[FitInputs], Any] | None
    directions: Callable[[Any], Any]
    key_fields: tuple[str, ...] = ()
    describe: Callable[[Any], dict] = field(default=lambda fitted: {})
    token_values: str | None = None
    remedy: str = "fit fewer components or on more examples"

    @property
    def estimator(self):
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)

    def load(self, path: Path, device: str | None = None):
        """The estimator saved in ``path`` (its fit's folder, ``compare/<name>/<folder>``); ``device``: where an
        estimator that holds a model (an SAE) is loaded (default: where it was fitted)."""
        cls = self.estimator
        kwargs = {"device": device} if device is not None and "device" in inspect.signature(cls.load).parameters else {}
        return cls.load(Path(path), **kwargs)

    def fitted_dir(self, compare_dir: Path) -> Path:
        """Where ``npeff compare`` saves this method's fit under ``compare_dir`` (``DECOMPOSITION_DIR/compare``)."""
        return Path(compare_dir) / self.name / self.folder


def _fit_grad_cluster(x: FitInputs):
    from .gradient_clustering import GradientClustering, collect_prediction_gradients

    cfg = x.config
    store = collect_prediction_gradients(
        x.adapter, x.texts, x.task, x.out / "pefs", batch_size=cfg.batch_size, progress=cfg.progress,
        **{**x.space, "rank": None},  # one row per example: nothing to reduce
    )  # fmt: skip
    return GradientClustering(x.components, seed=cfg.seed).fit(store)


def _fit_snmf(x: FitInputs):
    from .snmf import SNMFBaseline

    cfg = x.config
    snmf = SNMFBaseline(
        x.components, layer=cfg.snmf_layer, sparsity=cfg.snmf_sparsity, n_iter=cfg.snmf_iterations,
        n_init=cfg.snmf_restarts, max_tokens=cfg.snmf_tokens, seed=cfg.seed, k_top=cfg.k,
        activation_batch_size=cfg.batch_size, show_progress=cfg.progress, constant_tokens=cfg.constant_tokens,
        max_length=x.space.get("max_length"),
    )  # fmt: skip
    return snmf.fit(x.adapter, _prompts(x))


def _fit_sae(x: FitInputs):
    from .activations import default_hook, resolve_hook
    from .sae import TopKSAEBaseline

    cfg, prompts = x.config, _prompts(x)
    if x.given is not None:  # the user's SAE: read and encoded, not trained
        return x.given.fit(x.adapter, prompts)
    hook = resolve_hook(x.adapter, cfg.sae_hook or default_hook(x.adapter))
    k = cfg.sae_k or max(1, min(32, x.components // 4))
    sae = TopKSAEBaseline(
        x.components, k, hook=hook, seed=cfg.seed, lr=cfg.sae_lr, total_tokens=cfg.sae_tokens,
        activation_batch_size=cfg.batch_size, show_progress=cfg.progress, constant_tokens=cfg.constant_tokens,
        max_length=x.space.get("max_length"),
    )  # fmt: skip
    return sae.fit(x.adapter, prompts)


def _prompts(x: FitInputs) -> list[str]:
    """The run's prompts, as its collection made them (:meth:`~npeff_lens.tasks.Task.fitted_prompts` at its
    ``max_length``: a text too long lost its last tokens, the template kept)."""
    return x.task.fitted_prompts(x.adapter.tokenizer, x.texts, x.space.get("max_length"))[0]


_ACTIVATION_VALUES = "the {what} on each token of the prompt, divided by its max over the example's tokens"

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "npeff", "NPEFF components", "component", None, None, "parameters", None,
            directions=lambda est: est.components_,
            token_values="each token's exact share of the example's loading on the component",
        ),
        Method(
            "grad-cluster", "Gradient clusters", "cluster", "clusters",
            "npeff_lens.baselines.gradient_clustering:GradientClustering", "parameters", _fit_grad_cluster,
            directions=lambda gc: gc.cluster_centers_, key_fields=("components", "seed"),
        ),
        Method(
            "sae", "TopK SAE latents", "latent", "sae", "npeff_lens.baselines.sae:TopKSAEBaseline", "activations",
            _fit_sae, directions=lambda sae: sae.sae_.W_dec.detach(),
            key_fields=("components", "seed", "sae_hook", "sae_k", "sae_tokens", "sae_lr", "keep_constant_tokens"),
            describe=lambda sae: {"hook": sae.hook, "sae_k": sae.k},
            token_values=_ACTIVATION_VALUES.format(what="latent's activation (its SAE code)"),
            remedy="train on more tokens (--sae-tokens) or with fewer latents (--components)",
        ),
        Method(
            "snmf", "SNMF features (MLP activations)", "feature", "snmf", "npeff_lens.baselines.snmf:SNMFBaseline",
            "activations", _fit_snmf, directions=lambda snmf: snmf.features_,
            key_fields=("components", "seed", "snmf_layer", "snmf_sparsity", "snmf_iterations", "snmf_restarts",
                        "snmf_tokens", "keep_constant_tokens"),
            describe=lambda snmf: {"hook": snmf.hook},
            token_values=_ACTIVATION_VALUES.format(what="feature's non-negative SNMF coefficient"),
            remedy="use more tokens (--snmf-tokens) or fewer features (--components)",
        ),
    )
}  # fmt: skip


def method(name: str) -> Method:
    """The registered method ``name`` (a one-line error naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None
