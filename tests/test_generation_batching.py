"""Batched and deduplicated generation (engine.generation.batching) through the fair queue.

Requests that wait for a model together are decoded together: every answer must equal the
single-request answer (token ids exactly; log-probabilities within ``LOGPROB_TOL``), each row
streams and stops on its own, identical requests are computed once, sampled requests are not
batched, and the run record says what happened. Also: generation limits per role and the cost
a generation run is queued with.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import pytest

from engine import access, runs
from engine.access import LimitError, User
from engine.generation import GenerationSettings
from engine.generation.streaming import start_generation
from engine.testing import WORDS, watching_forward

# Batched logits differ from single-request logits by float rounding only (the padded
# positions are masked). Measured max |delta logprob|: ~1e-6 on the tiny model, 3.5e-5 on
# SmolLM2-135M (30 prompts, 16 tokens).
LOGPROB_TOL = 1e-3
GREEDY = GenerationSettings(max_new_tokens=12, greedy=True, top_alternatives=3)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` different prompts of 1 to 40 words of the tiny vocabulary."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        if text not in out:
            out.append(text)
    return out


@pytest.fixture(autouse=True)
def roomy_limits():
    """Students with high rate limits (the tests queue many requests quickly)."""
    table = dict(access.DEFAULT_LIMITS)
    table["student"] = replace(table["student"], requests_per_minute=100_000)
    access.set_limits(table)
    yield
    access.set_limits(None)


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("batching-home"), device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"]))


def ids(result) -> list[int]:
    return [t.id for t in result.tokens]


def assert_same(single, batched, what: str = "") -> float:
    """Token ids, text and finish equal; returns the max |delta logprob| (checked <= tol)."""
    assert ids(batched) == ids(single), what
    assert batched.text == single.text and batched.finish_reason == single.finish_reason, what
    worst = 0.0
    for a, b in zip(single.tokens, batched.tokens, strict=True):
        worst = max(worst, abs(a.logprob - b.logprob))
        assert [x.id for x in a.alternatives] == [x.id for x in b.alternatives], what
    assert worst <= LOGPROB_TOL, (what, worst)
    return worst


def queue_while_held(model, requests: list[tuple[User, str, GenerationSettings]], **kw):
    """Start every request while the model is held, so they all wait together; release and
    return the runs (they are decoded in as few grants as the scheduler allows)."""
    started = []
    with model.loaded.use():
        for user, prompt, settings in requests:
            with access.acting_as(user):
                started.append(model.start_generation(prompt, settings, **kw))
        assert wait_until(lambda: model.loaded.queue.waiting_count() == len(requests))
    return started


def students(n: int) -> list[User]:
    return [User(f"student{i}", "student") for i in range(n)]


def test_greedy_batches_give_the_single_request_answers(llama):
    texts = prompts(30)
    # varied settings that still batch: lengths, stop sequences, alternatives
    settings = [
        replace(
            GREEDY,
            max_new_tokens=4 + (i % 5) * 4,
            stop_sequences=(" paris",) if i % 7 == 0 else (),
            top_alternatives=i % 4,
        )
        for i in range(len(texts))
    ]
    single = [llama.generate(p, s) for p, s in zip(texts, settings, strict=True)]
    assert all(r.batch_size == 1 and r.shared_by == 1 for r in single)
    started = queue_while_held(llama, list(zip(students(30), texts, settings, strict=True)))
    batched = [run.wait(60) for run in started]
    worst = max(assert_same(a, b, p) for a, b, p in zip(single, batched, texts, strict=True))
    sizes = sorted({r.batch_size for r in batched})
    assert max(sizes) == 16, sizes  # MAX_BATCH_ROWS rows per grant, 30 = 16 + 14
    print(f"\ntiny llama, 30 prompts: max |delta logprob| {worst:.2e}, batch sizes {sizes}")


def test_each_row_streams_and_stops_on_its_own(llama):
    texts = prompts(3, seed=1)
    settings = replace(GREEDY, max_new_tokens=40)
    single = [llama.generate(p, settings) for p in texts]
    with watching_forward(llama.loaded, lambda rows: time.sleep(0.02)):
        started = queue_while_held(
            llama, list(zip(students(3), texts, [settings] * 3, strict=True))
        )
        assert wait_until(lambda: (started[1].snapshot().partial or None) is not None)
        assert wait_until(lambda: len(started[1].snapshot().partial.tokens) >= 2)
        started[1].cancel()
        results = [run.wait(30) for run in started]
    stopped = results[1]
    assert stopped.finish_reason == "cancelled" and stopped.batch_size == 3
    assert 2 <= len(stopped.tokens) < len(single[1].tokens) or single[1].finish_reason != "length"
    assert ids(stopped) == ids(single[1])[: len(stopped.tokens)]
    for i in (0, 2):  # the others went on to their own end
        assert_same(single[i], results[i])
        assert started[i].snapshot().partial.text == results[i].text
    assert not llama.loaded.busy


def test_identical_requests_are_computed_once(llama):
    prompt = "the capital of france is"
    settings = replace(GREEDY, max_new_tokens=10)
    calls = []
    with watching_forward(llama.loaded, calls.append):
        single = llama.generate(prompt, settings)
        one_request = len(calls)
        calls.clear()
        started = queue_while_held(llama, [(u, prompt, settings) for u in students(12)])
        results = [run.wait(30) for run in started]
    assert one_request == len(single.tokens)  # one forward per token (KV cache)
    assert len(calls) == one_request and set(calls) == {1}, calls  # once, at batch size 1
    for result in results:
        assert_same(single, result)
        assert result.shared_by == 12 and result.batch_size == 1


def test_one_of_several_identical_requests_can_stop_alone(llama):
    prompt = prompts(1, seed=3)[0]
    settings = replace(GREEDY, max_new_tokens=40)
    single = llama.generate(prompt, settings)
    with watching_forward(llama.loaded, lambda rows: time.sleep(0.02)):
        started = queue_while_held(llama, [(u, prompt, settings) for u in students(3)])
        assert wait_until(lambda: started[0].snapshot().partial is not None)
        assert wait_until(lambda: len(started[0].snapshot().partial.tokens) >= 2)
        started[0].cancel()
        results = [run.wait(30) for run in started]
    assert results[0].finish_reason == "cancelled"
    assert ids(results[0]) == ids(single)[: len(results[0].tokens)]
    if single.finish_reason == "length":
        assert len(results[0].tokens) < len(single.tokens)
    for result in results[1:]:
        assert_same(single, result)
        assert result.shared_by == 3


def test_sampled_requests_run_alone_and_keep_their_seeded_answers(llama):
    prompt = "the movie was"
    sampled = [replace(GREEDY, greedy=False, temperature=1.5, seed=s) for s in (1, 2)]
    single = [llama.generate(prompt, s) for s in sampled]
    assert ids(single[0]) != ids(single[1])  # the seeds matter on this prompt
    requests = [
        (User("a", "student"), prompt, sampled[0]),
        (User("b", "student"), prompt, sampled[1]),
        (User("c", "student"), prompt, sampled[0]),  # identical to a's: computed once
        (User("d", "student"), prompt, GREEDY),
        (User("e", "student"), "hello world", GREEDY),
    ]
    results = [run.wait(30) for run in queue_while_held(llama, requests)]
    for i, expected in ((0, single[0]), (1, single[1]), (2, single[0])):
        assert (
            ids(results[i]) == ids(expected) and results[i].settings.seed == expected.settings.seed
        )
        assert results[i].batch_size == 1
    assert results[0].shared_by == 2 and results[1].shared_by == 1
    assert results[3].batch_size == 2 and results[4].batch_size == 2  # the greedy pair


def test_the_run_record_says_batched_and_shared(wb, llama):
    prompt, other = "the capital of france is", "hello world"
    requests = [(u, prompt, GREEDY) for u in students(2)] + [(User("z", "student"), other, GREEDY)]
    started = queue_while_held(llama, requests)
    for run in started:
        run.wait(30)
    records = [wb.ledger.get(run.id) for run in started]
    stored = [wb.ledger.load_result(record) for record in records]
    assert [(r.batch_size, r.shared_by) for r in stored] == [(2, 2), (2, 2), (2, 1)]
    assert [record.user for record in records] == ["student0", "student1", "z"]


def test_many_threads_through_the_api_get_their_own_answers(llama):
    texts = prompts(12, seed=5)
    reference = {p: llama.generate(p, GREEDY) for p in texts}
    users = students(8) + [User("teacher", "instructor")]
    failures: list[str] = []
    sizes: list[int] = []
    lock = threading.Lock()

    def session(u: int) -> None:
        with access.acting_as(users[u]):
            for k in range(4):
                prompt = texts[(u * 5 + k) % len(texts)]
                result = llama.generate(prompt, GREEDY)
                with lock:
                    sizes.append(result.batch_size)
                    if ids(result) != ids(reference[prompt]) or result.prompt != prompt:
                        failures.append(f"{users[u].name}: {prompt!r}")

    threads = [threading.Thread(target=session, args=(u,)) for u in range(len(users))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [] and len(sizes) == 4 * len(users)
    assert max(sizes) > 1, "concurrent requests should have been batched"
    assert not llama.loaded.busy


def test_generation_limits_per_role(llama):
    table = dict(access.DEFAULT_LIMITS)
    table["student"] = replace(table["student"], max_new_tokens=8, max_input_tokens=5)
    access.set_limits(table)
    with access.acting_as(User("ana", "student")):
        with pytest.raises(LimitError, match=r"max_new_tokens is 9 new tokens; a student may "):
            llama.start_generation("hello world", replace(GREEDY, max_new_tokens=9))
        with pytest.raises(
            LimitError, match=r"The prompt is 6 tokens; a student may use at most 5"
        ):
            llama.start_generation(
                "a b c d e f".replace("b", "the"), replace(GREEDY, max_new_tokens=8)
            )
        kept = llama.generate(
            "the a an of to and in", replace(GREEDY, max_new_tokens=8, keep_last_tokens=True)
        )
        assert kept.prompt_tokens == 5 and kept.dropped_prompt_tokens == 2
        run = llama.start_generation("hello world", replace(GREEDY, max_new_tokens=8))
        assert run.cost == 2 + 8  # prompt tokens + max_new_tokens
        run.wait(30)
    # the admin's own limits are larger
    assert len(llama.generate("hello world", replace(GREEDY, max_new_tokens=9)).tokens) <= 9


def test_start_generation_passes_the_cost_to_the_queue(llama):
    run = start_generation(llama.loaded, "the capital of france is", GREEDY)
    assert run.cost == 5 + GREEDY.max_new_tokens
    run.wait(30)
    assert runs.current() is None


SMOLLM_BASES = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "The three primary colours are",
    "In 1969, the first humans to walk on the Moon were",
    "A recipe for pancakes: mix flour, eggs and milk, then",
    "Photosynthesis is the process by which plants",
    "The quick brown fox",
    "Dear Sir or Madam, I am writing to complain about the train that was late again this "
    "morning, which made me miss an important meeting with",
    "Water boils at",
)


def smollm_prompts() -> list[str]:
    """30 prompts of 2 to about 40 tokens: each base whole, cut short, and with a tail."""
    out = []
    for base in SMOLLM_BASES:
        words = base.split()
        out += [base, " ".join(words[: max(2, len(words) // 2)]), base + " Also,"]
    return out


@pytest.mark.slow
def test_smollm_batches_give_the_single_request_answers(smollm):
    texts = smollm_prompts()
    settings = GenerationSettings(max_new_tokens=12, greedy=True, top_alternatives=3)
    single = [smollm.generate(p, settings) for p in texts]
    started = queue_while_held(
        smollm, [(u, p, settings) for u, p in zip(students(30), texts, strict=True)]
    )
    batched = [run.wait(300) for run in started]
    worst = max(assert_same(a, b, p) for a, b, p in zip(single, batched, texts, strict=True))
    assert max(r.batch_size for r in batched) == 16
    print(f"\nSmolLM2-135M, 30 prompts: max |delta logprob| {worst:.2e}")


def test_a_short_request_in_a_batch_returns_without_waiting_for_a_long_one(llama):
    texts = prompts(2, seed=7)
    short, long = replace(GREEDY, max_new_tokens=3), replace(GREEDY, max_new_tokens=60)
    reference = llama.generate(texts[1], long)
    assert reference.finish_reason == "length"  # this prompt runs to all 60 tokens
    with watching_forward(llama.loaded, lambda rows: time.sleep(0.03)):  # 60 tokens: >= 1.8 s
        users = students(2)
        started = queue_while_held(llama, [(users[0], texts[0], short), (users[1], texts[1], long)])
        first = started[0].wait(30)  # the leader: its own row is done after 3 tokens
        assert not started[1].done, "the short request waited for the long one"
        assert llama.loaded.busy  # the batch thread still holds the model
        second = started[1].wait(30)
    assert first.batch_size == 2 == second.batch_size and len(first.tokens) == 3
    assert_same(reference, second)
    assert wait_until(lambda: not llama.loaded.busy)


def test_int8_requests_run_alone_and_get_their_single_request_answers(llama):
    texts = prompts(4, seed=11)
    settings = replace(GREEDY, decode_path="int8")
    single = [llama.generate(p, settings) for p in texts]
    started = queue_while_held(llama, list(zip(students(4), texts, [settings] * 4, strict=True)))
    queued = [run.wait(30) for run in started]
    assert {r.batch_size for r in queued} == {1}  # never batched: see engine.generation.batching
    assert {r.provenance.decode_path for r in queued} == {"int8"}
    for a, b in zip(single, queued, strict=True):
        assert [(t.id, t.logprob) for t in a.tokens] == [(t.id, t.logprob) for t in b.tokens]


def test_a_batch_runs_on_past_a_finished_rows_context(llama):
    # the tiny model has 128 positions: the long row ends after 5 tokens at position 106, then
    # is fed padding while the short row goes on for 100 tokens
    long_prompt, short_prompt = " ".join(["the"] * 100), "hello world"
    long, short = replace(GREEDY, max_new_tokens=5), replace(GREEDY, max_new_tokens=100)
    single = [llama.generate(long_prompt, long), llama.generate(short_prompt, short)]
    assert single[1].finish_reason == "length"  # it does run for 100 tokens
    users = students(2)
    started = queue_while_held(
        llama, [(users[0], long_prompt, long), (users[1], short_prompt, short)]
    )
    results = [run.wait(60) for run in started]
    assert [r.batch_size for r in results] == [2, 2]
    for one, batched in zip(single, results, strict=True):
        assert_same(one, batched)
