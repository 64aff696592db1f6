"""A real browser: tokens stream into the Generate page and the Stop button ends the run."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def token_count(page) -> int:
    caption = page.locator(".st-key-gen_stream").get_by_text(re.compile(r"\d+ tokens")).first
    return int(re.match(r"(\d+) tokens", caption.inner_text()).group(1))


def test_tokens_stream_and_stop_ends_the_run(app_server, page):
    page.goto(app_server + "/generate")
    page.get_by_role("heading", name="Generate").first.wait_for()
    page.locator(".st-key-gen_input textarea").fill(
        "Once upon a time, in a land far away, there lived"
    )
    max_tokens = page.locator(".st-key-gen_max_new_tokens input")
    max_tokens.fill("2000")
    max_tokens.press("Enter")
    page.locator(".st-key-gen_go button").click()
    stream = page.locator(".st-key-gen_stream")
    stream.wait_for()
    # the token count must grow while the page is showing the run: tokens stream
    deadline = time.monotonic() + 120
    first = None
    while time.monotonic() < deadline:
        n = token_count(page) if stream.count() else 0
        if first is None and n >= 1:
            first = n
        if first is not None and n >= first + 3:
            break
        page.wait_for_timeout(200)
    else:
        pytest.fail("tokens did not stream into the page")
    streamed_text = stream.inner_text()
    assert len(streamed_text.strip()) > 5
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "generate-streaming.png"))
    page.locator(".st-key-gen_stop_button button").click()
    # the run ends (well before 2000 tokens): the result view says it was cancelled
    page.get_by_text("cancelled").first.wait_for(timeout=60_000)
    assert stream.count() == 0
    page.screenshot(path=str(ARTIFACTS / "generate-stopped.png"))
