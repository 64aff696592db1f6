"""Settings and results survive a page change and a browser reload (same ?s= URL token)."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

APP = "../workbench/app.py"
ATTENTION = "../pages/attention.py"
GENERATE = "../pages/generate.py"


@pytest.fixture
def env(monkeypatch, tmp_path, tiny_models):
    import streamlit as st

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    st.cache_resource.clear()
    return tmp_path / "home"


def fresh(tiny_models, token: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_name"] = str(tiny_models["llama"])
    if token:
        at.query_params["s"] = token
    at.run()
    at.switch_page(GENERATE).run()
    assert not at.exception, at.exception
    return at


def test_settings_survive_a_page_change(env, tiny_models):
    at = fresh(tiny_models)
    at.number_input(key="gen_max_new_tokens").set_value(8)
    at.toggle(key="gen_greedy").set_value(True)
    at.text_input(key="gen_seed").input("42")
    at.text_area(key="gen_input").input("the capital of france is").run()
    at.switch_page(ATTENTION).run()
    at.switch_page(GENERATE).run()
    assert at.number_input(key="gen_max_new_tokens").value == 8
    assert at.toggle(key="gen_greedy").value is True
    assert at.text_input(key="gen_seed").value == "42"
    assert at.text_area(key="gen_input").value == "the capital of france is"


def test_settings_and_the_result_survive_a_reload(env, tiny_models):
    at = fresh(tiny_models)
    token = at.query_params["s"]
    token = token[0] if isinstance(token, list) else token
    at.number_input(key="gen_max_new_tokens").set_value(5)
    at.toggle(key="gen_greedy").set_value(True)
    at.text_area(key="gen_input").input("the capital of france is").run()
    at.button(key="gen_go").click().run()
    deadline = time.monotonic() + 60
    while "gen_result" not in at.session_state and time.monotonic() < deadline:
        time.sleep(0.05)
        at.run()
    text = at.session_state["gen_result"].text  # collected by the page's last run: saved
    reloaded = fresh(tiny_models, token)  # a new session, same URL
    reloaded.run()
    assert reloaded.number_input(key="gen_max_new_tokens").value == 5
    assert reloaded.toggle(key="gen_greedy").value is True
    assert reloaded.session_state["gen_result"].text == text
    assert any(m.label == "Tokens" and m.value == "5" for m in reloaded.metric)
    stranger = fresh(tiny_models, "0" * 24)  # another browser: none of it
    assert "gen_result" not in stranger.session_state
    assert stranger.number_input(key="gen_max_new_tokens").value == 64
