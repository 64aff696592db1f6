"""``workbench history list|show|export|verify``: the run ledger from the command line.

Reads the ledger directly (no model, no torch import), so it answers at once.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from workbench.cli.common import print_json, writable_output


def _ledger():
    from engine.ledger import Ledger
    from engine.store import workbench_home

    return Ledger(workbench_home())


def _when(created: float) -> str:
    return dt.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S")


def list_runs(args, _extra) -> int:
    records = _ledger().records(kind=args.kind, model=args.model, text=args.text, limit=args.limit)
    if args.json:
        print_json([r.summary() for r in records])
        return 0
    print(f"{'ID':16}  {'WHEN':19}  {'KIND':11} {'STATUS':9} {'MODEL':22} INPUT")
    for r in records:
        text = " ".join((r.input_text or "").split())
        text = text[:40] + ("…" if len(text) > 40 else "")
        model = (r.model or "-")[-22:]
        print(f"{r.id:16}  {_when(r.created)}  {r.operation:11} {r.status:9} {model:22} {text}")
    return 0


def show(args, _extra) -> int:
    ledger = _ledger()
    record = ledger.get(args.run_id)
    if args.json:
        print_json(record.to_dict())
        return 0
    for key, value in record.to_dict().items():
        if key in ("spec", "versions", "input_ids"):
            value = json.dumps(value, ensure_ascii=False)
        print(f"{key:15} {value}")
    return 0


def export(args, _extra) -> int:
    """The record and its result in one JSON file (npz results are copied beside it)."""
    out = writable_output(args.out)
    ledger = _ledger()
    record = ledger.get(args.run_id)
    bundle: dict = {"record": record.to_dict(), "result": None, "result_file": None}
    stored = ledger.result_file(record)
    if stored is not None and stored.suffix == ".json":
        bundle["result"] = json.loads(stored.read_text())
    elif stored is not None:
        copy = out.with_suffix(stored.suffix)
        shutil.copyfile(stored, copy)
        bundle["result_file"] = copy.name
    from engine.files import atomic_write_json

    atomic_write_json(out, bundle, str(out))
    print(f"wrote {out}")
    return 0


def verify(args, _extra) -> int:
    report = _ledger().verify()
    if args.json:
        print_json(
            {
                "ok": report.ok,
                "checked": report.checked,
                "first_bad": report.first_bad,
                "problems": report.problems,
            }
        )
    elif report.ok:
        print(f"ledger OK: {report.checked} records, hash chain and result files intact")
    else:
        print(f"ledger NOT OK: first bad record {report.first_bad}")
        for problem in report.problems:
            print(f"  {problem}")
    return 0 if report.ok else 1


def register(sub) -> None:
    history = sub.add_parser("history", help="the run ledger: list, show, export, verify")
    actions = history.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="recorded runs, oldest first")
    listing.add_argument("--kind", help="only this operation (generate, attention, explain, …)")
    listing.add_argument("--model", help="only runs on this model")
    listing.add_argument("--text", help="only runs whose input contains this text")
    listing.add_argument("--limit", type=int, default=None, help="only the last N runs")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=list_runs)
    one = actions.add_parser("show", help="one run's full record")
    one.add_argument("run_id")
    one.add_argument("--json", action="store_true")
    one.set_defaults(func=show)
    out = actions.add_parser("export", help="a run's record and result as one JSON file")
    out.add_argument("run_id")
    out.add_argument("--out", required=True, type=Path)
    out.set_defaults(func=export)
    check = actions.add_parser("verify", help="check the hash chain and every result file")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=verify)
