# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial: the processing strategies of a TransformerLens model
#
# NPEFF (Non-Negative Per-Example Fisher Factorization, Matena & Raffel) describes how a model processes its inputs.
# For every example it takes the model's *per-example Fisher* (PEF): which directions in parameter space change the
# model's output distribution on that example, and how much. It then factorises all the PEFs together into a few
# **components**. Each component is a direction in parameter space (a rank-1 matrix) with a non-negative
# coefficient per example, so it reads like a dictionary feature: the examples that load on it most show what it
# does, and perturbing the parameters along it changes the model's behaviour on those examples more than on others.
#
# This notebook goes through the whole loop on SmolLM2-135M, loaded as a TransformerLens `HookedTransformer`, and
# a sentiment task on movie reviews:
#
# 1. collect the PEFs of a small labelled set,
# 2. decompose them into components,
# 3. read each component's top examples and what it is tuned to,
# 4. find where in the model each component lives (layers, attention heads),
# 5. explain the prediction on a new input,
# 6. compare the components with a TopK sparse autoencoder (sae-lens) on the same examples,
# 7. perturb the model along one component and measure what changes.
#
# Every step writes into one run directory and can be resumed; each has a command-line twin (`npeff collect`,
# `npeff decompose`, `npeff top`, `npeff explain`, `npeff compare`, `npeff perturb`) that reads the same folders.

# %% [markdown]
# The imports. Every `npeff_lens` step below is called with `progress=False` so that this page shows results rather
# than progress bars (keep the bars in your own runs: they show the rate and the time left); the two environment
# variables do the same for the bars that transformers and datasets draw themselves while a checkpoint loads or a
# dataset is indexed.

# %%
import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import time
from pathlib import Path

import npeff_lens as nl
from npeff_lens import runs
from npeff_lens.analysis import active, top_examples, tuning_summary
from npeff_lens.comparison import format_compare
from npeff_lens.explain import explain, format_explanation
from npeff_lens.run_locations import location_lines
from npeff_lens.tasks import LabelTokens

started = time.time()

# %% [markdown]
# ## Settings
#
# The defaults below are tiny so that the whole notebook runs in a few minutes on a laptop CPU: 64 short reviews,
# the attention weights of the last two layers, 1024 projected dimensions and 6 components. The components of such a
# run are rough, and a few numbers below come with warnings that say so. For a real run, set `N_EXAMPLES = 640` (or
# more), `MAX_CHARS = None`, `PARAMS = ["blocks.2[0-9].attn.*W_*"]` (the attention of the last ten layers),
# `PROJ_DIM = 8192`, `N_COMPONENTS = 16` to `64`, `N_STEPS = 1000` and `K = 16` (the paper's tuning rule: 95 % of a
# component's top 16 examples share a label), and point `RUN` at a new folder; collection then takes about half an
# hour on a CPU and minutes on a GPU.

# %% tags=["parameters"]
N_EXAMPLES = 64  # labelled reviews whose PEFs are collected
MAX_CHARS = 100  # leave out longer reviews (short prompts keep this run fast); None keeps every review
PARAMS = ["blocks.2[89].attn.*W_*"]  # TransformerLens names (globs): W_Q, W_O, _W_K, _W_V of layers 28 and 29
PROJ_DIM = 1024  # each per-example gradient is projected to this many dimensions (sparse random projection)
DENSITY = 8  # outputs each parameter lands in (the paper uses 32)
N_COMPONENTS = 6
N_STEPS = 200  # joint steps of the NPEFF fit (after 50 warm-up steps)
K = 8  # top examples per component that define its tuning and where it lives
RUN = "runs/tutorial"  # the run directory, relative to the working directory

# %% [markdown]
# ## 1. The model, the data and the task
#
# `load_model` loads one of the built-in offline checkpoints and wraps it in an *adapter*, the one interface the
# library needs (tokenise, forward, named parameters). `backend="hooked"` builds a TransformerLens
# `HookedTransformer`; the model itself is `adapter.model`. A `HookedTransformer` you already have is wrapped with
# `nl.adapt(model)`, and so are a HuggingFace model (`nl.adapt(model, tokenizer)`), a `TransformerBridge` or an
# nnsight wrapper: parameter names are then the underlying model's own.

# %%
adapter = nl.load_model("smollm2-135m", backend="hooked")
model = adapter.model
print(type(model).__name__, f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, {model.cfg.n_heads} heads")
for name, p in adapter.named_parameters(include=PARAMS):
    print(f"  {name:24s} {tuple(p.shape)}")

# %% [markdown]
# The data are Rotten Tomatoes review snippets, shipped offline; `load_dataset` returns a `datasets.Dataset` with
# `text`, `label` and `label_name`, split into a seeded 80 % train and 20 % test. Any `datasets.Dataset` with a
# `text` column works the same way (or a CSV / JSON Lines / Parquet file, by path).
#
# The task says what the output distribution p(y|x) is. Here it is the paper's choice for sentiment (App. E.1): a
# prompt template, and a categorical over two label tokens, renormalised over just those two. The PEF of an example
# is the Fisher of that two-way distribution with respect to the selected parameters.

# %%
data = nl.load_dataset("movie-reviews", split="train")
if MAX_CHARS is not None:
    data = data.filter(lambda row: len(row["text"]) <= MAX_CHARS)
print(data)
for row in data.select(range(3)):
    print(f"  [{row['label_name']}] {row['text'][:100]}")

task = LabelTokens("Review: {text}\nSentiment:", [" negative", " positive"])

# %% [markdown]
# ## 2. Collect the per-example Fishers
#
# `collect_pefs` runs the model on each example, takes the gradient of each outcome's log-probability with respect
# to the selected parameters, and projects each one to `PROJ_DIM` dimensions as soon as it exists (the projection
# is defined by a seed and never materialised). The store on disk holds, per example, a `2 × PROJ_DIM` matrix `G`
# with `F = GᵀG`, and the metadata the analysis reads: the prediction, the probabilities and the PEF's norm.
# Calling it again with the same settings resumes where it stopped; other settings into the same folder are
# refused, with the differing fields named.

# %%
run = Path(RUN)
store = nl.collect_pefs(
    adapter, data, task, run / "pefs", n=N_EXAMPLES, params=PARAMS, proj_dim=PROJ_DIM, density=DENSITY, progress=False
)
meta = store.metadata
accuracy = sum(p == y for p, y in zip(meta["prediction"], meta["label"])) / len(store)
print(f"{len(store)} PEFs of {store.manifest['n_params']:,} parameters, projected to {PROJ_DIM} dimensions")
print(f"zero-shot accuracy of the model on them (argmax over the two label tokens): {accuracy:.2f}")
for row in meta.select(range(3)):
    probs = " ".join(f"{p:.2f}" for p in row["probs"])
    print(f"  label={row['label_name']:<9} pred={row['prediction_name']:<9} p=({probs})  |F|={row['pef_norm']:.3g}")

# %% [markdown]
# ## 3. Decompose
#
# `runs.decompose_store` fits the `NPEFF` estimator (an sklearn-shaped class: `nl.NPEFF(n_components=...).fit(store)`
# does the same in memory) and saves it in a run directory next to the store, with checkpoints. The fit normalises
# each PEF to unit Frobenius norm and minimises `Σ_i ‖F_i − Σ_j W_ij h_j h_jᵀ‖²` with `W ≥ 0`; the loss is the
# fraction of the (unit) PEFs the components leave unexplained.

# %%
decomposition = run / "npeff"
npeff = runs.decompose_store(
    store, decomposition, n_components=N_COMPONENTS, n_steps=N_STEPS, n_warmup_steps=50, progress=False
)
W = npeff.coefficients_  # [examples, components], non-negative
print(f"coefficients {tuple(W.shape)}, components {tuple(npeff.components_.shape)}")
print(f"unexplained (mean relative error of the unit PEFs): {npeff.reconstruction_err_:.3f}")
print("active examples per component:", active(W).sum(0).tolist())

# %% [markdown]
# ## 4. Top examples and tunings
#
# A component is read through the examples with the largest coefficients on it. It is *tuned* to a label (or to a
# prediction) when at least 95 % of its top `K` examples share it (§3.1). `npeff_lens.analysis` computes these from
# any coefficient matrix, so the same functions score the baselines below.

# %%
summary = tuning_summary(W, labels=meta["label_name"], predictions=meta["prediction_name"], k=K)
print(f"tuned to a label: {summary['label']:.0%}, to a prediction: {summary['prediction']:.0%} of the components")
print("per component, tuned prediction:", summary["tunings"]["prediction"])
top = top_examples(W, k=3)
print("top 3 examples of component 0:", top[0].tolist())

# %% [markdown]
# `runs.top_report` prints the same as `npeff top`: per component its tuning and its top examples, with each one's
# coefficient, label and prediction.

# %%
report = runs.top_report(decomposition, k=K, show=3, width=80)
print("\n".join(report["lines"]))
print(report["summary_line"])

# %% [markdown]
# ## 5. Where each component lives
#
# A component is a direction in the *projected* space; to say which layers and heads it uses, `runs.locate` rebuilds
# it in parameter space. The default method, `"span"`, reruns the model on the component's top `K` examples and
# finds the combination of their exact (unprojected) gradients that the projection maps onto the component; its
# `fit` says how much of the component that span reproduces (1 is all of it). Each line below gives a group's
# share of the component's energy and, in brackets, that share over the group's share of the parameters: above 1,
# the component concentrates there. The result is kept in the run (`npeff/locations.json`), and `npeff top --where`,
# `npeff explain` and the report show it. (The other method, `"recovered"`, works from the projected numbers alone;
# under a sparse projection its location is at chance, and its lines say so.)

# %%
located = runs.locate(decomposition, method="span", k=K, adapter=adapter, progress_bar=False)
kind = store.manifest["projection"]["kind"]
for entry in located["components"]:
    lines, _ = location_lines(entry, kind)
    print(f"component {entry['component']}  (span fit {entry.get('fit', float('nan')):.2f})")
    print("\n".join(lines))

# %% [markdown]
# ## 6. Explain a new input
#
# `explain` computes the PEF of a text the run has never seen, in the run's space (same template, parameters and
# projection), and fits its coefficients with the components fixed. It reports how much of that PEF the components
# explain, the input's top components with their tunings, where they live, and the run's top example for each.
#
# It also splits each component's loading over the input's tokens, exactly, from the gradients of the modules'
# per-token outputs. A `HookedTransformer` applies its attention weights in einsums that no module hook sees, so
# with the `hooked` backend the whole loading lands in the `remainder` ("parameters outside the module hooks") and
# the token shares read 0 %; load the model with `backend="hf"` (or `"bridge"`) to see the tokens that carry it.

# %%
text = "A gorgeous, heartfelt film with a cast that never misses a beat."
(explanation,) = explain(decomposition, [text], adapter=adapter, top=2, n_examples=1, k=K)
print(format_explanation(explanation, width=90))

# %% [markdown]
# ## 7. Compare with a TopK sparse autoencoder
#
# `runs.compare` fits other decompositions of the field on the same examples and scores every method with the same
# metrics (`npeff_lens.analysis.method_summary`): components `alive`, the fraction tuned to a label, to a prediction
# or (for activation methods) to a token, `argmax_shared` (the top examples share the model's prediction),
# `coverage` and the time of the fit. Methods are named from a registry: `npeff`, `grad-cluster` (k-means of
# per-example gradients), `sae` and `snmf`. The SAE is a sae-lens `TopK` SAE trained on the residual stream entering
# the middle layer (`sae_hook` picks another place, `sae_path` compares an SAE you already have), with as many
# latents as NPEFF has components. With `selectivity=True` every method also gets the same causal test: an
# intervention sized to move random examples by a target KL, measured on each component's own top examples.
#
# On a few thousand tokens the SAE's latents are degenerate (most fire somewhere in every review), and the
# comparison says so with a warning and the remedy: on a real run, give it more examples and `sae_tokens`.

# %%
results = runs.compare(decomposition, methods=("npeff", "sae"), k=K, sae_tokens=20_000, adapter=adapter, progress=False)
print(format_compare(results))

# %% [markdown]
# ## 8. Perturb the model along a component
#
# Finally the causal check of §3.3: recover a component's direction in parameter space, add it to the parameters
# with a fixed norm (`magnitude`, both signs; the sign that moves the top examples more is kept), and compare the KL
# divergence of p(y|x) on the component's top examples with the KL on random examples. A **KL ratio** well above 1
# means the direction acts on the examples that load on the component, not on everything; the **PEF-norm ratio**
# says how much more sensitive those examples are to any change to begin with. We take the first component tuned to
# a prediction (or component 0 when none is).

# %%
tuned = [j for j, t in enumerate(summary["tunings"]["prediction"]) if t is not None]
j = tuned[0] if tuned else 0
result = runs.run_perturbation(
    decomposition,
    components=[j],
    magnitude=20.0,
    top_k=K,
    n_baseline=24,
    out=run / "perturb",
    adapter=adapter,
    progress=False,
)
rec = result["records"][0]
print(f"component {j}: sign {rec['sign']}  KL ratio {rec['kl_ratio']:.1f}  PEF-norm ratio {rec['pef_norm_ratio']:.2f}")
print(f"  mean KL on its top {rec['n_top']} examples: {rec['kl_top_plus']:.2e} (+)  {rec['kl_top_minus']:.2e} (-)")
print(f"  mean KL on {rec['n_base']} random examples:   {rec['kl_base_plus']:.2e} (+)  {rec['kl_base_minus']:.2e} (-)")

# %% [markdown]
# ## Where to go next
#
# - The run directory holds everything: `pefs/` (the store and its manifest), `npeff/` (the fit, `locations.json`,
#   `compare/`) and `perturb/`. `npeff report runs/tutorial/npeff` builds an HTML dashboard of every component.
# - Scale up with the settings at the top; on a GPU, pass `device="cuda"` to `load_model`.
# - The same run works from the command line: `npeff top runs/tutorial/npeff --where`,
#   `npeff explain runs/tutorial/npeff "some text"`, `npeff perturb runs/tutorial/npeff`.

# %%
print(f"notebook ran in {time.time() - started:.0f} s; run directory: {run.resolve()}")
