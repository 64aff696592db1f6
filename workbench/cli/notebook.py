"""``workbench notebook list|new|run|export|import``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from engine.errors import InputError
from workbench.cli.common import open_workbench, print_json, writable_output


def list_notebooks(args, _extra) -> int:
    from engine.notebooks import NotebookStore
    from engine.store import workbench_home

    infos = NotebookStore(workbench_home()).list()
    if args.json:
        print_json([vars(i) for i in infos])
        return 0
    print(f"{'ID':12}  {'UPDATED':19}  {'CELLS':5}  NAME")
    for i in infos:
        when = dt.datetime.fromtimestamp(i.updated).strftime("%Y-%m-%d %H:%M:%S")
        name = f"{i.name}  (DAMAGED: {i.damaged})" if i.damaged else i.name
        print(f"{i.id:12}  {when}  {i.cells:5}  {name}")
    return 0


def new(args, _extra) -> int:
    from engine.notebooks import cells_from_runs

    wb = open_workbench()
    book = wb.notebooks.create(args.name)
    if args.from_runs:
        book = cells_from_runs(wb, book.id, args.from_runs)
    print(f"created notebook {book.id} ({book.name!r}, {len(book.cells)} cells)")
    return 0


def run(args, _extra) -> int:
    from engine.notebooks import wait_all

    wb = open_workbench()
    book = wb.notebooks.find(args.name)
    try:
        wait_all(wb, book.id)
    finally:
        book = wb.notebooks.get(book.id)
        for position, cell in enumerate(book.cells, 1):
            if cell.kind != "markdown":
                note = f" — {cell.error}" if cell.error else ""
                print(f"cell {position} ({cell.kind}): {cell.status}{note}")
    return 0


def export(args, _extra) -> int:
    from engine.files import atomic_write_text
    from engine.notebooks import export as exporter

    out = writable_output(args.out)
    wb = open_workbench()
    book = wb.notebooks.find(args.name)
    if args.format == "json":
        text = json.dumps(exporter.bundle(book, wb.ledger), ensure_ascii=False)
    elif args.format == "ipynb":
        text = exporter.to_ipynb(book, wb.ledger)
    else:
        verdicts = None
        if args.verify:
            from engine.notebooks import start_reproduce_all

            verdicts = start_reproduce_all(wb, book.id).wait()
        text = exporter.to_html(book, wb.ledger, wb, verdicts)
    atomic_write_text(out, text, str(out))
    print(f"wrote {out}")
    return 0


def import_(args, _extra) -> int:
    from engine.files import read_json_file
    from engine.notebooks import NotebookStore
    from engine.store import workbench_home

    path = Path(args.file)
    data = read_json_file(path, "a notebook bundle exported with `workbench notebook export`")
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON notebook bundle.")
    book = NotebookStore(workbench_home()).import_dict(data, str(path))
    print(f"imported notebook {book.id} ({book.name!r}, {len(book.cells)} cells)")
    return 0


def register(sub) -> None:
    nb = sub.add_parser("notebook", help="notebooks: list, new, run, export, import")
    actions = nb.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every notebook, most recent first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=list_notebooks)
    create = actions.add_parser("new", help="a new notebook (optionally from recorded runs)")
    create.add_argument("name")
    create.add_argument("--from-runs", nargs="+", metavar="RUN_ID", help="cells from these runs")
    create.set_defaults(func=new)
    go = actions.add_parser("run", help="run every cell top to bottom")
    go.add_argument("name", help="the notebook's name or id")
    go.set_defaults(func=run)
    out = actions.add_parser("export", help="export to JSON, .ipynb or an HTML audit report")
    out.add_argument("name", help="the notebook's name or id")
    out.add_argument("--format", choices=("json", "ipynb", "html"), required=True)
    out.add_argument("--out", required=True, type=Path)
    out.add_argument(
        "--verify", action="store_true", help="html: re-run every cell and include the verdicts"
    )
    out.set_defaults(func=export)
    imp = actions.add_parser("import", help="import a JSON bundle as a new notebook")
    imp.add_argument("file")
    imp.set_defaults(func=import_)
