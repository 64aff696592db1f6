"""Attention as a run: result equal to plain transformers, the result budget (pre-flight size,
refusal saying how many tokens fit, reservation freed when the run is dropped), the model's
context length (refusal or truncation), cancellation while waiting and between sides."""

from __future__ import annotations

import gc
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from engine.attention import (
    AttentionComparison,
    AttentionSettings,
    extract_attention,
    head_statistics,
    result_bytes,
    start_attention,
)
from engine.errors import InputError, MemoryBudgetError
from engine.runs import ResultBudget
from tests.test_attention_engine import TEXT, plain_eager_attentions


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("attn-run-home"), device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"])).loaded


@pytest.fixture(scope="module")
def bert(wb, tiny_models):
    return wb.load(str(tiny_models["bert"])).loaded


def plain_on_ids(folder, ids: list[int], kind: str) -> np.ndarray:
    """Reference on given token ids: a fresh eager transformers model, output_attentions."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).numpy()


def test_a_run_returns_both_sides_with_statistics_equal_to_references(llama, bert, tiny_models):
    run = start_attention([("A", llama, TEXT), ("B", bert, "the film was bad")])
    comparison = run.wait(60)
    assert isinstance(comparison, AttentionComparison)
    assert run.snapshot().state == "done" and run.snapshot().fraction == 1.0
    assert [s.label for s in comparison.sides] == ["A", "B"]
    assert comparison.request.sides == (
        ("A", llama.name, TEXT),
        ("B", bert.name, "the film was bad"),
    )
    for side, name, text, kind in (
        (comparison.sides[0], "llama", TEXT, "causal-lm"),
        (comparison.sides[1], "bert", "the film was bad", "encoder"),
    ):
        expected = plain_eager_attentions(tiny_models[name], text, kind)
        np.testing.assert_allclose(side.result.attentions, expected, rtol=1e-5, atol=1e-6)
        reference = head_statistics(expected)
        np.testing.assert_allclose(side.stats.entropy, reference.entropy, atol=1e-5)
        np.testing.assert_allclose(side.stats.previous_token, reference.previous_token, atol=1e-6)
    assert [p.model for p in comparison.provenance] == [llama.name, bert.name]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_the_size_estimate_is_the_result_size(request, name):
    loaded = request.getfixturevalue(name)
    comparison = start_attention([("x", loaded, TEXT)]).wait(60)
    result = comparison.sides[0].result
    assert result_bytes(loaded, result.n_tokens) == result.nbytes == comparison.nbytes
    assert (result.queries is not None) == (name == "bert")


def test_the_estimate_for_smollm2_matches_the_measured_sizes():
    """30 layers x 9 heads x tokens² x 4 bytes: about 1.1 GB at 1,024 and 18 GB at 4,096."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, hidden_size=576)
    fake = SimpleNamespace(name="smollm2", model=SimpleNamespace(config=config, modules=list))
    assert result_bytes(fake, 1024) == 30 * 9 * 1024**2 * 4
    assert 1.10e9 < result_bytes(fake, 1024) < 1.15e9
    assert 18.0e9 < result_bytes(fake, 4096) < 18.2e9


def test_past_the_budget_the_run_is_refused_saying_how_many_tokens_fit(bert):
    text = " ".join(["good"] * 40)  # 40 tokens (the tiny tokenizer adds no special tokens)
    budget = ResultBudget(budget_bytes=result_bytes(bert, 25) + 1)
    with pytest.raises(MemoryBudgetError, match=r"at most 25 tokens would fit") as info:
        start_attention([("x", bert, text)], budget=budget)
    assert "WORKBENCH_RESULT_BUDGET_GB" in str(info.value) and "\n" not in str(info.value)
    assert budget.used_bytes == 0
    # what the message promises: 25 tokens run within this budget, 26 are refused
    fits = start_attention([("x", bert, " ".join(["good"] * 25))], budget=budget)
    assert fits.wait(60).sides[0].result.n_tokens == 25
    del fits
    gc.collect()
    with pytest.raises(MemoryBudgetError, match="at most 25"):
        start_attention([("x", bert, " ".join(["good"] * 26))], budget=budget)


def test_the_budget_env_variable_sets_the_process_budget(monkeypatch, bert):
    import engine.runs

    text = " ".join(["good"] * 30)
    monkeypatch.setenv("WORKBENCH_RESULT_BUDGET_GB", str(result_bytes(bert, 12) / 2**30))
    monkeypatch.setattr(engine.runs, "_BUDGET", None)  # re-read the variable
    with pytest.raises(MemoryBudgetError, match="at most 12 tokens would fit"):
        start_attention([("x", bert, text)])
    with pytest.raises(MemoryBudgetError, match="at most 12 tokens would fit"):
        extract_attention(bert, text)  # the blocking API checks the same budget


def test_dropping_the_run_frees_its_reservation(bert):
    budget = ResultBudget(budget_bytes=10_000_000)
    run = start_attention([("x", bert, TEXT)], budget=budget)
    comparison = run.wait(60)
    assert budget.used_bytes == comparison.nbytes > 0
    del comparison  # the run still holds it: still reserved
    assert budget.used_bytes > 0
    del run  # nobody holds the run: released at once (no garbage collection needed)
    assert budget.used_bytes == 0


def test_a_failed_run_releases_its_reservation_at_once(bert, monkeypatch):
    import engine.attention.run as attention_run

    def broken(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(attention_run, "attention_forward", broken)
    budget = ResultBudget(budget_bytes=10_000_000)
    run = start_attention([("x", bert, TEXT)], budget=budget)
    assert run.join(30)
    assert run.snapshot().state == "failed"
    assert run.snapshot().error == "Attention failed: RuntimeError: boom"
    assert budget.used_bytes == 0


def test_inputs_longer_than_the_context_are_refused_or_truncated(bert, tiny_models):
    text = " ".join(["good"] * 200)  # 200 tokens; the tiny BERT has 128 positions
    with pytest.raises(InputError, match=r"200 tokens but .* at most 128 positions.*last 72"):
        start_attention([("x", bert, text)])
    with pytest.raises(InputError, match="at most 128 positions"):
        extract_attention(bert, text)
    result = start_attention([("x", bert, text)], AttentionSettings(truncate=True))
    result = result.wait(60).sides[0].result
    assert result.n_tokens == 128 and result.dropped_tokens == 72
    expected = plain_on_ids(tiny_models["bert"], result.token_ids, "encoder")
    np.testing.assert_allclose(result.attentions, expected, rtol=1e-5, atol=1e-6)
    # max_tokens below the context: truncation stops there
    short = start_attention([("x", bert, text)], AttentionSettings(max_tokens=10, truncate=True))
    assert short.wait(60).sides[0].result.dropped_tokens == 190


def test_settings_of_the_wrong_type_are_input_errors(bert):
    with pytest.raises(InputError, match="max_tokens must be a whole number"):
        start_attention([("x", bert, TEXT)], AttentionSettings(max_tokens="50"))
    with pytest.raises(InputError, match="truncate must be true or false"):
        start_attention([("x", bert, TEXT)], AttentionSettings(truncate="yes"))
    with pytest.raises(InputError, match="Nothing to run"):
        start_attention([])


def test_a_run_waiting_for_the_model_says_so_and_cancels(llama):
    holder = threading.Event()
    release = threading.Event()

    def hold():
        with llama.use():
            holder.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    assert holder.wait(10)
    try:
        run = start_attention([("x", llama, TEXT)], budget=ResultBudget(10_000_000))
        deadline = time.monotonic() + 10
        while not run.snapshot().waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        snap = run.snapshot()
        assert snap.waiting and "another run is using it" in snap.message
        run.cancel()
        assert run.join(5)
        assert run.snapshot().state == "cancelled" and run.result is None
    finally:
        release.set()


def test_cancel_is_checked_between_sides(llama, monkeypatch):
    import engine.attention.run as attention_run
    from engine import runs

    calls = []
    original = attention_run.attention_forward

    def forward_then_cancel(loaded, prepared):
        calls.append(prepared.text)
        result = original(loaded, prepared)
        runs.current().cancel_event.set()  # the user presses Cancel during the first side
        return result

    monkeypatch.setattr(attention_run, "attention_forward", forward_then_cancel)
    run = start_attention([("A", llama, TEXT), ("B", llama, "the film")])
    assert run.join(30)
    assert run.snapshot().state == "cancelled"
    assert calls == [TEXT]  # the second side never ran
