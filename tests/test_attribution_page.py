"""AppTest of the Explain page on tiny models: a full run, the faithfulness view, an export."""

from __future__ import annotations

import html
import json
import re

import pytest
from streamlit.testing.v1 import AppTest

PAGE = "../pages/attribution.py"


@pytest.fixture
def downloads(monkeypatch):
    """Records what the page offers for download: {file_name: data}."""
    from streamlit.delta_generator import DeltaGenerator

    offered: dict[str, str] = {}
    original = DeltaGenerator.download_button

    def recorder(self, label, data, *args, **kwargs):
        offered[kwargs.get("file_name", label)] = data
        return original(self, label, data, *args, **kwargs)

    monkeypatch.setattr(DeltaGenerator, "download_button", recorder)
    return offered


@pytest.fixture
def app(tiny_models, tmp_path, monkeypatch):
    import streamlit as st

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    st.cache_resource.clear()

    def make(kind: str) -> AppTest:
        at = AppTest.from_file(PAGE, default_timeout=120)
        at.session_state["model_name"] = str(tiny_models[kind])
        return at

    yield make
    st.cache_resource.clear()


RUN = "explain_active_run"


def _run_to_completion(at: AppTest) -> AppTest:
    at.button(key="explain_run").click().run()
    if RUN in at.session_state:
        run = at.session_state[RUN]
        assert run.join(120), "the explanation run did not finish"
    at.run()
    return at


def test_full_run_classifier_with_two_methods(app, downloads):
    at = app("classifier")
    at.run()
    assert not at.exception
    assert "Integrated Gradients" in at.multiselect(key="explain_methods").format_func(
        "integrated_gradients"
    )
    at.multiselect(key="explain_methods").set_value(["integrated_gradients", "feature_ablation"])
    at.run()
    # the pre-flight estimate lists both methods
    estimate = at.dataframe[0].value
    assert list(estimate["method"]) == ["Integrated Gradients", "Feature Ablation"]
    # IG's step refinement: its worst case is stated before the run
    worst = list(estimate["worst case (step refinement)"])
    assert worst[0].endswith("(4 runs)") and worst[1] == "-"
    assert any("up to" in c.value and "step refinement" in c.value for c in at.caption)
    _run_to_completion(at)
    assert not at.exception, at.exception
    result_set = at.session_state["explain_result"]
    results = result_set.attributions
    assert [r.method for r in results] == ["integrated_gradients", "feature_ablation"]
    # IG's completeness statement is shown next to the result
    statements = [m.value for m in (*at.success, *at.warning)]
    assert any("Integrated Gradients" in s and "completeness error" in s for s in statements)
    # faithfulness view
    labels = [m.label for m in at.metric]
    assert "Comprehensiveness (AOPC)" in labels and "Sufficiency" in labels
    # agreement table and export
    assert any("Method agreement" in h.value for h in at.subheader)
    exported = json.loads(downloads["attribution.json"])
    assert exported["type"] == "ExplanationSet"
    first = exported["attributions"][0]
    assert first["method"] == "integrated_gradients"
    assert len(first["scores"]) == len(results[0].tokens)
    assert first["provenance"]["fingerprint"] and "captum" in first["provenance"]["versions"]
    assert first["faithfulness"]["comprehensiveness"] == pytest.approx(
        results[0].faithfulness.comprehensiveness
    )
    assert len(exported["agreement"]["rows"]) == 1
    report = downloads["attribution.html"]
    assert report.startswith("<!doctype html>") and "Faithfulness" in report
    assert "<script" not in report
    assert not re.search(r"""(src|href)=["']?https?:""", report)  # self-contained


HOSTILE = 'this movie <script>alert(1)</script> is good "><img src=x onerror=alert(2)> !'


def test_hostile_text_is_escaped_in_the_page_and_the_report(app, downloads):
    at = app("classifier")
    at.run()
    at.text_area(key="explain_text").set_value(HOSTILE)
    at.multiselect(key="explain_methods").set_value(["saliency", "feature_ablation"])
    at.run()
    _run_to_completion(at)
    assert not at.exception, at.exception
    report = downloads["attribution.html"]
    assert "<script" not in report.lower() and "<img" not in report.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in report
    assert json.loads(downloads["attribution.json"])["attributions"][0]["text"] == HOSTILE
    # the page's own coloured text is escaped the same way; the input is shown as plain text
    shown = [h.proto.body for h in at.get("html")]
    assert len(shown) == 2 and all("<script" not in b and "<img" not in b for b in shown)
    for body in shown:  # its text content is the input, character for character
        assert html.unescape(re.sub(r"<[^>]+>", "", body)) == HOSTILE
    assert any(t.value == f"Input: {HOSTILE}" for t in at.text)


def test_estimate_is_cached_and_never_waits_for_a_busy_model(app, monkeypatch):
    import threading

    import engine.attribution as attribution
    from engine.attribution import calibration

    calls = []
    real = attribution.estimate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("wait"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "estimate", counting)
    calibration.forget()
    at = app("llama")
    at.run()  # nothing measured yet: a rough estimate while the benchmark runs in the background
    assert not at.exception and calls == [False]  # never a waiting estimate
    assert at.dataframe[0].value["estimated time"][0].startswith("~")
    from workbench import ui

    loaded = ui.get_workbench().manager.get(at.session_state["model_name"])
    assert calibration.rates(loaded, 16, wait=True) is not None  # waits for the background run
    at.run()
    assert len(calls) == 2  # the rough estimate was not cached
    assert not at.dataframe[0].value["estimated time"][0].startswith("~")  # measured
    at.number_input(key="explain_seed").set_value(5).run()  # the seed changes no estimate
    at.run()
    assert len(calls) == 2  # reruns read the page's cache
    at.text_area(key="explain_text").set_value("the capital of france is").run()
    assert len(calls) == 3
    assert not at.dataframe[0].value["estimated time"][0].startswith("~")  # same length bucket
    # another run holds the model and nothing is measured for this length yet (a longer
    # text: the next length bucket): the page shows the rough estimate at once instead of
    # waiting for the model
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with loaded.use():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        longer = "the capital of france is a city . " * 3  # 24 tokens: bucket 32
        at.text_area(key="explain_text").set_value(longer).run(timeout=30)
        assert not at.exception
        assert at.dataframe[0].value["estimated time"][0].startswith("~")
    finally:
        release.set()
        holder.join(10)
    assert calibration.rates(loaded, 32, wait=True) is not None  # measured once it was free
    at.run()  # the busy estimate was not cached: the measured one now
    assert not at.dataframe[0].value["estimated time"][0].startswith("~")


def test_causal_lm_run_and_bad_input(app):
    at = app("llama")
    at.run()
    assert not at.exception
    at.text_area(key="explain_text").set_value("the capital of france is")
    at.text_input(key="explain_target").set_value(" paris city")
    at.checkbox(key="explain_per_token").check()
    at.run()
    _run_to_completion(at)
    assert not at.exception, at.exception
    (result,) = at.session_state["explain_result"].attributions
    assert result.token_matrix is not None and result.token_matrix.shape[0] == 2
    # a target longer than allowed is a one-line error, not a traceback
    at.text_input(key="explain_target").set_value(" paris" * 40)
    at.run()
    assert not at.exception
    assert any("at most 32 are allowed" in e.value for e in at.error)


def test_fine_tuned_classifier_from_the_store_is_selectable(app, tiny_models, tmp_path):
    """A store entry of kind "classifier" (what the Fine-tune page saves) can be explained."""
    import shutil

    from engine.store import ModelStore

    ModelStore(tmp_path / "home").write(
        "tiny-sentiment",
        lambda folder: shutil.copytree(tiny_models["classifier"], folder, dirs_exist_ok=True),
        kind="classifier",
        source="fine-tune",
        licence="test",
        base_model="tiny-bert",
    )
    at = app("bert")  # an encoder without a head: nothing to explain
    at.run()
    assert not at.exception
    assert any("attribution needs a sequence classifier" in w.value for w in at.warning)
    picker = at.selectbox(key="explain_model")
    assert "tiny-sentiment · fine-tuned classifier (store)" in picker.options
    assert not any(o.startswith("minilm") for o in picker.options)  # encoders are not listed
    picker.set_value("tiny-sentiment").run()
    assert not at.exception
    assert at.session_state["model_name"] == "tiny-sentiment"
    assert at.selectbox(key="explain_label").options == ["(predicted)", "negative", "positive"]
    at.selectbox(key="explain_label").set_value("positive").run()
    _run_to_completion(at)
    assert not at.exception, at.exception
    (result,) = at.session_state["explain_result"].attributions
    assert result.model == "tiny-sentiment" and result.target["label"] == "positive"
    assert result.provenance.fingerprint.startswith("sha256:")


def test_cancel_stops_a_long_run(app):
    at = app("llama")
    at.run()
    at.text_area(key="explain_text").set_value("the capital of france is")
    at.multiselect(key="explain_methods").set_value(["shapley_value_sampling"])
    at.run()
    at.number_input(key="explain_opt_shapley_value_sampling_samples").set_value(1000)
    at.number_input(key="explain_opt_shapley_value_sampling_internal_batch_size").set_value(1)
    at.run()
    at.button(key="explain_run").click().run()
    run = at.session_state[RUN]
    assert not run.done
    # the progress fragment (run inline while the run is going) offers Cancel
    at.button(key="explain_cancel").click().run()
    assert run.join(60) and run.snapshot().cancelled
    at.run()
    assert not at.exception
    assert any("cancelled" in w.value for w in at.warning)
    assert RUN not in at.session_state
    # the error stays with the page across reruns until a run replaces it
    at.run()
    assert any("cancelled" in w.value for w in at.warning)


def test_a_run_that_would_not_fit_is_refused_before_starting(app, monkeypatch):
    from engine.attribution import budget

    monkeypatch.setattr(budget, "available_bytes", lambda loaded: 1000)
    at = app("llama")
    at.run()
    assert not at.exception
    assert any("would need about" in e.value and "shorten the text" in e.value for e in at.error)
    with pytest.raises(KeyError):  # the page stopped before offering Run
        at.button(key="explain_run")
