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


def test_upload_with_a_path_for_a_name_is_stored_safely(app_server, page, shared_home):
    """``../../x.csv`` uploaded on the Fine-tune page: stored as uploads/<user>/<sha>-x.csv,
    parsed and shown, nothing written outside the uploads folder."""
    rows = "\n".join(f"{t} {i},{lab}" for i in range(8) for t, lab in (("good", "p"), ("bad", "n")))
    body = ("text,label\n" + rows + "\n").encode()
    page.goto(app_server + "/finetune")
    page.get_by_role("heading", name="Fine-tune").first.wait_for()
    page.locator(".st-key-ft_source").get_by_text("Upload").click()
    page.locator(".st-key-ft_upload input[type=file]").set_input_files(
        files=[{"name": "../../x.csv", "mimeType": "text/csv", "buffer": body}]
    )
    page.get_by_text("16 rows →").first.wait_for(timeout=60_000)
    stored = [p for p in (shared_home / "uploads").rglob("*-x.csv") if p.read_bytes() == body]
    assert len(stored) == 1
    assert stored[0].parent.parent == shared_home / "uploads"  # uploads/<user>/<sha>-x.csv
    assert not (shared_home.parent / "x.csv").exists() and not (shared_home / "x.csv").exists()
