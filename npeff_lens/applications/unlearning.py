"""Unlearning one example while the other top examples of its NPEFF component guard related behaviour from collateral
change.

This is the paper's application of §6.1 and App. I.

**Method** (App. I.1, a variant of gradient ascent, Yao et al. 2023). The examples to forget form the forget set
``D_f``, the others the retain set ``D_r``; Adam minimises ``L = ε_f·(−L_f) + ε_r·L_r`` with

- ``L_f = mean_{x ∈ D_f} KL(p_θ(y|x) ‖ p_θog(y|x))`` (eq. 7), pushed *up*: gradient ascent on the KL of the
  unlearned model's predictions from the original ones (no labels, no "mismatch" term);
- ``L_r = mean_{x ∈ D_r} KL(p_θog(y|x) ‖ p_θ(y|x))`` (eq. 8, the forward KL), kept small;

each step on a mini-batch: ``forget_batch_size`` forget examples, and ``retain_batch_size`` random retain examples
with a *fixed* set of examples appended to every retain batch. App. I.2: Adam, lr 1e-4, ε_f = 0.1, ε_r = 10, one
forget example, 32 + 12 retain examples, 75 batches. ``p(y|x)`` is the task's outcome distribution
(:class:`~npeff_lens.tasks.NextToken`: the whole next-token distribution, the paper's TriviaQA set-up). The
original log-probabilities are computed once, up front; the original model is never left modified: the trained
parameters are snapshotted and restored bit for bit, and the unlearned values come back as a dict
(:meth:`UnlearningResult.installed` puts them in for a ``with`` block).

θ_og is a stationary point of ``L`` (both KLs have zero gradient there): the first step moves on the rounding
error of the gradient, which Adam's per-coordinate normalisation turns into a step of ~lr; from then on the
forget KL grows along the directions where ``ε_f·F_forget`` outweighs ``ε_r·F_retain``.

**Experiment** (§6.1, App. I.2), per component: the forget set is its top example; its next 24 top examples are
split at random into 12 *evaluation* and 12 *mitigation* examples. The mitigation run appends the 12 mitigation
examples to every retain batch; the control run appends 12 random examples (not among the 25). Both runs draw the
same random retain batches from the same pool (every example except the forget one, the 24, the control's 12 and
the random evaluation set), so they differ only in the appended examples. Reported per run and averaged (Table 6):
``KL(p_unlearned ‖ p_original)`` on the forget example, its median over the 12 evaluation examples and over a
random evaluation set (disjoint from all of the above), and the number of runs whose forget KL exceeds
``kl_threshold`` (10 nats); the paper averages over the components whose runs both exceed it (``restricted``).
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis import ACTIVE_DEFINITION, active, top_examples
from ..formatting import fmt
from ..io import progress as progress_bar
from ..io import to_jsonable
from ..perturb import kl_divergence, task_log_probs

__all__ = [
    "UnlearningResult",
    "unlearn",
    "unlearning_objective",
    "batch_schedule",
    "reference_log_probs",
    "installed",
    "unlearning_experiment",
    "experiment_sets",
    "TooFewTopExamplesError",
    "format_table",
]

#: Keys of one run's record in :func:`unlearning_experiment` (and of the summary's means).
RUN_KEYS = ("kl_forget", "kl_top_median", "kl_random_median", "forget_above_threshold")


# --------------------------------------------------------------------------------------------------
# Parameters: select, snapshot / restore, install.
# --------------------------------------------------------------------------------------------------


def _select(adapter, params) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained parameters: glob patterns / names (``params``), else the adapter's default selection."""
    if isinstance(params, str):
        params = [params]
    return adapter.named_parameters(include=list(params) if params else None)


@contextmanager
def _restoring(adapter, named):
    """Within the block the parameters may change (and require grad, the module in eval mode); afterwards,
    exception or not, values, ``requires_grad``, ``.grad`` and the training flag are what they were."""
    module = adapter.module
    saved = [(p, p.detach().clone(), p.requires_grad, p.grad) for _, p in named]
    was_training = module.training
    try:
        module.eval()
        for p, *_ in saved:
            p.requires_grad_(True)
        yield
    finally:
        with torch.no_grad():
            for p, value, requires_grad, grad in saved:
                p.copy_(value)
                p.grad = grad
                p.requires_grad_(requires_grad)
        module.train(was_training)


@contextmanager
def installed(adapter, params: Mapping[str, torch.Tensor]):
    """Within the block the named parameters hold ``params`` (e.g. :attr:`UnlearningResult.params`); afterwards
    their original values, bit for bit."""
    model_params = dict(adapter.all_named_parameters())
    missing = [n for n in params if n not in model_params]
    if missing:
        raise ValueError(f"the model has no parameter(s) {missing[:5]} (its names look like {list(model_params)[:4]})")
    for name, value in params.items():
        if tuple(value.shape) != tuple(model_params[name].shape):
            raise ValueError(f"{name!r}: shape {list(value.shape)}, the model's is {list(model_params[name].shape)}")
    saved = {n: model_params[n].detach().clone() for n in params}
    try:
        with torch.no_grad():
            for name, value in params.items():
                model_params[name].copy_(value)
        yield adapter
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                model_params[name].copy_(value)


# --------------------------------------------------------------------------------------------------
# Batches and the objective (App. I.1).
# --------------------------------------------------------------------------------------------------


def batch_schedule(
    n_forget: int,
    n_retain: int,
    n_batches: int,
    *,
    forget_batch_size: int = 1,
    retain_batch_size: int = 32,
    seed: int = 0,
) -> list[dict[str, list[int]]]:
    """Per batch, ``{"forget": [...], "retain": [...]}``: indices into the forget and retain sets, each drawn
    without replacement (``min(batch size, set size)`` of them). The fixed retain examples are not in it: they
    are appended to every batch. Batch ``t`` depends on the seed and the set sizes only (not on ``n_batches``)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(n_batches):
        forget = torch.randperm(n_forget, generator=gen)[:forget_batch_size].tolist()
        retain = torch.randperm(n_retain, generator=gen)[:retain_batch_size].tolist() if n_retain else []
        out.append({"forget": forget, "retain": retain})
    return out


def unlearning_objective(
    forget_log_probs: torch.Tensor,
    forget_reference: torch.Tensor,
    retain_log_probs: torch.Tensor,
    retain_reference: torch.Tensor,
    *,
    epsilon_forget: float = 0.1,
    epsilon_retain: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, L_f, L_r)`` of one batch (eqs. 7–8): ``L = ε_f·(−L_f) + ε_r·L_r``, differentiable in the
    ``*_log_probs`` (``[n, outcomes]``, the model being unlearned); ``*_reference``: the original model's."""
    l_f = kl_divergence(forget_log_probs, forget_reference.to(forget_log_probs.device)).mean()
    l_r = kl_divergence(retain_reference.to(retain_log_probs.device), retain_log_probs).mean()
    return -epsilon_forget * l_f + epsilon_retain * l_r, l_f, l_r


# --------------------------------------------------------------------------------------------------
# One unlearning run.
# --------------------------------------------------------------------------------------------------


@dataclass
class UnlearningResult:
    """What :func:`unlearn` returns.

    ``params``: the unlearned values of the trained parameters, ``{name: tensor}`` (on the model's device).
    ``history``: per batch, measured before its step: ``loss``, ``forget_kl`` (``L_f``), ``retain_kl`` (``L_r``).
    ``batches``: per batch, ``forget`` / ``retain`` indices into the forget and retain prompts; ``fixed``: the
    indices into ``fixed_retain`` appended to every batch.
    """

    params: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    batches: list[dict[str, list[int]]] = field(default_factory=list)
    fixed: list[int] = field(default_factory=list)

    def installed(self, adapter):
        """``with result.installed(adapter):`` the model holds the unlearned parameters inside the block."""
        return installed(adapter, self.params)


def _check_hyper(epsilon_forget, epsilon_retain, lr, n_batches, retain_batch_size, forget_batch_size) -> None:
    for name, value in (("epsilon_forget", epsilon_forget), ("epsilon_retain", epsilon_retain)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if n_batches < 0:
        raise ValueError(f"n_batches must be >= 0, got {n_batches}")
    for name, value in (("retain_batch_size", retain_batch_size), ("forget_batch_size", forget_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def reference_log_probs(adapter, task, prompts: Sequence[str], indices, *, batch_size: int = 32) -> dict[int, Any]:
    """``{i: [outcomes]}`` original log-probs of ``prompts[i]`` for the distinct ``indices`` (computed once)."""
    todo = sorted({int(i) for i in indices})
    if not todo:
        return {}
    lp = task_log_probs(adapter, task, [prompts[i] for i in todo], batch_size=batch_size)
    if not bool(torch.isfinite(lp).all()):
        raise ValueError("the original model gives non-finite log-probabilities on some prompts")
    return dict(zip(todo, lp))


def _train(adapter, task, prompts, forget, pool, fixed, schedule, reference, hp, bar) -> UnlearningResult:
    """Adam on ``L`` over ``schedule`` (indices into ``forget`` / ``pool``, which index ``prompts``)."""
    named = _select(adapter, hp["params"])
    plist = [p for _, p in named]
    with _restoring(adapter, named), torch.enable_grad():
        opt = torch.optim.Adam(plist, lr=hp["lr"])
        history = []
        for t, b in enumerate(schedule):
            f_idx = [forget[i] for i in b["forget"]]
            r_idx = [pool[i] for i in b["retain"]] + list(fixed)
            lp = task.log_probs(adapter, adapter.tokenize([prompts[i] for i in f_idx + r_idx]))
            loss, l_f, l_r = unlearning_objective(
                lp[: len(f_idx)],
                torch.stack([reference[i] for i in f_idx]),
                lp[len(f_idx) :],
                torch.stack([reference[i] for i in r_idx]),
                epsilon_forget=hp["epsilon_forget"],
                epsilon_retain=hp["epsilon_retain"],
            )
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"the unlearning loss is not finite at batch {t} (lower lr?)")
            grads = torch.autograd.grad(loss, plist)
            for p, g in zip(plist, grads):
                p.grad = g
            opt.step()
            rec = {"loss": float(loss.detach()), "forget_kl": float(l_f.detach()), "retain_kl": float(l_r.detach())}
            history.append(rec)
            bar.update(1)
            bar.set_postfix(forget_kl=f"{rec['forget_kl']:.3g}", retain_kl=f"{rec['retain_kl']:.3g}")
        del opt
        unlearned = {name: p.detach().clone() for name, p in named}
    return UnlearningResult(unlearned, history)


def unlearn(
    adapter,
    task,
    forget_prompts: Sequence[str],
    retain_prompts: Sequence[str],
    *,
    fixed_retain: Sequence[str] = (),
    epsilon_forget: float = 0.1,
    epsilon_retain: float = 10.0,
    lr: float = 1e-4,
    n_batches: int = 75,
    retain_batch_size: int = 32,
    forget_batch_size: int = 1,
    seed: int = 0,
    params=None,
    batch_size: int = 32,
    progress: bool = False,
) -> UnlearningResult:
    """Gradient-ascent unlearning of ``forget_prompts`` (App. I.1); the model is left as it was.

    ``forget_prompts`` / ``retain_prompts`` / ``fixed_retain``: formatted prompts (``task.prompts(texts)``); each
    batch holds ``forget_batch_size`` forget prompts, ``retain_batch_size`` random retain prompts and all of
    ``fixed_retain`` (see :func:`batch_schedule`). ``params``: glob patterns of the parameters to train (default:
    the adapter's selection: all but embeddings and norms). ``batch_size``: for computing the original
    log-probs. Returns the unlearned parameters, the per-batch losses and the batches (:class:`UnlearningResult`).
    """
    _check_hyper(epsilon_forget, epsilon_retain, lr, n_batches, retain_batch_size, forget_batch_size)
    forget, retain, fixed = list(forget_prompts), list(retain_prompts), list(fixed_retain)
    if not forget:
        raise ValueError("the forget set is empty")
    if not retain and not fixed:
        raise ValueError("the retain set is empty: give retain_prompts or fixed_retain")
    task.bind(adapter)
    prompts = forget + retain + fixed
    f_idx = list(range(len(forget)))
    pool = list(range(len(forget), len(forget) + len(retain)))
    fixed_idx = list(range(len(forget) + len(retain), len(prompts)))
    schedule = batch_schedule(
        len(forget),
        len(retain),
        n_batches,
        forget_batch_size=forget_batch_size,
        retain_batch_size=retain_batch_size,
        seed=seed,
    )
    used = f_idx + fixed_idx + [pool[i] for b in schedule for i in b["retain"]]
    reference = reference_log_probs(adapter, task, prompts, used, batch_size=batch_size)
    hp = {"lr": lr, "epsilon_forget": epsilon_forget, "epsilon_retain": epsilon_retain, "params": params}
    with progress_bar(total=n_batches, desc="unlearn", unit="batch", enabled=progress) as bar:
        result = _train(adapter, task, prompts, f_idx, pool, fixed_idx, schedule, reference, hp, bar)
    result.batches, result.fixed = schedule, list(range(len(fixed)))
    return result


# --------------------------------------------------------------------------------------------------
# The experiment (§6.1, App. I.2).
# --------------------------------------------------------------------------------------------------


_HYPER = ("epsilon_forget", "epsilon_retain", "lr", "params")  # unlearn()'s options an experiment passes on
_SIZES = ("n_batches", "retain_batch_size", "forget_batch_size")


class TooFewTopExamplesError(ValueError):
    """A component has fewer active examples (:func:`~npeff_lens.analysis.active`) than the experiment needs
    top examples."""


def _generator(seed: int, component: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(component))


def experiment_sets(
    coefficients, component: int, *, k_eval: int = 12, k_mitigation: int = 12, n_random: int = 256, seed: int = 0
) -> dict[str, Any]:
    """The example sets of one component's runs (indices into the examples of ``coefficients [m, C]``):
    ``forget`` (its top example), ``evaluation`` and ``mitigation`` (its next ``k_eval + k_mitigation`` top
    examples split at random), ``control`` (``k_mitigation`` random examples outside those), ``random`` (the
    random evaluation set, disjoint from all of them) and ``pool`` (the rest: where retain batches are drawn).
    Seeded by ``(seed, component)``. :class:`TooFewTopExamplesError` when the component has fewer than
    ``1 + k_eval + k_mitigation`` active examples; a ValueError when the examples do not suffice."""
    c = torch.as_tensor(coefficients)
    m = c.shape[0]
    n_top = 1 + k_eval + k_mitigation
    if n_top + k_mitigation + n_random >= m:
        raise ValueError(
            f"{m} examples cannot hold {n_top} top, {k_mitigation} control and {n_random} random examples plus a "
            "retain pool: lower k_eval / k_mitigation / n_random"
        )
    top = top_examples(c, k=n_top)[component].tolist()
    if not bool(active(c)[top, component].all()):
        raise TooFewTopExamplesError(
            f"component {component} has fewer than {n_top} active examples ({ACTIVE_DEFINITION})"
        )
    gen = _generator(seed, component)
    rest = [top[1 + i] for i in torch.randperm(n_top - 1, generator=gen).tolist()]
    taken = set(top)
    outside = [i for i in torch.randperm(m, generator=gen).tolist() if i not in taken]
    control, random = outside[:k_mitigation], outside[k_mitigation : k_mitigation + n_random]
    return {
        "forget": top[0],
        "evaluation": sorted(rest[:k_eval]),
        "mitigation": sorted(rest[k_eval:]),
        "control": sorted(control),
        "random": sorted(random),
        "pool": sorted(outside[k_mitigation + n_random :]),
    }


def _evaluate(adapter, task, prompts, sets, result: UnlearningResult, reference, threshold, batch_size) -> dict:
    """KL(p_unlearned ‖ p_original) on the forget example, the evaluation set and the random set."""
    idx = [sets["forget"]] + sets["evaluation"] + sets["random"]
    with result.installed(adapter):
        lp = task_log_probs(adapter, task, [prompts[i] for i in idx], batch_size=batch_size)
    kl = kl_divergence(lp, torch.stack([reference[i] for i in idx])).tolist()
    k = len(sets["evaluation"])
    return {
        "kl_forget": kl[0],
        "kl_top_median": statistics.median(kl[1 : 1 + k]),
        "kl_random_median": statistics.median(kl[1 + k :]),
        "forget_above_threshold": kl[0] > threshold,
        "kl_top": kl[1 : 1 + k],
        "loss_history": [h["loss"] for h in result.history],
        "forget_kl_history": [h["forget_kl"] for h in result.history],
    }


def _means(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    def mean(key):
        return sum(r[key] for r in runs) / len(runs) if runs else math.nan

    return {
        "n_runs": len(runs),
        "kl_forget_mean": mean("kl_forget"),
        "kl_top_median_mean": mean("kl_top_median"),
        "kl_random_median_mean": mean("kl_random_median"),
        "n_forget_above_threshold": sum(bool(r["forget_above_threshold"]) for r in runs),
    }


def _summary(records: Sequence[Mapping[str, Any]], kl_threshold: float) -> dict[str, Any]:
    """Table 6: means per set-up over all components, and over those whose runs both exceeded the threshold."""
    done = [r for r in records if r["status"] == "ok"]
    both = [r for r in done if all(r["runs"][s]["forget_above_threshold"] for s in ("mitigation", "control"))]
    return {
        "n_components": len(records),
        "n_evaluated": len(done),
        "kl_threshold": kl_threshold,
        **{s: _means([r["runs"][s] for r in done]) for s in ("mitigation", "control")},
        "restricted": {
            "n_components": len(both),
            **{s: _means([r["runs"][s] for r in both]) for s in ("mitigation", "control")},
        },
    }


def unlearning_experiment(
    adapter,
    task,
    prompts: Sequence[str],
    coefficients,
    components: Sequence[int],
    *,
    k_eval: int = 12,
    k_mitigation: int = 12,
    n_random: int = 256,
    kl_threshold: float = 10.0,
    seed: int = 0,
    keep_batches: bool = False,
    progress: bool = True,
    batch_size: int = 32,
    **unlearn_kwargs,
) -> dict[str, Any]:
    """Mitigation and control unlearning runs for each of ``components`` (§6.1; see the module docstring).

    ``prompts``: the formatted prompts of the decomposition's ``m`` examples (``task.prompts(texts)``, in store
    order); ``coefficients``: ``[m, C]`` (``NPEFF.coefficients_``). ``unlearn_kwargs``: :func:`unlearn`'s
    hyper-parameters (``epsilon_forget``, ``epsilon_retain``, ``lr``, ``n_batches``, ``retain_batch_size``,
    ``forget_batch_size``, ``params``); both runs of a component use ``seed``, hence the same retain batches.
    ``keep_batches``: add each run's batches (indices into ``prompts``) to its record.

    Returns (JSON-able) ``{"per_component": [...], "summary": {...}, "config": {...}}``; a component record holds
    ``component``, ``status`` (``"ok"`` or the reason it was skipped), its example sets (``forget``,
    ``evaluation``, ``mitigation``, ``control``, ``n_random``, ``n_pool``) and ``runs`` ``{"mitigation": ...,
    "control": ...}`` with ``kl_forget``, ``kl_top_median``, ``kl_random_median``, ``forget_above_threshold``,
    ``kl_top``, ``loss_history``, ``forget_kl_history``. The summary: per set-up ``n_runs``, ``kl_forget_mean``,
    ``kl_top_median_mean``, ``kl_random_median_mean``, ``n_forget_above_threshold``; and ``restricted``, the same
    over the components whose two runs both exceed ``kl_threshold`` (Table 6).
    """
    prompts, components = list(prompts), list(dict.fromkeys(int(j) for j in components))
    c = torch.as_tensor(coefficients)
    if c.ndim != 2 or c.shape[0] != len(prompts):
        raise ValueError(f"coefficients must be [{len(prompts)}, C] (one row per prompt); got {tuple(c.shape)}")
    bad = [j for j in components if not 0 <= j < c.shape[1]]
    if bad:
        raise ValueError(f"components {bad} are out of range [0, {c.shape[1]})")
    hp, sizes = _options(unlearn_kwargs)
    task.bind(adapter)
    records, plans = [], {}
    for j in components:
        try:
            sets = experiment_sets(c, j, k_eval=k_eval, k_mitigation=k_mitigation, n_random=n_random, seed=seed)
        except TooFewTopExamplesError as e:
            records.append({"component": j, "status": str(e)})
            continue
        plans[j] = (sets, batch_schedule(1, len(sets["pool"]), seed=seed, **sizes))
    used = set()  # every example whose original log-probs any run needs: computed once, before any training
    for sets, schedule in plans.values():
        used.update([sets["forget"], *sets["evaluation"], *sets["mitigation"], *sets["control"], *sets["random"]])
        used.update(sets["pool"][i] for b in schedule for i in b["retain"])
    reference = reference_log_probs(adapter, task, prompts, used, batch_size=batch_size)
    bar = progress_bar(total=2 * len(plans) * sizes["n_batches"], desc="unlearn", unit="batch", enabled=progress)
    with bar:
        for j, (sets, schedule) in plans.items():
            runs = {}
            for setup in ("mitigation", "control"):
                result = _train(
                    adapter, task, prompts, [sets["forget"]], sets["pool"], sets[setup], schedule, reference, hp, bar
                )
                runs[setup] = _evaluate(adapter, task, prompts, sets, result, reference, kl_threshold, batch_size)
                if keep_batches:
                    runs[setup]["batches"] = [
                        {"forget": [sets["forget"]], "retain": [sets["pool"][i] for i in b["retain"]] + sets[setup]}
                        for b in schedule
                    ]
            records.append(_record(j, sets, runs))
    records.sort(key=lambda r: components.index(r["component"]))
    config = {"k_eval": k_eval, "k_mitigation": k_mitigation, "n_random": n_random, "seed": seed, **hp, **sizes}
    return to_jsonable({"per_component": records, "summary": _summary(records, kl_threshold), "config": config})


def _options(unlearn_kwargs: dict) -> tuple[dict, dict]:
    """:func:`unlearn`'s defaults updated with ``unlearn_kwargs``: (optimisation, batch sizes)."""
    unknown = set(unlearn_kwargs) - set(_HYPER) - set(_SIZES)
    if unknown:
        raise TypeError(f"unknown unlearning option(s) {sorted(unknown)}; valid: {sorted(_HYPER + _SIZES)}")
    defaults = inspect.signature(unlearn).parameters  # the defaults are written once, in unlearn()
    hp = {k: unlearn_kwargs.get(k, defaults[k].default) for k in _HYPER}
    sizes = {k: unlearn_kwargs.get(k, defaults[k].default) for k in _SIZES}
    _check_hyper(hp["epsilon_forget"], hp["epsilon_retain"], hp["lr"], **sizes)
    return hp, sizes


def _record(j: int, sets: Mapping[str, Any], runs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "component": j,
        "status": "ok",
        **{k: sets[k] for k in ("forget", "evaluation", "mitigation", "control")},
        "n_random": len(sets["random"]),
        "n_pool": len(sets["pool"]),
        "runs": dict(runs),
    }


def format_table(report: Mapping[str, Any]) -> str:
    """Per-component KLs of both set-ups and the Table 6 means, as printed by the benchmark and the CLI."""
    cols = ("component", "setup", "kl_forget", "kl_top_median", "kl_random_median", "above")
    rows = []
    for r in report["per_component"]:
        if r["status"] != "ok":
            rows.append([str(r["component"]), "skipped", "", "", "", ""])
            continue
        for s in ("mitigation", "control"):
            run = r["runs"][s]
            rows.append([str(r["component"]), s] + [fmt(run[k], 4, missing="") for k in RUN_KEYS])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    s = report["summary"]
    for name, block in (("all", s), ("restricted", s["restricted"])):
        for setup in ("mitigation", "control"):
            b = block[setup]
            lines.append(
                f"{name:>10} {setup:>10}: forget {fmt(b['kl_forget_mean'], 4, missing='')}  top examples "
                f"{fmt(b['kl_top_median_mean'], 4, missing='')}  random "
                f"{fmt(b['kl_random_median_mean'], 4, missing='')}  "
                f"({b['n_forget_above_threshold']}/{b['n_runs']} runs with forget KL > {s['kl_threshold']:g})"
            )
    return "\n".join(lines)
