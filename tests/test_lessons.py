"""Lesson notebooks: each opens as a fresh copy with notes between its cells; all four run top
to bottom on the embedded models in under 5 minutes; the Notebook page lists and opens them."""

from __future__ import annotations

import math
import shutil
import time

import pytest

from engine.errors import InputError
from engine.notebooks import NotebookStore
from engine.notebooks.lessons import LESSONS, open_lesson

TIME_LIMIT_S = 300.0


def test_every_lesson_opens_as_a_fresh_copy_with_notes_between_cells(tmp_path):
    store = NotebookStore(tmp_path)
    assert len(LESSONS) == 4 and len({item.id for item in LESSONS}) == 4
    for number, item in enumerate(LESSONS, 1):
        first = open_lesson(store, item.id)
        second = open_lesson(store, item.id)
        assert first.id != second.id  # a copy each time: editing one leaves the other alone
        assert first.name == f"Lesson {number}: {item.title}"
        kinds = [c.kind for c in first.cells]
        assert kinds[0] == "markdown" and kinds.count("markdown") >= 3
        runnable = [i for i, k in enumerate(kinds) if k != "markdown"]
        assert len(runnable) >= 2
        # a note right before each block of cells (no two runnable groups without a note)
        assert kinds[runnable[0] - 1] == "markdown"
        assert all(c.spec["text"].strip() for c in first.cells if c.kind == "markdown")
        assert all(c.status == "new" and c.run_id is None for c in first.cells)
    assert len(store.list()) == 8


def test_lesson_four_copies_train_models_with_distinct_names(tmp_path):
    store = NotebookStore(tmp_path)
    outs = [
        next(c for c in open_lesson(store, "new-task").cells if c.kind == "finetune").spec["out"]
        for _ in range(2)
    ]
    assert outs[0] != outs[1]


def test_unknown_lesson_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="Unknown lesson.*next-word"):
        open_lesson(NotebookStore(tmp_path), "../../etc")


@pytest.fixture
def lesson_workbench(tmp_path, smollm, minilm, shared_home):
    """A CPU workbench on a private store holding copies of the two embedded models."""
    from engine import Workbench

    home = tmp_path / "home"
    for name in ("smollm2-135m", "minilm-l6"):
        shutil.copytree(shared_home / "models" / name, home / "models" / name)
    return Workbench(home=home, device="cpu")


def _results(wb, book) -> list:
    from engine.notebooks import cell_result

    book = wb.notebooks.get(book.id)
    cells = [c for c in book.cells if c.kind != "markdown"]
    assert [(c.kind, c.status, c.error) for c in cells] == [(c.kind, "done", None) for c in cells]
    return [cell_result(wb, c) for c in cells]


@pytest.mark.slow
def test_all_four_lessons_run_top_to_bottom_in_under_five_minutes(lesson_workbench):
    from engine.notebooks import wait_all

    wb = lesson_workbench
    seconds, books = {}, {}
    for item in LESSONS:
        book = open_lesson(wb.notebooks, item.id)
        start = time.perf_counter()
        wait_all(wb, book.id, timeout=TIME_LIMIT_S)
        seconds[item.id] = time.perf_counter() - start
        books[item.id] = book
    print("lesson seconds:", {k: round(v, 1) for k, v in seconds.items()})
    for item in LESSONS:
        cells = [c for c in wb.notebooks.get(books[item.id].id).cells if c.run_id]
        print(item.id, [(c.kind, round(wb.ledger.get(c.run_id).seconds, 1)) for c in cells])
    assert sum(seconds.values()) < TIME_LIMIT_S, seconds

    # 1. next word: token probabilities, a perplexity, four compared decodings
    gen, ppl, comparison = _results(wb, books["next-word"])
    probs = [t.prob for t in gen.tokens]
    assert len(probs) == 16 and all(0 < p <= 1 for p in probs)
    # greedy: every token is the most probable one the model offered
    assert all(t.logprob >= max(a.logprob for a in t.alternatives) - 1e-4 for t in gen.tokens)
    assert 1 < ppl.perplexity < 1000
    labels = [o.label for o in comparison.outcomes]
    assert labels == ["greedy", "temperature 0.7", "temperature 1.5", "top-p 0.5"]
    assert all(o.error is None and o.result.text for o in comparison.outcomes)
    assert len({o.result.text for o in comparison.outcomes}) >= 3  # the knobs change the text

    # 2. attention: maps on both models, a long text, truncated on MiniLM
    maps = [r.sides[0].result for r in _results(wb, books["attention"])]
    for result in maps:
        n = result.n_tokens
        assert result.attentions.shape[-2:] == (n, n)
        rows = result.attentions.sum(axis=-1)
        assert abs(rows - 1).max() < 1e-3  # every query's weights sum to 1
    assert maps[0].n_layers == 30 and maps[1].n_layers == 6
    assert maps[2].n_tokens > 200 and maps[2].dropped_tokens == 0
    assert maps[3].n_tokens == 256 and maps[3].dropped_tokens > 0

    # 3. why Paris: IG + occlusion with completeness, faithfulness, agreement; a contrast
    both, contrast = _results(wb, books["why"])
    ig, occlusion = both.attributions
    assert (ig.method, occlusion.method) == ("integrated_gradients", "occlusion")
    assert ig.delta_ok and "completeness error" in ig.delta_statement()
    # completeness, checked from the scores themselves: they sum to f(input) - f(baseline)
    assert math.isclose(float(ig.scores.sum()), ig.target_score - ig.baseline_score, rel_tol=0.01)
    assert ig.faithfulness is not None and occlusion.faithfulness is not None
    assert both.agreement is not None
    assert ig.target_score > math.log(0.05)  # the model does say Paris
    (vs,) = contrast.attributions
    assert vs.target.get("contrast") == " London" and "London" in vs.target_description

    # 4. a new task: fine-tune, classify with the new model, explain its decision
    tuned, label, why = _results(wb, books["new-task"])
    assert tuned.metrics_after["accuracy"] >= 0.8
    assert tuned.metrics_after["accuracy"] > tuned.metrics_before.get("accuracy", 0)
    assert label.label == "negative" and label.confidence > 0.6
    assert [a.method for a in why.attributions] == ["integrated_gradients", "occlusion"]
    assert why.attributions[0].delta_statement()


def test_notebook_page_lists_the_lessons_and_opens_one(monkeypatch, tmp_path):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    st.cache_resource.clear()
    at = AppTest.from_file("../workbench/app.py", default_timeout=120).run()
    assert not at.exception, at.exception
    buttons = [b for b in at.button if (b.key or "").startswith("nb_lesson_")]
    assert len(buttons) == len(LESSONS) == 4
    shown = " ".join(m.value for m in at.markdown)
    assert all(item.title in shown and item.summary in shown for item in LESSONS)
    at.button(key="nb_lesson_why").click().run()
    assert not at.exception, at.exception
    (info,) = NotebookStore(home).list()
    assert info.name == "Lesson 3: Why did the model say that?"
    assert at.session_state["nb_active"] == info.id
    assert any("Paris" in m.value for m in at.markdown)  # the lesson's notes are shown
    # with a notebook open, the lessons are in the sidebar; Open makes another fresh copy
    sidebar = [b for b in at.sidebar.button if (b.key or "").startswith("nb_lesson_")]
    assert len(sidebar) == 4
    at.button(key="nb_lesson_why").click().run()
    assert not at.exception, at.exception
    infos = NotebookStore(home).list()
    assert len(infos) == 2 and at.session_state["nb_active"] not in (info.id, None)
    assert {i.name for i in infos} == {info.name}
