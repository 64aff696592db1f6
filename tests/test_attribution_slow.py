"""Integration on the embedded models: SmolLM2-135M and MiniLM with a classifier head.

Done-when of the issue: with 50 Integrated Gradients steps the completeness error is under 1%
of |f(input) - f(baseline)|, or the result says plainly that it is not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attribution import TargetSpec
from engine.attribution.targets import Target

pytestmark = pytest.mark.slow


def _assert_honest(result) -> None:
    statement = result.delta_statement()
    rel = result.relative_delta
    gap = result.target_score - result.baseline_score
    # completeness: the scores add up to the score change, up to the reported delta
    assert float(result.scores.sum()) - gap == pytest.approx(result.convergence_delta, abs=1e-3)
    if rel <= 0.01:
        assert statement.startswith("Integrated Gradients converged") and "under 1%" in statement
    else:
        assert "did NOT converge" in statement and "above 1%" in statement


def test_smollm_target_is_the_direct_log_probability(smollm):
    loaded = smollm.loaded
    text = "The capital of France is"
    with loaded.use():
        target = Target(loaded, text, TargetSpec(text=" Paris"))
        with torch.no_grad():
            mine = float(target.score(target.free_embeds()))
    tok = loaded.tokenizer
    ids = tok(text, return_tensors="pt")["input_ids"]
    paris = tok(" Paris", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.cat([ids[0], torch.tensor(paris)]).unsqueeze(0)).logits[0]
    expected = sum(
        float(torch.log_softmax(logits[ids.shape[1] - 1 + j].float(), -1)[t])
        for j, t in enumerate(paris)
    )
    assert mine == pytest.approx(expected, abs=1e-4)
    assert mine > np.log(0.5)  # the model is confident: "Paris"


def test_smollm_ig_50_steps_completeness(smollm):
    result = smollm.explain("The capital of France is", " Paris", faithfulness=False)
    assert result.options["steps"] == 50
    _assert_honest(result)
    # measured: 0.03% of the gap at 50 steps, so step refinement has nothing to do
    assert result.delta_ok and result.steps_used == 50 and len(result.step_trials) == 1
    assert "converged at 50 steps" in result.delta_statement()


LONGER = ("I went to the store to buy some milk and", " eggs")  # 50 steps: about 8%


def test_smollm_ig_step_refinement_converges(smollm):
    """50 steps are above 1% on a longer prompt; the refined run is under it."""
    off = smollm.explain(*LONGER, options={"auto_steps": False}, faithfulness=False)
    _assert_honest(off)
    assert not off.delta_ok and off.steps_used == 50
    assert "did NOT converge at 50 steps" in off.delta_statement()
    result = smollm.explain(*LONGER, faithfulness=False)  # refinement on by default
    _assert_honest(result)
    trials = result.step_trials
    assert trials[0] == (50, pytest.approx(off.relative_delta, rel=1e-3))
    assert [s for s, _ in trials] == [50 * 2**i for i in range(len(trials))]
    assert result.delta_ok and result.steps_used == trials[-1][0] > 50
    assert f"converged after {result.steps_used} steps" in result.delta_statement()


@pytest.fixture(scope="module")
def minilm_classifier(minilm, real_workbench, tmp_path_factory):
    """MiniLM with a fresh 2-label head (untrained: the completeness check does not care)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("minilm-cls") / "minilm-classifier"
    model = AutoModelForSequenceClassification.from_pretrained(minilm.loaded.path, num_labels=2)
    model.save_pretrained(folder)
    minilm.loaded.tokenizer.save_pretrained(folder)
    return real_workbench.load(str(folder))


@pytest.mark.parametrize("baseline", ["pad", "mask"])
def test_minilm_classifier_ig_50_steps_under_one_percent(minilm_classifier, baseline):
    assert minilm_classifier.kind == "classifier"
    text = "This movie was really good, I loved every minute of it."
    result = minilm_classifier.explain(
        text, options={"steps": 50, "baseline": baseline}, faithfulness=False
    )
    _assert_honest(result)
    assert result.delta_ok, result.delta_statement()
    assert result.tokens[0] == "[CLS]" and not result.free[0] and result.scores[0] == 0


@pytest.fixture
def private_timing_cache(tmp_path, monkeypatch):
    """Measure afresh, in a temporary WORKBENCH_HOME (not the user's timing cache)."""
    from engine.attribution import calibration

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    calibration.forget()
    yield calibration
    calibration.forget()


def test_smollm_estimate_range_brackets_the_run(smollm, private_timing_cache):
    """The calibrated pre-flight range for IG (50 steps) on SmolLM2 contains the real run, up to
    a factor 3 either side for a shared machine's load (the old matmul-based estimate said 3.4 s
    for a 20 s run). The run then adds its own speed to the rates."""
    from engine.attribution import estimate, explain

    loaded = smollm.loaded
    text, spec = "The capital of France is", TargetSpec(text=" Paris")
    options = {"steps": 50, "auto_steps": False}
    explain(loaded, "Hello", spec, "ig", {"steps": 2, "auto_steps": False}, faithfulness=False)
    plan = estimate(loaded, text, spec, "ig", options, wait=True)
    assert plan.calibrated and plan.rows == 52
    assert plan.seconds_low < plan.seconds < plan.seconds_high
    result = explain(loaded, text, spec, "ig", options, faithfulness=False)
    assert plan.seconds_low / 3 <= result.seconds <= plan.seconds_high * 3, (
        plan.time_range(),
        result.seconds,
    )
    rates = private_timing_cache.cached(loaded, plan.tokens)
    assert len(rates.backward) == 3  # the benchmark's cold and warm passes, then this run
