"""Notebook export: JSON bundle that imports elsewhere with its results, a .ipynb that
reproduces the recorded numbers when run headless (nbclient), an HTML audit report with no
script, and the `workbench notebook` commands."""

from __future__ import annotations

import json
import os

import pytest

from engine.notebooks import Ref, cell_result, wait_all
from engine.notebooks import export as exporter
from tests.conftest import run_cli

HOSTILE = 'the capital of <script>alert(1)</script> "><img src=x onerror=alert(2)> is'


@pytest.fixture
def wb(tmp_path):
    from engine import Workbench

    return Workbench(home=tmp_path / "home", device="cpu")


@pytest.fixture
def ran(wb, tiny_models):
    """A notebook with a note, a greedy generation and the perplexity of its output, run."""
    model = str(tiny_models["llama"])
    store = wb.notebooks
    book = store.create("Audit me")
    store.add_cell(book.id, "markdown", {"text": "Why <b>Paris</b>?"})
    gen = store.add_cell(
        book.id,
        "generate",
        {"model": model, "prompt": HOSTILE, "settings": {"max_new_tokens": 5, "greedy": True}},
    )
    store.add_cell(
        book.id, "evaluate", {"model": model, "metric": "perplexity"}, {"text": Ref(gen.id, "text")}
    )
    wait_all(wb, book.id, timeout=120)
    return store.get(book.id)


def test_bundle_imports_on_another_machine_with_its_results(wb, ran, tmp_path):
    from engine import Workbench

    data = json.loads(json.dumps(exporter.bundle(ran, wb.ledger)))
    elsewhere = Workbench(home=tmp_path / "elsewhere", device="cpu")
    copy = elsewhere.notebooks.import_dict(data)
    original = cell_result(wb, ran.cells[1])
    imported = cell_result(elsewhere, copy.cells[1])
    assert imported.text == original.text and imported.tokens == original.tokens
    assert elsewhere.ledger.records() == []  # shown from the bundle, nothing recomputed


def test_html_report_is_self_contained_and_escapes_hostile_text(wb, ran):
    page = exporter.to_html(ran, wb.ledger, wb)
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;" in page and "&lt;b&gt;Paris&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    record = wb.ledger.get(ran.cells[1].run_id)
    for value in (record.id, record.fingerprint, record.tokenizer_hash, record.hash):
        assert value in page
    assert "UTC" in page  # dates, not raw epochs


def test_exported_ipynb_reproduces_the_recorded_numbers_headless(wb, ran, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    text = exporter.to_ipynb(ran, wb.ledger)
    notebook = nbformat.reads(text, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert len(code) == 3  # set-up + two runs
    assert "check('generate'" in code[1].source
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute(
        cwd=str(tmp_path), env=dict(os.environ)
    )
    outputs = "".join(
        o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs
    )
    assert outputs.count("verdict: exact") == 2, outputs


def test_a_tampered_record_fails_the_exported_check(wb, ran, tmp_path, monkeypatch):
    """The .ipynb's check compares with the recorded numbers: a wrong record must fail it."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    record = wb.ledger.get(ran.cells[1].run_id)
    path = wb.ledger.result_file(record)
    data = json.loads(path.read_text())
    data["tokens"][0]["id"] += 1
    path.write_text(json.dumps(data))
    notebook = nbformat.reads(exporter.to_ipynb(ran, wb.ledger), as_version=4)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    with pytest.raises(CellExecutionError, match="mismatch|AssertionError"):
        NotebookClient(notebook, timeout=300, kernel_name="python3").execute(
            cwd=str(tmp_path), env=dict(os.environ)
        )


def test_notebook_cli_new_from_runs_export_and_import(tmp_path, tiny_models):
    home = tmp_path / "home"
    model = str(tiny_models["llama"])
    made = run_cli("generate", model, "once upon a", "--max-new-tokens", "4", "--greedy", home=home)
    assert made.returncode == 0, made.stderr
    run_id = json.loads(run_cli("history", "list", "--json", home=home).stdout)[0]["id"]
    created = run_cli("notebook", "new", "From runs", "--from-runs", run_id, home=home)
    assert created.returncode == 0, created.stderr
    listed = json.loads(run_cli("notebook", "list", "--json", home=home).stdout)
    assert [(n["name"], n["cells"]) for n in listed] == [("From runs", 1)]
    out = tmp_path / "report.html"
    exported = run_cli(
        "notebook", "export", "From runs", "--format", "html", "--out", str(out), home=home
    )
    assert exported.returncode == 0, exported.stderr
    assert run_id in out.read_text() and "Reproduce verdict" not in out.read_text()
    verified = run_cli(
        "notebook", "export", "From runs", "--format", "html", "--verify", "--out", str(out),
        home=home,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert "Reproduce verdict: <span class='verdict-ok'>exact</span>" in out.read_text()
    bundle = tmp_path / "bundle.json"
    assert (
        run_cli(
            "notebook", "export", "From runs", "--format", "json", "--out", str(bundle), home=home
        ).returncode
        == 0
    )
    other = tmp_path / "other"
    imported = run_cli("notebook", "import", str(bundle), home=other)
    assert imported.returncode == 0, imported.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "llmos-notebook", "cells": "x"}')
    refused = run_cli("notebook", "import", str(bad), home=other)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    missing = run_cli(
        "notebook", "export", "nope", "--format", "json", "--out", str(bundle), home=home
    )
    assert missing.returncode == 2 and "No notebook" in missing.stderr
