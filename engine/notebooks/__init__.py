"""Notebooks: saved, re-runnable cells over the run ledger.

    from engine.notebooks import NotebookStore, Ref, start_cell, start_all
    store = workbench.notebooks            # NotebookStore(workbench.home)
    book = store.create("Paris")
    cell = store.add_cell(book.id, "generate", {"model": "smollm2-135m", "prompt": "..."})
    start_cell(workbench, book.id, cell.id).wait()

Modules: ``book`` (cells, references, staleness, the store), ``execute`` (running cells as
engine runs), ``export`` (JSON bundle, .ipynb, HTML audit report) and ``lessons`` (ready
lesson notebooks for a class: ``LESSONS``, ``open_lesson(store, id)``).
"""

from engine.notebooks.book import (
    KINDS,
    OUTPUTS,
    Cell,
    Notebook,
    NotebookError,
    NotebookInfo,
    NotebookStore,
    Ref,
    example,
    resolve_spec,
)
from engine.notebooks.execute import (
    cell_readable,
    cell_result,
    cells_from_runs,
    outputs_of,
    start_all,
    start_cell,
    start_reproduce_all,
    wait_all,
)
from engine.notebooks.handle import NotebookHandle
from engine.notebooks.lessons import LESSONS, Lesson, open_lesson

__all__ = [
    "KINDS",
    "LESSONS",
    "OUTPUTS",
    "Cell",
    "Lesson",
    "Notebook",
    "NotebookError",
    "NotebookHandle",
    "NotebookInfo",
    "NotebookStore",
    "Ref",
    "cell_readable",
    "cell_result",
    "cells_from_runs",
    "example",
    "open_lesson",
    "outputs_of",
    "resolve_spec",
    "start_all",
    "start_cell",
    "start_reproduce_all",
    "wait_all",
]
