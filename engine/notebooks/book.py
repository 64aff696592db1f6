"""Notebooks: an ordered list of cells, each a saved, re-runnable run spec.

A notebook lives in ``$WORKBENCH_HOME/notebooks/<id>.json`` and is saved (atomically, under a
file lock) after every change. A cell holds its kind, its spec (model, settings, inputs: plain
data), explicit references to other cells' outputs, and the ledger id of its last run, whose
stored result is what the notebook shows after a restart, without recomputing.

References: ``cell.refs = {"text": Ref(cell_id, "full_text")}`` means "this cell's ``text`` is
cell X's generated text, prompt included". When a cell is edited or re-run, every cell that
depends on it (directly or through others) is marked stale: shown, never silently re-run.

    book = NotebookStore(home).create("Paris")
    gen = book.add("generate", {"model": "smollm2-135m", "prompt": "The capital of France is",
                                "settings": {"max_new_tokens": 8, "greedy": True}})
    book.add("attention", {"model": "smollm2-135m"}, refs={"text": Ref(gen.id, "full_text")})
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from engine import access
from engine.errors import EngineError, InputError
from engine.files import atomic_write_json

FORMAT = "llmos-notebook"
FORMAT_VERSION = 1
KINDS = (
    "markdown",
    "generate",
    "evaluate",
    "compare",
    "attention",
    "explain",
    "classify",
    "collect",
    "finetune",
)
# ledger operation -> the cell kind that re-runs it
KIND_OF_OPERATION = {
    "generate": "generate",
    "perplexity": "evaluate",
    "score": "evaluate",
    "compare": "compare",
    "attention": "attention",
    "explain": "explain",
    "classify": "classify",
    "finetune": "finetune",
}
# what each kind's result offers to other cells: output name -> description
OUTPUTS = {
    "generate": {
        "text": "the generated text",
        "prompt": "the prompt",
        "full_text": "the prompt followed by the generated text",
    },
    "finetune": {"model": "the model it produced"},
    "collect": {"data": "the sentences collected (text, label)"},
}
MAX_CELLS = 200
MAX_TEXT = 100_000  # characters in any one text field of a cell
_ID = re.compile(r"[0-9a-f]{12}")


class NotebookError(EngineError):
    """A notebook file that cannot be read or a change that cannot be made."""


@dataclass(frozen=True)
class Ref:
    """ "Use output ``output`` of cell ``cell``" (see ``OUTPUTS``)."""

    cell: str
    output: str


@dataclass(frozen=True)
class Cell:
    """One cell. ``spec``: the run spec as plain data (for markdown: ``{"text": ...}``);
    ``refs``: spec field -> Ref; ``run_id``: ledger id of the last run (None: never run);
    ``status``: "new", "done", "failed", "cancelled"; ``error``: the last run's one-line error;
    ``stale``: an upstream cell changed since this cell ran; ``outputs``: what other cells
    may reference (e.g. the generated text), copied from the last result."""

    id: str
    kind: str
    spec: dict
    refs: dict[str, Ref] = field(default_factory=dict)
    run_id: str | None = None
    status: str = "new"
    error: str | None = None
    stale: bool = False
    outputs: dict = field(default_factory=dict)
    updated: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Notebook:
    """An ordered list of cells with a name. ``readonly`` for shared snapshots."""

    id: str
    name: str
    cells: tuple[Cell, ...] = ()
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    forked_from: str | None = None
    owner: str = "local"  # who may change it (engine.access); others may read it if shared
    shared: bool = False  # pushed to the class by an instructor: every user may read it

    def cell(self, cell_id: str) -> Cell:
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        raise InputError(f"No cell {cell_id!r} in notebook {self.name!r}.")

    def index(self, cell_id: str) -> int:
        return [c.id for c in self.cells].index(self.cell(cell_id).id)

    def dependents(self, cell_id: str) -> list[str]:
        """Cells that use ``cell_id``'s outputs, directly or through other cells, in order."""
        found: list[str] = []
        frontier = {cell_id}
        for cell in self.cells:  # references only point upward, so one pass in order suffices
            if any(ref.cell in frontier for ref in cell.refs.values()):
                found.append(cell.id)
                frontier.add(cell.id)
        return found

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}


# --- reading and checking ---------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise NotebookError(f"{what} must be text.")
    if len(value) > MAX_TEXT:
        raise InputError(f"{what} is longer than {MAX_TEXT:,} characters: shorten it.")
    return value


def _check_spec(kind: str, spec: Any) -> dict:
    if not isinstance(spec, dict):
        raise NotebookError(f"A {kind} cell's spec must be an object.")
    for key, value in spec.items():
        if isinstance(value, str):
            _text(value, f"The cell's {key!r}")
    json.dumps(spec)  # must be plain data
    return spec


def _cell_from(data: Any, position: int) -> Cell:
    where = f"cell {position + 1}"
    if not isinstance(data, dict):
        raise NotebookError(f"{where} is not an object.")
    kind = data.get("kind")
    if kind not in KINDS:
        raise NotebookError(f"{where} has an unknown kind {kind!r} (expected one of {KINDS}).")
    cell_id = data.get("id")
    if not isinstance(cell_id, str) or not _ID.fullmatch(cell_id):
        raise NotebookError(f"{where} has a bad id {cell_id!r}.")
    refs_raw = data.get("refs") or {}
    if not isinstance(refs_raw, dict):
        raise NotebookError(f"{where}: refs must be an object.")
    refs = {}
    for key, ref in refs_raw.items():
        if not isinstance(ref, dict) or not {"cell", "output"} <= set(ref):
            raise NotebookError(f"{where}: reference {key!r} needs a cell and an output.")
        refs[str(key)] = Ref(str(ref["cell"]), str(ref["output"]))
    outputs = data.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise NotebookError(f"{where}: outputs must be an object.")
    status = data.get("status", "new")
    if status not in ("new", "done", "failed", "cancelled"):
        raise NotebookError(f"{where} has an unknown status {status!r}.")
    run_id = data.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise NotebookError(f"{where} has a bad run id.")
    return Cell(
        id=cell_id,
        kind=kind,
        spec=_check_spec(kind, data.get("spec") or {}),
        refs=refs,
        run_id=run_id,
        status=status,
        error=data.get("error") if isinstance(data.get("error"), str) else None,
        stale=bool(data.get("stale", False)),
        outputs=outputs,
        updated=float(data.get("updated") or time.time()),
    )


def notebook_from_dict(data: Any, source: str = "the notebook") -> Notebook:
    """Build and check a notebook from plain data; ``NotebookError`` naming what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NotebookError(f"{source} is not a workbench notebook.")
    if int(data.get("version", 0)) > FORMAT_VERSION:
        raise NotebookError(f"{source} was written by a newer workbench: upgrade to open it.")
    cells_raw = data.get("cells")
    if not isinstance(cells_raw, list):
        raise NotebookError(f"{source} has no list of cells.")
    if len(cells_raw) > MAX_CELLS:
        raise NotebookError(f"{source} has more than {MAX_CELLS} cells.")
    cells = tuple(_cell_from(c, i) for i, c in enumerate(cells_raw))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise NotebookError(f"{source} has two cells with the same id.")
    for i, cell in enumerate(cells):
        for key, ref in cell.refs.items():
            if ref.cell not in ids[:i]:
                raise NotebookError(
                    f"cell {i + 1}'s {key!r} refers to a cell that is not above it."
                )
    notebook_id = data.get("id")
    if not isinstance(notebook_id, str) or not _ID.fullmatch(notebook_id):
        raise NotebookError(f"{source} has a bad id.")
    return Notebook(
        id=notebook_id,
        name=_text(data.get("name") or "Untitled", "The notebook's name")[:200],
        cells=cells,
        created=float(data.get("created") or time.time()),
        updated=float(data.get("updated") or time.time()),
        forked_from=data.get("forked_from") if isinstance(data.get("forked_from"), str) else None,
        owner=data["owner"] if isinstance(data.get("owner"), str) else "local",
        shared=data.get("shared") is True,
    )


def new_id() -> str:
    return secrets.token_hex(6)


# --- the store --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotebookInfo:
    id: str
    name: str
    cells: int
    updated: float
    damaged: str | None = None
    owner: str = "local"
    shared: bool = False


def may_read(book: Notebook) -> bool:
    """Whether the acting user may open ``book``: its owner, a reading role, or shared."""
    return book.shared or access.may_read(book.owner)


def check_writable(book: Notebook) -> None:
    """``AccessError`` unless the acting user may change ``book`` (its owner, or an admin)."""
    access.require("notebooks.write")
    if not access.may_control(book.owner):
        raise access.AccessError(
            f"Notebook {book.name!r} belongs to {book.owner}: make a copy to change it."
        )


class NotebookStore:
    """Notebooks under ``home/notebooks``; every change is one locked read-modify-write.

    Each notebook belongs to the user who made it (``engine.access``): others see it only
    when their role reads everything or when it is shared with the class; only its owner
    (or an admin) changes it.
    """

    def __init__(self, home: str | Path) -> None:
        self.root = Path(home) / "notebooks"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, notebook_id: str) -> Path:
        if not isinstance(notebook_id, str) or not _ID.fullmatch(notebook_id):
            raise InputError(f"{notebook_id!r} is not a notebook id.")
        return self.root / f"{notebook_id}.json"

    def _lock(self, notebook_id: str) -> FileLock:
        return FileLock(str(self.root / f".{notebook_id}.lock"), timeout=30)

    def get(self, notebook_id: str) -> Notebook:
        """The notebook, if the acting user may read it (another's reads as missing)."""
        book = self._read(notebook_id)
        if not may_read(book):
            raise InputError(f"No notebook {notebook_id!r}.")
        return book

    def collect_cell(self, notebook_id: str, cell_id: str) -> Cell:
        """The collect cell a student's link points at: readable by anyone logged in who has
        the link (only this cell, never the rest of the notebook)."""
        access.current_user()
        cell = self._read(notebook_id).cell(cell_id)
        if cell.kind != "collect":
            raise InputError("This link is not a data collection.")
        return cell

    def _read(self, notebook_id: str) -> Notebook:
        path = self.path(notebook_id)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise InputError(f"No notebook {notebook_id!r}.") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise NotebookError(f"Notebook file {path.name} cannot be read ({exc}).") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NotebookError(
                f"Notebook file {path.name} is not valid JSON (line {exc.lineno}): it was left "
                "as it is; fix it by hand or delete it."
            ) from exc
        return notebook_from_dict(data, f"Notebook file {path.name}")

    def list(self) -> list[NotebookInfo]:
        """The notebooks the acting user may read, most recently changed first; damaged files
        are listed (to roles that read everything), not hidden."""
        infos = []
        for path in self.root.glob("*.json"):
            try:
                book = self._read(path.stem)
            except EngineError as exc:
                if access.can("runs.read_all"):
                    info = NotebookInfo(path.stem, path.stem, 0, path.stat().st_mtime, str(exc))
                    infos.append(info)
                continue
            if may_read(book):
                infos.append(
                    NotebookInfo(
                        book.id,
                        book.name,
                        len(book.cells),
                        book.updated,
                        owner=book.owner,
                        shared=book.shared,
                    )
                )
        return sorted(infos, key=lambda i: -i.updated)

    def find(self, name_or_id: str) -> Notebook:
        """A notebook by id, or by its (unique) name."""
        if _ID.fullmatch(name_or_id or "") and self.path(name_or_id).exists():
            return self.get(name_or_id)
        matches = [i for i in self.list() if i.name == name_or_id and not i.damaged]
        if not matches:
            raise InputError(f"No notebook named {name_or_id!r}: `workbench notebook list`.")
        if len(matches) > 1:
            raise InputError(f"Several notebooks are named {name_or_id!r}: use its id.")
        return self.get(matches[0].id)

    def save(self, book: Notebook) -> Notebook:
        book = replace(book, updated=time.time())
        atomic_write_json(self.path(book.id), book.to_dict(), f"notebook {book.name!r}")
        return book

    def create(self, name: str, cells: tuple[Cell, ...] = ()) -> Notebook:
        """A new notebook owned by the acting user."""
        access.require("notebooks.write")
        name = _text(name, "The notebook's name").strip()
        if not name:
            raise InputError("Give the notebook a name.")
        owner = access.current_user().name
        return self.save(Notebook(id=new_id(), name=name[:200], cells=cells, owner=owner))

    def delete(self, notebook_id: str) -> None:
        with self._lock(notebook_id):
            if self.path(notebook_id).exists():
                check_writable(self.get(notebook_id))
            self.path(notebook_id).unlink(missing_ok=True)

    def share(self, notebook_id: str, shared: bool = True) -> Notebook:
        """Push a notebook to the class (every user may open it read-only and copy it), or
        take it back. Instructors and admins, on their own notebooks."""
        access.require("notebooks.push")
        return self.update(notebook_id, lambda b: replace(b, shared=bool(shared)))

    def import_dict(self, data: Any, source: str = "the file") -> Notebook:
        """A notebook from an exported bundle, under a new id (never overwrites another).

        The bundle's recorded results are kept beside the notebooks (``imported/``), so the
        cells show them at once on this machine too.
        """
        if not isinstance(data, dict):
            raise NotebookError(f"{source} is not a workbench notebook.")
        book = notebook_from_dict(data.get("notebook") if "notebook" in data else data, source)
        runs = data.get("runs") or {}
        if not isinstance(runs, dict):
            raise NotebookError(f"{source}: runs must be an object.")
        access.require("notebooks.write")
        owner = access.current_user().name
        for entry in runs.values():
            self._import_run(entry, source, owner)
        return self.save(replace(book, id=new_id(), owner=owner, shared=False))

    def _imported(self, owner: str) -> Path:
        """Where results that came with ``owner``'s imported bundles are kept."""
        return self.root / "imported" if owner == "local" else self.root / "imported" / owner

    def _import_run(self, entry: Any, source: str, owner: str) -> None:
        import base64

        record = entry.get("record") if isinstance(entry, dict) else None
        run_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f]{16}", run_id):
            raise NotebookError(f"{source} holds a run with a bad id.")
        folder = self._imported(owner)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / f"{run_id}.record.json", record, f"imported run {run_id}")
        if isinstance(entry.get("result"), dict):
            atomic_write_json(folder / f"{run_id}.json", entry["result"], f"imported run {run_id}")
        elif isinstance(entry.get("result_npz"), str):
            from engine.files import atomic_write_bytes

            raw = base64.b64decode(entry["result_npz"], validate=True)
            atomic_write_bytes(folder / f"{run_id}.npz", raw, f"imported run {run_id}")

    def imported_result(self, run_id: str, owner: str = "local") -> Path | None:
        """The file of a run that came with a bundle ``owner`` imported (None when none)."""
        if not re.fullmatch(r"[0-9a-f]{16}", run_id or ""):
            return None
        for suffix in (".json", ".npz"):
            path = self._imported(owner) / f"{run_id}{suffix}"
            if path.is_file():
                return path
        return None

    # --- changes (each under the notebook's lock, re-reading the file first) ---------------

    def update(self, notebook_id: str, change) -> Notebook:
        """Apply ``change(notebook) -> notebook`` atomically with respect to other writers."""
        with self._lock(notebook_id):
            book = self.get(notebook_id)
            check_writable(book)
            return self.save(change(book))

    def rename(self, notebook_id: str, name: str) -> Notebook:
        name = _text(name, "The notebook's name").strip()
        if not name:
            raise InputError("Give the notebook a name.")
        return self.update(notebook_id, lambda b: replace(b, name=name[:200]))

    def duplicate(self, notebook_id: str, name: str | None = None) -> Notebook:
        """An editable copy (also what "fork" of a shared snapshot does)."""
        access.require("notebooks.write")
        book = self.get(notebook_id)
        copy = replace(
            book,
            id=new_id(),
            name=name or f"{book.name} (copy)",
            forked_from=book.id,
            owner=access.current_user().name,
            shared=False,
        )
        return self.save(copy)

    def add_cell(
        self,
        notebook_id: str,
        kind: str,
        spec: dict,
        refs: dict[str, Ref] | None = None,
        after: str | None = None,
        run_id: str | None = None,
        outputs: dict | None = None,
        status: str = "new",
    ) -> Cell:
        if kind not in KINDS:
            raise InputError(f"Unknown cell kind {kind!r}: use one of {', '.join(KINDS)}.")
        cell = Cell(
            new_id(),
            kind,
            _check_spec(kind, dict(spec)),
            dict(refs or {}),
            run_id,
            status,
            outputs=dict(outputs or {}),
        )

        def change(book: Notebook) -> Notebook:
            if len(book.cells) >= MAX_CELLS:
                raise InputError(f"A notebook holds at most {MAX_CELLS} cells.")
            cells = list(book.cells)
            at = book.index(after) + 1 if after else len(cells)
            for key, ref in cell.refs.items():
                if ref.cell not in [c.id for c in cells[:at]]:
                    raise InputError(f"{key!r} must refer to a cell above the new one.")
                _check_output(book.cell(ref.cell), ref.output)
            cells.insert(at, cell)
            return replace(book, cells=tuple(cells))

        self.update(notebook_id, change)
        return cell

    def edit_cell(
        self, notebook_id: str, cell_id: str, spec: dict, refs: dict[str, Ref] | None = None
    ) -> Notebook:
        """Change a cell's spec (and refs); it and every cell depending on it become stale."""

        def change(book: Notebook) -> Notebook:
            old = book.cell(cell_id)
            new_refs = old.refs if refs is None else dict(refs)
            above = [c.id for c in book.cells[: book.index(cell_id)]]
            for key, ref in new_refs.items():
                if ref.cell not in above:
                    raise InputError(f"{key!r} must refer to a cell above this one.")
            edited = replace(
                old,
                spec=_check_spec(old.kind, dict(spec)),
                refs=new_refs,
                stale=old.run_id is not None,
                updated=time.time(),
            )
            return _mark_stale(_replace_cell(book, edited), cell_id)

        return self.update(notebook_id, change)

    def record_run(
        self,
        notebook_id: str,
        cell_id: str,
        run_id: str | None,
        status: str,
        error: str | None = None,
        outputs: dict | None = None,
        spec: dict | None = None,
    ) -> Notebook:
        """A cell's run ended: keep its ledger id and outputs; dependents become stale."""

        def change(book: Notebook) -> Notebook:
            cell = book.cell(cell_id)
            done = replace(
                cell,
                run_id=run_id if status == "done" else cell.run_id,
                status=status,
                error=error,
                stale=False if status == "done" else cell.stale,
                outputs=dict(outputs or {}) if status == "done" else cell.outputs,
                spec=spec if spec is not None else cell.spec,
                updated=time.time(),
            )
            book = _replace_cell(book, done)
            return _mark_stale(book, cell_id) if status == "done" else book

        return self.update(notebook_id, change)

    def move_cell(self, notebook_id: str, cell_id: str, step: int) -> Notebook:
        """Move a cell up (-1) or down (+1); refused when it would sit above a cell it uses."""

        def change(book: Notebook) -> Notebook:
            cells = list(book.cells)
            i = book.index(cell_id)
            j = i + step
            if not 0 <= j < len(cells):
                return book
            cells[i], cells[j] = cells[j], cells[i]
            moved = replace(book, cells=tuple(cells))
            try:
                notebook_from_dict(moved.to_dict())
            except NotebookError as exc:
                raise InputError(
                    "That move would put a cell above a cell whose output it uses."
                ) from exc
            return moved

        return self.update(notebook_id, change)

    def delete_cell(self, notebook_id: str, cell_id: str) -> Notebook:
        def change(book: Notebook) -> Notebook:
            users = [c for c in book.cells if any(r.cell == cell_id for r in c.refs.values())]
            if users:
                positions = ", ".join(str(book.index(c.id) + 1) for c in users)
                raise InputError(
                    f"Cell {book.index(cell_id) + 1} is used by cell(s) {positions}: "
                    "change or delete those first."
                )
            return replace(book, cells=tuple(c for c in book.cells if c.id != cell_id))

        return self.update(notebook_id, change)

    def duplicate_cell(self, notebook_id: str, cell_id: str) -> Cell:
        book = self.get(notebook_id)
        cell = book.cell(cell_id)
        return self.add_cell(
            notebook_id,
            cell.kind,
            cell.spec,
            cell.refs,
            after=cell_id,
            run_id=cell.run_id,
            outputs=cell.outputs,
            status=cell.status,
        )


def _check_output(cell: Cell, output: str) -> None:
    offered = OUTPUTS.get(cell.kind, {})
    if output not in offered:
        names = ", ".join(offered) or "none"
        raise InputError(f"A {cell.kind} cell offers no output {output!r} (it offers: {names}).")


def _replace_cell(book: Notebook, cell: Cell) -> Notebook:
    return replace(book, cells=tuple(cell if c.id == cell.id else c for c in book.cells))


def _mark_stale(book: Notebook, cell_id: str) -> Notebook:
    stale = set(book.dependents(cell_id))
    return replace(
        book,
        cells=tuple(
            replace(c, stale=True) if c.id in stale and c.run_id else c for c in book.cells
        ),
    )


def resolve_spec(book: Notebook, cell: Cell) -> dict:
    """The cell's spec with every reference replaced by the referenced cell's output.

    ``InputError`` when an upstream cell has not run yet (run it first).
    """
    spec = dict(cell.spec)
    for key, ref in cell.refs.items():
        source = book.cell(ref.cell)
        if ref.output not in source.outputs:
            raise InputError(
                f"Cell {book.index(source.id) + 1} has no {ref.output!r} yet: run it first."
            )
        spec[key] = source.outputs[ref.output]
    return spec


def iter_runnable(book: Notebook) -> Iterator[Cell]:
    """Cells Run all goes through, in order (markdown notes are skipped)."""
    return (c for c in book.cells if c.kind != "markdown")


def example(store: NotebookStore, model: str = "smollm2-135m") -> Notebook:
    """A ready notebook for a first look: a note, a greedy generation, the attention on its
    output and an explanation of its answer (nothing run yet)."""
    book = store.create("Why does the model say Paris?")
    store.add_cell(
        book.id,
        "markdown",
        {
            "text": "### Why does the model say *Paris*?\n"
            "Run all: the model continues a sentence, then we look at where its attention "
            "goes and which words made it answer the way it did."
        },
    )
    gen = store.add_cell(
        book.id,
        "generate",
        {
            "model": model,
            "prompt": "The Eiffel Tower is located in the city of",
            "settings": {"max_new_tokens": 4, "greedy": True},
        },
    )
    store.add_cell(book.id, "attention", {"model": model}, refs={"text": Ref(gen.id, "full_text")})
    store.add_cell(
        book.id,
        "explain",
        {"model": model, "methods": ["integrated_gradients"], "faithfulness": True},
        refs={"text": Ref(gen.id, "prompt"), "target": Ref(gen.id, "text")},
    )
    return store.get(book.id)
