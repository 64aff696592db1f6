"""Per-role limits at the start of a run: requests per minute (a sliding window per user),
input tokens of attention, perplexity, classification and explanations, and attribution
steps. Every refusal is a ``LimitError`` raised in the caller's thread, before any work runs."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from engine import access, runs
from engine.access import DEFAULT_LIMITS, LimitError, User, acting_as
from engine.errors import InputError

ANA = User("ana", "student")
BO = User("bo", "student")
ROOT = User("root", "admin")


@pytest.fixture(autouse=True)
def fresh_limits():
    """Default limits (not the developer's limits.toml) and an empty request window."""
    access.set_limits(dict(DEFAULT_LIMITS))
    runs.REQUEST_RATE.reset()
    yield
    access.set_limits(None)
    runs.REQUEST_RATE.reset()


def limits(role: str, **changes) -> None:
    table = dict(DEFAULT_LIMITS)
    table[role] = dataclasses.replace(table[role], **changes)
    access.set_limits(table)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- requests per minute ----------------------------------------------------------------


def test_the_window_slides_and_retry_after_is_when_the_oldest_request_expires():
    clock = Clock()
    rate = runs.RequestRate(clock=clock)
    for _ in range(30):
        rate.admit(ANA, 30)
        clock.now += 1.0  # 30 requests at t = 1000 .. 1029
    clock.now = 1040.0
    with pytest.raises(LimitError) as refused:
        rate.admit(ANA, 30)
    # the oldest (t = 1000) leaves the window at 1060: 20 s from now
    assert refused.value.retry_after_s == pytest.approx(20.0)
    assert str(refused.value) == (
        "You started 30 runs in the last minute (a student may start 30): try again in 20 s."
    )
    rate.admit(BO, 30)  # per user: bo is not ana
    clock.now = 1060.0 + 1e-6  # the first request has expired, the second not yet
    rate.admit(ANA, 30)
    with pytest.raises(LimitError) as again:
        rate.admit(ANA, 30)
    assert again.value.retry_after_s == pytest.approx(1.0, abs=1e-3)
    assert rate.count(ANA) == 30


def test_a_lowered_limit_waits_for_enough_requests_to_expire():
    clock = Clock()
    rate = runs.RequestRate(clock=clock)
    for _ in range(10):
        rate.admit(ANA, 10)
        clock.now += 2.0  # t = 1000 .. 1018
    with pytest.raises(LimitError) as refused:
        rate.admit(ANA, 4)  # 10 in the window, 4 allowed: the 7th oldest (t=1012) must expire
    assert refused.value.retry_after_s == pytest.approx(1012.0 + 60.0 - clock.now)


def test_a_limit_of_zero_allows_no_run():
    with pytest.raises(LimitError, match="may not start runs") as refused:
        runs.RequestRate().admit(ANA, 0)
    assert refused.value.retry_after_s is None


def test_the_31st_run_of_a_student_within_a_minute_is_refused_at_start_but_an_admins_is_not():
    started = []

    def work(ctx):
        started.append(1)
        return 1

    with acting_as(ANA):
        made = [runs.start("demo", work) for _ in range(30)]
        with pytest.raises(LimitError) as refused:
            runs.start("demo", work)
    assert all(run.wait(10) == 1 for run in made)
    assert len(started) == 30  # the refused one never ran
    assert 0 < refused.value.retry_after_s <= 60
    assert "You started 30 runs in the last minute (a student may start 30)" in str(refused.value)
    with acting_as(ROOT):
        assert all(runs.start("demo", work).wait(10) == 1 for _ in range(40))
    with acting_as(BO):  # another student has a window of their own
        assert runs.start("demo", work).wait(10) == 1
    assert len(started) == 71


def test_the_local_user_is_not_rate_limited_but_a_named_admin_is():
    limits("admin", requests_per_minute=2)
    assert all(runs.start("demo", lambda ctx: 1).wait(10) == 1 for _ in range(5))  # LOCAL
    with acting_as(ROOT):
        runs.start("demo", lambda ctx: 1)
        runs.start("demo", lambda ctx: 1)
        with pytest.raises(LimitError, match="an admin may start 2"):
            runs.start("demo", lambda ctx: 1)


def test_runs_started_by_a_running_run_are_part_of_its_request():
    limits("student", requests_per_minute=2)

    def outer(ctx):
        inner = [runs.start("cell", lambda c: 2) for _ in range(5)]
        return sum(run.wait(10) for run in inner)

    with acting_as(ANA):
        assert runs.start("notebook-run-all", outer).wait(20) == 10
    assert runs.REQUEST_RATE.count(ANA) == 1


def test_a_run_refused_for_its_result_size_does_not_count():
    limits("student", requests_per_minute=1)
    budget = runs.ResultBudget(budget_bytes=100)
    with acting_as(ANA):
        with pytest.raises(Exception, match="result budget"):
            runs.Run("demo", lambda ctx: 1, reserve_bytes=1000, budget=budget)
        assert runs.start("demo", lambda ctx: 1).wait(10) == 1  # the one allowed request


def test_concurrent_starts_admit_exactly_the_limit():
    limits("student", requests_per_minute=30)
    admitted, refused = [], []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def client():
        with acting_as(ANA):
            go.wait()
            for _ in range(10):
                try:
                    run = runs.start("demo", lambda ctx: 1)
                except LimitError as exc:
                    with lock:
                        refused.append(exc)
                else:
                    with lock:
                        admitted.append(run)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(admitted) == 30 and len(refused) == 50
    assert all(run.wait(10) == 1 for run in admitted)
    assert all(0 < exc.retry_after_s <= 60 for exc in refused)


# --- sizes: attention, perplexity, classification ----------------------------------------


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("limits-home"), device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"])).loaded


@pytest.fixture(scope="module")
def classifier(wb, tiny_models):
    return wb.load(str(tiny_models["classifier"])).loaded


LONG = "the cat sat on the mat and the dog ran after it in the park"
SHORT = "the cat sat"


def n_tokens(loaded, text: str, **kwargs) -> int:
    return len(loaded.tokenizer(text, **kwargs)["input_ids"])


def test_attention_over_the_students_input_tokens_is_refused_and_under_it_runs(llama):
    from engine.attention import start_attention

    cap = n_tokens(llama, SHORT)
    limits("student", max_input_tokens=cap)
    long_n = n_tokens(llama, LONG)
    assert long_n > cap
    with acting_as(ANA):
        with pytest.raises(LimitError) as refused:
            start_attention([("A", llama, LONG)])
        assert str(refused.value) == (
            f"The input is {long_n} tokens; a student may use at most {cap} tokens "
            "(limits.toml sets this)."
        )
        with pytest.raises(LimitError, match="'B' is"):  # either side of a comparison
            start_attention([("A", llama, SHORT), ("B", llama, LONG)])
        run = start_attention([("A", llama, SHORT)])
        assert run.cost == cap
        assert run.wait(30).sides[0].result.attentions.shape[-1] == cap
    assert runs.REQUEST_RATE.count(ANA) == 1  # refusals are not requests
    start_attention([("A", llama, LONG)]).wait(30)  # the local user: no limit


def test_perplexity_limit_cost_and_bad_input_still_failing_in_the_run(llama):
    from engine.generation.evaluation import perplexity, start_perplexity

    cap = n_tokens(llama, SHORT)
    limits("student", max_input_tokens=cap)
    with acting_as(ANA):
        with pytest.raises(LimitError, match=f"is {n_tokens(llama, LONG)} tokens"):
            start_perplexity(llama, LONG)
        run = start_perplexity(llama, SHORT)
        assert run.cost == cap
        assert run.wait(30).perplexity == pytest.approx(perplexity(llama, SHORT).perplexity)
        empty = start_perplexity(llama, "   ")  # the run reports bad input, as before
        assert empty.join(10) and empty.snapshot().state == "failed"
        with pytest.raises(InputError, match="empty"):
            empty.wait(1)
    assert run.spec == {"model": llama.name, "fingerprint": llama.fingerprint, "text": SHORT}


def test_classification_counts_the_tokens_that_run_after_truncation(classifier):
    from engine.classification import classify, start_classification

    long_n = n_tokens(classifier, LONG)
    limits("student", max_input_tokens=8)
    assert long_n > 8
    with acting_as(ANA):
        with pytest.raises(LimitError, match=f"is {long_n} tokens; a student may use at most 8"):
            start_classification(classifier, LONG)
        run = start_classification(classifier, LONG, max_length=8)  # truncated: 8 tokens run
        assert run.cost == 8
        result = run.wait(30)
    assert result.label == classify(classifier, LONG, max_length=8).label
    assert run.spec["max_length"] == 8


# --- explanations: attribution steps and input tokens --------------------------------------


def test_attribution_steps_over_the_students_limit_are_refused_with_the_numbers(llama):
    from engine.attribution import ExplanationSpec, MethodRun, start_explanation

    over = ExplanationSpec(SHORT, methods=(MethodRun("ig", {"steps": 200, "auto_steps": False}),))
    under = ExplanationSpec(SHORT, methods=(MethodRun("ig", {"steps": 100, "auto_steps": False}),))
    both = ExplanationSpec(
        SHORT,
        methods=(MethodRun("ig", {"steps": 100, "auto_steps": False}), MethodRun("lime")),
    )
    with acting_as(ANA):
        with pytest.raises(LimitError) as refused:
            start_explanation(llama, over)
        assert str(refused.value) == (
            "This explanation (Integrated Gradients 200 steps) is 200 steps; a student may use "
            "at most 128 steps (limits.toml sets this)."
        )
        with pytest.raises(LimitError, match=r"100 steps \+ LIME 200 samples\) is 300 steps"):
            start_explanation(llama, both)
        run = start_explanation(llama, under)
        result = run.wait(60)
    assert len(result.attributions) == 1
    assert run.cost == 100 + 2  # the path and the two end points: model rows
    with acting_as(ROOT):  # an admin may use 512
        assert start_explanation(llama, over).wait(60) is not None


def test_per_token_explanations_multiply_steps_by_the_target_tokens(llama):
    from engine.attribution import ExplanationSpec, MethodRun, TargetSpec, start_explanation

    target = " mat and the dog"
    outputs = n_tokens(llama, target, add_special_tokens=False)
    assert outputs > 1
    steps = 128 // outputs + 1  # under the limit for one target, over it for all of them
    spec = ExplanationSpec(
        SHORT,
        TargetSpec(text=target),
        methods=(MethodRun("ig", {"steps": steps, "auto_steps": False}),),
        per_token=True,
        faithfulness=False,
    )
    with acting_as(ANA):
        with pytest.raises(LimitError, match=f"x {outputs} target tokens\\) is {steps * outputs}"):
            start_explanation(llama, spec)
        start_explanation(llama, dataclasses.replace(spec, per_token=False)).wait(60)


def test_refinement_stops_at_the_limit_and_the_spec_records_it(llama):
    from engine.attribution import ExplanationSpec, MethodRun, start_explanation

    spec = ExplanationSpec(SHORT, methods=(MethodRun("ig"),), faithfulness=False)  # 50 -> 400
    with acting_as(ANA):
        run = start_explanation(llama, spec)
        run.wait(60)
    assert dict(run.spec.methods[0].options)["max_steps"] == 128
    local = start_explanation(llama, spec)  # the local user: the spec as asked
    local.wait(60)
    assert "max_steps" not in dict(local.spec.methods[0].options)


def test_explanation_input_tokens_are_limited(llama):
    from engine.attribution import ExplanationSpec, MethodRun, start_explanation

    limits("student", max_input_tokens=4)
    spec = ExplanationSpec(LONG, methods=(MethodRun("saliency"),), faithfulness=False)
    with acting_as(ANA), pytest.raises(LimitError, match=f"The text is {n_tokens(llama, LONG)}"):
        start_explanation(llama, spec)
