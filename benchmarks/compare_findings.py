"""The paper's two findings about the baselines (§5), measured on offline data with `npeff compare`'s metrics.

(a) ``--finding argmax``: next-token task on ``geo-facts`` with SmolLM2-135M (the TriviaQA stand-in):
    the fraction of gradient clusters whose top k share the argmax prediction vs the fraction of NPEFF
    components that do (paper, SmolLM2-360M on TriviaQA, 2,048 each: 1,690 vs 384 of 2,048).
(b) ``--finding sae-layers``: on an existing movie-reviews run (``--run DECOMPOSITION_DIR``, e.g. the demo's),
    TopK SAEs at an early, a middle and a late layer: the fraction of alive latents tuned to the label / the
    prediction / tokens, beside NPEFF's (paper Table 5: SAEs below 5% for label and prediction).
(c) ``--finding four-methods``: NPEFF, gradient clusters, TopK SAE and SNMF side by side, with selectivity (one
    causal test: KL on a component's top examples / target KL on random ones), on movie reviews (label tokens;
    the ``--run`` decomposition's store, re-decomposed at each ``--sizes`` value) and on ``geo-facts`` (next
    token; collected here), SAE and SNMF at the same layer (``--layer``). Does SNMF beat the SAE on selectivity?

Every size is a flag; the run directories resume, so a rerun only prints. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def finding_argmax(args) -> dict:
    import npeff_lens as nl
    from npeff_lens.runs import compare, decompose_store
    from npeff_lens.tasks import NextToken

    root = Path(args.out) / "argmax"
    adapter = nl.load_model("smollm2-135m")
    data = nl.load_dataset("geo-facts", split="train", seed=0)
    task = NextToken("{text}", expectation_projections=args.expectation_projections, seed=0)  # factual completions
    t0 = time.time()
    nl.collect_pefs(
        adapter,
        data,
        task,
        root / "pefs",
        n=args.n,
        proj_dim=args.proj_dim,
        density=args.density,
        params=args.params,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    t1 = time.time()
    decompose_store(root / "pefs", root / "npeff", n_components=args.components, progress=not args.quiet)
    t2 = time.time()
    res = compare(
        root / "npeff",
        methods=("npeff", "grad-cluster"),
        components=args.components,
        k=args.k,
        adapter=adapter,
        progress=not args.quiet,
    )
    return {"collect_seconds": t1 - t0, "decompose_seconds": t2 - t1, **res}


def finding_sae_layers(args) -> dict:
    from npeff_lens.analysis import method_summary, top_examples
    from npeff_lens.baselines.sae import TopKSAEBaseline
    from npeff_lens.models import load_model
    from npeff_lens.runs import label_columns, load_run
    from npeff_lens.tasks import task_from_config

    est, store = load_run(args.run)
    meta = store.metadata
    labels, _ = label_columns(store)
    preds = meta["prediction"]
    model = store.manifest["model"]
    adapter = load_model(model["name"], backend=model.get("backend", "hf"))
    prompts = task_from_config(store.manifest["task"]).bind(adapter).prompts(list(meta["text"]))
    out = {"npeff": method_summary(est.coefficients_, labels=labels, predictions=preds, k=args.k)}
    for layer in args.layers:
        hook = f"model.layers.{layer}"
        path = Path(args.out) / "sae-layers" / f"layer{layer}"
        if (path / "npeff_sae.json").exists():
            sae = TopKSAEBaseline.load(path)
        else:
            sae = TopKSAEBaseline(
                args.latents,
                args.sae_k,
                hook=hook,
                seed=0,
                total_tokens=args.sae_tokens or 200_000,
                show_progress=not args.quiet,
            )
            sae.fit(adapter, prompts)
            sae.save(path)
        coeffs = sae.coefficients_
        top = top_examples(coeffs, k=args.k)
        sets = [
            sae.active_token_sets(j, [int(i) for i in top[j].tolist() if coeffs[i, j] > 0])
            for j in range(coeffs.shape[1])
        ]
        out[f"sae@{hook}"] = {
            **method_summary(
                coeffs, labels=labels, predictions=preds, k=args.k, alive_min_examples=args.k, token_sets=sets
            ),
            "fit_seconds": sae.fit_seconds_,
        }
    return {"methods": out}


def _compare_at(run_dir: Path, components: int, args, adapter) -> dict:
    from npeff_lens.runs import compare

    t0 = time.time()
    res = compare(
        run_dir,
        methods=tuple(args.methods),
        components=components,
        k=args.k,
        keep_constant_tokens=args.keep_constant_tokens,
        sae_hook=f"model.layers.{args.layer - 1}",
        snmf_layer=args.layer,
        **({"sae_tokens": args.sae_tokens} if args.sae_tokens else {}),  # default: compare's
        selectivity=True,
        target_kl=args.target_kl,
        n_baseline=args.n_baseline,
        selectivity_components=args.selectivity_components,
        adapter=adapter,
        progress=not args.quiet,
    )
    return {**res, "seconds": time.time() - t0}


def _decomposed(store, out: Path, components: int, args) -> Path:
    from npeff_lens.runs import decompose_store

    decompose_store(store, out, n_components=components, progress=not args.quiet)
    return out


def finding_four_methods(args) -> dict:
    """(c): per dataset and size, the compare table with selectivity; SAE at the residual stream entering
    ``--layer`` (the output of layer ``layer - 1``), SNMF at layer ``--layer``'s MLP."""
    import npeff_lens as nl
    from npeff_lens.runs import load_run
    from npeff_lens.tasks import NextToken

    adapter, out, results = nl.load_model("smollm2-135m"), Path(args.out) / "four-methods", {}
    if "movie" in args.datasets:
        _, store = load_run(args.run)
        for c in args.sizes:
            d = Path(args.run) if c == 16 and not args.redecompose else _decomposed(store, out / f"movie-c{c}", c, args)
            results[f"movie-reviews, {c} components"] = _compare_at(d, c, args, adapter)
    if "geo" in args.datasets:
        data = nl.load_dataset("geo-facts", split="train", seed=0)
        task = NextToken("{text}", expectation_projections=args.expectation_projections, seed=0)
        t0 = time.time()
        nl.collect_pefs(
            adapter,
            data,
            task,
            out / "geo" / "pefs",
            n=args.geo_n,
            proj_dim=args.proj_dim,
            density=args.density,
            params=args.params,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        results["geo collect seconds"] = time.time() - t0
        for c in args.sizes:
            d = _decomposed(out / "geo" / "pefs", out / "geo" / f"c{c}", c, args)
            results[f"geo-facts, {c} components"] = _compare_at(d, c, args, adapter)
    return results


def _row(name, r) -> str:
    def f(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    keys = ("n_components", "alive", "tuned_label", "tuned_prediction", "tuned_tokens", "argmax_shared", "coverage")
    return f"| {name} | " + " | ".join(f(r.get(k)) for k in keys) + f" | {f(r.get('fit_seconds'))} |"


def _four_row(name, r) -> str:
    def f(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    keys = ("n_components", "alive", "tuned_label", "tuned_prediction", "argmax_shared", "coverage", "selectivity")
    n = f"{r.get('selectivity_n_evaluated')}/{len(r.get('selectivity_per_component') or [])}"
    return f"| {name} | " + " | ".join(f(r.get(k)) for k in keys) + f" | {n} | {f(r.get('fit_seconds'))} |"


def _print_four(res: dict) -> None:
    for title, table in res.items():
        if not isinstance(table, dict) or "methods" not in table:
            continue
        print(f"\n{title} ({table['seconds']:.0f} s)")
        print(
            "| method | components | alive | label | prediction | argmax-shared | coverage | selectivity | measured "
            "| fit s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in table["methods"].items():
            print(_four_row(name, r))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finding", choices=["argmax", "sae-layers", "four-methods"], required=True)
    p.add_argument("--out", default="runs/findings", help="run directories (resumable)")
    p.add_argument("--k", type=int, default=16, help="top examples per component")
    p.add_argument("--quiet", action="store_true")
    a = p.add_argument_group("argmax (a)")
    a.add_argument("--n", type=int, default=256, help="geo-facts training examples")
    a.add_argument("--components", type=int, default=16, help="NPEFF components = gradient clusters")
    a.add_argument("--expectation-projections", type=int, default=8, help="r' rows of the next-token PEF (App. B)")
    a.add_argument("--params", nargs="+", default=["model.layers.2[0-9].self_attn.*"], help="parameter globs")
    a.add_argument("--proj-dim", type=int, default=8192)
    a.add_argument("--density", type=int, default=8)
    a.add_argument("--batch-size", type=int, default=8)
    b = p.add_argument_group("sae-layers (b)")
    b.add_argument("--run", help="a movie-reviews decomposition directory (e.g. runs/demo/npeff)")
    b.add_argument("--layers", type=int, nargs="+", default=[3, 14, 26], help="early, middle, late layer")
    b.add_argument("--latents", type=int, default=512)
    b.add_argument("--sae-k", type=int, default=16)
    b.add_argument(
        "--sae-tokens",
        type=int,
        default=None,
        help="tokens each SAE trains on (default: 200,000 here; compare's own default in (c))",
    )
    c = p.add_argument_group("four-methods (c); also --run, --sae-tokens and the argmax flags for geo-facts")
    c.add_argument("--datasets", nargs="+", choices=["movie", "geo"], default=["movie", "geo"])
    c.add_argument("--sizes", type=int, nargs="+", default=[16, 64], help="components of every method")
    c.add_argument("--layer", type=int, default=15, help="SNMF at this layer's MLP; SAE at the residual entering it")
    c.add_argument("--geo-n", type=int, default=256, help="geo-facts training examples")
    c.add_argument("--target-kl", type=float, default=0.01)
    c.add_argument("--n-baseline", type=int, default=32)
    c.add_argument("--selectivity-components", type=int, default=None, help="first N components measured")
    c.add_argument("--redecompose", action="store_true", help="decompose movie reviews at 16 too (else --run's)")
    c.add_argument(
        "--methods",
        nargs="+",
        choices=["npeff", "grad-cluster", "sae", "snmf"],
        default=["npeff", "grad-cluster", "sae", "snmf"],
        help="methods compared (each method resumes on its own)",
    )
    c.add_argument(
        "--keep-constant-tokens",
        action="store_true",
        help="SAE and SNMF read the prompts' common prefix too (compare's --keep-constant-tokens)",
    )
    args = p.parse_args()
    t0 = time.time()
    finding = {"argmax": finding_argmax, "sae-layers": finding_sae_layers, "four-methods": finding_four_methods}
    res = finding[args.finding](args)
    res["seconds"] = time.time() - t0
    res["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.finding == "four-methods":
        _print_four(res)
    else:
        print("| method | components | alive | label | prediction | tokens | argmax-shared | coverage | fit s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in res["methods"].items():
            print(_row(name, r))
    print(f"total {res['seconds']:.0f}s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.finding}.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
