"""Hostile prompts on the served Generate page, in a real browser: text stays text.

A prompt holding a Markdown image that points at a local HTTP server we run, an
``<img onerror>`` and a ``<script>`` is generated from (greedy, few tokens) in text mode and
in chat mode. The page must show it as typed: no dialog, no request to the planted URL, no
``<img>`` made from it.
"""

from __future__ import annotations

import http.server
import threading

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def planted():
    """A local HTTP server counting every request it gets: (base URL, hits list)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()

        def log_message(self, *args):
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def _prompt(base: str) -> str:
    return (
        f"![p]({base}/x.png) [link]({base}/l) <img src=x onerror=alert(1)> "
        "<script>alert(2)</script> **bold** The capital of France is"
    )


def test_hostile_prompt_renders_as_text(app_server, page, planted):
    base, hits = planted
    dialogs: list[str] = []
    requests: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: requests.append(r.url))
    prompt = _prompt(base)

    page.goto(app_server + "/generate")
    page.get_by_role("heading", name="Generate").first.wait_for()
    page.locator(".st-key-gen_greedy label").first.click()
    max_tokens = page.locator(".st-key-gen_max_new_tokens input")
    max_tokens.fill("3")
    max_tokens.press("Enter")
    page.locator(".st-key-gen_input textarea").fill(prompt)
    page.locator(".st-key-gen_go button").click()
    output = page.locator(".st-key-gen_output")
    output.wait_for(timeout=180_000)
    shown = output.inner_text()
    assert f"![p]({base}/x.png)" in shown  # shown as typed, not as an image or a link
    assert "<img src=x onerror=alert(1)>" in shown and "<script>alert(2)</script>" in shown
    assert output.locator("img").count() == 0 and output.locator("a").count() == 0

    # chat mode: the message goes into the conversation drawn on the page
    page.locator(".st-key-gen_preset").click()
    page.get_by_role("option", name="Chat", exact=True).click()
    page.locator(".st-key-gen_input textarea").fill(prompt)
    page.locator(".st-key-gen_go button").click()
    user_turn = page.locator("[data-testid='stChatMessage']").first
    user_turn.wait_for(timeout=180_000)
    page.locator(".st-key-gen_output").wait_for(timeout=180_000)
    assert f"![p]({base}/x.png)" in user_turn.inner_text()
    assert user_turn.locator("img").count() == 0

    page.wait_for_timeout(1000)
    assert dialogs == []
    assert hits == [], hits
    leaked = [u for u in requests if u.startswith(base) or u.rstrip("/").endswith("/x")]
    assert leaked == [], leaked
