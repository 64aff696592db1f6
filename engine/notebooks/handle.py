"""The Python face of a notebook: ``wb.notebook("Paris")`` gives a handle to add cells, run
them and export, over the same store and ledger as the pages.

    book = wb.notebook("Paris")                      # opened, or created when new
    gen = book.add("generate", model="smollm2-135m", prompt="The capital of France is",
                   settings={"max_new_tokens": 8, "greedy": True})
    book.add("evaluate", model="smollm2-135m", metric="perplexity",
             refs={"text": Ref(gen.id, "full_text")})
    book.run_all()
    book.result(gen.id).text
    book.export("paris.ipynb")                        # .json, .ipynb or .html
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.files import atomic_write_text
from engine.notebooks.book import Cell, Notebook, Ref
from engine.notebooks.execute import cell_result, start_cell, wait_all


class NotebookHandle:
    """One notebook of a workbench (re-read from disk on every access: other sessions may
    change it at the same time)."""

    def __init__(self, workbench, notebook_id: str) -> None:
        self._wb = workbench
        self.id = notebook_id

    @property
    def data(self) -> Notebook:
        return self._wb.notebooks.get(self.id)

    @property
    def cells(self) -> tuple[Cell, ...]:
        return self.data.cells

    def add(self, kind: str, refs: dict[str, Ref] | None = None, **spec: Any) -> Cell:
        """Append a cell; ``spec`` fields are the cell's settings and inputs."""
        return self._wb.notebooks.add_cell(self.id, kind, spec, refs)

    def run(self, cell_id: str, timeout: float | None = None) -> Any:
        """Run one cell and return its result."""
        return start_cell(self._wb, self.id, cell_id).wait(timeout)

    def run_all(self, timeout: float | None = None) -> list:
        """Run every cell top to bottom; returns (cell id, run id) pairs."""
        return wait_all(self._wb, self.id, timeout)

    def result(self, cell_id: str) -> Any:
        """The stored result of a cell's last run (None if it never ran)."""
        book = self.data
        return cell_result(self._wb, book.cell(cell_id), book.owner)

    def reproduce(self, timeout: float | None = None) -> dict:
        """Re-run every recorded cell: ``{cell id: Verdict}``."""
        from engine.notebooks.execute import start_reproduce_all

        return start_reproduce_all(self._wb, self.id).wait(timeout)

    def export(
        self, path: str | Path, format: str | None = None, verdicts: dict | None = None
    ) -> Path:
        """Write the notebook as a JSON bundle, a .ipynb or an HTML audit report (with the
        reproduce ``verdicts`` of ``reproduce()`` when given)."""
        import json

        from engine.notebooks import export as exporter

        path = Path(path)
        format = format or path.suffix.lstrip(".")
        book = self.data
        if format == "json":
            text = json.dumps(exporter.bundle(book, self._wb.ledger), ensure_ascii=False)
        elif format == "ipynb":
            text = exporter.to_ipynb(book, self._wb.ledger)
        elif format == "html":
            text = exporter.to_html(book, self._wb.ledger, self._wb, verdicts)
        else:
            raise InputError(f"Unknown export format {format!r}: use json, ipynb or html.")
        return atomic_write_text(path, text, str(path))

    def __repr__(self) -> str:
        return f"NotebookHandle({self.data.name!r}, {len(self.cells)} cells)"
