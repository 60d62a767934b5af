"""Benchmark: how concentrated NPEFF's components are in the model, and whether where they live is causal.

For each component of a decomposition run, its direction is recovered in parameter space as ``npeff compare
--selectivity`` recovers it (``--recovery``, rejection at ``--reject-threshold``), and located over (layer,
module) groups (:func:`npeff_lens.locations.component_locations`, as ``npeff top --where`` does):

- **concentration**: ``top_energy``, the fraction of the direction's energy in its top ``--share`` of groups
  (5 %: ``top5pct`` of ``npeff top --where``), beside ``uniform``, the share of the parameters those groups hold
  (what a direction spread evenly would put there);
- **causality**: the selectivity (:mod:`npeff_lens.selectivity`: the perturbation is sized so that the mean KL
  on ``--n-baseline`` random examples equals ``--target-kl``, then the mean KL on the component's top ``--k``
  examples is divided by it) of three perturbations: the **full** direction (the baseline every ratio is
  against, measured in the same run), the direction **restricted to its top groups**
  (:func:`npeff_lens.locations.restricted`), and a **control** restricted to as many groups drawn at random
  from the others that hold any of its energy (their parameter share: ``control_uniform``).
  ``kept = selectivity(top groups) / selectivity(full)``, and the same for the control; ``excess kept``
  compares the parts above 1 (a selectivity of 1 moves top examples no more than random ones).

    python benchmarks/locations.py runs/demo/npeff --components 16

Writes ``DECOMPOSITION_DIR/locations-benchmark.json`` (``--out``) after each component and resumes from it
when rerun with the same settings on the same fit. Components with fewer than ``--k`` active examples are
skipped, as in ``npeff compare --selectivity``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from npeff_lens import selectivity as sel
from npeff_lens.io import read_json, write_json
from npeff_lens.locations import component_locations, parameter_group, restricted, top_group_keys
from npeff_lens.perturb import _Reference, geometric_mean
from npeff_lens.recovery import estimate_lambda_max, projection_from_config, recover_direction, unflatten
from npeff_lens.rundir import load_with_model


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("decomposition", metavar="DECOMPOSITION_DIR", help="directory written by `npeff decompose`")
    p.add_argument("--components", type=int, default=None, help="the first N components (default: all)")
    p.add_argument("--k", type=int, default=16, help="top examples per component (npeff compare's default)")
    p.add_argument("--n-baseline", type=int, default=32, help="random baseline examples that size a perturbation")
    p.add_argument("--target-kl", type=float, default=0.01, help="mean KL (nats) on the baseline examples")
    p.add_argument("--share", type=float, default=0.05, help="share of the groups kept (0.05: the top 5 %%)")
    p.add_argument("--recovery", default="adjoint", help="how a direction is recovered (npeff compare --recovery)")
    p.add_argument("--reject-threshold", type=float, default=0.5, help="npeff compare --reject-threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the baseline examples and the control's groups")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON results (default: DECOMPOSITION_DIR/locations-benchmark.json)")
    return p.parse_args(argv)


def _selectivity(adapter, task, prompts, layout, flat, top, reference, a) -> dict:
    try:
        direction = sel.ParameterDirection(adapter, unflatten(flat.float(), layout))
    except ValueError as e:  # nothing of the direction on these groups
        return {"status": "zero", "error": str(e)}
    try:
        r = sel.component_selectivity(adapter, task, prompts, direction, top, target_kl=a.target_kl,
                                      n_baseline=a.n_baseline, seed=a.seed, reference=reference,
                                      batch_size=a.batch_size)  # fmt: skip
    except sel.UnreachableTargetError as e:
        return {"status": "unreachable", "error": str(e)}
    return {"status": "ok", **r}


def _component(j, est, layout, op, lam, adapter, task, prompts, reference, a) -> dict:
    top = sel.top_positive(torch.as_tensor(est.coefficients_), j, a.k)
    if len(top) < a.k:
        return {"component": j, "status": "excluded", "n_top": len(top)}
    comps = torch.as_tensor(est.components_).float()
    flat, _ = recover_direction(comps, j, op, method=a.recovery, reject_threshold=a.reject_threshold, lambda_max=lam)
    flat = flat.double()
    loc = component_locations(flat, layout)
    keys = top_group_keys(loc, a.share)
    # the control: as many other groups, drawn among those the direction reaches at all
    others = [(r["layer"], r["module"]) for r in loc["groups"][len(keys) :] if r["energy"] > 0]
    control = random.Random(a.seed * 100_003 + j).sample(others, min(len(keys), len(others)))
    numel = {}
    for e in layout:
        g = parameter_group(e["name"])
        numel[g] = numel.get(g, 0) + int(e["numel"])
    total = sum(numel.values())
    rec = {
        "component": j,
        "status": "ok",
        "n_groups": loc["n_groups"],
        "top_groups": [list(k) for k in keys],
        "control_groups": [list(k) for k in control],
        "top5pct": loc["top5pct"],
        "top_energy": sum(r["fraction"] for r in loc["groups"] if (r["layer"], r["module"]) in set(keys)),
        "uniform": sum(numel[k] for k in keys) / total,
        "control_energy": sum(r["fraction"] for r in loc["groups"] if (r["layer"], r["module"]) in set(control)),
        "control_uniform": sum(numel[k] for k in control) / total,
    }
    for name, kept in (("full", None), ("top", keys), ("control", control)):
        if kept is not None and not kept:
            rec[name] = {"status": "no-control", "error": "no other group holds any of the direction's energy"}
            continue
        v = flat if kept is None else restricted(flat, layout, kept)
        rec[name] = _selectivity(adapter, task, prompts, layout, v, top, reference, a)
    return rec


def _ratio(rec, name, excess=False):
    full, part = rec["full"], rec[name]
    if rec["status"] != "ok" or full["status"] != "ok" or part["status"] != "ok":
        return None
    if excess:
        return (part["selectivity"] - 1) / (full["selectivity"] - 1) if full["selectivity"] > 1 else None
    return part["selectivity"] / full["selectivity"]


def main(argv=None):
    a = _args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    d = Path(a.decomposition)
    out = Path(a.out) if a.out else d / "locations-benchmark.json"
    t0 = time.time()
    est, store, adapter, task = load_with_model(d)
    key = {k: v for k, v in vars(a).items() if k not in ("threads", "out", "components", "batch_size")}
    # the decomposition itself, not only where it lies: a refit into the same directory is measured again
    key.update(decomposition=str(d.resolve()), n_components=int(est.n_components),
               reconstruction_err=float(est.reconstruction_err_), n_examples=len(store))  # fmt: skip
    done = {}
    if out.exists():
        stored = read_json(out)
        if stored.get("key") == key:
            done = {r["component"]: r for r in stored["components"]}
        else:
            print(f"{out} holds results for other settings or another fit: measuring again (it is overwritten)")
    manifest = est.manifest_
    layout = manifest["layout"]
    op = projection_from_config(manifest["projection"]) if manifest.get("projection") else None
    lam = estimate_lambda_max(op) * 1.1 if op is not None and a.recovery not in ("adjoint", "minnorm") else None
    prompts = task.prompts(list(store.metadata["text"]))
    reference = _Reference(adapter, task, prompts, a.batch_size)
    n = min(a.components or est.n_components, est.n_components)
    print(f"{d}: {n} of {est.n_components} components, {len(prompts)} examples, {len(layout)} tensors")
    print(f"{'comp':>4} {'energy':>8} {'uniform':>8} {'S full':>8} {'S top':>8} {'S ctrl':>8} {'kept':>6} "
          f"{'ctrl':>6}  top groups")  # fmt: skip
    for j in range(n):
        if j not in done:
            t1 = time.time()
            done[j] = {**_component(j, est, layout, op, lam, adapter, task, prompts, reference, a),
                       "seconds": time.time() - t1}  # fmt: skip
            write_json(out, {"key": key, "components": [done[i] for i in sorted(done)]})
        r = done[j]
        if r["status"] != "ok":
            print(f"{j:>4} excluded: {r['n_top']} active examples < k")
            continue
        s = {m: r[m].get("selectivity", math.nan) for m in ("full", "top", "control")}
        kept, ctrl = _ratio(r, "top"), _ratio(r, "control")
        groups = ", ".join(f"L{g[0]} {g[1]}" for g in r["top_groups"])
        energy = r.get("top_energy", r["top5pct"])
        print(f"{j:>4} {energy:>8.3f} {r['uniform']:>8.3f} {s['full']:>8.2f} {s['top']:>8.2f} "
              f"{s['control']:>8.2f} {kept if kept is not None else math.nan:>6.2f} "
              f"{ctrl if ctrl is not None else math.nan:>6.2f}  {groups}")  # fmt: skip
    rows = [done[j] for j in range(n) if done[j]["status"] == "ok"]
    summary = _summary(rows)
    summary["seconds"] = time.time() - t0  # this run, loading included; "seconds" of a component: measuring it
    write_json(out, {"key": key, "components": [done[i] for i in sorted(done)], "summary": summary})
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def _summary(rows) -> dict:
    def gm(name):
        v = [r[name]["selectivity"] for r in rows if r[name]["status"] == "ok"]
        return geometric_mean(v) if v else None

    def med(values):
        v = [x for x in values if x is not None]
        return statistics.median(v) if v else None

    return {
        "n_measured": len(rows),
        "top_energy_median": med([r.get("top_energy", r["top5pct"]) for r in rows]),
        "top_energy_mean": statistics.fmean(r.get("top_energy", r["top5pct"]) for r in rows) if rows else None,
        "uniform_median": med([r["uniform"] for r in rows]),
        "selectivity_full_geomean": gm("full"),
        "selectivity_top_geomean": gm("top"),
        "selectivity_control_geomean": gm("control"),
        "kept_median": med([_ratio(r, "top") for r in rows]),
        "control_kept_median": med([_ratio(r, "control") for r in rows]),
        "excess_kept_median": med([_ratio(r, "top", excess=True) for r in rows]),
        "control_excess_kept_median": med([_ratio(r, "control", excess=True) for r in rows]),
        "top_beats_control": sum(
            r["top"]["status"] == "ok"
            and r["control"]["status"] == "ok"
            and r["top"]["selectivity"] > r["control"]["selectivity"]
            for r in rows
        ),
        "n_unreachable": {m: sum(r[m]["status"] == "unreachable" for r in rows) for m in ("full", "top", "control")},
    }


if __name__ == "__main__":
    main()
