"""AppTest of the Notebook page on a tiny model: create, add cells with a reference, Run all,
results back after a restart without recomputing, read-only share link and fork, and
"Add to notebook" from the Generate page."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

APP = "../workbench/app.py"
PAGE = "../pages/notebook.py"


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    return tmp_path / "home"


def open_page(tiny_models, query: dict | None = None) -> AppTest:
    import streamlit as st

    st.cache_resource.clear()  # as after a server restart
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_name"] = str(tiny_models["llama"])
    if query:
        at.query_params.update(query)
    at.run()
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    return at


def rerun_until(at: AppTest, predicate, timeout: float = 90.0) -> None:
    """AppTest does not fire run_every: rerun until ``predicate(at)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        if predicate(at):
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def make_notebook(home, tiny_models):
    from engine.notebooks import NotebookStore, Ref

    store = NotebookStore(home)
    book = store.create("Lesson")
    store.add_cell(book.id, "markdown", {"text": "## A <b>note</b>"})
    gen = store.add_cell(
        book.id,
        "generate",
        {
            "model": str(tiny_models["llama"]),
            "prompt": "the capital of france is",
            "settings": {"max_new_tokens": 4, "greedy": True},
        },
    )
    store.add_cell(
        book.id,
        "evaluate",
        {"model": str(tiny_models["llama"]), "metric": "perplexity"},
        {"text": Ref(gen.id, "full_text")},
    )
    return book


def test_run_all_then_a_restart_shows_every_result_without_recomputing(home, tiny_models):
    from engine.ledger import Ledger

    book = make_notebook(home, tiny_models)
    at = open_page(tiny_models)
    assert any("A <b>note</b>" in m.value or "A note" in m.value for m in at.markdown)
    at.button(key="nb_run_all").click().run()
    rerun_until(at, lambda a: "nb_run" not in a.session_state)
    assert not at.exception
    assert any(m.label == "Perplexity" for m in at.metric)
    assert any(m.label == "Tokens" for m in at.metric)
    records = len(Ledger(home).records())
    assert records == 2
    # restart: a fresh app process state, same home
    again = open_page(tiny_models)
    assert any(m.label == "Perplexity" for m in again.metric)
    assert any(m.label == "Tokens" for m in again.metric)
    assert len(Ledger(home).records()) == records  # nothing was recomputed
    assert again.session_state["nb_active"] == book.id


def test_shared_link_is_read_only_and_fork_makes_an_editable_copy(home, tiny_models):
    book = make_notebook(home, tiny_models)
    at = open_page(tiny_models, {"notebook": book.id})
    assert not [b for b in at.button if b.key == "nb_run_all"]
    assert not [b for b in at.button if (b.key or "").startswith("del_")]
    at.button(key="nb_fork").click().run()
    from engine.notebooks import NotebookStore

    books = NotebookStore(home).list()
    assert len(books) == 2 and any(i.name == "Lesson (fork)" for i in books)


def test_bad_shared_id_is_a_clear_message(home, tiny_models):
    at = open_page(tiny_models, {"notebook": "../../etc/passwd"})
    assert any("not a notebook id" in e.value for e in at.error)
    assert not at.exception


def test_add_a_cell_from_the_page(home, tiny_models):
    from engine.notebooks import NotebookStore

    book = NotebookStore(home).create("Empty")
    at = open_page(tiny_models)
    at.selectbox(key="nb_add_kind").set_value("markdown").run()
    at.text_area(key="new_markdown_md").input("Hello class").run()
    at.button(key="new_markdown_save").click().run()
    cells = NotebookStore(home).get(book.id).cells
    assert [c.spec["text"] for c in cells] == ["Hello class"]


def test_generate_page_adds_its_run_to_the_notebook(home, tiny_models):
    import streamlit as st

    from engine.notebooks import NotebookStore

    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_name"] = str(tiny_models["llama"])
    at.run()
    at.switch_page("../pages/generate.py").run()
    at.text_area(key="gen_input").input("the capital of france is")
    at.number_input(key="gen_max_new_tokens").set_value(3)
    at.button(key="gen_go").click().run()
    rerun_until(at, lambda a: "gen_result" in a.session_state)
    at.button(key="gen_add_to_notebook").click().run()
    assert any("Added to notebook" in s.value for s in at.success)
    (info,) = NotebookStore(home).list()
    cell = NotebookStore(home).get(info.id).cells[0]
    assert cell.kind == "generate" and cell.status == "done"
    assert cell.run_id == at.session_state["gen_result_run_id"]
    assert cell.outputs["text"] == at.session_state["gen_result"].text


def test_attention_page_records_its_run_and_adds_it_to_a_notebook(home, tiny_models):
    import streamlit as st

    from engine.ledger import Ledger
    from engine.notebooks import NotebookStore, cell_result

    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_name"] = str(tiny_models["llama"])
    at.run()
    at.switch_page("../pages/attention.py").run()
    next(b for b in at.button if b.label == "Show attention").click().run()
    rerun_until(at, lambda a: any(b.key == "attn_add_to_notebook" for b in a.button))
    (record,) = Ledger(home).records()
    assert record.operation == "attention" and record.status == "done"
    at.button(key="attn_add_to_notebook").click().run()
    (info,) = NotebookStore(home).list()
    cell = NotebookStore(home).get(info.id).cells[0]
    assert cell.kind == "attention" and cell.run_id == record.id
    from engine import Workbench

    shown = cell_result(Workbench(home=home, device="cpu"), cell)
    assert shown.sides[0].result.text == record.input_text


def test_add_an_attention_cell_on_a_generation_from_the_page(home, tiny_models):
    from engine.notebooks import NotebookStore

    book = make_notebook(home, tiny_models)
    at = open_page(tiny_models)
    at.selectbox(key="nb_add_kind").set_value("attention").run()
    gen = NotebookStore(home).get(book.id).cells[1]
    at.selectbox(key="new_attention_ref").set_value((gen.id, "full_text")).run()
    at.button(key="new_attention_save").click().run()
    cell = NotebookStore(home).get(book.id).cells[-1]
    assert cell.kind == "attention" and cell.refs["text"].cell == gen.id
    assert cell.refs["text"].output == "full_text"
    # and editing it keeps the reference selected
    at.button(key=f"edit_{cell.id}").click().run()
    assert at.selectbox(key=f"{cell.id}_ref").value == (gen.id, "full_text")


def test_notebook_is_the_first_page_and_offers_an_example(home, tiny_models):
    import streamlit as st

    from engine.notebooks import NotebookStore

    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert [t.value for t in at.title] == ["Notebook"]
    at.button(key="nb_example").click().run()
    (info,) = NotebookStore(home).list()
    kinds = [c.kind for c in NotebookStore(home).get(info.id).cells]
    assert kinds == ["markdown", "generate", "attention", "explain"]
    assert not at.exception


def test_reproduce_all_shows_a_verdict_per_cell(home, tiny_models):
    book = make_notebook(home, tiny_models)
    at = open_page(tiny_models)
    at.button(key="nb_run_all").click().run()
    rerun_until(at, lambda a: "nb_run" not in a.session_state)
    at.button(key="nb_reproduce_all").click().run()
    rerun_until(at, lambda a: "nb_run" not in a.session_state)
    verdicts = [s.value for s in at.success if "Reproduce verdict" in s.value]
    assert len(verdicts) == 2 and all("exact" in v for v in verdicts), [e.value for e in at.error]
    held_id, held = at.session_state["nb_verdicts"]
    assert held_id == book.id and {v.verdict for v in held.values()} == {"exact"}


def test_duplicate_opens_the_copy(home, tiny_models):
    book = make_notebook(home, tiny_models)
    at = open_page(tiny_models)
    at.button(key="nb_duplicate").click().run()
    assert at.session_state["nb_active"] != book.id
    assert at.selectbox(key="nb_pick").value == at.session_state["nb_active"]
    at.run()
    assert at.session_state["nb_active"] != book.id  # still the copy after a rerun


def test_presenter_view_shows_one_cell_at_a_time_with_run(home, tiny_models):
    from engine.ledger import Ledger

    make_notebook(home, tiny_models)
    at = open_page(tiny_models)
    at.toggle(key="nb_present").set_value(True).run()
    assert not [b for b in at.button if b.key in ("nb_run_all", "nb_reproduce_all")]
    assert not [b for b in at.button if (b.key or "").startswith(("edit_", "del_", "run_"))]
    assert any("Cell 1 of 3" in m.value for m in at.markdown)
    assert not [b for b in at.button if b.key == "nb_present_run"]  # a note has no Run
    at.button(key="nb_next").click().run()
    assert any("Cell 2 of 3" in m.value for m in at.markdown)
    at.button(key="nb_present_run").click().run()
    rerun_until(at, lambda a: "nb_run" not in a.session_state)
    assert any(m.label == "Tokens" for m in at.metric)  # the result, kept in the view
    assert [r.operation for r in Ledger(home).records()] == ["generate"]
    at.button(key="nb_prev").click().run()
    assert any("Cell 1 of 3" in m.value for m in at.markdown)
