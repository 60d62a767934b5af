"""Selectivity, one causal test for every method: the bisection hits the target KL for a parameter-space and an
activation-space intervention, a planted component that only its top examples use is far more selective than a
random direction, interventions leave the model as it was, and bad input is one clear line."""

from __future__ import annotations

import math
import pickle
import random

import pytest
import torch
from helpers import LABELS

from npeff_lens.errors import as_flag
from npeff_lens.models import load_model
from npeff_lens.perturb import task_log_probs
from npeff_lens.selectivity import (
    ActivationDirection,
    ParameterDirection,
    UnreachableTargetError,
    calibrate,
    component_selectivity,
    steered,
    summarize,
    top_positive,
)
from npeff_lens.tasks import LabelTokens

# Its own list, without "film": only the planted texts end with it.
WORDS = "dull moving boring fun happy awful brilliant good movie great".split()
PLANTED = " film"  # one token in the tiny tokenizer; the last word of 32 of the 80 texts
TEMPLATE = "Review: {text}"  # the prediction is made at the text's last token


def _texts(n=80, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        out.append(" ".join(words + ([PLANTED.strip()] if i % 5 < 2 else [])))
    return out


@pytest.fixture(scope="module")
def setup(adapter):
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    texts = _texts()
    return adapter, task, task.prompts(texts), texts


def _random_parameters(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in adapter.named_parameters(include="model.layers.*")}


# --- the bisection -----------------------------------------------------------------------------------


def test_calibrate_on_a_known_curve_and_an_unreachable_target():
    calls = []

    def quadratic(s):
        calls.append(s)
        return 0.37 * s**2 / (1 + 0.1 * s)

    out = calibrate(quadratic, 0.01, start=50.0, rtol=0.01)
    assert abs(out["kl"] / 0.01 - 1) <= 0.01 and out["n_evals"] == len(calls) <= 12
    with pytest.raises(UnreachableTargetError, match=r"largest mean KL on the baseline examples was 0\.005") as e:
        calibrate(lambda s: 0.005 * (1 - math.exp(-s)), 0.01)
    assert "\n" not in str(e.value) and str(e.value).endswith("; lower the target KL (target_kl)")
    assert e.value.render(as_flag).endswith("; lower the target KL (--target-kl)")
    assert pickle.loads(pickle.dumps(e.value)).render(as_flag) == e.value.render(as_flag)
    with pytest.raises(UnreachableTargetError, match="was 0 "):
        calibrate(lambda s: 0.0, 0.01)  # a direction the model ignores


def test_bisection_hits_the_target_for_a_parameter_and_an_activation_intervention(setup):
    adapter, task, prompts, _ = setup
    top = list(range(16))
    for intervention in (
        ParameterDirection(adapter, _random_parameters(adapter)),
        ActivationDirection(adapter, "mlp:1", torch.randn(64, generator=torch.Generator().manual_seed(1))),
    ):
        r = component_selectivity(adapter, task, prompts, intervention, top, target_kl=0.002, n_baseline=48)
        assert abs(r["kl_baseline"] / 0.002 - 1) <= 0.05, r
        assert r["n_base"] == 48 and r["n_top"] == 16 and r["scale"] > 0


def test_a_planted_component_is_selective_and_a_random_direction_is_not(setup):
    adapter, task, prompts, texts = setup
    film = adapter.tokenizer(PLANTED, add_special_tokens=False)["input_ids"]
    assert len(film) == 1
    users = [i for i, t in enumerate(texts) if t.endswith(PLANTED)]
    assert len(users) == 32
    # The planted component: the embedding row of " film" (not a label token, so its tied unembedding moves no
    # label logit): only examples containing the token can feel it, and those ending with it feel it most.
    emb = adapter.module.model.embed_tokens.weight
    row = torch.zeros_like(emb)
    row[film[0]] = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(2))
    planted = ParameterDirection(adapter, {"model.embed_tokens.weight": row})
    coefficients = torch.zeros(len(prompts), 1)
    coefficients[users[:16], 0] = 1.0
    top = top_positive(coefficients, 0, 16)
    assert top == users[:16]
    kw = dict(target_kl=0.002, n_baseline=48, seed=0)
    r = component_selectivity(adapter, task, prompts, planted, top, **kw)
    assert r["selectivity"] > 2.5, r  # 16 of the baseline's 64 candidates are users too: about 4 expected
    rand = component_selectivity(
        adapter, task, prompts, ParameterDirection(adapter, _random_parameters(adapter, 3)), top, **kw
    )
    assert 0.4 < rand["selectivity"] < 2.5, rand
    assert r["selectivity"] > 2 * rand["selectivity"]
    summary = summarize([{"status": "ok", **r}, {"status": "ok", **rand}, {"status": "excluded", "n_top": 3}])
    assert summary["selectivity_n_excluded"] == 1 and summary["selectivity_n_evaluated"] == 2
    assert summary["selectivity"] == pytest.approx(math.sqrt(r["selectivity"] * rand["selectivity"]))


# --- no trace left behind --------------------------------------------------------------------------


def _hooks(adapter):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in adapter.module.modules())


@pytest.mark.parametrize(
    "backend, hook",
    [("hf", "mlp:1"), ("hf", "model.layers.0"), ("hooked", "attn:1"), ("hooked", "blocks.0.hook_resid_post")],
)
def test_activation_interventions_leave_the_model_unchanged(backend, hook):
    adapter = load_model("tiny-llama", backend=backend)
    task = LabelTokens(TEMPLATE, LABELS).bind(adapter)
    prompts = task.prompts(_texts(12))
    before, n_hooks = task_log_probs(adapter, task, prompts), _hooks(adapter)
    d = 64 if hook.startswith("mlp") else 32
    intervention = ActivationDirection(adapter, hook, torch.ones(d))
    with intervention.applied(3.0):
        during = task_log_probs(adapter, task, prompts)
    assert not torch.allclose(during, before, atol=1e-4)  # the steering did act
    with pytest.raises(RuntimeError, match="boom"), steered(adapter, hook, torch.ones(d)):
        raise RuntimeError("boom")
    assert _hooks(adapter) == n_hooks
    assert torch.equal(task_log_probs(adapter, task, prompts), before)


def test_selectivity_leaves_parameters_and_hooks_as_they_were(setup):
    adapter, task, prompts, _ = setup
    before = task_log_probs(adapter, task, prompts)
    params = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    steer = torch.randn(64, generator=torch.Generator().manual_seed(1))
    for intervention in (
        ParameterDirection(adapter, _random_parameters(adapter)),
        ActivationDirection(adapter, "mlp:1", steer),
    ):
        component_selectivity(adapter, task, prompts, intervention, list(range(8)), n_baseline=16, target_kl=0.002)
    assert _hooks(adapter) == 0
    assert all(torch.equal(p, params[n]) for n, p in adapter.named_parameters())
    assert torch.equal(task_log_probs(adapter, task, prompts), before)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_one_clear_line(setup):
    adapter, task, prompts, _ = setup
    steer = ActivationDirection(adapter, "mlp:1", torch.ones(64))
    with pytest.raises(
        ValueError,
        match=r"fewer baseline examples than asked: 80 examples less 16 top ones leave "
        r"64, but 100 were asked for \(n_baseline\)",
    ) as e:
        component_selectivity(adapter, task, prompts, steer, list(range(16)), n_baseline=100)
    assert "\n" not in str(e.value) and e.value.render(as_flag).endswith("(--n-baseline)")
    # Two label tokens: the KL is bounded, so 50 nats is out of reach whatever the size.
    with pytest.raises(UnreachableTargetError, match="target KL 50 not reached: the largest mean KL") as e:
        component_selectivity(adapter, task, prompts, steer, list(range(16)), n_baseline=16, target_kl=50.0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="norm 0"):
        ActivationDirection(adapter, "mlp:1", torch.zeros(64))
    with (
        pytest.raises(ValueError, match="steering vector has 5 entries"),
        steer.__class__(adapter, "mlp:1", torch.ones(5)).applied(1.0),
    ):
        task_log_probs(adapter, task, prompts[:2])
