"""The settings of each step (collect, decompose, perturb, ...) as one frozen dataclass per step.

A config holds a step's knobs; it is written as JSON into the step's run directory, and its resume key decides
whether a rerun may resume. The configs are ``CollectConfig``, ``DecomposeConfig``, ``PerturbConfig``,
``CompareConfig``, ``UnlearnConfig``, ``IclConfig``, ``ReportConfig`` and ``ExplainConfig``. The Python API takes
one as ``config``, or its fields as keyword arguments (``collect_pefs(model, data, task, out, n=..., ...)`` builds
a ``CollectConfig``). Every field is
documented (:func:`option`) and validated in ``__post_init__``; an error is a :class:`ConfigError` whose ``field``
names the field. The command line of each step (its config plus its inputs) is in :mod:`npeff_lens.commands`: a
command extends its step's config, so the CLI hands a step its command as the config, checked once. NPEFF's own
hyper-parameter constraints in :mod:`npeff_lens.constraints`.

Fields marked ``resume=False`` (progress bars, batch sizes, devices, paths) do not change the result and are
left out of the resume key: ``config.key()``. A rerun into a directory compares the stored key with the new
one; a difference is a :class:`ConfigMismatchError` that names each differing field with both values.

The base every config extends (fields, checks, JSON, resume keys) is :mod:`npeff_lens.schema`; this module
imports nothing of the package but it and :mod:`npeff_lens.constraints`: it is the schema every layer above
shares.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from .constraints import ParameterError, validate_params
from .schema import BaseConfig, ConfigError, ConfigMismatchError, check_same, diff, option, plain, unwrap_optional

__all__ = [
    "ConfigError",
    "ConfigMismatchError",
    "diff",
    "check_same",
    "option",
    "plain",
    "unwrap_optional",
    "CollectConfig",
    "DecomposeConfig",
    "PerturbConfig",
    "CompareConfig",
    "UnlearnConfig",
    "IclConfig",
    "ReportConfig",
    "ExplainConfig",
    "METHODS",
    "ParameterError",
    "validate_params",
]


# ----------------------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------------------

Dtype = Literal["float16", "bfloat16", "float32"]


@dataclass(frozen=True, kw_only=True)
class CollectConfig(BaseConfig):
    """How PEFs are collected (§2.1): what ``collect_pefs`` takes besides the model, data and task.

    ``split``, ``data_seed`` and the column fields apply when the dataset is given by name or path."""

    step: ClassVar[str] = "collect"

    proj_dim: int | None = option(
        8192,
        "projected dimension d of the sparse random projection (§2.1.1); "
        "0 or none stores unprojected rows (tiny models only)",
    )
    density: int = option(32, "projection density: outputs each parameter lands in (App. A: 32)")
    projection: Literal["sparse", "kron"] = option(
        "sparse",
        "sparse: the paper's sparse random projection of each per-example gradient (App. A); kron: a Kronecker "
        "sketch P_R X P_C^T of each weight matrix (k x k, never forming the per-example weight gradient), then "
        "the sparse projection of the sketches; several times faster over many parameters",
    )
    kron_k: int = option(16, "kron: rows and columns each weight matrix is sketched to (k x k per matrix)")
    rank: int | None = option(None, "keep the top-k right singular directions of each PEF (App. C); none: all rows")
    params: tuple[str, ...] | None = option(
        None,
        "glob patterns of parameters to include (default: all but token embeddings and normalisation weights)",
        metavar="GLOB",
    )
    exclude: tuple[str, ...] | None = option(None, "glob patterns of parameters to leave out", metavar="GLOB")
    seed: int = option(0, "seed of the projection matrix (the same seed gives the same matrix on every backend)")
    n: int | None = option(
        None, "number of examples: the first n of the split, which is in seeded random order (default: all)"
    )
    split: Literal["train", "test"] | None = option(
        "train",
        "split of a dataset given by name or path: a seeded shuffle (--data-seed) of 80%% (train) or the other 20%% "
        "(test) of its rows; none: every row in file order",
    )
    data_seed: int = option(0, "seed of the train/test split")
    drop_invalid: bool = option(
        False,
        "leave out rows with an empty text or label, or a label that names none of the task's outcomes (say how "
        "many); default: such rows are an error naming them",
    )
    text_column: str = option("text", "column holding the example text (a dataset given by file or directory)")
    label_column: str | None = option(None, "column holding the label (default: 'label' when present)")
    label_names: tuple[str, ...] | None = option(
        None, "names of integer labels 0, 1, ... (default: a ClassLabel feature's names)"
    )
    max_length: int | None = option(
        256,
        "most tokens of a prompt, special tokens included: a longer one loses tokens from the end of its text, never "
        "the template's (the metadata column text_tokens_cut counts them); none: every token",
    )
    dtype: Dtype = option("float16", "storage dtype of the PEFs")
    top_k_probs: int = option(5, "probabilities kept per example for large outcome sets (next-token)")
    engine: Literal["hooks", "loop"] = option(
        "hooks",
        "per-example gradients from module hooks, or one autograd call per example and row (the slow reference)",
    )
    batch_size: int = option(8, "examples per forward/backward pass", resume=False)
    shard_size: int = option(256, "examples per store shard", resume=False)
    flush_every: int = option(64, "make the store durable every this many examples", resume=False)
    progress: bool = option(True, "show a progress bar (rate and ETA)", resume=False)
    dist_timeout: float = option(
        1800.0,
        "multi-process collection (torchrun): seconds a rank waits for the others before it stops with an error",
        resume=False,
    )

    def validate(self):
        if self.proj_dim == 0:
            object.__setattr__(self, "proj_dim", None)
        self._require("proj_dim", self.proj_dim is None or self.proj_dim >= 1, "must be >= 1 (or 0/none)")
        self._require("density", self.density >= 1, "must be >= 1")
        self._require("kron_k", self.kron_k >= 1, "must be >= 1")
        self._require("projection", self.projection == "sparse" or self.proj_dim is not None, "kron needs a proj_dim")
        if self.proj_dim is not None:
            self._require("density", self.density <= self.proj_dim, f"must be <= proj_dim ({self.proj_dim})")
        self._require("rank", self.rank is None or self.rank >= 1, "must be >= 1")
        self._require("n", self.n is None or self.n >= 1, "must be >= 1")
        self._require("max_length", self.max_length is None or self.max_length >= 1, "must be >= 1")
        for name in ("top_k_probs", "batch_size", "shard_size", "flush_every"):
            self._require(name, getattr(self, name) >= 1, "must be >= 1")
        self._require("dist_timeout", self.dist_timeout > 0, "must be > 0")


@dataclass(frozen=True, kw_only=True)
class DecomposeConfig(BaseConfig):
    """The NPEFF fit (§2.2, App. D); the fields are :class:`~npeff_lens.decomposition.NPEFF`'s, with its defaults
    (a test keeps the two equal)."""

    step: ClassVar[str] = "decompose"

    n_components: int = option(help="number of components C", flag="--components")
    n_steps: int = option(1000, "joint W/H steps after the warm-up (App. D)", flag="--steps")
    n_warmup_steps: int = option(100, "H-only warm-up steps first (App. D.4)", flag="--warmup-steps")
    lr: float = option(0.5, "learning rate of the H gradient step (on the mean loss)")
    warmup_lr: float = option(
        0.5,
        "learning rate during the warm-up (up to ~0.1 C shortens it for hundreds of components)",
    )
    seed: int = option(0, "seed of the initialisation")
    eps: float = option(1e-12, "added to the denominator of the multiplicative W update")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = option("float32", "compute dtype of the fit")
    storage_dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = option(
        None, "dtype the PEFs are held in during the fit (bfloat16: half the memory; products stay in --dtype)"
    )
    nonfinite: Literal["raise", "exclude"] = option(
        "raise", "PEFs with NaN/inf: stop with an error, or leave them out (coefficients 0)"
    )
    device: str | None = option(None, "where to compute (default: CUDA when available, else CPU)", resume=False)
    memory_budget: int = option(
        4 * 2**30,
        "bytes of PEFs held in memory; above it the store is streamed every step",
        resume=False,
    )
    batch_size: int | None = option(
        None, "examples per streamed batch or in-memory chunk (default: automatic)", resume=False
    )
    checkpoint_every: int = option(100, "save a checkpoint every this many steps", resume=False)
    progress: bool = option(True, "show a progress bar with the loss", resume=False)

    def validate(self):
        try:
            validate_params(self.estimator_params())
        except ParameterError as e:
            self._fail(e.name, e.reason)

    def estimator_params(self) -> dict:
        """Keyword arguments of ``NPEFF``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DecomposeConfig)}


class _ComponentSpec:
    """For configs with a ``components`` field (CLI text: a count or indices such as ``0,3,7-9``): an int or a
    list given from Python is kept as that text, and ``validate`` checks it through ``component_list``."""

    def __post_init__(self):
        if isinstance(self.components, (int, list, tuple)) and not isinstance(self.components, bool):
            spec = self.components if isinstance(self.components, int) else ",".join(map(str, self.components))
            object.__setattr__(self, "components", str(spec))
        super().__post_init__()

    def _validate_components(self):
        try:
            self.component_list(None)
        except ValueError as e:
            self._fail("components", str(e))


@dataclass(frozen=True, kw_only=True)
class PerturbConfig(_ComponentSpec, BaseConfig):
    """The perturbation experiment (§3.3, App. F)."""

    step: ClassVar[str] = "perturb"

    components: str | None = option(
        None,
        "the first N components (a number), or indices such as '0,3,7-9' (default: the first 32, all when fewer)",
        resume=False,
    )
    magnitude: float = option(
        20.0,
        "L2 norm of the perturbation over all selected parameters "
        "(paper: 20 for SmolLM2-135M on SST-2, 30 for BERT on SNLI)",
    )
    top_k: int = option(16, "top examples per component, by coefficient")
    n_baseline: int = option(1000, "random baseline examples, disjoint from the top ones")
    seed: int = option(0, "seed of the baseline examples")
    recovery: Literal["adjoint", "minnorm", "sparsa", "fista", "fpc"] = option(
        "adjoint",
        "parameter-space direction: the back-projection A·h (the cheapest; selectivity of each "
        "solver: benchmarks/README.md), the least-norm x with x A = h (conjugate gradients), compressed sensing of "
        "App. F eq. 6 solved by SpaRSA or FISTA (continuation, to convergence: sparse), or the paper's FPC "
        "(one inner iteration: coarse)",
    )
    mu: float = option(4e-5, "μ of App. F eq. 6 (sparsa, fista, fpc)")
    max_iter: int = option(300, "iteration cap of the sparsa / fista / minnorm solvers (two operator products each)")
    reject_threshold: float | None = option(
        0.5, "reject h from the components with |cos| below this (§3.3); none: no rejection"
    )
    backend: Literal["hf", "bridge", "hooked", "nnsight"] | None = option(
        None, "model backend (default: the one the PEFs were collected with)"
    )
    batch_size: int = option(32, "prompts per forward pass", resume=False)
    device: str = option("cpu", "device of the model", resume=False)
    progress: bool = option(True, "show a progress bar over components", resume=False)
    time_budget: float | None = option(
        None,
        "minutes after which no further component is started: the results cover the components measured "
        "(rerun to continue); none: all components",
        resume=False,
    )

    def validate(self):
        self._validate_components()
        ok = self.time_budget is None or (math.isfinite(self.time_budget) and self.time_budget >= 0)
        self._require("time_budget", ok, "must be >= 0 minutes (or none)")
        self._require("magnitude", math.isfinite(self.magnitude) and self.magnitude > 0, "must be positive and finite")
        self._require("top_k", self.top_k >= 1, "must be >= 1")
        self._require("n_baseline", self.n_baseline >= 1, "must be >= 1")
        self._require("mu", self.mu > 0, "must be > 0")
        self._require("max_iter", self.max_iter >= 1, "must be >= 1")
        self._require("batch_size", self.batch_size >= 1, "must be >= 1")

    def component_list(self, n_components: int | None) -> list[int]:
        """The component indices: ``range(N)`` for a count (more than ``n_components`` is an error), else the listed
        ones; unset: the first 32, all when there are fewer."""
        if self.components is None:
            return list(range(32 if n_components is None else min(32, n_components)))
        text = self.components.strip()
        if text.isdigit():
            count = int(text)
            if count < 1:
                raise ValueError("must be >= 1")
            if n_components is not None and count > n_components:
                raise ValueError(
                    f"asks for {count} components but the decomposition has {n_components}: pass at most "
                    f"{n_components} (or indices such as 0,3,7-9)"
                )
            return list(range(count))
        out = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot read {part!r}: use a count ('16') or indices ('0,3,7-9')")
            out.extend(range(int(lo), int(hi or lo) + 1))
        if not out:
            raise ValueError("names no components")
        bad = [i for i in out if n_components is not None and i >= n_components]
        if bad:
            raise ValueError(f"component index {bad[0]} out of range: the decomposition has {n_components} components")
        return out


METHODS = ("npeff", "grad-cluster", "sae", "snmf")  # npeff_lens.baselines.REGISTRY's names (a test keeps them equal)


@dataclass(frozen=True, kw_only=True)
class CompareConfig(BaseConfig):
    """NPEFF beside gradient clustering (§5.1), TopK SAEs (§5.2) and SNMF of MLP activations on the same
    examples, with one set of metrics (``analysis.method_summary``) and, optionally, one causal test
    (``selectivity``)."""

    step: ClassVar[str] = "compare"

    methods: tuple[str, ...] = option(METHODS, f"methods to compare, from {', '.join(METHODS)}", metavar="METHOD")
    components: int | None = option(None, "clusters / SAE latents (default: the decomposition's number of components)")
    k: int = option(16, "top examples per component that define tunings, argmax-sharing and coverage (§3.1, §5)")
    threshold: float = option(0.95, "fraction of the top examples that must agree for a tuning")
    seed: int = option(0, "seed of k-means, the SAE, SNMF and the selectivity baseline examples")
    sae_hook: str | None = option(
        None,
        "where the SAE reads activations: a TransformerLens hook name (blocks.5.hook_resid_pre) for hooked/bridge "
        "models, a module path (model.layers.5; PATH:input for its input) for hf/nnsight, or attn:L (layer L's "
        "attention output before its projection: hook_z) or mlp:L (its MLP hidden activations) on any backend "
        "(default: the residual stream entering the middle layer)",
    )
    sae_k: int | None = option(None, "active latents per token of the TopK SAE (default: min(32, latents // 4))")
    sae_tokens: int = option(300_000, "tokens the SAE trains on (the examples' tokens, repeated in shuffled epochs)")
    sae_lr: float = option(1e-3, "learning rate of the SAE")
    sae_path: str | None = option(
        None,
        "an SAE you already have, in sae-lens's saved format (a folder with cfg.json and sae_weights.safetensors, "
        "as SAE.save_model writes; any architecture): compared at the hook it records (or --sae-hook) instead "
        "of training one; it reads the raw activations",
        metavar="DIR",
    )
    snmf_layer: int | None = option(
        None, "layer whose MLP hidden activations SNMF factorises (default: the middle one)"
    )
    snmf_sparsity: float | None = option(
        0.1, "fraction of the MLP's neurons each SNMF feature keeps (winner-take-all); none: dense features"
    )
    snmf_iterations: int = option(200, "rounds of the semi-NMF multiplicative updates (Ding, Li and Jordan, 2010)")
    snmf_restarts: int = option(3, "seeded SNMF starts; the one with the lowest reconstruction error is kept")
    snmf_tokens: int | None = option(
        65536, "tokens SNMF is fitted on (a seeded random subset; the others are encoded); none: all"
    )
    keep_constant_tokens: bool = option(
        False,
        "let the SAE and SNMF read the tokens every prompt starts with (the BOS and the template's text before "
        "{text}); by default they are left out of training and of each example's max, since a causal model's "
        "activations there are the same for every example (bidirectional models always keep them)",
    )
    selectivity: bool = option(
        False, "measure each component's selectivity: KL on its top examples / target KL on random ones"
    )
    target_kl: float = option(0.01, "mean KL (nats) on the random baseline examples that sizes each intervention")
    n_baseline: int = option(32, "random baseline examples per component for selectivity, disjoint from its top k")
    selectivity_components: int | None = option(
        None, "measure selectivity on each method's first N components only (a cheaper estimate); none: all"
    )
    recovery: Literal["adjoint", "minnorm", "sparsa", "fista", "fpc"] = option(
        "adjoint",
        "parameter-space direction of NPEFF components and gradient-cluster centroids for selectivity: the "
        "back-projection A·h (seconds), the least-norm x with x A = h, or compressed sensing (App. F eq. 6) solved "
        "by SpaRSA, FISTA or the paper's FPC (as `npeff perturb --recovery`)",
    )
    reject_threshold: float | None = option(
        0.5, "reject a component from the dissimilar ones (|cos| below this) before recovery; none: no rejection"
    )
    batch_size: int = option(
        8, "examples per forward/backward pass when reading gradients or activations", resume=False
    )
    device: str = option("cpu", "device of the model", resume=False)
    progress: bool = option(True, "show progress bars", resume=False)

    def __post_init__(self):
        methods = self.methods.split(",") if isinstance(self.methods, str) else self.methods
        if isinstance(methods, (list, tuple)) and all(isinstance(m, str) for m in methods):  # "a,b" c -> a b c
            methods = tuple(p.strip() for m in methods for p in m.split(",") if p.strip())
        object.__setattr__(self, "methods", methods)
        super().__post_init__()

    @property
    def constant_tokens(self) -> str:
        """The activation estimators' ``constant_tokens``: ``"keep"`` with ``keep_constant_tokens``, else ``"drop"``."""
        return "keep" if self.keep_constant_tokens else "drop"

    def validate(self):
        bad = [m for m in self.methods if m not in METHODS]
        self._require("methods", not bad and len(self.methods) >= 1, f"names unknown methods {bad}; valid: {METHODS}")
        self._require("components", self.components is None or self.components >= 1, "must be >= 1")
        self._require("k", self.k >= 1, "must be >= 1")
        self._require("threshold", 0 < self.threshold <= 1, "must be in (0, 1]")
        self._require("sae_k", self.sae_k is None or self.sae_k >= 1, "must be >= 1")
        self._require("sae_tokens", self.sae_tokens >= 1, "must be >= 1")
        self._require("sae_lr", self.sae_lr > 0, "must be > 0")
        self._require("snmf_layer", self.snmf_layer is None or self.snmf_layer >= 0, "must be >= 0")
        ok = self.snmf_sparsity is None or 0 < self.snmf_sparsity <= 1
        self._require("snmf_sparsity", ok, "must be in (0, 1] (or none)")
        self._require("snmf_iterations", self.snmf_iterations >= 1, "must be >= 1")
        self._require("snmf_restarts", self.snmf_restarts >= 1, "must be >= 1")
        self._require("snmf_tokens", self.snmf_tokens is None or self.snmf_tokens >= 1, "must be >= 1")
        self._require("target_kl", math.isfinite(self.target_kl) and self.target_kl > 0, "must be finite and > 0")
        self._require("n_baseline", self.n_baseline >= 1, "must be >= 1")
        ok = self.selectivity_components is None or self.selectivity_components >= 1
        self._require("selectivity_components", ok, "must be >= 1")
        self._require("batch_size", self.batch_size >= 1, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class UnlearnConfig(_ComponentSpec, BaseConfig):
    """NPEFF-guided unlearning with collateral-damage mitigation (§6.1, App. I.1-I.2)."""

    step: ClassVar[str] = "unlearn"

    components: str = option("0,1", "components whose top example is unlearned: indices such as '0,3,7-9'")
    k_eval: int = option(12, "next top examples kept to measure collateral damage (App. I.2: 12)")
    k_mitigation: int = option(12, "next top examples appended to every retain batch by mitigation (12)")
    n_random: int | None = option(
        None,
        "random examples to measure the damage elsewhere (paper: 10,000; default: 64, or what a smaller store "
        "leaves beside the top, control and a retain pool of 16)",
    )
    n_batches: int = option(75, "unlearning batches (App. I.2: 75)")
    retain_batch_size: int = option(32, "random retain examples per batch (App. I.2: 32)")
    forget_batch_size: int = option(1, "forget examples per batch")
    lr: float = option(1e-4, "Adam learning rate (App. I.2: 1e-4)")
    epsilon_forget: float = option(0.1, "weight of the forget term, gradient ascent on its KL (App. I.2: 0.1)")
    epsilon_retain: float = option(10.0, "weight of the retain KL (App. I.2: 10)")
    kl_threshold: float = option(
        10.0,
        "forget KL (nats) for a run to count as unlearned (the paper's 10 is for a "
        "whole vocabulary; a two-label task's KL is bounded by -log min p)",
    )
    params: tuple[str, ...] = option(
        ("store",),
        "parameters trained: 'store' (those the PEFs cover), 'default' "
        "(all but embeddings and norms), or glob patterns",
        metavar="GLOB",
    )
    seed: int = option(0, "seed of the evaluation/mitigation split, the random sets and the retain batches")
    batch_size: int = option(32, "prompts per forward when evaluating", resume=False)
    progress: bool = option(True, "show progress bars", resume=False)

    def validate(self):
        self._validate_components()
        for name in ("k_eval", "k_mitigation", "n_random", "n_batches", "retain_batch_size", "forget_batch_size"):
            self._require(name, getattr(self, name) is None or getattr(self, name) >= 1, "must be >= 1")
        for name in ("lr", "epsilon_forget", "epsilon_retain", "kl_threshold"):
            self._require(name, getattr(self, name) > 0, "must be > 0")

    def component_list(self, n_components: int | None) -> list[int]:
        """The listed component indices (a bare number is one index here, not a count)."""
        text = self.components.strip()
        return PerturbConfig(components=text if "," in text or "-" in text else f"{text},").component_list(n_components)


@dataclass(frozen=True, kw_only=True)
class IclConfig(BaseConfig):
    """The tuning classifier against zero-shot and in-context prompts (§6.2)."""

    step: ClassVar[str] = "icl"

    dataset: str | None = option(
        None,
        "dataset of the held-out examples, a name or a local file (default: the one the run was collected from, "
        "with its columns); examples in the run's store are always left out",
    )
    text_column: str | None = option(None, "its text column (default: the run's, else 'text')")
    label_column: str | None = option(None, "its label column (default: the run's, else 'label' when present)")
    eval_split: Literal["train", "test"] | None = option("test", "its split (seeded by --data-seed)")
    data_seed: int | None = option(None, "seed of the split (default: the run's)")
    n_eval: int = option(200, "held-out examples (the first n of the split not in the run's store)")
    accept_changed_dataset: bool = option(
        False,
        "use the run's dataset even when its file no longer holds the rows the run collected (edited since): by "
        "default that is refused, as held-out examples and labels read from it would not be the run's",
        resume=False,
    )
    threshold: float = option(0.75, "fraction of a component's top k sharing a label for it to vote (§6.2: 0.75)")
    k: int = option(16, "top examples per component (§6.2: 16)")
    shots: int = option(6, "demonstrations per in-context prompt (§6.2: 6)")
    n_prompts: int = option(
        10, "random in-context prompts to choose the best from (§6.2: 50; each costs n_select forwards)"
    )
    n_select: int = option(256, "training examples the best prompt is chosen on (§6.2: 1,024)")
    seed: int = option(0, "seed of the prompts and the selection subset")
    batch_size: int = option(16, "prompts per forward", resume=False)
    progress: bool = option(True, "show progress bars", resume=False)

    def validate(self):
        for name in ("n_eval", "k", "shots", "n_prompts", "n_select"):
            self._require(name, getattr(self, name) >= 1, "must be >= 1")
        self._require("threshold", 0 < self.threshold <= 1, "must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class ReportConfig(BaseConfig):
    """The static component dashboard (nothing of it is resumed: a rerun rewrites the pages)."""

    k: int = option(16, "top examples shown per component (§3.1)")
    n_attributed: int = option(
        8, "top examples per component whose tokens are attributed (each: a forward and a backward per PEF row)"
    )
    perturbation: str | None = option(None, "a perturbation.json or its folder (default: found beside the run)")
    attributions: bool = option(True, "compute exact token attributions (needs the model)")
    progress: bool = option(True, "show progress bars")

    def validate(self):
        self._require("k", self.k >= 1, "must be >= 1")
        self._require("n_attributed", self.n_attributed >= 0, "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ExplainConfig(BaseConfig):
    """Which components were at work on an input: how much of it is shown."""

    top: int = option(3, "components shown per input, by coefficient")
    n_examples: int = option(3, "top run examples shown per component")
    k: int = option(16, "top run examples that define a tuning (§3.1)")

    def validate(self):
        self._require("top", self.top >= 1, "must be >= 1")
        self._require("n_examples", self.n_examples >= 0, "must be >= 0")
        self._require("k", self.k >= 1, "must be >= 1")
