"""Notebooks: cells with references, Run all, results back after a restart without
recomputing, staleness, hostile notebook files, concurrent writers."""

from __future__ import annotations

import json
import threading

import pytest

from engine.errors import InputError
from engine.notebooks import (
    NotebookError,
    NotebookStore,
    Ref,
    cell_result,
    start_all,
    start_cell,
    wait_all,
)

PROMPT = "the capital of france is"


@pytest.fixture
def wb(tmp_path):
    from engine import Workbench

    return Workbench(home=tmp_path / "home", device="cpu")


def story(wb, model: str):
    """A note, a greedy generation, and the perplexity of its prompt + answer."""
    store = wb.notebooks
    book = store.create("Paris")
    store.add_cell(book.id, "markdown", {"text": "# Where is Paris?"})
    gen = store.add_cell(
        book.id,
        "generate",
        {"model": model, "prompt": PROMPT, "settings": {"max_new_tokens": 5, "greedy": True}},
    )
    ppl = store.add_cell(
        book.id,
        "evaluate",
        {"model": model, "metric": "perplexity"},
        refs={"text": Ref(gen.id, "full_text")},
    )
    return book, gen, ppl


def test_run_all_fills_every_cell_and_a_restart_shows_the_results(wb, tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    book, gen, ppl = story(wb, model)
    ran = wait_all(wb, book.id, timeout=120)
    assert [cell for cell, _ in ran] == [gen.id, ppl.id]
    book = wb.notebooks.get(book.id)
    g, p = book.cell(gen.id), book.cell(ppl.id)
    assert g.status == p.status == "done" and not g.stale and not p.stale
    expected = wb.load(model).generate(PROMPT, max_new_tokens=5, greedy=True)
    assert g.outputs["text"] == expected.text
    assert g.outputs["full_text"] == PROMPT + expected.text
    # "after a restart": a new store and ledger on the same home, nothing recomputed
    from engine.ledger import Ledger

    reopened = NotebookStore(tmp_path / "home").get(book.id)
    ledger = Ledger(tmp_path / "home")
    before = len(ledger.records())
    gen_result = ledger.load_result(ledger.get(reopened.cell(gen.id).run_id))
    ppl_result = ledger.load_result(ledger.get(reopened.cell(ppl.id).run_id))
    assert gen_result.text == expected.text and type(gen_result).__name__ == "GenerationResult"
    assert ppl_result.text == PROMPT + expected.text
    assert len(ledger.records()) == before
    # and the recorded run reproduces exactly
    from engine.reproduce import reproduce

    assert reproduce(wb, reopened.cell(ppl.id).run_id).verdict == "exact"


def test_editing_a_cell_marks_its_dependents_stale(wb, tiny_models):
    model = str(tiny_models["llama"])
    book, gen, ppl = story(wb, model)
    wait_all(wb, book.id, timeout=120)
    spec = dict(wb.notebooks.get(book.id).cell(gen.id).spec, prompt="once upon a")
    book = wb.notebooks.edit_cell(book.id, gen.id, spec)
    assert book.cell(gen.id).stale and book.cell(ppl.id).stale
    assert book.cell(ppl.id).status == "done"  # shown as stale, not silently re-run
    start_cell(wb, book.id, gen.id).wait(60)
    book = wb.notebooks.get(book.id)
    assert not book.cell(gen.id).stale and book.cell(ppl.id).stale
    assert book.cell(gen.id).outputs["prompt"] == "once upon a"


def test_a_cell_whose_upstream_has_not_run_says_so(wb, tiny_models):
    book, _gen, ppl = story(wb, str(tiny_models["llama"]))
    with pytest.raises(InputError, match="run it first"):
        start_cell(wb, book.id, ppl.id)


def test_references_point_upward_and_used_cells_cannot_vanish(wb, tiny_models):
    book, gen, ppl = story(wb, str(tiny_models["llama"]))
    store = wb.notebooks
    with pytest.raises(InputError, match="used by"):
        store.delete_cell(book.id, gen.id)
    with pytest.raises(InputError, match="above"):
        store.move_cell(book.id, ppl.id, -1)
    with pytest.raises(InputError, match="offers no output"):
        store.add_cell(book.id, "attention", {"model": "m"}, refs={"text": Ref(ppl.id, "text")})
    assert [c.id for c in store.get(book.id).cells][1:] == [gen.id, ppl.id]


def test_a_failed_cell_keeps_its_error_and_run_all_stops_there(wb, tiny_models):
    store = wb.notebooks
    book = store.create("broken")
    bad = store.add_cell(book.id, "generate", {"model": str(tiny_models["llama"]), "prompt": " "})
    store.add_cell(book.id, "evaluate", {"model": str(tiny_models["llama"]), "text": "a b c"})
    run = start_all(wb, book.id)
    assert run.join(60) and run.snapshot().state == "failed"
    book = store.get(book.id)
    assert book.cell(bad.id).status == "failed" and "empty" in book.cell(bad.id).error
    assert book.cells[1].status == "new"


def test_hostile_notebook_files_give_a_clear_message_and_are_left_alone(wb):
    store = wb.notebooks
    good = store.create("fine")
    broken_text = '{"format": "llmos-notebook", "cells": [ '
    bad_path = store.root / "0123456789ab.json"
    bad_path.write_text(broken_text)
    with pytest.raises(NotebookError, match="not valid JSON"):
        store.get("0123456789ab")
    assert bad_path.read_text() == broken_text  # never destroyed
    listing = {i.id: i for i in store.list()}
    assert listing["0123456789ab"].damaged and not listing[good.id].damaged
    wrong_kind = good.to_dict()
    wrong_kind["cells"] = [{"id": "aaaaaaaaaaaa", "kind": "rm -rf", "spec": {}}]
    with pytest.raises(NotebookError, match="unknown kind"):
        store.import_dict(wrong_kind)
    for hostile in ("../../etc/passwd", "x/../y", "\x00", "a" * 300):
        with pytest.raises(InputError):
            store.get(hostile)
    with pytest.raises(InputError, match="longer than"):
        store.add_cell(good.id, "markdown", {"text": "x" * 200_001})


def test_concurrent_writers_lose_no_cell(wb):
    store = wb.notebooks
    book = store.create("busy")

    def add(k):
        other = NotebookStore(wb.home)  # as another session would
        for i in range(5):
            other.add_cell(book.id, "markdown", {"text": f"{k}-{i}"})

    threads = [threading.Thread(target=add, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = sorted(c.spec["text"] for c in store.get(book.id).cells)
    assert texts == sorted(f"{k}-{i}" for k in range(8) for i in range(5))


def test_export_bundle_imports_as_a_new_notebook(wb, tiny_models):
    book, gen, _ppl = story(wb, str(tiny_models["llama"]))
    data = json.loads(json.dumps(wb.notebooks.get(book.id).to_dict()))
    copy = wb.notebooks.import_dict(data)
    assert copy.id != book.id and [c.kind for c in copy.cells] == [
        "markdown",
        "generate",
        "evaluate",
    ]
    forked = wb.notebooks.duplicate(book.id)
    assert forked.forked_from == book.id and forked.cells == wb.notebooks.get(book.id).cells


def test_python_notebook_handle(wb, tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    book = wb.notebook("Python")
    gen = book.add(
        "generate", model=model, prompt=PROMPT, settings={"max_new_tokens": 4, "greedy": True}
    )
    book.add("evaluate", model=model, metric="perplexity", refs={"text": Ref(gen.id, "text")})
    book.run_all(timeout=120)
    assert wb.notebook("Python").id == book.id  # opened again by name, not created twice
    text = book.result(gen.id).text
    assert text == wb.load(model).generate(PROMPT, max_new_tokens=4, greedy=True).text
    out = book.export(tmp_path / "python.html")
    assert "Cell 2" in out.read_text()
    with pytest.raises(InputError, match="format"):
        book.export(tmp_path / "x.pdf")


def test_kill_9_while_writing_a_notebook_leaves_it_readable(wb, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from tests.conftest import REPO

    book = wb.notebooks.create("crash")
    script = textwrap.dedent(
        f"""
        from engine.notebooks import NotebookStore
        store = NotebookStore({str(wb.home)!r})
        i = 0
        while True:
            store.add_cell({book.id!r}, "markdown", {{"text": "x" * 20000 + str(i)}})
            i += 1
            if i == 3:
                print("writing", flush=True)
            if i % 20 == 0:
                for cell in store.get({book.id!r}).cells[:10]:
                    store.delete_cell({book.id!r}, cell.id)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    import time

    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    cells = wb.notebooks.get(book.id).cells  # parses: never half a file
    assert len(cells) >= 3
    wb.notebooks.add_cell(book.id, "markdown", {"text": "after the crash"})  # lock not stuck
    assert wb.notebooks.get(book.id).cells[-1].spec["text"] == "after the crash"


@pytest.mark.slow
def test_a_finetune_cell_trains_and_a_later_cell_uses_its_model(wb, tiny_models, tmp_path):
    data = tmp_path / "tiny.csv"
    rows = ["text,label"] + [f"good film number {i},pos" for i in range(8)]
    rows += [f"bad film number {i},neg" for i in range(8)]
    data.write_text("\n".join(rows) + "\n")
    store = wb.notebooks
    book = store.create("train then use")
    tune = store.add_cell(
        book.id,
        "finetune",
        {
            "base": str(tiny_models["bert"]),
            "task": "classification",
            "data": str(data),
            "out": "nb-tuned",
            "train": {"epochs": 1, "batch_size": 8, "max_length": 16},
        },
    )
    use = store.add_cell(
        book.id, "classify", {"text": "a good film"}, refs={"model": Ref(tune.id, "model")}
    )
    wait_all(wb, book.id, timeout=300)
    book = store.get(book.id)
    assert book.cell(tune.id).status == "done", book.cell(tune.id).error
    assert book.cell(tune.id).outputs["model"] == "nb-tuned"
    record = wb.ledger.get(book.cell(tune.id).run_id)
    assert record.operation == "finetune" and record.status == "done"
    tuned = cell_result(wb, book.cell(tune.id))
    assert tuned.model == "nb-tuned" and tuned.metrics_after
    label = cell_result(wb, book.cell(use.id))
    assert label.provenance.model == "nb-tuned"  # the cell used the model the job produced
    direct = wb.load("nb-tuned").classify("a good film")
    assert (label.label, label.scores) == (direct.label, direct.scores)


def test_chat_and_bleu_cells(wb, tiny_models):
    from engine.generation import ChatMessage

    model = str(tiny_models["llama"])
    store = wb.notebooks
    book = store.create("chat")
    chat = store.add_cell(
        book.id,
        "generate",
        {
            "model": model,
            "prompt": "hello world",
            "chat": True,
            "system": "be brief",
            "settings": {"max_new_tokens": 3, "greedy": True},
        },
    )
    score = store.add_cell(
        book.id,
        "evaluate",
        {"metric": "overlap", "reference": "the capital of france"},
        refs={"hypothesis": Ref(chat.id, "text")},
    )
    wait_all(wb, book.id, timeout=120)
    book = store.get(book.id)
    reply = cell_result(wb, book.cell(chat.id))
    direct = wb.load(model).chat(
        [ChatMessage("system", "be brief"), ChatMessage("user", "hello world")],
        max_new_tokens=3,
        greedy=True,
    )
    assert reply.mode == "chat" and reply.tokens == direct.tokens
    scores = cell_result(wb, book.cell(score.id))
    from engine.generation.evaluation import overlap_scores

    assert scores.bleu == overlap_scores(reply.text, "the capital of france").bleu
