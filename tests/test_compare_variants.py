"""Compare one model under different settings (works with a single generative model), and
a base model against a fine-tuned copy; recorded comparisons reproduce exactly."""

from __future__ import annotations

import pytest

from engine.errors import InputError
from engine.generation import GenerationSettings
from engine.generation.comparison import Variant
from engine.reproduce import reproduce

PROMPT = "the capital of france is"


@pytest.fixture
def wb(tmp_path):
    from engine import Workbench

    return Workbench(home=tmp_path / "home", device="cpu")


def test_one_model_greedy_against_sampled(wb, tiny_models):
    name = str(tiny_models["llama"])
    shared = GenerationSettings(max_new_tokens=6, greedy=True)
    sampled = GenerationSettings(max_new_tokens=6, greedy=False, temperature=1.5, seed=3)
    comparison = wb.compare([Variant(name), Variant(name, sampled)], PROMPT, shared)
    greedy_out, sampled_out = comparison.outcomes
    assert greedy_out.label == name
    assert "greedy False" in sampled_out.label and "temperature 1.5" in sampled_out.label
    model = wb.load(name)
    assert greedy_out.result.tokens == model.generate(PROMPT, shared).tokens
    assert sampled_out.result.tokens == model.generate(PROMPT, sampled).tokens
    assert greedy_out.result.tokens != sampled_out.result.tokens
    record = wb.ledger.records(kind="compare")[-1]
    assert reproduce(wb, record.id).verdict == "exact"


def test_identical_variants_are_refused(wb, tiny_models):
    name = str(tiny_models["llama"])
    with pytest.raises(InputError, match="same model with the same settings"):
        wb.start_comparison([name, name], PROMPT, GenerationSettings(greedy=True))


def test_base_against_a_fine_tuned_copy(wb, tiny_models, tmp_path):
    from engine import testing

    tuned = testing.tiny_llama(tmp_path / "tuned", seed=5)
    comparison = wb.compare(
        [str(tiny_models["llama"]), {"model": str(tuned), "label": "fine-tuned"}],
        PROMPT,
        GenerationSettings(max_new_tokens=4, greedy=True),
    )
    assert [o.label for o in comparison.outcomes] == [str(tiny_models["llama"]), "fine-tuned"]
    assert comparison.outcomes[0].result.provenance.fingerprint != (
        comparison.outcomes[1].result.provenance.fingerprint
    )
