"""``workbench models list|verify|remove``."""

from __future__ import annotations

from dataclasses import asdict

from engine.names import is_store_name, validate_name
from workbench.cli.common import open_workbench, print_json


def _rows(workbench) -> list[dict]:
    """Catalog entries plus damaged store entries (``damaged``: the one-line reason, or None).

    A damaged entry never hides the others: the listing goes on and says what to do.
    """
    rows = [{**asdict(e), "damaged": None} for e in workbench.catalog()]
    by_name = {r["name"]: r for r in rows}
    for bad in workbench.store.damaged():
        if bad.name in by_name:  # an embedded alias whose converted copy is damaged
            by_name[bad.name]["damaged"] = bad.reason
            continue
        rows.append(
            {
                "name": bad.name,
                "source": "store",
                "kind": "unknown",
                "description": "damaged",
                "installed": False,
                "in_store": True,
                "loaded": False,
                "damaged": bad.reason,
            }
        )
    return rows


def list_models(args, _extra) -> int:
    rows = _rows(open_workbench())
    if args.json:
        print_json(rows)
        return 0
    print(f"{'NAME':24} {'SOURCE':9} {'KIND':11} {'READY':6} DESCRIPTION")
    for r in rows:
        name = r["name"] if is_store_name(r["name"]) else repr(r["name"])
        ready = "yes" if r["installed"] and not r["damaged"] else "no"
        note = f"DAMAGED: {r['damaged']}" if r["damaged"] else r["description"]
        print(f"{name:24} {r['source']:9} {r['kind']:11} {ready:6} {note}")
    return 0


def verify(args, _extra) -> int:
    validate_name(args.name)
    ok = open_workbench().store.verify(args.name)
    print(f"{args.name}: fingerprint {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def remove(args, _extra) -> int:
    validate_name(args.name)
    open_workbench().store.remove(args.name)
    print(f"removed {args.name}")
    return 0


def prepare(args, _extra) -> int:
    """Convert the embedded models into the store now (set-up), so a first click answers fast."""
    import time

    from engine.catalog import EMBEDDED
    from engine.loading import materialize_embedded
    from workbench.cli.common import progress_printer

    store = open_workbench().store
    for alias in args.names or list(EMBEDDED):
        if alias not in EMBEDDED:
            from engine.errors import InputError

            raise InputError(f"{alias!r} is not an embedded model ({', '.join(EMBEDDED)}).")
        started = time.perf_counter()
        had = alias in store.names()
        materialize_embedded(alias, store, progress_printer)
        done = (
            "already in the store" if had else f"converted in {time.perf_counter() - started:.0f} s"
        )
        print(f"{alias}: {done}")
    return 0


def register(sub) -> None:
    models = sub.add_parser("models", help="list, verify or remove models")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="embedded and stored models")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=list_models)
    check = actions.add_parser("verify", help="recompute a store entry's sha256 fingerprint")
    check.add_argument("name")
    check.set_defaults(func=verify)
    prep = actions.add_parser(
        "prepare", help="convert the embedded models into the store (done by make run/test)"
    )
    prep.add_argument("names", nargs="*", help="embedded aliases (default: all)")
    prep.set_defaults(func=prepare)
    rm = actions.add_parser("remove", help="delete a store entry")
    rm.add_argument("name")
    rm.set_defaults(func=remove)
