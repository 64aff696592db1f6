"""``workbench users add|list|remove|set-role|set-password|disable|enable``: built-in accounts.

Accounts live in ``$WORKBENCH_HOME/auth.db``. Whoever can run this command on the server owns
that folder, so the command acts as the local admin.
"""

from __future__ import annotations

import datetime as dt
import getpass
import secrets
import sys

from engine.errors import InputError
from workbench.cli.common import print_json


def _store():
    from engine.auth import UserStore
    from engine.store import workbench_home

    return UserStore(workbench_home())


def _as_admin():
    from engine.access import LOCAL, acting_as

    return acting_as(LOCAL)


def _password(args) -> tuple[str | None, bool]:
    """The new password and whether it was generated (then printed once)."""
    if args.generate_password:
        return secrets.token_urlsafe(12), True
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n"), False
    if getattr(args, "oidc", None) and not sys.stdin.isatty():
        return None, False  # an OIDC-only account from a script
    if not sys.stdin.isatty():
        raise InputError(
            "No terminal for the password prompt: pass --password-stdin (and pipe the "
            "password) or --generate-password."
        )
    first = getpass.getpass("Password (at least 8 characters): ")
    if not first and getattr(args, "oidc", None):
        return None, False
    second = getpass.getpass("Repeat the password: ")
    if first != second:
        raise InputError("The two passwords differ: try again.")
    return first, False


def add(args, _extra) -> int:
    password, generated = _password(args)
    with _as_admin():
        user = _store().add(args.name, args.role, password, identity=args.oidc)
    print(
        f"added {user.name} ({user.role})" + (f", OIDC identity {args.oidc}" if args.oidc else "")
    )
    if generated:
        print(f"password: {password}  (shown once: hand it over now)")
    return 0


def _when(created: float) -> str:
    return dt.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S")


def list_users(args, _extra) -> int:
    with _as_admin():
        users = _store().list()
    if args.json:
        print_json(
            [
                {
                    "name": u.name,
                    "role": u.role,
                    "created": u.created,
                    "disabled": u.disabled,
                    "password": u.has_password,
                    "oidc": u.identity,
                }
                for u in users
            ]
        )
        return 0
    if not users:
        print("no users yet: add one with `workbench users add NAME --role admin`")
        return 0
    print(f"{'NAME':24} {'ROLE':10} {'CREATED':19}  NOTE")
    for u in users:
        note = ", ".join(
            n
            for n in ("disabled" if u.disabled else "", f"oidc {u.identity}" if u.identity else "")
            if n
        )
        print(f"{u.name:24} {u.role:10} {_when(u.created)}  {note}")
    return 0


def remove(args, _extra) -> int:
    with _as_admin():
        _store().remove(args.name)
    print(f"removed {args.name} (its sessions and API keys no longer work)")
    return 0


def set_role(args, _extra) -> int:
    with _as_admin():
        _store().set_role(args.name, args.role)
    print(f"{args.name} is now {args.role} (open sessions and keys too)")
    return 0


def set_password(args, _extra) -> int:
    password, generated = _password(args)
    if password is None:
        raise InputError("Give the new password (prompt, --password-stdin or --generate-password).")
    with _as_admin():
        _store().set_password(args.name, password)
    print(f"password of {args.name} changed (its open sessions ended)")
    if generated:
        print(f"password: {password}  (shown once: hand it over now)")
    return 0


def disable(args, _extra) -> int:
    with _as_admin():
        _store().set_disabled(args.name, args.action == "disable")
    print(f"{args.name} {args.action}d")
    return 0


def _password_flags(parser) -> None:
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--password-stdin", action="store_true", help="read the password from one stdin line"
    )
    how.add_argument(
        "--generate-password", action="store_true", help="make a random password, print it once"
    )


def register(sub) -> None:
    from engine.access import ROLES

    users = sub.add_parser(
        "users",
        help="manage built-in accounts (add, list, remove, set-role)",
        description="Built-in accounts for logging in to a served workbench.",
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("add", help="add an account (password prompted twice)")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument(
        "--oidc", metavar="EMAIL", help="link an OIDC identity (email or subject) to this account"
    )
    _password_flags(p)
    p.set_defaults(func=add)

    p = actions.add_parser("list", help="list accounts (name, role, created)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_users)

    p = actions.add_parser("remove", help="remove an account, its sessions and API keys")
    p.add_argument("name")
    p.set_defaults(func=remove)

    p = actions.add_parser("set-role", help="change an account's role")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    p.set_defaults(func=set_role)

    p = actions.add_parser("set-password", help="change an account's password")
    p.add_argument("name")
    _password_flags(p)
    p.set_defaults(func=set_password)

    for action in ("disable", "enable"):
        p = actions.add_parser(action, help=f"{action} an account (keeps its data)")
        p.add_argument("name")
        p.set_defaults(func=disable)
