"""AppTest of the Generate page on a tiny model: controls, streaming run, bad input, export,
chat, evaluation and comparison."""

from __future__ import annotations

import time

import pytest
import torch
from streamlit.testing.v1 import AppTest

APP = "../workbench/app.py"
PROMPT = "the capital of france is"


@pytest.fixture
def app(monkeypatch, tmp_path, tiny_models):
    import streamlit as st

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_name"] = str(tiny_models["llama"])
    at.run()
    at.switch_page("../pages/generate.py").run()
    assert not at.exception
    yield at
    st.cache_resource.clear()


def wait_for_keys(at, *keys, timeout=60.0):
    """Rerun (AppTest does not fire run_every) until one of ``keys`` is in session state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(k in at.session_state for k in keys):
            at.run()
            return
        time.sleep(0.05)
        at.run()
    raise AssertionError(f"none of {keys} appeared")


def wait_for_result(at, timeout=60.0):
    """AppTest does not fire run_every: rerun until the worker's result is collected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "gen_result" in at.session_state or "gen_error" in at.session_state:
            return at.session_state["gen_result"] if "gen_result" in at.session_state else None  # noqa: SIM401
        time.sleep(0.05)
        at.run()
    raise AssertionError("the generation did not finish")


def generate(at, prompt=PROMPT, **controls):
    at.text_area(key="gen_input").input(prompt)
    for key, value in controls.items():
        _set(at, key, value)
    at.button(key="gen_go").click().run()
    return at


def _set(at, key, value):
    for finder in (at.number_input, at.toggle, at.slider, at.text_input, at.checkbox):
        try:
            finder(key=key).set_value(value)
            return
        except KeyError:
            continue
    raise KeyError(key)


def plain_greedy_ids(folder, prompt, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_generate_page_has_all_controls(app):
    assert any(t.value == "Generate" for t in app.title)
    for key in ("gen_max_new_tokens", "gen_top_k"):
        assert app.number_input(key=key)
    for key in ("gen_temperature", "gen_top_p", "gen_repetition_penalty"):
        assert app.slider(key=key)
    assert app.toggle(key="gen_greedy") and app.checkbox(key="gen_keep_last")
    assert app.text_input(key="gen_seed") and app.text_input(key="gen_stop")
    presets = app.selectbox(key="gen_preset").options
    assert {"Continue text", "Chat", "Summarize", "Write code"} <= set(presets)


def test_greedy_run_matches_plain_generate_and_exports(app, tiny_models):
    generate(app, gen_max_new_tokens=10, gen_greedy=True)
    result = wait_for_result(app)
    assert not app.exception
    assert [t.id for t in result.tokens] == plain_greedy_ids(tiny_models["llama"], PROMPT, 10)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Tokens"] == "10" and metrics["Finish"] in ("length", "eos")
    html = " ".join(m.value for m in app.markdown)
    assert 'class="gen-token"' in html and "hsl(" in html
    labels = [b.proto.label for b in app.get("download_button")]
    assert labels == ["Export run (JSON)", "Export tokens (CSV)"]
    assert result.provenance.decode_path == "lean"  # the CPU default, shown in the sidebar
    assert any("Decode path: **lean**" in c.value for c in app.sidebar.caption)


def test_seeded_sampling_on_the_page_is_reproducible(app):
    texts = []
    for _ in range(2):
        generate(app, gen_max_new_tokens=12, gen_temperature=1.5, gen_seed="5")
        texts.append(wait_for_result(app).text)
        app.session_state["gen_result"] = None
        del app.session_state["gen_result"]
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    ("prompt", "controls", "message"),
    [
        ("   ", {}, "prompt is empty"),
        (PROMPT, {"gen_seed": "abc"}, "whole number"),
        (PROMPT, {"gen_max_new_tokens": 500}, "below the model's context"),
        (" ".join(["the movie was good"] * 40), {"gen_max_new_tokens": 8}, "keep last tokens"),
        (PROMPT, {"gen_stop": "|"}, None),
    ],
)
def test_bad_input_shows_a_message_not_a_traceback(app, prompt, controls, message):
    generate(app, prompt, **controls)
    if message is None:  # an empty stop list is fine: the run just works
        assert wait_for_result(app) is not None
        return
    assert not app.exception
    assert any(message in e.value for e in app.error), [e.value for e in app.error]


def test_keep_last_tokens_and_temperature_zero(app):
    generate(
        app,
        " ".join(["the movie was good"] * 40),
        gen_max_new_tokens=8,
        gen_keep_last=True,
        gen_temperature=0.0,
    )
    assert any("greedy" in c.value for c in app.caption)
    result = wait_for_result(app)
    assert result.dropped_prompt_tokens == 40 and not result.settings.sampling
    assert any("first 40 tokens were dropped" in w.value for w in app.warning)


def test_encoder_model_cannot_generate(app, tiny_models):
    app.text_input(key="other_model").input(str(tiny_models["bert"]))
    next(b for b in app.button if b.label == "Use this model").click().run()
    generate(app)
    assert any("cannot generate" in e.value for e in app.error)


def test_chat_preset_keeps_history(app):
    app.selectbox(key="gen_preset").set_value("Chat").run()
    app.text_area(key="gen_input").input("hello world")
    _set(app, "gen_max_new_tokens", 4)
    app.button(key="gen_go").click().run()
    wait_for_result(app)
    app.run()
    history = app.session_state["gen_histories"]["Chat"]
    assert [r for r, _ in history] == ["user", "assistant"]
    assert len(app.chat_message) == 2
    # another chat-style preset starts its own conversation: no earlier turns leak into it
    app.selectbox(key="gen_preset").set_value("Translate to French").run()
    assert app.text_input(key="gen_system")  # a chat-mode preset, with no turns of its own
    assert len(app.chat_message) == 0
    app.selectbox(key="gen_preset").set_value("Chat").run()
    assert len(app.chat_message) == 2


def test_save_a_preset(app, tmp_path):
    app.selectbox(key="gen_preset").set_value("Summarize").run()
    app.text_area(key="gen_template::Summarize").input("Shorten: {input}")
    app.text_input(key="gen_preset_name").input("Short")
    next(b for b in app.button if b.label == "Save preset").click().run()
    assert any("Saved preset" in s.value for s in app.success)
    assert (tmp_path / "home" / "presets.json").is_file()
    app.run()
    assert "Short" in app.selectbox(key="gen_preset").options


def test_evaluate_tab(app):
    app.text_area(key="eval_text").input("the movie was good")
    app.button(key="eval_ppl").click().run()
    wait_for_keys(app, "eval_ppl_result", "eval_ppl_error")
    assert any(m.label == "Perplexity" for m in app.metric)
    app.text_area(key="eval_hyp").input("the cat sat")
    app.text_area(key="eval_ref").input("the cat sat")
    app.button(key="eval_score").click().run()
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["BLEU"] == "100.00" and metrics["chrF"] == "100.00"
    app.text_area(key="eval_text").input("   ")
    app.button(key="eval_ppl").click().run()
    wait_for_keys(app, "eval_ppl_error")
    assert any("empty" in e.value for e in app.error)
    assert not any(m.label == "Perplexity" for m in app.metric), "a stale result was shown"


def test_compare_two_models(app, tiny_models, tmp_path):
    from engine import testing
    from workbench.ui import get_workbench

    other = testing.tiny_llama(tmp_path / "other", seed=1)
    get_workbench().load(str(other))
    app.run()
    app.multiselect(key="cmp_models").set_value([str(tiny_models["llama"]), str(other)])
    app.text_area(key="cmp_prompt").input(PROMPT)
    _set(app, "gen_greedy", True)
    app.button(key="cmp_go").click().run()
    deadline = time.monotonic() + 60
    while "gen_comparison" not in app.session_state and time.monotonic() < deadline:
        time.sleep(0.05)
        app.run()
    app.run()
    comparison = app.session_state["gen_comparison"]
    assert len(comparison.outcomes) == 2 and all(o.result for o in comparison.outcomes)
    names = [str(tiny_models["llama"]), str(other)]
    assert comparison.provenance.model == ", ".join(names)
    assert comparison.provenance.fingerprint == ", ".join(
        o.result.provenance.fingerprint for o in comparison.outcomes
    )
    assert not app.exception


def test_compare_works_out_of_the_box_with_one_model(app):
    """One generative model: Compare pits it against itself under other settings."""
    app.text_area(key="cmp_prompt").input(PROMPT)
    app.button(key="cmp_go").click().run()
    wait_for_keys(app, "gen_comparison", "gen_compare_error")
    assert "gen_compare_error" not in app.session_state, app.session_state["gen_compare_error"]
    comparison = app.session_state["gen_comparison"]
    assert len(comparison.outcomes) == 2
    assert comparison.outcomes[0].model == comparison.outcomes[1].model
    assert "temperature 1.0" in comparison.outcomes[1].label
    assert all(o.result for o in comparison.outcomes)


def test_empty_page_suggests_a_first_prompt(app):
    app.button(key="gen_example").click().run()
    assert app.text_area(key="gen_input").value.startswith("The Eiffel Tower")
    assert not [b for b in app.button if b.key == "gen_example"]  # gone once there is text


def test_a_bad_decode_setting_is_said_in_the_sidebar_not_a_traceback(app, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DECODE", "warp")
    generate(app, gen_max_new_tokens=3, gen_greedy=True)
    assert wait_for_result(app) is None  # the run ends in an error
    app.run()
    assert not app.exception
    assert any("Unknown decode path 'warp'" in w.value for w in app.sidebar.warning)
    assert "Unknown decode path 'warp'" in str(app.session_state["gen_error"])
