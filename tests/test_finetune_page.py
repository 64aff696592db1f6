"""The Fine-tune page: AppTest on a tiny classifier, and a real browser on MiniLM.

Both cover start, live progress, cancel (then resume) and using the finished model.
"""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

APP = "../workbench/app.py"
PAGE = "../pages/finetune.py"


def rerun_until(at, predicate, timeout=120.0, what="condition"):
    """AppTest does not fire run_every: rerun the script until ``predicate(at)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, at.exception
        if predicate(at):
            return at
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; page text: {page_text(at)[:2000]}")


def page_text(at) -> str:
    return "\n".join(m.value for m in at.markdown) + "\n".join(str(c.value) for c in at.caption)


@pytest.fixture
def app(monkeypatch, tmp_path, tiny_models):
    import streamlit as st

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0.3")
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    yield at
    st.cache_resource.clear()


def test_page_start_progress_cancel_resume_and_use(app, tiny_models, monkeypatch):
    at = app
    assert any("No fine-tuning jobs yet" in i.value for i in at.info)
    assert at.selectbox(key="ft_sample").value == "sentiment"
    assert at.selectbox(key="ft_text_sentiment.csv").value == "text"
    assert at.selectbox(key="ft_label_sentiment.csv").value == "label"
    assert at.dataframe  # the preview table
    assert any("negative (158)" in c.value for c in at.caption)
    settings = [i.value for i in at.info if "**Settings:**" in i.value]
    assert settings and "batch 8:" in settings[0] and "Chosen automatically" in settings[0]

    at.text_input(key="ft_base_other").input(str(tiny_models["classifier"]))
    at.number_input(key="ft_max_steps").set_value(12)
    at.number_input(key="ft_eval").set_value(4)
    at.text_input(key="ft_out").input("page-tiny")
    at.button(key="ft_start").click().run()
    assert not at.exception, at.exception
    job_id = at.session_state["ft_job"]

    rerun_until(
        at, lambda a: "Step 2/12" in page_text(a) or _progress_step(a) >= 2, what="progress"
    )
    assert any("running" in m.value for m in at.markdown)
    assert "steps (max_steps 12)" in page_text(at)  # the job's settings, and why
    at.button(key=f"cancel_{job_id}").click().run()
    rerun_until(at, lambda a: any("**cancelled**" in m.value for m in a.markdown), what="cancel")

    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0")
    at.button(key=f"resume_{job_id}").click().run()
    rerun_until(
        at, lambda a: any("**completed**" in m.value for m in a.markdown), what="completion"
    )
    assert any("page-tiny" in s.value for s in at.success)
    assert "page-tiny" in at.sidebar.selectbox[0].options

    at.button(key=f"use_{job_id}").click().run()
    assert at.sidebar.selectbox[0].value == "page-tiny"
    at.text_input(key=f"try_{job_id}").input("a good movie")
    at.button(key=f"run_{job_id}").click().run()
    assert not at.exception, at.exception
    assert any("Prediction:" in m.value for m in at.markdown)


def _progress_step(at) -> int:
    for el in at.get("progress"):
        text = getattr(el, "proto", None)
        text = getattr(text, "text", "") if text is not None else ""
        if text.startswith("Step "):
            return int(text.split()[1].split("/")[0])
    return 0
