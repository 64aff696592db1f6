"""Two users generating at once through the served app, in two real browser contexts.

With Streamlit's post-script ``gc.collect(2)`` on, two polling sessions starved the decode
thread (24 tokens: 278 s instead of ~6 s). Now the two runs, which share one model and so
take turns on its lock, must finish within about the sum of their single-user times, and the
one that waits must say so ("Waiting for <model>: another run is using it…") while the other
runs.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TOKENS = 24
# both run to all TOKENS tokens greedily on SmolLM2-135M (no end-of-text before)
PROMPTS = {
    "A": "Once upon a time, in a land far away, there lived",
    "B": "The best way to learn a new language is",
}
WAITING = re.compile(r"Waiting for \S+: another run is using it")
SLACK = 1.5  # together may take this many times the sum of the single-user times...
EXTRA_S = 5.0  # ...plus this (page round trips and polling)


def open_generate(browser, url: str, prompt: str):
    """A fresh session on the Generate page, set for ``TOKENS`` greedy tokens of ``prompt``."""
    context = browser.new_context(viewport={"width": 1400, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(url + "/generate")
    page.get_by_role("heading", name="Generate").first.wait_for()
    page.locator(".st-key-gen_input textarea").fill(prompt)
    max_tokens = page.locator(".st-key-gen_max_new_tokens input")
    max_tokens.fill(str(TOKENS))
    max_tokens.press("Enter")
    greedy = page.locator(".st-key-gen_greedy input")
    if not greedy.is_checked():
        page.locator(".st-key-gen_greedy").get_by_text("Greedy (deterministic)").click()
    page.wait_for_function(
        "() => document.querySelector('.st-key-gen_greedy input')?.checked === true"
    )
    return context, page


def finished(page) -> bool:
    """The run ended and its result is drawn: the live view is gone, the output text and the
    result's metrics are shown."""
    if page.locator(".st-key-gen_stream").count() or not page.locator(".st-key-gen_output").count():
        return False
    try:
        drawn = page.locator(".st-key-gen_output").inner_text(timeout=500).strip()
    except Exception:  # noqa: BLE001 - the page may redraw between count and read
        return False
    return bool(drawn) and page.locator("[data-testid='stMetric']").count() > 0


def output_text(page) -> str:
    return page.locator(".st-key-gen_output").inner_text()


def stream_text(page) -> str:
    stream = page.locator(".st-key-gen_stream")
    try:
        return stream.inner_text(timeout=500) if stream.count() else ""
    except Exception:  # noqa: BLE001 - the fragment may redraw between count and read
        return ""


def start(page) -> float:
    button = page.locator(".st-key-gen_go button")
    button.wait_for()
    page.wait_for_function("() => !document.querySelector('.st-key-gen_go button')?.disabled")
    t0 = time.monotonic()
    button.click()
    # the live view replaces the previous result (which must not count as this run's end)
    page.locator(".st-key-gen_stream").wait_for(timeout=60_000)
    return t0


def generate_alone(page, timeout_s: float = 300) -> tuple[float, str]:
    """Seconds from the click until the result shows, and the output text."""
    t0 = start(page)
    deadline = t0 + timeout_s
    while not finished(page):
        assert time.monotonic() < deadline, "the run did not finish"
        page.wait_for_timeout(50)
    return time.monotonic() - t0, output_text(page)


def tokens_shown(page) -> str:
    metric = page.locator("[data-testid='stMetric']").filter(has_text="Tokens").first
    return metric.inner_text().split()[-1]


def measure(pages: dict) -> dict:
    """A alone, B alone, then both at once; the seconds, answers and waiting messages seen."""
    alone, texts = {}, {}
    for who in ("A", "B"):
        alone[who], texts[who] = generate_alone(pages[who])
        assert tokens_shown(pages[who]) == str(TOKENS), who
    assert texts["A"] != texts["B"]
    budget = (alone["A"] + alone["B"]) * SLACK + EXTRA_S

    # both at once: A clicks, B clicks as soon as A's run shows
    t0 = {who: start(pages[who]) for who in ("A", "B")}
    done: dict[str, float] = {}
    waited_while_other_ran: dict[str, str] = {}
    deadline = min(t0.values()) + budget * 2 + 30  # past this it has failed anyway
    while len(done) < 2 and time.monotonic() < deadline:
        for who, page in pages.items():
            if who in done:
                continue
            if finished(page):
                done[who] = time.monotonic() - t0[who]
                continue
            other = "B" if who == "A" else "A"
            shown = stream_text(page)
            if WAITING.search(shown) and other not in done:
                waited_while_other_ran.setdefault(who, shown)
        time.sleep(0.05)
    same = {
        who: who in done and output_text(page) == texts[who] and tokens_shown(page) == str(TOKENS)
        for who, page in pages.items()
    }
    return {
        "tokens": TOKENS,
        "alone_s": alone,
        "together_s": done,
        "budget_s": budget,
        "within_budget": len(done) == 2 and max(done.values()) <= budget,
        "same_answer_as_alone": same,
        "waiting_shown": sorted(waited_while_other_ran),
    }


@pytest.mark.timeout(1200)
def test_two_users_generate_at_once_within_the_sum_of_their_times(app_server, browser):
    sessions = {who: open_generate(browser, app_server, p) for who, p in PROMPTS.items()}
    pages = {who: page for who, (_, page) in sessions.items()}
    try:
        generate_alone(pages["A"])  # warm-up: first model load and imports, not timed
        # This machine's CPUs are shared, so a burst of load can slow one phase alone: when
        # both finished but over budget, measure once more. Not when a run is still going (it
        # would hold the model during the next measurement). The bug this guards against was
        # 45x, not 1.5x.
        attempts = [measure(pages)]
        if len(attempts[0]["together_s"]) == 2 and not attempts[0]["within_budget"]:
            attempts.append(measure(pages))
        ARTIFACTS.mkdir(exist_ok=True)
        for who, page in pages.items():
            page.screenshot(path=str(ARTIFACTS / f"serving-concurrency-{who}.png"))
        (ARTIFACTS / "serving-concurrency.json").write_text(json.dumps(attempts, indent=2))
        print("\n" + json.dumps(attempts))
        measured = attempts[-1]
        assert set(measured["together_s"]) == {"A", "B"}, f"not finished in time: {attempts}"
        assert measured["within_budget"], f"two users took too long together: {attempts}"
        # both got the same greedy answer as when each was alone
        assert all(measured["same_answer_as_alone"].values()), attempts
        # the two runs share one model: one of them waited, and said so while the other ran
        assert measured["waiting_shown"], f"no session showed a waiting message: {attempts}"
    finally:
        for context, _ in sessions.values():
            context.close()
