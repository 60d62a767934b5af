"""The command line of each ``npeff`` subcommand as a frozen dataclass: a step's config
(:mod:`npeff_lens.config`) plus the step's inputs (model and dataset names, paths). The CLI generates each
subcommand's flags from these fields; the run layer (:mod:`npeff_lens.runs`) receives them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import (
    BaseConfig,
    CollectConfig,
    CompareConfig,
    DecomposeConfig,
    ExplainConfig,
    IclConfig,
    PerturbConfig,
    ReportConfig,
    UnlearnConfig,
    option,
)

__all__ = [
    "CollectCommand",
    "DecomposeCommand",
    "PerturbCommand",
    "TopCommand",
    "CompareCommand",
    "UnlearnCommand",
    "IclCommand",
    "ReportCommand",
    "ExplainCommand",
    "RepairCommand",
    "DemoCommand",
    "ZeroShotCommand",
    "TraceCommand",
]

Backend = Literal["hf", "bridge", "hooked", "nnsight"]


@dataclass(frozen=True, kw_only=True)
class CollectCommand(CollectConfig):
    """``npeff collect``: a model, a dataset and a task by name, and the collection's knobs."""

    model: str = option(help="built-in model name (npeff models), local checkpoint directory or HF repo id")
    backend: Backend = option("hf", "model backend")
    device: str = option("cpu", "device of the model", resume=False)
    dataset: str = option(
        help="built-in dataset name (npeff datasets), a CSV / JSON Lines / Parquet file, or a "
        "datasets.save_to_disk directory"
    )
    task: Literal["label-tokens", "classifier-head", "next-token"] = option(
        "label-tokens", "what p(y|x) is (App. E): label tokens, the model's classifier head, or the next token"
    )
    template: str = option(
        "{text}", "prompt template with {text} where the example goes; \\n is a newline", escapes=True
    )
    labels: tuple[str, ...] | None = option(
        None, "label strings for label-tokens (leading spaces matter; \\n is a newline)", escapes=True
    )
    label_first_token: bool = option(
        False,
        "let a label of several tokens be stood for by its first token (the paper's App. E.1 rule); by "
        "default such a label is refused with its tokens named",
    )
    expectation_projections: int = option(16, "r' rows of the expectation projection for next-token (App. B)")
    task_seed: int = option(0, "seed of next-token's expectation-projection matrix")
    out: str = option(
        help="directory of the PEF store (created, or resumed when it holds this configuration)", resume=False
    )

    def validate(self):
        super().validate()
        if self.task == "label-tokens":
            self._require(
                "labels",
                bool(self.labels) and len(self.labels) >= 2,
                "needs two or more label strings for --task label-tokens (e.g. --labels ' negative' ' positive')",
            )
        self._require("template", "{text}" in self.template, "must contain {text}")
        self._require("expectation_projections", self.expectation_projections >= 1, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class DecomposeCommand(DecomposeConfig):
    """``npeff decompose``: fit NPEFF on a PEF store."""

    store: str = option(help="the PEF store (a directory written by `npeff collect`)", resume=False)
    out: str = option(
        help="directory of the decomposition (created, or resumed when it holds this configuration)", resume=False
    )


@dataclass(frozen=True, kw_only=True)
class PerturbCommand(PerturbConfig):
    """``npeff perturb``: recover components in parameter space, perturb θ ± magnitude·ĥ, compare KLs."""

    decomposition: str = option(
        help="directory written by `npeff decompose`", positional=True, resume=False, metavar="DECOMPOSITION_DIR"
    )
    out: str | None = option(
        None,
        "directory for perturbation.csv / perturbation.json (resumes after the components already there)",
        resume=False,
    )
    store: str | None = option(None, "the PEF store (default: the one the decomposition was fitted on)", resume=False)


@dataclass(frozen=True, kw_only=True)
class TopCommand(BaseConfig):
    """``npeff top``: top examples per component and the tuning summary (§3.1)."""

    decomposition: str = option(
        help="directory written by `npeff decompose`", positional=True, metavar="DECOMPOSITION_DIR"
    )
    k: int = option(16, "top examples that define a tuning (§3.1)")
    show: int = option(5, "examples printed per component")
    store: str | None = option(None, "the PEF store (default: the one the decomposition was fitted on)")
    where: bool = option(
        False,
        "also where each component lives: the 5 (layer, module) groups, attention heads and MLP neurons with the "
        "most of its energy (x: enrichment over their share of the parameters); saved in "
        "DECOMPOSITION_DIR/locations.json",
    )
    where_method: Literal["span", "recovered"] = option(
        "span",
        "how --where locates a component: span rebuilds its direction from its top examples' exact gradients "
        "(runs the model on them again); recovered back-projects its projected numbers (no model, but at chance "
        "under the sparse projection)",
    )
    where_k: int = option(16, "top examples whose gradients locate a component (--where-method span)")

    def validate(self):
        self._require("k", self.k >= 1, "must be >= 1")
        self._require("show", self.show >= 0, "must be >= 0")
        self._require("where_k", self.where_k >= 1, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class CompareCommand(CompareConfig):
    """``npeff compare``: gradient clusters, TopK-SAE latents and SNMF features beside NPEFF's components, measured
    the same way (with --selectivity, also by one causal test); writes DECOMPOSITION_DIR/compare/compare.json and
    prints a table."""

    decomposition: str = option(
        help="directory written by `npeff decompose`", positional=True, metavar="DECOMPOSITION_DIR", resume=False
    )
    store: str | None = option(None, "the PEF store (default: the one the decomposition was fitted on)", resume=False)


@dataclass(frozen=True, kw_only=True)
class UnlearnCommand(UnlearnConfig):
    """``npeff unlearn``: unlearn each chosen component's top example twice, with NPEFF-guided mitigation (its
    next top examples in every retain batch) and with a control (random ones); KL on the forget example, the
    component's other top examples and random examples (§6.1, Table 6)."""

    decomposition: str = option(
        help="directory written by `npeff decompose`", positional=True, metavar="DECOMPOSITION_DIR", resume=False
    )
    out: str | None = option(None, "output directory (default: DECOMPOSITION_DIR/unlearn)", resume=False)
    store: str | None = option(None, "the PEF store (default: the one the decomposition was fitted on)", resume=False)


@dataclass(frozen=True, kw_only=True)
class IclCommand(IclConfig):
    """``npeff icl``: fit the tuning classifier on a run's coefficients and labels, fit coefficients for held-out
    examples with the components fixed, and compare it with the zero-shot model and the best of N random k-shot
    prompts, with agreement rates (§6.2)."""

    decomposition: str = option(
        help="directory written by `npeff decompose`", positional=True, metavar="DECOMPOSITION_DIR", resume=False
    )
    out: str | None = option(None, "output directory (default: DECOMPOSITION_DIR/icl)", resume=False)
    store: str | None = option(None, "the PEF store (default: the one the decomposition was fitted on)", resume=False)


@dataclass(frozen=True, kw_only=True)
class ReportCommand(ReportConfig):
    """``npeff report``: a static component dashboard (index, per-component pages with exact token attributions,
    plots, perturbation and comparison results when the run has them) that opens from disk with no network."""

    decomposition: str = option(
        help="directory written by `npeff decompose`", positional=True, metavar="DECOMPOSITION_DIR"
    )
    out: str | None = option(None, "output directory (default: DECOMPOSITION_DIR/report)")
    store: str | None = option(None, "the PEF store (default: the one the decomposition was fitted on)")


@dataclass(frozen=True, kw_only=True)
class ExplainCommand(ExplainConfig):
    """``npeff explain``: which of a run's components were at work on an input: the model's prediction, the share of
    the input's PEF the decomposition explains, its top components with their tunings, top run examples and the
    exact token attributions of its loading. Prints a short view; writes a page and the JSON."""

    decomposition: str = option(
        help="directory written by `npeff decompose`", positional=True, metavar="DECOMPOSITION_DIR"
    )
    text: tuple[str, ...] | None = option(
        None,
        "input(s) to explain, put into the run's prompt template (\\n is a newline); repeat the flag for more",
        metavar="TEXT",
        repeat=True,
        escapes=True,
    )
    dataset: str | None = option(
        None, "also explain the first --n texts of a dataset (a built-in name, or a CSV / JSON Lines / Parquet file)"
    )
    text_column: str = option("text", "--dataset's column holding the text")
    n: int = option(8, "texts taken from --dataset")
    out: str | None = option(
        None, "directory for index.html (the page) and explanations.json (default: DECOMPOSITION_DIR/explain)"
    )
    report: str | None = option(
        None, "report whose component pages the page links to (default: DECOMPOSITION_DIR/report when it exists)"
    )
    store: str | None = option(None, "the PEF store (default: the one the decomposition was fitted on)")

    def validate(self):
        super().validate()
        self._require("text", bool(self.text) or self.dataset is not None, "or --dataset: give an input to explain")
        self._require("n", self.n >= 1, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RepairCommand(BaseConfig):
    """``npeff repair``: remove only the damaged shards of a PEF store; their examples become missing ranges,
    which rerunning `npeff collect` with the same arguments recollects."""

    store: str = option(help="the PEF store (a directory written by `npeff collect`)", positional=True, metavar="STORE")


@dataclass(frozen=True, kw_only=True)
class DemoCommand(BaseConfig):
    """``npeff demo``: SmolLM2-135M on movie reviews, collect -> decompose -> top examples and tunings.

    Sized for a 2-core CPU in a few minutes: the attention weights of the last ten layers (8.8M of the
    106M non-embedding parameters) at density 8; every knob scales up."""

    model: str = option("smollm2-135m", "model (npeff models)")
    n: int = option(640, "number of training reviews")
    params: tuple[str, ...] = option(
        ("model.layers.2[0-9].self_attn.*",), "glob patterns of parameters", metavar="GLOB"
    )
    proj_dim: int = option(8192, "projected dimension d")
    density: int = option(8, "projection density")
    projection: Literal["sparse", "kron"] = option("sparse", "sparse or kron (see npeff collect --help)")
    kron_k: int = option(16, "kron: each weight matrix is sketched to k x k")
    components: int = option(16, "number of NPEFF components")
    steps: int = option(1000, "joint NPEFF steps")
    batch_size: int = option(8, "examples per forward/backward pass")
    show: int = option(3, "examples printed per component")
    out: str = option("runs/demo", "run directory")
    progress: bool = option(True, "show progress bars")


@dataclass(frozen=True, kw_only=True)
class ZeroShotCommand(BaseConfig):
    """``npeff zero-shot``: zero-shot label-token accuracy on held-out movie reviews."""

    model: str = option("smollm2-135m", "model (npeff models)")
    n: int = option(300, "number of reviews (a third calibrates the threshold, the rest are scored)")
    max_length: int | None = option(
        256,
        "prompts in at most this many tokens, as collect fits them: a longer review loses its last tokens, the "
        "template is kept; none: every token",
    )

    def validate(self):
        self._require("n", self.n >= 3, "must be >= 3")
        self._require("max_length", self.max_length is None or self.max_length >= 1, "must be >= 1")


TRACE_KINDS = ("hidden", "mlp", "attn")


@dataclass(frozen=True, kw_only=True)
class TraceCommand(BaseConfig):
    """``npeff trace``: causal tracing (Meng et al. 2022, §2.1), a localisation independent of NPEFF: the subject's
    input embeddings are noised, then each layer's MLP or attention output is restored to its clean value at the last
    subject token; the indirect effect is the answer's probability regained. Writes OUT/trace.json (every fact's
    effects and the average profile) and prints the average per layer."""

    model: str = option("smollm2-135m", "built-in model name (npeff models), local checkpoint directory or HF repo id")
    backend: Backend = option("hf", "model backend")
    device: str = option("cpu", "device of the model")
    dataset: str = option(
        "geo-facts",
        "built-in dataset name, or a CSV / JSON Lines / Parquet file or datasets.save_to_disk directory, with "
        "columns text (the prompt), subject (a substring of it) and target (the answer; a space is put before it "
        "unless it starts with one)",
    )
    n: int = option(8, "facts traced: the first n of the split, which is in seeded random order")
    split: Literal["train", "test"] | None = option(
        "train",
        "split of the dataset: a seeded shuffle (--data-seed) of 80%% (train) or the other 20%% (test) of its rows; "
        "none: every row in file order",
    )
    data_seed: int = option(0, "seed of the train/test split")
    known_only: bool = option(
        False,
        "trace only facts the model knows, as the paper does: the first n rows of the split whose answer's first "
        "token is the model's top prediction",
    )
    kinds: tuple[str, ...] = option(
        ("mlp", "attn"), "outputs restored: mlp, attn, hidden (the layer's output, the residual stream)", metavar="KIND"
    )
    positions: Literal["last_subject", "all"] = option(
        "last_subject", "restore at the last subject token, or at every token of the prompt in turn"
    )
    window: int = option(
        1, "restore MLP and attention outputs over this many consecutive layers around each layer (the paper: 10)"
    )
    noise: float = option(
        3.0, "noise standard deviation, in standard deviations of the subject tokens' input embeddings (the paper: 3)"
    )
    samples: int = option(10, "noise draws per fact")
    seed: int = option(0, "seed of the noise draws")
    batch_size: int = option(64, "rows (noise draws x restorations) per forward pass")
    out: str = option("runs/trace", "directory for trace.json")
    progress: bool = option(True, "show a progress bar")

    def validate(self):
        for name in ("n", "samples", "window", "batch_size"):
            self._require(name, getattr(self, name) >= 1, "must be >= 1")
        self._require("noise", self.noise >= 0 and self.noise != float("inf"), "must be a finite number >= 0")
        kinds_ok = bool(self.kinds) and set(self.kinds) <= set(TRACE_KINDS) and len(set(self.kinds)) == len(self.kinds)
        self._require("kinds", kinds_ok, f"must be distinct names among {', '.join(TRACE_KINDS)}")
