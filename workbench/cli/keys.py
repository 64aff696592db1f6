"""``workbench keys create|list|revoke``: API keys (placeholder until the auth module lands)."""

from __future__ import annotations


def register(sub) -> None:
    sub.add_parser("keys", help="manage API keys (create, list, revoke)")
