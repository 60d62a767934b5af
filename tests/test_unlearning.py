"""Unlearning (§6.1, App. I) on tiny-llama: a step lowers the objective, the forget KL rises while the appended
retain examples stay put, the original model is untouched (also after an error), mitigation and control runs
differ only in the appended examples, and the experiment's report."""

import json
import math

import pytest
import torch
from helpers import WORDS_AND_ARTICLES, random_texts

from npeff_lens.applications.unlearning import (
    batch_schedule,
    experiment_sets,
    format_table,
    installed,
    unlearn,
    unlearning_experiment,
    unlearning_objective,
)
from npeff_lens.perturb import kl_divergence, task_log_probs
from npeff_lens.tasks import LabelTokens

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on a shared machine
FAST = {"lr": 1e-2, "epsilon_forget": 1.0, "epsilon_retain": 1.0, "retain_batch_size": 8}


@pytest.fixture(scope="module")
def prompts(task):
    return task.prompts(random_texts(60, seed=0, max_words=7, words=WORDS_AND_ARTICLES))


@pytest.fixture(scope="module")
def reference(adapter, task, prompts):
    return task_log_probs(adapter, task, prompts)


def _state(adapter):
    return {k: v.detach().clone() for k, v in adapter.module.state_dict().items()}


def _assert_same_state(adapter, before):
    after = adapter.module.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_batch_schedule_is_seeded_and_prefix_stable():
    a = batch_schedule(3, 20, 6, forget_batch_size=2, retain_batch_size=5, seed=1)
    assert a[:4] == batch_schedule(3, 20, 4, forget_batch_size=2, retain_batch_size=5, seed=1)
    assert a != batch_schedule(3, 20, 6, forget_batch_size=2, retain_batch_size=5, seed=2)
    for b in a:
        assert len(b["forget"]) == len(set(b["forget"])) == 2 and set(b["forget"]) <= set(range(3))
        assert len(b["retain"]) == len(set(b["retain"])) == 5 and set(b["retain"]) <= set(range(20))
    assert [len(b["retain"]) for b in batch_schedule(1, 3, 2, retain_batch_size=32)] == [3, 3]


def test_objective_signs():
    ref = torch.log_softmax(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), -1)
    moved = torch.log_softmax(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), -1)
    loss, l_f, l_r = unlearning_objective(moved[:1], ref[:1], moved[1:], ref[1:], epsilon_forget=0.1, epsilon_retain=10)
    assert float(l_f) == pytest.approx(float(kl_divergence(moved[:1], ref[:1])))  # reverse KL on the forget set
    assert float(l_r) == pytest.approx(float(kl_divergence(ref[1:], moved[1:])))  # forward KL on the retain set
    assert float(loss) == pytest.approx(-0.1 * float(l_f) + 10 * float(l_r))


def test_one_step_lowers_the_objective_on_its_batch(adapter, task, prompts, reference):
    forget, retain, fixed = prompts[:1], prompts[1:40], prompts[40:44]
    k = 3
    before = unlearn(adapter, task, forget, retain, fixed_retain=fixed, n_batches=k, seed=0, **FAST)
    after = unlearn(adapter, task, forget, retain, fixed_retain=fixed, n_batches=k + 1, seed=0, **FAST)
    assert after.batches[:k] == before.batches
    retain_idx = [1 + i for i in after.batches[k]["retain"]] + list(range(40, 44))

    def objective(result):
        with result.installed(adapter):
            lp = task_log_probs(adapter, task, [prompts[0]] + [prompts[i] for i in retain_idx])
        eps = {"epsilon_forget": FAST["epsilon_forget"], "epsilon_retain": FAST["epsilon_retain"]}
        return float(unlearning_objective(lp[:1], reference[:1], lp[1:], reference[retain_idx], **eps)[0])

    o_before, o_after = objective(before), objective(after)
    assert after.history[k]["loss"] == pytest.approx(o_before, abs=1e-6)  # history: the loss before the step
    assert o_after < o_before - 1e-3


def test_forget_kl_rises_and_the_appended_examples_are_spared(adapter, task, prompts, reference):
    res = unlearn(adapter, task, prompts[:1], prompts[1:40], fixed_retain=prompts[40:44], n_batches=10, **FAST)
    forget_kl = [h["forget_kl"] for h in res.history]
    assert forget_kl[0] == pytest.approx(0.0, abs=1e-6)  # θ = θ_og at the first batch
    with res.installed(adapter):
        kl = kl_divergence(task_log_probs(adapter, task, prompts), reference)
    assert forget_kl[-1] > 0.05 and kl[0] > 0.05
    assert kl[0] > 10 * kl[1:].median()  # the forget example moves, most others do not
    assert kl[40:44].mean() < kl[44:].mean()  # appended to every batch: disturbed least (the mitigation)


def test_original_model_is_untouched(adapter, task, prompts, reference):
    before = _state(adapter)
    flags = {n: p.requires_grad for n, p in adapter.all_named_parameters()}
    res = unlearn(adapter, task, prompts[:2], prompts[2:40], n_batches=3, forget_batch_size=2, **FAST)
    _assert_same_state(adapter, before)
    assert {n: p.requires_grad for n, p in adapter.all_named_parameters()} == flags
    assert all(p.grad is None for _, p in adapter.all_named_parameters())
    assert torch.equal(task_log_probs(adapter, task, prompts), reference)  # logits bit for bit
    params = dict(adapter.all_named_parameters())
    assert set(res.params) == {n for n, _ in adapter.named_parameters()}  # the default selection
    assert any(not torch.equal(v, params[n]) for n, v in res.params.items())
    with installed(adapter, res.params):
        assert all(torch.equal(params[n], v) for n, v in res.params.items())
        assert not torch.equal(task_log_probs(adapter, task, prompts), reference)
    _assert_same_state(adapter, before)


def test_restored_after_an_error_and_only_selected_params_train(adapter, task, prompts):
    before = _state(adapter)

    class Failing(LabelTokens):
        calls = 0

        def log_probs(self, adapter, batch):
            out = super().log_probs(adapter, batch)
            Failing.calls += 1
            if Failing.calls == 4:  # 1 reference batch, then the third training batch
                raise RuntimeError("boom")
            return out

    failing = Failing(task.template, task.labels).bind(adapter)
    with pytest.raises(RuntimeError, match="boom"):
        unlearn(adapter, failing, prompts[:1], prompts[1:20], n_batches=5, batch_size=64, **FAST)
    _assert_same_state(adapter, before)
    res = unlearn(adapter, task, prompts[:1], prompts[1:20], n_batches=2, params=["model.layers.1.mlp.*"], **FAST)
    assert sorted(res.params) == sorted(n for n, _ in adapter.named_parameters(include="model.layers.1.mlp.*"))


def test_unlearn_errors(adapter, task, prompts):
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(adapter, task, [], prompts)
    with pytest.raises(ValueError, match="retain set is empty"):
        unlearn(adapter, task, prompts[:1], [])
    with pytest.raises(ValueError, match="lr"):
        unlearn(adapter, task, prompts[:1], prompts[1:], lr=0)
    with pytest.raises(ValueError, match="epsilon_retain"):
        unlearn(adapter, task, prompts[:1], prompts[1:], epsilon_retain=-1)
    res = unlearn(adapter, task, prompts[:1], prompts[1:], n_batches=0)
    params = dict(adapter.all_named_parameters())
    assert res.history == [] and all(torch.equal(v, params[n]) for n, v in res.params.items())


def _planted_coefficients(m=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(m, 3, generator=g)
    c[:, 2] = 0.0
    c[:5, 2] = 1.0  # too few active examples for 1 + 3 + 3 top examples
    return c


def test_experiment_sets_partition(prompts):
    c = _planted_coefficients()
    s = experiment_sets(c, 1, k_eval=3, k_mitigation=3, n_random=10, seed=4)
    top = torch.sort(c[:, 1], descending=True).indices[:7].tolist()
    assert s["forget"] == top[0] and sorted(s["evaluation"] + s["mitigation"]) == sorted(top[1:])
    groups = [[s["forget"]], s["evaluation"], s["mitigation"], s["control"], s["random"], s["pool"]]
    assert sorted(sum(groups, [])) == list(range(60))  # a partition of the examples
    assert [len(x) for x in groups[:5]] == [1, 3, 3, 3, 10]
    assert s == experiment_sets(c, 1, k_eval=3, k_mitigation=3, n_random=10, seed=4)
    with pytest.raises(ValueError, match="active examples"):
        experiment_sets(c, 2, k_eval=3, k_mitigation=3, n_random=10)
    with pytest.raises(ValueError, match="cannot hold"):
        experiment_sets(c, 0, k_eval=3, k_mitigation=3, n_random=60)


@pytest.fixture(scope="module")
def report(adapter, task, prompts):
    before = _state(adapter)
    out = unlearning_experiment(
        adapter,
        task,
        prompts,
        _planted_coefficients(),
        [0, 2, 1],
        k_eval=3,
        k_mitigation=3,
        n_random=10,
        kl_threshold=0.01,
        seed=0,
        keep_batches=True,
        progress=False,
        n_batches=4,
        **FAST,
    )
    _assert_same_state(adapter, before)
    return out


def test_mitigation_and_control_differ_only_in_the_appended_examples(report):
    for r in report["per_component"]:
        if r["status"] != "ok":
            continue
        mit, ctl = r["runs"]["mitigation"]["batches"], r["runs"]["control"]["batches"]
        assert len(mit) == len(ctl) == 4
        for bm, bc in zip(mit, ctl):
            assert bm["forget"] == bc["forget"] == [r["forget"]]
            assert bm["retain"][:-3] == bc["retain"][:-3] and len(bm["retain"]) == 8 + 3
            assert bm["retain"][-3:] == r["mitigation"] and bc["retain"][-3:] == r["control"]
            assert not set(bm["retain"][:-3]) & {r["forget"], *r["evaluation"], *r["mitigation"], *r["control"]}
        assert not set(r["control"]) & {r["forget"], *r["evaluation"], *r["mitigation"]}


def test_experiment_report(report):
    assert json.loads(json.dumps(report, allow_nan=False)) == report  # JSON-able, finite
    assert set(report) == {"per_component", "summary", "config"}
    assert [r["component"] for r in report["per_component"]] == [0, 2, 1]
    skipped = report["per_component"][1]
    assert "active examples" in skipped["status"] and "runs" not in skipped
    s = report["summary"]
    assert (s["n_components"], s["n_evaluated"], s["kl_threshold"]) == (3, 2, 0.01)
    ok = [r for r in report["per_component"] if r["status"] == "ok"]
    for setup in ("mitigation", "control"):
        runs = [r["runs"][setup] for r in ok]
        for run in runs:
            assert run["kl_forget"] >= 0 and run["kl_top_median"] >= 0 and run["kl_random_median"] >= 0
            assert run["kl_top_median"] == pytest.approx(sorted(run["kl_top"])[1])  # median of 3
            assert run["forget_above_threshold"] == (run["kl_forget"] > 0.01)
            assert len(run["loss_history"]) == len(run["forget_kl_history"]) == 4
        b = s[setup]
        assert b["n_runs"] == 2
        assert b["kl_forget_mean"] == pytest.approx(sum(r["kl_forget"] for r in runs) / 2)
        assert b["kl_random_median_mean"] == pytest.approx(sum(r["kl_random_median"] for r in runs) / 2)
        assert b["n_forget_above_threshold"] == sum(r["forget_above_threshold"] for r in runs)
        assert s["restricted"][setup]["n_runs"] == s["restricted"]["n_components"] <= 2
    both = [r for r in ok if all(r["runs"][x]["forget_above_threshold"] for x in ("mitigation", "control"))]
    assert s["restricted"]["n_components"] == len(both)
    assert not math.isnan(s["mitigation"]["kl_top_median_mean"])
    table = format_table(report)
    assert "skipped" in table and "restricted" in table and "control" in table


def test_experiment_errors(adapter, task, prompts):
    c = _planted_coefficients()
    with pytest.raises(ValueError, match="one row per prompt"):
        unlearning_experiment(adapter, task, prompts[:10], c, [0], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        unlearning_experiment(adapter, task, prompts, c, [3], progress=False)
    with pytest.raises(TypeError, match="unknown"):
        unlearning_experiment(adapter, task, prompts, c, [0], progress=False, n_batch=3)
