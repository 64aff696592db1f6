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


@pytest.mark.parametrize(
    ("text", "continuation", "converges"),
    [
        ("The capital of France is", " Paris", True),  # measured: 0.03% of the gap
        ("I went to the store to buy some milk and", " eggs", None),  # measured: about 8%
    ],
)
def test_smollm_ig_50_steps_completeness(smollm, text, continuation, converges):
    result = smollm.explain(text, continuation, options={"steps": 50}, faithfulness=False)
    assert result.options["steps"] == 50
    _assert_honest(result)
    if converges:
        assert result.delta_ok, result.delta_statement()


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
