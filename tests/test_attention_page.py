"""AppTest of the Attention page on tiny models: weights equal plain transformers, the explorer
reruns without the model, compare mode, the long-input switch to aggregated views."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.test_attention_engine import TEXT, plain_eager_attentions

PAGE = "../pages/attention.py"


@pytest.fixture
def app(monkeypatch, tmp_path):
    import streamlit as st

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    st.cache_resource.clear()
    yield AppTest.from_file(PAGE, default_timeout=120)
    st.cache_resource.clear()


def run_until_finished(at: AppTest, timeout_s: float = 60.0):
    """AppTest does not fire run_every: rerun until the page's run has ended; its snapshot."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, at.exception
        state = at.session_state
        run = state["attention_run"] if "attention_run" in state else None  # noqa: SIM401
        if run is not None and run.done:
            at.run()  # the page's first run after the end draws the result or the error
            assert not at.exception, at.exception
            return run.snapshot()
        time.sleep(0.1)
    raise AssertionError(f"the run did not end; errors: {[e.value for e in at.error]}")


def run_until_results(at: AppTest, timeout_s: float = 60.0) -> list:
    """(label, AttentionResult) per side of the page's finished run."""
    snap = run_until_finished(at, timeout_s)
    assert snap.state == "done", snap.error
    return snap.result.results


def show(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Show attention").click().run()
    assert not at.exception, at.exception


@pytest.mark.parametrize("name,kind", [("llama", "causal-lm"), ("bert", "encoder")])
def test_page_attentions_equal_plain_transformers(app, tiny_models, name, kind):
    app.session_state["model_name"] = str(tiny_models[name])
    app.run()
    app.text_area(key="attn_text").input(TEXT)
    show(app)
    results = run_until_results(app)
    ((label, result),) = results
    expected = plain_eager_attentions(tiny_models[name], TEXT, kind)
    np.testing.assert_allclose(result.attentions, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.attentions.sum(-1), 1.0, atol=1e-5)
    assert any(s.value == "Head statistics" for s in app.subheader)
    table = app.dataframe[0].value
    assert len(table) == 2 * 4 and "previous_token" in table.columns
    assert len(app.get("iframe")) == 1  # bertviz fits for a short text
    html = app.get("iframe")[0].proto.srcdoc
    assert "d3js.org v5.7.0" in html and "cdnjs" not in html


def count_forward_passes(tiny_models, name: str) -> list:
    """A forward hook on the shared tiny model: one entry per forward pass, whoever runs it."""
    from workbench import ui

    calls: list = []
    model = ui.get_workbench().load(str(tiny_models[name])).loaded.model
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_changing_layer_and_head_does_not_rerun_the_model(app, tiny_models):
    app.session_state["model_name"] = str(tiny_models["llama"])
    app.run()
    calls = count_forward_passes(tiny_models, "llama")
    show(app)
    run_until_results(app)
    assert len(calls) == 1
    app.slider(key="attn_layers").set_value((1, 1)).run()
    app.slider(key="attn_heads").set_value((0, 3)).run()
    app.toggle(key="attn_merge").set_value(True).run()
    assert not app.exception
    assert len(calls) == 1
    title = json.loads(app.get("vega_lite_chart")[0].proto.spec)["title"]
    assert "layer 1, heads 0–3 (mean)" in title and "merged into" in title


def test_compare_two_texts_and_two_models(app, tiny_models):
    app.session_state["model_name"] = str(tiny_models["llama"])
    app.run()
    app.radio(key="attn_compare").set_value("Another text").run()
    app.text_area(key="attn_text_b").input("the film was very bad")
    show(app)
    results = run_until_results(app)
    assert [label for label, _ in results] == ["A", "B"]
    assert results[0][1].tokens != results[1][1].tokens
    assert set(app.dataframe[0].value["input"]) == {"A", "B"}
    assert len(app.get("iframe")) == 2


def test_empty_text_shows_one_line_error(app, tiny_models):
    app.session_state["model_name"] = str(tiny_models["llama"])
    app.run()
    app.text_area(key="attn_text").input("   ")
    show(app)
    assert not app.exception
    assert "The text is empty" in app.error[0].value
    app.run()  # the refusal stays on the page until the next Show attention
    assert "The text is empty" in app.error[0].value


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    """A 2-layer, 12-head BERT with 1024 positions: bertviz would be far over budget."""
    from engine.testing import tiny_bert

    return tiny_bert(
        tmp_path_factory.mktemp("wide") / "wide-bert",
        hidden_size=48,
        num_attention_heads=12,
        max_position_embeddings=1024,
    )


def test_long_input_switches_to_aggregated_views_within_5_mb(app, wide_bert):
    app.session_state["model_name"] = str(wide_bert)
    app.run()
    app.text_area(key="attn_text").input(" ".join(["the good movie ,"] * 256))  # 1024 tokens
    show(app)
    ((_, result),) = run_until_results(app)
    assert result.n_tokens == 1024
    assert not app.get("iframe")  # no bertviz: it would be about 80 MB for one layer
    assert any("showing the aggregated views instead" in i.value for i in app.info)
    spec = app.get("vega_lite_chart")[0].proto.spec
    edges = app.dataframe[1].value
    assert len(edges) == 40 and list(edges.columns)[:3] == ["rank", "from (query)", "to (key)"]
    sent = len(spec) + sum(len(d.value.to_csv()) for d in app.dataframe)
    assert sent < 5_000_000
    assert any("Sent to the browser" in c.value for c in app.caption)


def test_last_generation_fills_the_text(app, tiny_models):
    from types import SimpleNamespace

    app.session_state["model_name"] = str(tiny_models["llama"])
    app.session_state["gen_result"] = SimpleNamespace(
        prompt="the movie was", model_input="the movie was", text=" very good"
    )
    app.run()
    next(b for b in app.button if b.label == "Use the last generation").click().run()
    assert app.text_area(key="attn_text").value == "the movie was very good"


def test_encoder_decoder_model_gets_a_clear_message(app, tiny_models):
    app.session_state["model_name"] = str(tiny_models["t5"])
    app.run()
    show(app)
    assert not app.exception
    assert "encoder-decoder" in app.error[0].value
    assert "attention_run" not in app.session_state


def test_neuron_view_for_encoders_and_a_message_for_causal_lms(app, tiny_models):
    app.session_state["model_name"] = str(tiny_models["bert"])
    app.run()
    show(app)
    run_until_results(app)
    app.button_group(key="attn_bertviz_view").set_value("neuron").run()
    assert not app.exception
    (frame,) = app.get("iframe")
    assert "window.bertviz_params" in frame.proto.srcdoc and "cdnjs" not in frame.proto.srcdoc
    app.session_state["model_name"] = str(tiny_models["llama"])
    show(app)
    run_until_results(app)
    assert not app.get("iframe")
    assert any("neuron view needs BERT-style" in i.value for i in app.info)


# --- the run on the page: errors stay, results name their input, budget, cancel ------------


def texts_on_page(at: AppTest) -> str:
    """Every error, warning, info and caption on the page, markdown escapes removed."""
    parts = [e.value for e in (*at.error, *at.warning, *at.info, *at.caption)]
    return "\n".join(parts).replace("\\", "")


def test_a_failed_run_keeps_its_error_and_hides_the_old_result(app, tiny_models, monkeypatch):
    import engine.attention.run as attention_run

    app.session_state["model_name"] = str(tiny_models["llama"])
    app.run()
    show(app)
    run_until_results(app)
    assert any(s.value == "Head statistics" for s in app.subheader)

    def broken(*_a, **_k):
        raise RuntimeError("The size of tensor a (757) must match the size of tensor b (512)")

    monkeypatch.setattr(attention_run, "attention_forward", broken)
    app.text_area(key="attn_text").input("the film was bad")
    show(app)
    snap = run_until_finished(app)
    assert snap.state == "failed"
    for _ in range(3):  # reruns (any widget) keep the error, and never bring the old result back
        assert "Attention failed: RuntimeError: The size of tensor a (757)" in app.error[0].value
        assert "For: " in texts_on_page(app) and "the film was bad" in texts_on_page(app)
        assert not any(s.value == "Head statistics" for s in app.subheader)
        assert not app.get("iframe")
        app.run()
    monkeypatch.undo()
    show(app)  # a new run replaces the error
    run_until_results(app)
    assert not app.error
    assert "Results for: " in texts_on_page(app)


def test_too_long_for_the_model_is_refused_then_truncated_on_request(app, tiny_models):
    app.session_state["model_name"] = str(tiny_models["bert"])  # 128 positions
    app.run()
    app.text_area(key="attn_text").input(" ".join(["good"] * 200))
    show(app)
    message = app.error[0].value
    assert "200 tokens but" in message and "at most 128 positions" in message
    assert "Truncate to the model's context" in message
    app.run()
    assert app.error and "at most 128 positions" in app.error[0].value  # it stays
    app.checkbox(key="attn_truncate").check().run()
    show(app)
    ((_, result),) = run_until_results(app)
    assert result.n_tokens == 128 and result.dropped_tokens == 72
    assert not app.error
    assert "truncated to 128 tokens (72 tokens dropped" in texts_on_page(app)


def test_results_always_say_which_input_they_belong_to(app, tiny_models):
    app.session_state["model_name"] = str(tiny_models["llama"])
    app.run()
    app.text_area(key="attn_text").input("the movie was good")
    show(app)
    run_until_results(app)
    assert "Results for: " in texts_on_page(app) and "“the movie was good”" in texts_on_page(app)
    assert not app.warning
    app.text_area(key="attn_text").input("the plot was boring").run()
    (warning,) = app.warning
    text = warning.value.replace("\\", "")
    assert text.startswith("These results are for:") and "the movie was good" in text
    assert "the plot was boring" not in text
    assert len(app.get("iframe")) == 1  # still drawn, but labelled with its own input


def test_past_the_result_budget_the_page_refuses_and_a_new_run_frees_the_old(
    app, tiny_models, monkeypatch
):
    import engine.runs
    from engine.attention import result_bytes
    from engine.runs import ResultBudget
    from workbench import ui

    loaded = ui.get_workbench().load(str(tiny_models["llama"])).loaded
    budget = ResultBudget(budget_bytes=result_bytes(loaded, 10) + 1)
    monkeypatch.setattr(engine.runs, "_BUDGET", budget)
    app.session_state["model_name"] = str(tiny_models["llama"])
    app.run()
    app.text_area(key="attn_text").input("the movie was very good , i love the plot")  # 10
    show(app)
    first = run_until_results(app)[0][1]
    assert budget.used_bytes == first.nbytes == result_bytes(loaded, 10)
    del first
    show(app)  # the same input again: fits only because the first run was dropped
    second = run_until_results(app)[0][1]
    assert budget.used_bytes == second.nbytes
    del second
    app.text_area(key="attn_text").input("the movie was very good , i love the plot a lot")
    show(app)
    assert "at most 10 tokens would fit" in app.error[0].value
    assert "attention_run" not in app.session_state
    assert budget.used_bytes == 0  # the refused click dropped the previous run too
    assert not any(s.value == "Head statistics" for s in app.subheader)


def test_a_waiting_run_says_so_and_cancel_stops_it(app, tiny_models):
    import threading

    from workbench import ui

    loaded = ui.get_workbench().load(str(tiny_models["llama"])).loaded
    holding, release = threading.Event(), threading.Event()

    def hold():
        with loaded.use():
            holding.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    assert holding.wait(10)
    try:
        app.session_state["model_name"] = str(tiny_models["llama"])
        app.run()
        show(app)
        deadline = time.monotonic() + 10
        while not app.info and time.monotonic() < deadline:
            time.sleep(0.1)
            app.run()
        assert "another run is using it" in app.info[0].value
        assert next(b for b in app.button if b.label == "Show attention").disabled
        next(b for b in app.button if b.label == "Cancel").click().run()
        snap = run_until_finished(app)
        assert snap.state == "cancelled"
        app.run()
        assert app.warning[0].value == "Cancelled."
        assert not any(s.value == "Head statistics" for s in app.subheader)
    finally:
        release.set()


def test_a_model_that_cannot_load_keeps_its_error(app, tmp_path):
    app.session_state["model_name"] = str(tmp_path / "no-such-model")
    app.run()
    show(app)
    assert app.error and "no-such-model" in app.error[0].value
    app.run()
    assert app.error and "no-such-model" in app.error[0].value
    assert "attention_run" not in app.session_state
