"""``workbench keys create|list|revoke``: API keys for the HTTP API.

A key acts as its user (with that user's current role); the secret is printed once. The
command acts as the local admin, like ``workbench users``.
"""

from __future__ import annotations

import datetime as dt

from workbench.cli.common import print_json


def _keys():
    from engine.auth import ApiKeys
    from engine.store import workbench_home

    return ApiKeys(workbench_home())


def _as_admin():
    from engine.access import LOCAL, acting_as

    return acting_as(LOCAL)


def create(args, _extra) -> int:
    with _as_admin():
        key_id, secret = _keys().create(args.user)
    if args.json:
        print_json({"id": key_id, "user": args.user, "secret": secret})
        return 0
    print(f"key {key_id} for {args.user}")
    print(f"secret: {secret}")
    print("(shown once: store it now; send it as 'Authorization: Bearer <secret>')")
    return 0


def list_keys(args, _extra) -> int:
    with _as_admin():
        keys = _keys().list(args.user)
    if args.json:
        print_json([k.__dict__ for k in keys])
        return 0
    if not keys:
        print("no API keys" + (f" for {args.user}" if args.user else ""))
        return 0
    print(f"{'ID':18} {'USER':24} {'CREATED':19}  STATE")
    for k in keys:
        when = dt.datetime.fromtimestamp(k.created).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{k.id:18} {k.user:24} {when}  {'revoked' if k.revoked else 'active'}")
    return 0


def revoke(args, _extra) -> int:
    with _as_admin():
        _keys().revoke(args.key_id)
    print(f"revoked {args.key_id}")
    return 0


def register(sub) -> None:
    keys = sub.add_parser(
        "keys",
        help="manage API keys (create, list, revoke)",
        description="API keys for the workbench HTTP API; each acts as one user.",
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("create", help="create a key for a user (secret shown once)")
    p.add_argument("--user", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=create)

    p = actions.add_parser("list", help="list keys (never their secrets)")
    p.add_argument("--user")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_keys)

    p = actions.add_parser("revoke", help="revoke a key")
    p.add_argument("key_id")
    p.set_defaults(func=revoke)
