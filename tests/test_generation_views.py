"""The token view: byte-level pieces of one character are shown as that character, hostile
token text is escaped."""

from __future__ import annotations

import threading

import pytest

from engine.generation import Alternative, TokenStep
from engine.generation.views import token_html


def test_byte_pieces_of_one_character_are_merged_into_one_span():
    pieces = [
        TokenStep(1, "Hi ", -0.1, (), "Hi "),
        TokenStep(2, "\ufffd", -0.5, (), ""),  # first bytes of the emoji: nothing to show yet
        TokenStep(3, "\ufffd", -0.7, (), "😀"),  # last bytes: the whole character
    ]
    page = token_html(pieces)
    assert "\ufffd" not in page.split('title="')[0] and page.count('class="gen-token"') == 2
    assert ">😀</span>" in page
    assert "token 2:" in page and "token 3:" in page  # per-piece figures kept in the hover


def test_hostile_token_text_is_escaped():
    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    page = token_html([TokenStep(5, hostile, -0.1, (Alternative(6, hostile, -2.0),), hostile)])
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page


@pytest.mark.slow
def test_smollm2_decoding_of_emoji_hebrew_and_arabic_has_no_replacement_characters(smollm):
    from engine.generation.decoding import Observer, Recorder

    text = "Shalom שלום, marhaba مرحبا 😀👍🏽 done"
    loaded = smollm.loaded
    ids = loaded.encode(text, add_special_tokens=False)["input_ids"]
    observer = Observer(loaded.tokenizer, Recorder(0), (), threading.Event())
    import torch

    for i in range(len(ids)):
        observer(torch.tensor([ids[: i + 1]]), None)
    displays = [s.display for s in observer.steps]
    assert "".join(displays) == text
    assert any(d == "" for d in displays), "the emoji should span several byte-level tokens"
    assert any("\ufffd" in s.text for s in observer.steps)  # the raw pieces do show "\ufffd"
    page = token_html(observer.steps)
    visible = "".join(part.split(">", 1)[-1] for part in page.split("</span>"))
    assert "\ufffd" not in visible and "😀" in visible and "שלום" in visible
