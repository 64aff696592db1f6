"""Reproduce verdicts: exact re-runs, within tolerance, mismatch with the difference named, and
"cannot reproduce" when the weights changed or the model is gone; `workbench rerun`."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.generation import GenerationSettings
from engine.reproduce import reproduce
from tests.conftest import run_cli

PROMPT = "the capital of france is"


@pytest.fixture
def wb(tmp_path):
    from engine import Workbench

    return Workbench(home=tmp_path / "home", device="cpu")


def last(wb):
    return wb.ledger.records()[-1]


def test_greedy_and_seeded_generation_reproduce_exactly(wb, tiny_models):
    model = wb.load(str(tiny_models["llama"]))
    model.generate(PROMPT, max_new_tokens=6, greedy=True)
    greedy = last(wb)
    model.generate(PROMPT, max_new_tokens=6, greedy=False, temperature=1.3)  # seed drawn
    sampled = last(wb)
    assert sampled.seed is not None
    for record in (greedy, sampled):
        verdict = reproduce(wb, record.id)
        assert (verdict.verdict, verdict.match) == ("exact", True), verdict.differences
        assert verdict.new_run_id and verdict.new_run_id != record.id
    assert len(wb.ledger.records()) == 4  # the re-runs are recorded too


def test_perplexity_and_classification_reproduce_exactly(wb, tiny_models):
    wb.load(str(tiny_models["llama"])).perplexity("the capital of france is paris")
    ppl = last(wb)
    wb.load(str(tiny_models["classifier"])).classify("the capital of france")
    label = last(wb)
    assert reproduce(wb, ppl.id).verdict == "exact"
    assert reproduce(wb, label.id).verdict == "exact"


def _edit_result(wb, record, edit):
    path = wb.ledger.result_file(record)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_small_numeric_drift_is_within_tolerance_and_a_token_change_is_a_mismatch(wb, tiny_models):
    model = wb.load(str(tiny_models["llama"]))
    model.generate(PROMPT, max_new_tokens=6, greedy=True)
    record = last(wb)

    def drift(data):
        data["tokens"][2]["logprob"] *= 1 + 2e-6

    _edit_result(wb, record, drift)
    verdict = reproduce(wb, record.id)
    assert verdict.verdict == "within tolerance" and verdict.match
    assert "rtol 0.0001" in verdict.tolerance

    def other_token(data):
        data["tokens"][3]["id"] += 1

    _edit_result(wb, record, other_token)
    verdict = reproduce(wb, record.id)
    assert verdict.verdict == "mismatch" and not verdict.match
    assert "position 3" in verdict.differences[0]


def test_changed_weights_or_a_missing_model_cannot_be_reproduced(wb, tiny_models, tmp_path):
    from engine import testing

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    model = wb.load(str(folder))
    model.generate(PROMPT, max_new_tokens=4, greedy=True)
    record = last(wb)
    wb.unload(str(folder))
    testing.tiny_llama(folder, seed=3)  # same name, other weights
    verdict = reproduce(wb, record.id)
    assert verdict.verdict == "cannot reproduce" and not verdict.match
    assert "fingerprint" in verdict.differences[0]
    wb.unload(str(folder))
    shutil.rmtree(folder)
    verdict = reproduce(wb, record.id)
    assert verdict.verdict == "cannot reproduce" and "not available" in verdict.differences[0]


def test_a_saved_generation_result_file_reproduces(wb, tiny_models, tmp_path):
    model = wb.load(str(tiny_models["llama"]))
    result = model.generate(PROMPT, GenerationSettings(max_new_tokens=5, greedy=True))
    saved = result.save(tmp_path / "run.json")
    verdict = reproduce(wb, saved)
    assert verdict.verdict == "exact" and verdict.run_id is None


def test_rerun_cli_prints_the_verdict_as_json(tmp_path, tiny_models):
    home = tmp_path / "home"
    made = run_cli(
        "generate",
        str(tiny_models["llama"]),
        PROMPT,
        "--max-new-tokens",
        "4",
        "--greedy",
        home=home,
    )
    assert made.returncode == 0, made.stderr
    listed = json.loads(run_cli("history", "list", "--json", home=home).stdout)
    assert [r["kind"] for r in listed] == ["generate"]
    rerun = run_cli("rerun", listed[0]["id"], "--json", home=home)
    assert rerun.returncode == 0, rerun.stderr
    verdict = json.loads(rerun.stdout)
    assert verdict["verdict"] == "exact" and verdict["match"] is True
    missing = run_cli("rerun", "no-such-run", home=home)
    assert missing.returncode == 2 and "No run" in missing.stderr
    bad_file = tmp_path / "bad.json"
    bad_file.write_text("[1, 2")
    broken = run_cli("rerun", str(bad_file), home=home)
    assert broken.returncode == 2 and "not a JSON file" in broken.stderr


@pytest.mark.slow
def test_an_explanation_reproduces_exactly_even_when_free_memory_changes(
    real_workbench, smollm, monkeypatch
):
    """The automatic batch size follows free memory; the recorded one is reused on a re-run,
    so the floating-point sums (and the scores) come out bit-identical."""
    from engine.attribution import ExplanationSpec, MethodRun, TargetSpec, budget

    spec = ExplanationSpec(
        "The Eiffel Tower is located in the city of",
        TargetSpec(text=" Paris"),
        (MethodRun("integrated_gradients", {"auto_steps": False}),),
        faithfulness=False,
    )
    first = smollm.start_explanation(spec).wait()
    used = first.attributions[0].options["internal_batch_size"]
    assert used > 1
    record = real_workbench.ledger.records(kind="explain")[-1]
    # far less free memory now: the automatic choice would be a smaller batch
    monkeypatch.setattr(budget, "available_bytes", lambda loaded: 60 * 2**20)
    verdict = reproduce(real_workbench, record.id)
    assert verdict.verdict == "exact", verdict.differences
