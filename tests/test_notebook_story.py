"""The whole notebook story on a tiny model: a note, a greedy generation, attention on its
output and an explanation of its answer; every cell reproduces exactly (engine verdicts and
the exported .ipynb run headless); the HTML report has its figures inline and no script."""

from __future__ import annotations

import os

import pytest

from engine.notebooks import Ref, cell_result, wait_all
from engine.notebooks import export as exporter
from engine.reproduce import reproduce

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def story(tmp_path_factory, tiny_models):
    from engine import Workbench

    home = tmp_path_factory.mktemp("story")
    wb = Workbench(home=home, device="cpu")
    model = str(tiny_models["llama"])
    store = wb.notebooks
    book = store.create("Why Paris?")
    store.add_cell(book.id, "markdown", {"text": "Where is the Eiffel Tower?"})
    gen = store.add_cell(
        book.id,
        "generate",
        {"model": model, "prompt": PROMPT, "settings": {"max_new_tokens": 3, "greedy": True}},
    )
    store.add_cell(book.id, "attention", {"model": model}, refs={"text": Ref(gen.id, "full_text")})
    store.add_cell(
        book.id,
        "explain",
        {
            "model": model,
            "methods": ["integrated_gradients", "occlusion"],
            "options": {},
            "faithfulness": True,
        },
        refs={"text": Ref(gen.id, "prompt"), "target": Ref(gen.id, "text")},
    )
    wait_all(wb, book.id, timeout=300)
    return wb, store.get(book.id)


def test_every_cell_ran_and_uses_the_generation(story):
    wb, book = story
    _note, gen, att, why = book.cells
    assert [c.status for c in (gen, att, why)] == ["done"] * 3, [c.error for c in book.cells]
    generated = cell_result(wb, gen)
    attention = cell_result(wb, att)
    explanation = cell_result(wb, why)
    assert attention.sides[0].result.text == PROMPT + generated.text
    assert explanation.text == PROMPT
    assert [a.method for a in explanation.attributions] == ["integrated_gradients", "occlusion"]
    # the target is the generated answer (the tiny tokenizer joins words without spaces)
    assert "".join(generated.text.split()) in explanation.attributions[0].target_description
    assert explanation.agreement is not None


def test_every_cell_reproduces_exactly(story):
    wb, book = story
    for cell in book.cells[1:]:
        verdict = reproduce(wb, cell.run_id)
        assert verdict.verdict == "exact", (cell.kind, verdict.differences)


def test_exported_ipynb_reproduces_every_cell(story, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    wb, book = story
    notebook = nbformat.reads(exporter.to_ipynb(book, wb.ledger), as_version=4)
    monkeypatch.setenv("WORKBENCH_HOME", str(wb.home))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute(
        cwd=str(tmp_path), env=dict(os.environ)
    )
    outputs = "".join(
        o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs
    )
    assert outputs.count("verdict: exact") == 3, outputs


def test_exported_ipynb_carries_the_recorded_figures(story):
    import nbformat

    wb, book = story
    notebook = nbformat.reads(exporter.to_ipynb(book, wb.ledger), as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"][1:]
    images = [
        [o for o in c.outputs if o.get("output_type") == "display_data" and "image/png" in o.data]
        for c in code
    ]
    assert [len(i) for i in images] == [0, 1, 2]  # generation: text; attention; two methods
    import base64

    png = base64.b64decode(images[1][0].data["image/png"])
    assert png.startswith(b"\x89PNG")


def test_html_report_has_inline_figures_and_explains_the_numbers(story):
    wb, book = story
    page = exporter.to_html(book, wb.ledger, wb)
    assert "<script" not in page.lower()
    assert page.count("data:image/png;base64,") >= 1  # the attention heatmap, inline
    assert "Completeness" in page and "higher is better" in page and "random order" in page
    assert "Method agreement" in page
