"""AppTest of the app shell and the Models & system page."""

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import SHARED_HOME

APP = "../workbench/app.py"


@pytest.fixture
def app(monkeypatch, tiny_models):
    import streamlit as st

    monkeypatch.setenv("WORKBENCH_HOME", str(SHARED_HOME))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    yield at
    st.cache_resource.clear()


def test_shell_shows_model_picker_and_device(app):
    app.switch_page("../pages/models.py").run()
    assert not app.exception
    picker = app.sidebar.selectbox[0]
    assert picker.label == "Model"
    assert "smollm2-135m" in picker.options and "minilm-l6" in picker.options
    assert any("Device: **cpu**" in c.value for c in app.sidebar.caption)


def test_models_page_loads_and_unloads(app, tiny_models):
    app.switch_page("../pages/models.py").run()
    assert any(h.value == "Models & system" for h in app.title)
    app.selectbox(key="load_choice").set_value("minilm-l6")
    app.button[0].click().run()
    assert not app.exception
    loaded = app.dataframe[0].value
    assert "minilm-l6" in set(loaded["name"])
    app.selectbox(key="unload_choice").set_value("minilm-l6")
    next(b for b in app.button if b.label == "Unload").click().run()
    assert not app.exception
    assert not any(
        d.value is not None and "minilm-l6" in set(d.value.get("name", [])) and "busy" in d.value
        for d in app.dataframe
    )


def _load_unknown_hub_model():
    from workbench import ui

    ui.load_model("HuggingFaceTB/does-not-exist")


def test_bad_model_shows_a_one_line_message_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    at = AppTest.from_function(_load_unknown_hub_model, default_timeout=120).run()
    assert not at.exception
    assert "offline" in at.error[0].value


def test_other_model_box_selects_a_local_folder(app, tiny_models):
    app.switch_page("../pages/models.py").run()
    app.text_input(key="other_model").input(str(tiny_models["llama"]))
    next(b for b in app.button if b.label == "Use this model").click().run()
    app.run()  # the picker shows the new choice on the next run
    assert not app.exception
    assert app.session_state["model_name"] == str(tiny_models["llama"])
    assert str(tiny_models["llama"]) in app.sidebar.selectbox[0].options


def test_open_access_banner_only_with_no_auth(app, monkeypatch):
    app.run()
    assert not any("Open access" in w.value for w in app.warning)
    monkeypatch.setenv("WORKBENCH_NO_AUTH", "1")
    app.run()
    assert any("Open access" in w.value and "--no-auth" in w.value for w in app.warning)
