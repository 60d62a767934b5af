"""Benchmark: where NPEFF's components live (:func:`npeff_lens.runs.locate`) against causal tracing (Meng et al.
2022, :func:`npeff_lens.tracing.causal_trace`), an established localisation method that shares nothing with NPEFF.

A next-token NPEFF run of SmolLM2-135M on ``geo-facts`` (``--n`` examples, every layer's attention and MLP weights,
the sparse projection) is decomposed into ``--components`` components, and each component is located by ``span``
(its direction rebuilt from the exact gradients of its top ``--k`` examples). Two per-layer profiles come from a
location: the component's energy fraction in each layer's MLP (gate + up + down) and in each layer's attention
(q, k, v, o). Causal tracing gives the same two profiles from the other side: the indirect effect of restoring
each layer's MLP output, or attention output, at the last subject token (``--window`` layers around it) on the
probability of the fact's answer, averaged over the component's first ``--trace-k`` examples (those that located
it, in rank order; ``--known-only``: the first that the model predicts right). The same trace over ``--n-random``
random examples of the run is the null: the dataset's average profile. Every trace uses one noise scale (3 x the
standard deviation of the subject tokens' embeddings over all the run's examples), so traces compare alike.

Per component (Spearman's rho over the layers whose weights the run collected; 1 = the same order of layers,
0 = unrelated):

- ``rho mlp`` / ``rho attn``: NPEFF's MLP (attention) energy profile against tracing's MLP (attention)
  indirect-effect profile on the component's own examples;
- ``rho mlp rnd`` / ``rho attn rnd``: the same profile against tracing on the random examples. A location that
  says something about *its* examples agrees more with tracing on them than with the dataset's average; when
  tracing's own-example profile is itself close to the average (``trace own~rnd``), the two cannot differ much;
- ``mlp share``: the component's energy share in MLPs (against the MLPs' share of the parameters, which a
  direction with no location gets) and tracing's share of the positive indirect effect in MLPs;
- the layers where each profile peaks.

The summary gives the medians and means over components, how many components agree more with their own
examples than with the random ones, and a mismatched-pairing null: each component's NPEFF profile against the
*other* components' own-example tracing profiles (``rho mlp other``). A positive ``rho mlp`` that is no larger than
``rho mlp rnd`` or ``rho mlp other`` says that both methods find the same general layer trend, not that a
component's location is specific to its examples. NPEFF's energy is where the gradient of the whole next-token
distribution lies; tracing measures where the subject's information reaches the answer's probability: the two
need not agree even where both are right. Attention in particular: at the last subject token its indirect effect
is small (the paper finds attention's effect at the last token), while NPEFF's attention energy counts every
position's gradient, so ``rho attn`` compares against a profile that is mostly noise. Tracing a fact the model does
not know measures little (its answer's probability is near 0 with and without the noise); ``known`` counts the
traced facts whose answer is the model's top prediction, and ``--known-only`` traces those alone.

    OMP_NUM_THREADS=2 python benchmarks/causal_tracing.py --out runs/causal-tracing
    python benchmarks/causal_tracing.py --out runs/causal-tracing-d8 --density 8 --k 8  # cheaper: collect, locate
    python benchmarks/causal_tracing.py --out runs/causal-tracing --known-only --window 5

Writes ``OUT/causal-tracing.json`` (every profile, every correlation, the summary and the seconds of each phase;
``causal-tracing-known-w5.json`` for the second line); the collected store (``OUT/pefs``), the fit (``OUT/npeff``,
with ``locations.json``) and each trace (``OUT/traces/*.json``, ``OUT/traces-known-w5/``) are read back by a rerun
with the same settings.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

MLP_MODULES = ("gate", "up", "down")
ATTN_MODULES = ("q", "k", "v", "o", "qkv")
KINDS = ("mlp", "attn")


# --------------------------------------------------------------------------------------------------
# Profiles and their agreement (pure: no model).
# --------------------------------------------------------------------------------------------------


def location_profile(location: dict, n_layers: int) -> dict[str, np.ndarray]:
    """``{"mlp": [layer], "attn": [layer]}``: a location's energy fraction per layer in the MLP (gate, up, down)
    and in attention (q, k, v, o, fused qkv), from its ``groups`` rows (norms and ``other`` left out)."""
    out = {kind: np.zeros(n_layers) for kind in KINDS}
    for row in location["groups"]:
        layer, module = row["layer"], row["module"]
        if layer is None or not 0 <= layer < n_layers:
            continue
        kind = "mlp" if module in MLP_MODULES else "attn" if module in ATTN_MODULES else None
        if kind is not None:
            out[kind][layer] += row["fraction"]
    return out


def trace_profile(trace: dict) -> dict[str, np.ndarray]:
    """``{"mlp": [layer], "attn": [layer]}``: the average indirect effect of a trace (``CausalTrace.to_dict()``)."""
    return {kind: np.asarray(trace["average_indirect_effect"][kind], dtype=float) for kind in KINDS}


def spearman(a, b) -> float:
    """Spearman's rho of two profiles over layers; NaN where either is constant (no order to compare)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"profiles of different or too few layers: {a.shape} and {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


def mlp_share(profile: dict[str, np.ndarray]) -> float:
    """The MLPs' share of a profile's total, each layer's negative values counted as 0 (a restoration that lowers
    the answer's probability moves nothing towards it); NaN when the total is 0."""
    mlp, attn = (float(np.clip(profile[k], 0, None).sum()) for k in KINDS)
    return mlp / (mlp + attn) if mlp + attn > 0 else math.nan


def peak(values) -> int:
    """The layer of the largest value."""
    return int(np.argmax(np.asarray(values, dtype=float)))


def covered(profiles: list[dict[str, np.ndarray]], layers) -> list[dict[str, np.ndarray]]:
    """The profiles over ``layers`` only (those whose weights the run collected: a layer without any has no
    NPEFF energy to rank)."""
    layers = list(layers)
    return [{k: np.asarray(p[k])[layers] for k in KINDS} for p in profiles]


def agreement(location: dict[str, np.ndarray], own: dict[str, np.ndarray], rand: dict[str, np.ndarray]) -> dict:
    """One component: its NPEFF profile against tracing on its own examples and on the random ones (each
    ``{"mlp": [layer], "attn": [layer]}``); peaks are positions in these profiles."""
    out = {}
    for kind in KINDS:
        out[f"rho_{kind}"] = spearman(location[kind], own[kind])
        out[f"rho_{kind}_random"] = spearman(location[kind], rand[kind])
        out[f"rho_{kind}_trace_own_random"] = spearman(own[kind], rand[kind])
        out[f"peak_{kind}_npeff"] = peak(location[kind])
        out[f"peak_{kind}_trace"] = peak(own[kind])
    out["mlp_share_npeff"] = mlp_share(location)
    out["mlp_share_trace"] = mlp_share(own)
    return out


def mismatched(locations: list[dict[str, np.ndarray]], owns: list[dict[str, np.ndarray]], kind: str) -> list[float]:
    """Per component ``j``: the mean rho of its NPEFF profile against the other components' own-example tracing
    profiles (NaN with one component)."""
    out = []
    for j, loc in enumerate(locations):
        rhos = [spearman(loc[kind], own[kind]) for i, own in enumerate(owns) if i != j]
        rhos = [r for r in rhos if math.isfinite(r)]
        out.append(statistics.fmean(rhos) if rhos else math.nan)
    return out


def summarize(rows: list[dict]) -> dict:
    """Over the components: the median and mean of each correlation, the mean shares, and how many agree more with
    tracing on their own examples than on the random ones (or on the other components')."""

    def finite(name):
        return [r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])]

    out: dict = {"n_components": len(rows)}
    names = [f"rho_{k}{s}" for k in KINDS for s in ("", "_random", "_other", "_trace_own_random")]
    for name in (*names, "mlp_share_npeff", "mlp_share_trace"):
        v = finite(name)
        out[name] = {
            "median": statistics.median(v) if v else None,
            "mean": statistics.fmean(v) if v else None,
            "n": len(v),
        }
    for kind in KINDS:
        for null in ("random", "other"):
            pairs = [(r[f"rho_{kind}"], r[f"rho_{kind}_{null}"]) for r in rows]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None and math.isfinite(a + b)]
            out[f"{kind}_own_beats_{null}"] = f"{sum(a > b for a, b in pairs)}/{len(pairs)}"
    pairs = [(r["mlp_share_npeff"], r["mlp_share_trace"]) for r in rows]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    out["rho_mlp_share_across_components"] = (
        spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else None
    )
    return out


# --------------------------------------------------------------------------------------------------
# The run: collect, decompose, locate, trace.
# --------------------------------------------------------------------------------------------------


def _prepare(a, adapter, data, seconds: dict):
    import npeff_lens as nl
    from npeff_lens.runs import decompose_store
    from npeff_lens.tasks import NextToken

    out = Path(a.out)
    task = NextToken("{text}", expectation_projections=a.expectation_projections, seed=0)
    t0 = time.time()
    store = nl.collect_pefs(
        adapter,
        data,
        task,
        out / "pefs",
        n=a.n,
        proj_dim=a.proj_dim,
        density=a.density,
        params=a.params,
        batch_size=a.batch_size,
        progress=not a.quiet,
    )
    seconds["collect"] = time.time() - t0
    t0 = time.time()
    decompose_store(store, out / "npeff", n_components=a.components, progress=not a.quiet)
    seconds["decompose"] = time.time() - t0
    return store


def _facts(store, data) -> list[dict]:
    """Per store example: its prompt, subject, answer and dataset row (the metadata's ``index``, checked against
    the text; by text where they differ)."""
    meta = store.metadata
    texts, index = list(meta["text"]), list(meta["index"])
    columns = {c: list(data[c]) for c in ("text", "subject", "target")}
    by_text = {}
    for i, t in enumerate(columns["text"]):
        by_text.setdefault(t, i)
    facts = []
    for i, text in enumerate(texts):
        row = index[i] if 0 <= index[i] < len(data) and columns["text"][index[i]] == text else by_text.get(text)
        if row is None:
            raise ValueError(f"store example {i} ({text!r}) is not in the dataset")
        target = columns["target"][row]
        answer = target if target[:1].isspace() else " " + target
        facts.append({"example": i, "row": row, "prompt": text, "subject": columns["subject"][row], "answer": answer})
    return facts


def _trace(a, adapter, facts: list[dict], examples: list[int], std: float, path: Path) -> dict:
    """The causal trace of ``examples`` (store indices), read back from ``path`` when it holds the same one."""
    from npeff_lens.io import read_json, write_json
    from npeff_lens.tracing import causal_trace

    key = {
        "examples": examples,
        "window": a.window,
        "noise": a.noise,
        "samples": a.samples,
        "seed": a.seed,
        "embedding_std": std,
        "model": a.model,
    }
    if path.exists():
        stored = read_json(path)
        if stored.get("key") == key:
            return stored["trace"]
    chosen = [facts[i] for i in examples]
    trace = causal_trace(
        adapter,
        [f["prompt"] for f in chosen],
        [f["subject"] for f in chosen],
        [f["answer"] for f in chosen],
        noise=a.noise,
        n_samples=a.samples,
        kinds=KINDS,
        window=a.window,
        seed=a.seed,
        batch_size=a.trace_batch_size,
        embedding_std=std,
        show_progress=not a.quiet,
    ).to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "trace": trace})
    return trace


def _layout_sizes(layout) -> tuple[float, list[int]]:
    """``(the MLPs' share of the attention and MLP parameters, the layers that have either)``."""
    from npeff_lens.locations import parameter_group

    sizes, layers = dict.fromkeys(KINDS, 0), set()
    for e in layout:
        layer, module = parameter_group(e["name"])
        kind = "mlp" if module in MLP_MODULES else "attn" if module in ATTN_MODULES else None
        if kind and layer is not None:
            sizes[kind] += int(e["numel"])
            layers.add(layer)
    return sizes["mlp"] / max(1, sum(sizes.values())), sorted(layers)


def _variant(a) -> str:
    """The suffix of the results and traces of a variant of the trace: ``""``, ``"-known"``, ``"-w5"``, ..."""
    return ("-known" if a.known_only else "") + (f"-w{a.window}" if a.window != 1 else "")


def run(a) -> dict:
    import torch

    import npeff_lens as nl
    from npeff_lens.io import write_json
    from npeff_lens.runs import locate
    from npeff_lens.tracing import embedding_std, known_facts, trace_modules

    if a.threads:
        torch.set_num_threads(a.threads)
    t_start, seconds = time.time(), {}
    adapter = nl.load_model(a.model)
    data = nl.load_dataset("geo-facts", split="train", seed=0)
    store = _prepare(a, adapter, data, seconds)
    out = Path(a.out)
    t0 = time.time()
    located = locate(out / "npeff", method="span", k=a.k, adapter=adapter, progress_bar=not a.quiet)["components"]
    seconds["locate"] = time.time() - t0

    t0 = time.time()
    facts = _facts(store, data)
    n_layers = trace_modules(adapter).n_layers
    std = embedding_std(adapter, [f["prompt"] for f in facts], [f["subject"] for f in facts])
    known = known_facts(adapter, [f["prompt"] for f in facts], [f["answer"] for f in facts])
    seconds["facts"] = time.time() - t0

    rng = random.Random(a.seed)
    pool = [i for i in range(len(facts)) if known[i] or not a.known_only]
    randoms = sorted(rng.sample(pool, min(a.n_random, len(pool))))
    t0 = time.time()
    traces = out / f"traces{_variant(a)}"
    rand_trace = _trace(a, adapter, facts, randoms, std, traces / "random.json")
    seconds["trace_random"] = time.time() - t0
    param_share, layers = _layout_sizes(store.manifest["layout"])
    (rand,) = covered([trace_profile(rand_trace)], layers)

    rows, locs, owns, skipped = [], [], [], []
    t0 = time.time()
    for c in located:
        j = c["component"]
        if "groups" not in c:
            skipped.append({"component": j, "status": c.get("status"), "note": c.get("note")})
            continue
        chosen = [i for i in c["examples"] if known[i] or not a.known_only][: a.trace_k]
        if not chosen:
            skipped.append({"component": j, "status": "no known example", "note": "none of its examples is known"})
            continue
        trace = _trace(a, adapter, facts, chosen, std, traces / f"component-{j}.json")
        loc, own = covered([location_profile(c, n_layers), trace_profile(trace)], layers)
        locs.append(loc), owns.append(own)
        ranks = agreement(loc, own, rand)
        for key in ranks:
            if key.startswith("peak_"):
                ranks[key] = layers[ranks[key]]
        rows.append(
            {
                "component": j,
                "fit": c.get("fit"),
                "examples": chosen,
                "known": sum(known[i] for i in chosen),
                "rows": [facts[i]["row"] for i in chosen],
                "prompts": [facts[i]["prompt"] for i in chosen],
                "p_clean_mean": trace["average_p_clean"],
                "p_corrupted_mean": trace["average_p_corrupted"],
                **ranks,
                "npeff_profile": {k: loc[k].tolist() for k in KINDS},
                "trace_profile": {k: own[k].tolist() for k in KINDS},
            }
        )
        if not a.quiet:
            print(f"traced component {j} ({len(chosen)} examples, {time.time() - t0:.0f} s so far)", flush=True)
    seconds["trace_components"] = time.time() - t0
    for kind in KINDS:
        for r, other in zip(rows, mismatched(locs, owns, kind)):
            r[f"rho_{kind}_other"] = other
    seconds["total"] = time.time() - t_start

    result = {
        "model": a.model,
        "dataset": "geo-facts",
        "settings": {k: v for k, v in vars(a).items() if k not in ("quiet",)},
        "n_layers": n_layers,
        "n_known": sum(known),
        "n_examples": len(facts),
        "embedding_std": std,
        "layers": layers,
        "mlp_param_share": param_share,
        "random": {
            "examples": randoms,
            "known": sum(known[i] for i in randoms),
            "p_clean_mean": rand_trace["average_p_clean"],
            "p_corrupted_mean": rand_trace["average_p_corrupted"],
            "profile": {k: rand[k].tolist() for k in KINDS},
            "mlp_share": mlp_share(rand),
            "peak_mlp": layers[peak(rand["mlp"])],
            "peak_attn": layers[peak(rand["attn"])],
        },
        "components": rows,
        "skipped": skipped,
        "summary": summarize(rows),
        "seconds": seconds,
    }
    path = out / f"causal-tracing{_variant(a)}.json"
    write_json(path, result)
    print(format_table(result))
    print(f"wrote {path}")
    return result


def _f(v, spec=".2f") -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_table(result: dict) -> str:
    """The per-component table, the random examples' profile and the summary, as printed."""
    head = (
        f"{'comp':>4} {'fit':>5} {'known':>5} {'p_clean':>7} {'rho mlp':>7} {'rnd':>5} {'other':>5} "
        f"{'rho attn':>8} {'rnd':>5} {'other':>5} {'trace own~rnd':>13} {'mlp share E/IE':>14} "
        f"{'peak mlp E/IE':>13} {'peak attn E/IE':>14}"
    )
    lines = [head]
    for r in result["components"]:
        lines.append(
            f"{r['component']:>4} {_f(r['fit']):>5} {r['known']:>2}/{len(r['examples']):<2} "
            f"{_f(r['p_clean_mean'], '.3f'):>7} {_f(r['rho_mlp']):>7} {_f(r['rho_mlp_random']):>5} "
            f"{_f(r['rho_mlp_other']):>5} {_f(r['rho_attn']):>8} {_f(r['rho_attn_random']):>5} "
            f"{_f(r['rho_attn_other']):>5} "
            f"{_f(r['rho_mlp_trace_own_random']) + '/' + _f(r['rho_attn_trace_own_random']):>13} "
            f"{_f(r['mlp_share_npeff']) + '/' + _f(r['mlp_share_trace']):>14} "
            f"{str(r['peak_mlp_npeff']) + '/' + str(r['peak_mlp_trace']):>13} "
            f"{str(r['peak_attn_npeff']) + '/' + str(r['peak_attn_trace']):>14}"
        )
    for s in result["skipped"]:
        lines.append(f"{s['component']:>4} skipped: {s['status']} ({s['note']})")
    rnd = result["random"]
    lines.append(
        f"random: {len(rnd['examples'])} examples ({rnd['known']} known), p_clean {_f(rnd['p_clean_mean'], '.3f')}, "
        f"mlp share of IE {_f(rnd['mlp_share'])}, peak mlp layer {rnd['peak_mlp']}, peak attn layer {rnd['peak_attn']}"
        f"; MLPs hold {_f(result['mlp_param_share'])} of the parameters; {result['n_known']}/{result['n_examples']} "
        "of the run's facts known"
    )
    s = result["summary"]
    lines.append("summary over components (median / mean):")
    for name in (
        "rho_mlp",
        "rho_mlp_random",
        "rho_mlp_other",
        "rho_attn",
        "rho_attn_random",
        "rho_attn_other",
        "rho_mlp_trace_own_random",
        "rho_attn_trace_own_random",
        "mlp_share_npeff",
        "mlp_share_trace",
    ):
        lines.append(f"  {name:<26} {_f(s[name]['median']):>6} / {_f(s[name]['mean']):<6} (n={s[name]['n']})")
    lines.append(
        f"  own beats random: mlp {s['mlp_own_beats_random']}, attn {s['attn_own_beats_random']}; own beats other "
        f"components': mlp {s['mlp_own_beats_other']}, attn {s['attn_own_beats_other']}; rho of mlp shares across "
        f"components {_f(s['rho_mlp_share_across_components'])}"
    )
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    return "\n".join(lines)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/causal-tracing", help="directory of the run and the results (resumes)")
    p.add_argument("--model", default="smollm2-135m", help="built-in model name")
    p.add_argument("--n", type=int, default=192, help="geo-facts training examples collected")
    p.add_argument("--components", type=int, default=8, help="NPEFF components")
    p.add_argument("--expectation-projections", type=int, default=4, help="r' rows of the next-token PEF (App. B)")
    p.add_argument("--params", nargs="+", default=None, help="parameter globs (default: all but embeddings and norms)")
    p.add_argument("--proj-dim", type=int, default=8192, help="projected dimension d")
    p.add_argument("--density", type=int, default=32, help="projection density")
    p.add_argument("--batch-size", type=int, default=8, help="examples per collection and locating pass")
    p.add_argument("--k", type=int, default=16, help="top examples that locate each component (span)")
    p.add_argument("--trace-k", type=int, default=6, help="of those, the first traced per component")
    p.add_argument("--known-only", action="store_true", help="trace only facts whose answer the model predicts")
    p.add_argument("--n-random", type=int, default=16, help="random examples of the run traced as the null")
    p.add_argument("--window", type=int, default=1, help="layers restored around each layer (the paper's figures: 10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise, in standard deviations of the embeddings")
    p.add_argument("--samples", type=int, default=10, help="noise draws per fact")
    p.add_argument("--trace-batch-size", type=int, default=64, help="rows per forward while tracing")
    p.add_argument("--seed", type=int, default=0, help="noise draws and the random examples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None):
    run(_args(argv))


if __name__ == "__main__":
    main()
