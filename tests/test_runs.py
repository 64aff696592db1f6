"""The one run mechanism (engine.runs) and what it gives every capability: progress, partial
output, cancel, idle timeout, one-line errors, the result budget, "waiting for the model", and
tokenizer calls that never run outside the model's tokenizer lock."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from engine import runs
from engine.errors import CancelledError, InputError, MemoryBudgetError
from engine.generation import GenerationSettings

PROMPT = "the capital of france is"


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_a_run_reports_progress_partial_output_and_its_result():
    gate = threading.Event()

    def work(ctx):
        ctx.progress(0.5, "half way")
        ctx.partial("so far")
        gate.wait(5)
        return 42

    run = runs.start("demo", work, spec={"x": 1})
    assert wait_until(lambda: run.snapshot().fraction == 0.5)
    snap = run.snapshot()
    assert (snap.state, snap.message, snap.partial, snap.result) == (
        "running",
        "half way",
        "so far",
        None,
    )
    gate.set()
    assert run.wait(5) == 42
    snap = run.snapshot()
    assert (snap.state, snap.fraction, snap.result, snap.error) == ("done", 1.0, 42, None)
    assert run.spec == {"x": 1} and run.operation == "demo"


def test_cancel_stops_the_work_at_its_next_check():
    checks = []

    def work(ctx):
        while True:
            checks.append(1)
            ctx.check()
            time.sleep(0.005)

    run = runs.start("loop", work)
    assert wait_until(lambda: len(checks) > 2)
    run.cancel()
    assert run.join(2)
    snap = run.snapshot()
    assert snap.state == "cancelled" and snap.cancelled and snap.error == "Cancelled."
    with pytest.raises(CancelledError):
        run.wait(0)


def test_a_run_nobody_polls_stops_itself_after_the_idle_timeout():
    def work(ctx):
        for _ in range(400):  # 2 s at most
            ctx.check()
            time.sleep(0.005)
        return "finished"

    polled = runs.start("watched", work, idle_timeout_s=0.3)
    unpolled = runs.start("unwatched", work, idle_timeout_s=0.3)
    while not polled.done:
        polled.snapshot()
        time.sleep(0.05)
    assert polled.wait() == "finished"
    assert unpolled.join(3)
    assert unpolled.snapshot().state == "cancelled"
    assert "nobody was watching" in unpolled.snapshot().error


def test_errors_become_one_line_and_engine_errors_keep_their_message():
    def boom(_ctx):
        raise ValueError("first line\nsecond line")

    def bad_input(_ctx):
        raise InputError("The prompt is empty: type some text.")

    failed, refused = runs.start("explain", boom), runs.start("generate", bad_input)
    failed.join(2), refused.join(2)
    assert failed.snapshot().state == "failed"
    assert failed.snapshot().error == "Explain failed: ValueError: first line second line"
    assert refused.snapshot().error == "The prompt is empty: type some text."
    with pytest.raises(ValueError):
        failed.wait(0)


def test_the_result_budget_refuses_what_does_not_fit_and_frees_dropped_runs():
    budget = runs.ResultBudget(1000)
    kept = runs.Run("attention", lambda _ctx: "big", reserve_bytes=600, budget=budget)
    kept.wait(2)
    assert budget.used_bytes == 600
    with pytest.raises(MemoryBudgetError, match="result budget"):
        runs.Run("attention", lambda _ctx: "too big", reserve_bytes=600, budget=budget)
    del kept  # nobody holds the result any more: its reservation goes with it
    gc.collect()
    assert budget.used_bytes == 0
    again = runs.Run("attention", lambda _ctx: "fits now", reserve_bytes=600, budget=budget)
    assert again.wait(2) == "fits now"


def test_a_failed_run_releases_its_reservation_at_once():
    budget = runs.ResultBudget(1000)
    failed = runs.Run("attention", lambda _ctx: 1 / 0, reserve_bytes=700, budget=budget)
    failed.join(2)
    assert budget.used_bytes == 0 and failed.state == "failed"


# --- on a real (tiny) model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("runs-home"), device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"]))


def test_a_run_waiting_for_the_model_says_so_and_can_be_cancelled(llama):
    settings = GenerationSettings(max_new_tokens=4, greedy=True)
    with llama.loaded.use():  # another user holds the model
        run = llama.start_generation(PROMPT, settings)
        assert wait_until(lambda: run.snapshot().waiting, 5)
        assert "Waiting for" in run.snapshot().message
        assert "another run" in run.snapshot().message
        run.cancel()
        assert run.join(2), "a cancelled run must stop waiting for the model"
    assert run.snapshot().state == "cancelled"
    # and once the model is free, the same request runs normally
    second = llama.start_generation(PROMPT, settings)
    assert len(second.wait(30).tokens) == 4 and second.snapshot().state == "done"


def test_generation_streams_into_the_snapshot(llama):
    run = llama.start_generation(PROMPT, GenerationSettings(max_new_tokens=12, greedy=True))
    result = run.wait(30)
    partial = run.snapshot().partial
    assert partial.text == result.text and partial.tokens == result.tokens
    assert run.spec["prompt"] == PROMPT and run.spec["fingerprint"] == llama.loaded.fingerprint


class LockCheckingTokenizer:
    """Wraps a tokenizer and records every call made without the model's tokenizer lock."""

    CHECKED = ("__call__", "decode", "batch_decode", "encode", "convert_ids_to_tokens")

    def __init__(self, inner, lock):
        self._inner, self._lock, self.unlocked_calls = inner, lock, []

    def _check(self, name):
        if not self._lock._is_owned():
            self.unlocked_calls.append(name)

    def __call__(self, *args, **kwargs):
        self._check("__call__")
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name in self.CHECKED or name == "apply_chat_template":
            self._check(name)
        return value


def test_generation_perplexity_and_compare_tokenize_only_under_the_tokenizer_lock(
    wb, llama, tiny_models
):
    loaded = llama.loaded
    original = loaded.tokenizer
    spy = LockCheckingTokenizer(original, loaded.tokenizer_lock)
    loaded.tokenizer = spy
    try:
        llama.generate(PROMPT, max_new_tokens=6, greedy=True)
        llama.perplexity("the capital of france is paris")
        llama.generate(PROMPT, max_new_tokens=3, greedy=False, seed=1, stop_sequences=("x",))
    finally:
        loaded.tokenizer = original
    assert spy.unlocked_calls == []


def test_classify_tokenizes_only_under_the_tokenizer_lock(wb, tiny_models):
    model = wb.load(str(tiny_models["classifier"]))
    loaded = model.loaded
    original = loaded.tokenizer
    spy = LockCheckingTokenizer(original, loaded.tokenizer_lock)
    loaded.tokenizer = spy
    try:
        model.classify("the capital of france")
    finally:
        loaded.tokenizer = original
    assert spy.unlocked_calls == []


def test_concurrent_runs_on_one_model_each_get_their_own_answer(llama):
    prompts = [PROMPT, "the cat sat on", "once upon a", "paris is the"]
    settings = GenerationSettings(max_new_tokens=8, greedy=True)
    alone = {p: [t.id for t in llama.generate(p, settings).tokens] for p in prompts}
    started = [llama.start_generation(p, settings) for p in prompts * 2]
    together = [[t.id for t in r.wait(60).tokens] for r in started]
    assert together == [alone[p] for p in prompts * 2]


def test_token_view_escapes_hostile_token_text():
    from engine.generation import Alternative, TokenStep
    from engine.generation.views import token_html

    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    step = TokenStep(5, hostile, -0.1, (Alternative(6, hostile, -2.0),))
    page = token_html([step])
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "onerror" in page  # shown as text, not run
