"""AppTest of the History page: runs listed and filtered, one opened with its result and
reproduced (verdict shown), two compared side by side."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

APP = "../workbench/app.py"
PAGE = "../pages/history.py"


@pytest.fixture
def at(monkeypatch, tmp_path, tiny_models):
    import streamlit as st

    from engine import Workbench

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    wb = Workbench(home=tmp_path / "home", device="cpu")
    model = wb.load(str(tiny_models["llama"]))
    model.generate("the capital of france is", max_new_tokens=3, greedy=True)
    model.perplexity("once upon a time")
    st.cache_resource.clear()
    app = AppTest.from_file(APP, default_timeout=120)
    app.session_state["model_name"] = str(tiny_models["llama"])
    app.run()
    app.switch_page(PAGE).run()
    assert not app.exception, app.exception
    return app


def select_rows(app, rows):
    state = {"selection": {"rows": rows, "columns": [], "cells": []}}
    app.session_state["hist_table"] = state
    app.run()


def test_runs_are_listed_and_filtered(at):
    table = at.dataframe[0].value
    assert list(table["kind"]) == ["perplexity", "generate"]  # newest first
    at.selectbox(key="hist_kind").set_value("generate").run()
    assert list(at.dataframe[0].value["kind"]) == ["generate"]
    at.selectbox(key="hist_kind").set_value("all").run()
    at.text_input(key="hist_text").input("once upon").run()
    assert list(at.dataframe[0].value["kind"]) == ["perplexity"]


def test_open_and_reproduce_a_run(at):
    at.selectbox(key="hist_kind").set_value("generate").run()
    select_rows(at, [0])
    assert any(m.label == "Tokens" for m in at.metric)
    at.button(key="hist_reproduce").click().run()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not at.success:
        time.sleep(0.1)
        at.run()
    assert any("exact" in s.value for s in at.success), [e.value for e in at.error]


def test_two_runs_side_by_side(at):
    select_rows(at, [0, 1])
    assert any(m.label == "Tokens" for m in at.metric)
    assert any(m.label == "Perplexity" for m in at.metric)
    assert any("differ" in c.value for c in at.caption)


def test_open_a_generation_in_its_page(at):
    at.selectbox(key="hist_kind").set_value("generate").run()
    select_rows(at, [0])
    at.button(key="hist_open").click().run()
    assert not at.exception, at.exception
    assert any(t.value == "Generate" for t in at.title)
    shown = at.session_state["gen_result"]
    assert shown.prompt == "the capital of france is" and len(shown.tokens) == 3
    assert any(m.label == "Tokens" and m.value == "3" for m in at.metric)
