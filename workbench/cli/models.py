"""``workbench models list|verify|remove``."""

from __future__ import annotations

from dataclasses import asdict

from workbench.cli.common import open_workbench, print_json


def list_models(args, _extra) -> int:
    entries = open_workbench().catalog()
    if args.json:
        print_json([asdict(e) for e in entries])
        return 0
    print(f"{'NAME':24} {'SOURCE':9} {'KIND':11} {'READY':6} DESCRIPTION")
    for e in entries:
        ready = "yes" if e.installed else "no"
        print(f"{e.name:24} {e.source:9} {e.kind:11} {ready:6} {e.description}")
    return 0


def verify(args, _extra) -> int:
    ok = open_workbench().store.verify(args.name)
    print(f"{args.name}: fingerprint {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def remove(args, _extra) -> int:
    open_workbench().store.remove(args.name)
    print(f"removed {args.name}")
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
    rm = actions.add_parser("remove", help="delete a store entry")
    rm.add_argument("name")
    rm.set_defaults(func=remove)
