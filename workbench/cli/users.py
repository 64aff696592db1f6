"""``workbench users add|list|remove``: built-in accounts (placeholder until the auth module lands)."""

from __future__ import annotations


def register(sub) -> None:
    sub.add_parser("users", help="manage built-in accounts (add, list, remove)")
