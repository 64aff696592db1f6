"""Two sessions at once on one shared ``Workbench``: mixed capabilities, same answers.

Each "session" is a thread running its own list of requests (generate, attention, explain on
SmolLM2-135M; classify on the fine-tuned MiniLM) while the other runs its list in a different
order. Every answer must equal the one the same request got when it ran alone: the shared
model lock, the tokenizer lock and per-run state must keep the two sessions apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

GEN_TOKENS = 10
IG = {"steps": 20}


def requests(smollm, classifier) -> dict[str, Callable[[], Any]]:
    """name -> the call. Inputs differ between the two sessions,
    so an answer delivered to the wrong session is caught too."""

    def generate(prompt: str):
        return lambda: smollm.generate(prompt, max_new_tokens=GEN_TOKENS, greedy=True)

    def attention(text: str):
        return lambda: smollm.attention(text)

    def explain(text: str, target: str):
        return lambda: smollm.explain(
            text, target, method="integrated_gradients", options=IG, faithfulness=False
        )

    def classify(text: str):
        return lambda: classifier.classify(text)

    return {
        "A.generate": generate("The capital of France is"),
        "A.attention": attention("The quick brown fox jumps over the lazy dog."),
        "A.explain": explain("The capital of France is", " Paris"),
        "A.classify": classify("A wonderful, moving film with a great cast."),
        "B.generate": generate("Once upon a time, there was a"),
        "B.attention": attention("Attention lets every token look at the others."),
        "B.explain": explain("The opposite of hot is", " cold"),
        "B.classify": classify("Dull, boring and far too long. I hated it."),
    }


def assert_same(name: str, alone: Any, together: Any) -> None:
    kind = name.split(".")[1]
    if kind == "generate":
        assert [t.id for t in together.tokens] == [t.id for t in alone.tokens], name
        assert together.text == alone.text, name
    elif kind == "attention":
        assert together.tokens == alone.tokens, name
        assert np.array_equal(together.attentions, alone.attentions), name
    elif kind == "explain":
        assert together.tokens == alone.tokens, name
        assert together.steps_used == alone.steps_used, name
        np.testing.assert_allclose(together.scores, alone.scores, rtol=1e-4, atol=1e-6)
        assert together.target_score == pytest.approx(alone.target_score, abs=1e-5), name
    elif kind == "classify":
        assert together.label == alone.label, name
        assert together.scores.keys() == alone.scores.keys(), name
        for label, p in alone.scores.items():
            assert together.scores[label] == pytest.approx(p, abs=1e-5), (name, label)
    else:  # pragma: no cover - a new request kind needs its own comparison
        raise AssertionError(f"no comparison for {name}")


def test_two_sessions_with_mixed_capabilities_get_their_single_user_answers(
    real_workbench, minilm_sentiment
):
    smollm = real_workbench.load("smollm2-135m")
    classifier = real_workbench.load(minilm_sentiment)
    todo = requests(smollm, classifier)

    alone: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, call in todo.items():
        alone[name] = call()
    alone_s = time.perf_counter() - t0
    # the inputs give different answers, so a swapped answer cannot pass
    assert alone["A.classify"].label != alone["B.classify"].label
    assert alone["A.generate"].text != alone["B.generate"].text
    assert not np.array_equal(alone["A.explain"].scores[:3], alone["B.explain"].scores[:3])

    orders = {
        "A": ["A.generate", "A.attention", "A.explain", "A.classify"],
        "B": ["B.classify", "B.explain", "B.attention", "B.generate"],
    }
    together: dict[str, list[tuple[str, Any]]] = {"A": [], "B": []}  # every answer is kept
    errors: list[tuple[str, BaseException]] = []
    start = threading.Barrier(2)

    def session(who: str) -> None:
        start.wait(timeout=30)
        for name in orders[who]:
            try:
                together[who].append((name, todo[name]()))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append((name, exc))

    threads = [threading.Thread(target=session, args=(who,)) for who in orders]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    together_s = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "a session did not finish in 300 s"
    assert not errors, errors
    for who, names in orders.items():
        assert [name for name, _ in together[who]] == names, who
        for name, answer in together[who]:
            assert_same(name, alone[name], answer)
    print(f"\nalone one after another: {alone_s:.1f} s; two sessions at once: {together_s:.1f} s")
