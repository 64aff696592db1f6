"""The notebook story in a real browser on the embedded SmolLM2: open the example notebook (a
note, a greedy generation, attention on its output, an explanation of its answer), Run all,
restart the server, reopen: every result is there at once and nothing was recomputed; every
cell reproduces exactly; the HTML report shows its figures with the network blocked."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import ARTIFACTS, served_workbench

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def served(home):
    return served_workbench(home, name="notebook-server")


def ran_cells(page) -> int:
    """Cells showing a stored result (each says how to re-run it)."""
    return page.get_by_text("reproduces it").count()


def test_notebook_story_survives_a_restart_and_reproduces(smollm, shared_home, tmp_path, browser):
    from engine import Workbench
    from engine.ledger import Ledger
    from engine.notebooks import NotebookStore
    from engine.notebooks import export as exporter
    from engine.reproduce import reproduce

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(shared_home / "models" / "smollm2-135m", home / "models" / "smollm2-135m")

    context = browser.new_context(viewport={"width": 1400, "height": 2400})
    page = context.new_page()
    page.set_default_timeout(180_000)
    with served(home) as url:
        page.goto(url + "/")
        page.get_by_role("heading", name="Notebook").first.wait_for()
        page.get_by_role("button", name="Open the example notebook").click()
        page.get_by_role("button", name="Run all").click()
        deadline = time.monotonic() + 300
        while ran_cells(page) < 3 and time.monotonic() < deadline:
            page.wait_for_timeout(500)
        assert ran_cells(page) == 3, "Run all did not fill the three cells"
        page.screenshot(path=str(ARTIFACTS / "notebook-run-all.png"))
    records = len(Ledger(home).records())
    assert records == 3

    with served(home) as url:  # a restarted server: results come back from the ledger
        page.goto(url + "/")
        page.get_by_text("reproduces it").nth(2).wait_for(timeout=120_000)
        assert ran_cells(page) == 3
        assert page.get_by_text("Paris").count() > 0
        page.screenshot(path=str(ARTIFACTS / "notebook-after-restart.png"))
    assert len(Ledger(home).records()) == records  # nothing was recomputed

    wb = Workbench(home=home, device="cpu")
    (info,) = NotebookStore(home).list()
    book = NotebookStore(home).get(info.id)
    for cell in book.cells[1:]:
        verdict = reproduce(wb, cell.run_id)
        assert verdict.verdict == "exact", (cell.kind, verdict.differences)

    report = tmp_path / "report.html"
    report.write_text(exporter.to_html(book, wb.ledger, wb))
    offline = browser.new_context()
    blocked = []

    def block(route):
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    offline.route("**/*", block)
    tab = offline.new_page()
    tab.goto(report.as_uri())
    figures = tab.locator("img")
    assert figures.count() >= 1
    widths = tab.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), widths
    assert blocked == []
    assert tab.get_by_text("Completeness").count() >= 1
    offline.close()
    context.close()


def test_presenter_view_at_1280x720(tiny_models, tmp_path, browser):
    """Projector size: one cell, large type, only Previous / Next / Run on screen."""
    from engine.notebooks import NotebookStore

    home = tmp_path / "home"
    store = NotebookStore(home)
    book = store.create("Class demo")
    store.add_cell(book.id, "markdown", {"text": "Where is the Eiffel Tower?"})
    store.add_cell(
        book.id,
        "generate",
        {
            "model": str(tiny_models["llama"]),
            "prompt": "the capital of france is",
            "settings": {"max_new_tokens": 3, "greedy": True},
        },
    )
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    page = context.new_page()
    page.set_default_timeout(120_000)
    with served(home) as url:
        page.goto(url + "/")
        page.get_by_text("Presenter view").click()
        note = page.locator(".st-key-nb_slide_body p", has_text="Where is the Eiffel Tower?")
        note.wait_for()
        page.screenshot(path=str(ARTIFACTS / "presenter-1280x720.png"))
        size = float(note.evaluate("e => parseFloat(window.getComputedStyle(e).fontSize)"))
        assert size >= 24, size  # large type
        assert page.get_by_role("button", name="Run all").count() == 0
        assert page.locator("section[data-testid='stSidebar']").is_hidden()
        page.get_by_role("button", name="Next ▶").click()
        page.get_by_text("Cell 2 of 2").wait_for()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("reproduces it").wait_for()
        page.screenshot(path=str(ARTIFACTS / "presenter-1280x720-run.png"))
    context.close()
