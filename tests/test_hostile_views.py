"""Hostile tokens in the HTML views: bertviz head and model views and the neuron view.

A tiny BERT whose vocabulary holds the token ``</script><script>alert(1)</script>`` (an added
token, so the tokenizer really produces it) runs through the engine; the views must carry it
as inert data: no raw ``</script><script>`` in the HTML, the token drawn as text, and no
dialog when a real browser opens the page.
"""

from __future__ import annotations

import json

import pytest

EVIL = "</script><script>alert(1)</script>"
EVIL_IMG = "<img src=x onerror=alert(2)>"
TEXT = f"the movie {EVIL} was {EVIL_IMG} good"


@pytest.fixture(scope="module")
def hostile_result(tmp_path_factory):
    """Attention of a tiny BERT (with queries and keys) on a text holding both tokens."""
    from transformers import AutoModel, AutoTokenizer

    from engine import Workbench, testing

    root = tmp_path_factory.mktemp("hostile")
    folder = testing.tiny_bert(root / "evil-bert")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([EVIL, EVIL_IMG])
    model = AutoModel.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    wb = Workbench(home=root / "home", device="cpu")
    result = wb.load(str(folder)).attention(TEXT)
    assert EVIL in result.tokens and EVIL_IMG in result.tokens  # the tokenizer produced them
    return result


def _views(result) -> dict[str, str]:
    from engine.attention.neuron import neuron_view_html
    from engine.attention.views import bertviz_html

    return {
        "head": bertviz_html(result, "head"),
        "model": bertviz_html(result, "model"),
        "neuron": neuron_view_html(result),
    }


def test_script_json_escapes_and_round_trips():
    from engine.html import script_json

    value = {"t": [EVIL, "a & b", "x > y", "\u2028"]}
    text = script_json(value)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == value


def test_views_hold_no_raw_script_from_data(hostile_result):
    for name, page_html in _views(hostile_result).items():
        assert "</script><script>alert(1)" not in page_html, name
        assert "<img src=x onerror" not in page_html, name
        # the tokens are still there, escaped: JavaScript reads the same string back
        assert "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)" in page_html, name


def _serve(body: str):
    def handler(route) -> None:
        route.fulfill(body=body, content_type="text/html")

    return handler


@pytest.mark.browser
def test_views_fire_no_dialog_in_a_real_browser(hostile_result, page):
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    for name, page_html in _views(hostile_result).items():
        page.route(f"http://127.0.0.1:9/{name}.html", _serve(page_html))
        page.goto(f"http://127.0.0.1:9/{name}.html")
        # the view ran to the end (its script was not cut by the token): head and neuron
        # views draw the hostile token as SVG text; the model view draws its layer grid
        shown = "Layers" if name == "model" else EVIL
        page.wait_for_function(
            "s => [...document.querySelectorAll('svg text')].some(t => t.textContent === s)",
            arg=shown,
            timeout=30_000,
        )
        assert page.locator("img").count() == 0, name
        page.wait_for_timeout(300)
    assert dialogs == []
