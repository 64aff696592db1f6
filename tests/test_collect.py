"""Class data collection: students add labelled sentences to a collect cell (checked and
cleaned), the instructor removes bad rows, the cell freezes them, a fine-tune cell trains on
them; many students at once lose nothing."""

from __future__ import annotations

import csv
import threading

import pytest

from engine.errors import InputError
from engine.notebooks import Ref, cell_result, wait_all
from engine.notebooks.collect import MAX_TEXT, Collection

LABELS = ["pos", "neg"]


@pytest.fixture
def wb(tmp_path):
    from engine import Workbench

    return Workbench(home=tmp_path / "home", device="cpu")


def test_sentences_are_checked_and_cleaned(wb):
    book = wb.notebooks.create("class")
    cell = wb.notebooks.add_cell(book.id, "collect", {"labels": LABELS, "prompt": "Say it"})
    box = Collection(wb.home, cell.id)
    row = box.add("  <script>alert(1)</script>\x00 nice\tfilm \n", "pos", LABELS)
    assert row.text == "<script>alert(1)</script> nice film"  # kept as text: pages escape it
    for text, label, message in [
        ("   ", "pos", "Type a sentence"),
        ("x" * (MAX_TEXT + 1), "pos", "at most"),
        ("fine", "maybe", "Pick one of the labels"),
    ]:
        with pytest.raises(InputError, match=message):
            box.add(text, label, LABELS)
    with pytest.raises(InputError, match="not a cell id"):
        Collection(wb.home, "../../etc")
    assert [r.text for r in box.rows()] == [row.text]


def test_many_students_at_once_lose_nothing(wb):
    book = wb.notebooks.create("class")
    cell = wb.notebooks.add_cell(book.id, "collect", {"labels": LABELS})

    def student(k):
        mine = Collection(wb.home, cell.id)
        for i in range(5):
            mine.add(f"student {k} sentence {i}", LABELS[i % 2], LABELS)

    threads = [threading.Thread(target=student, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = sorted(r.text for r in Collection(wb.home, cell.id).rows())
    assert texts == sorted(f"student {k} sentence {i}" for k in range(8) for i in range(5))


def test_collect_then_fine_tune_on_it(wb, tiny_models):
    store = wb.notebooks
    book = store.create("class")
    collect = store.add_cell(book.id, "collect", {"labels": LABELS})
    tune = store.add_cell(
        book.id,
        "finetune",
        {
            "base": str(tiny_models["bert"]),
            "task": "classification",
            "out": "class-model",
            "train": {"epochs": 1, "batch_size": 8, "max_length": 16},
        },
        refs={"data": Ref(collect.id, "data")},
    )
    box = Collection(wb.home, collect.id)
    box.add("bad film", "neg", LABELS)
    with pytest.raises(InputError, match="at least 4"):
        wait_all(wb, book.id, timeout=60)
    for i in range(8):
        box.add(f"a good film {i}", "pos", LABELS)
        box.add(f"a bad film {i}", "neg", LABELS)
    spam = box.add("buy cheap watches", "pos", LABELS)
    assert box.remove([spam.id]) == 1
    wait_all(wb, book.id, timeout=300)
    book = store.get(book.id)
    frozen = cell_result(wb, book.cell(collect.id))
    assert frozen.rows == 17 and frozen.per_label == {"pos": 8, "neg": 9}
    with open(frozen.path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert "buy cheap watches" not in {r["text"] for r in rows} and len(rows) == 17
    assert book.cell(tune.id).status == "done", book.cell(tune.id).error
    assert cell_result(wb, book.cell(tune.id)).model == "class-model"


def test_student_link_and_instructor_table(wb, tiny_models, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_HOME", str(wb.home))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    book = wb.notebooks.create("class")
    cell = wb.notebooks.add_cell(
        book.id, "collect", {"labels": LABELS, "prompt": "Describe a film"}
    )
    st.cache_resource.clear()
    student = AppTest.from_file("../workbench/app.py", default_timeout=120)
    student.query_params["collect"] = f"{book.id}:{cell.id}"
    student.run()
    assert any("Describe a film" in h.value for h in student.subheader)
    assert not [b for b in student.button if b.key == "nb_run_all"]  # nothing else on show
    student.text_area(key="collect_text").input('<img src=x onerror="alert(1)"> great')
    student.radio(key="collect_label").set_value("pos")
    student.button[0].click().run()
    assert any("Thank you" in s.value for s in student.success)
    (row,) = Collection(wb.home, cell.id).rows()
    assert row.label == "pos" and "great" in row.text
    bad = AppTest.from_file("../workbench/app.py", default_timeout=120)
    bad.query_params["collect"] = "nope:nothing"
    bad.run()
    assert bad.error and not bad.exception

    teacher = AppTest.from_file("../workbench/app.py", default_timeout=120).run()
    assert any("1 sentences" in c.value for c in teacher.caption)
    assert f"?collect={book.id}:{cell.id}" in "".join(m.value for m in teacher.markdown)
