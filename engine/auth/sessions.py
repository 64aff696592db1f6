"""Login sessions for built-in accounts: opaque random tokens that expire.

Only the token's sha256 is stored. ``user_for`` reads the account on every call, so removing
or disabling a user ends their sessions at once and a role change applies at once.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from engine.access import User
from engine.auth._db import connect
from engine.errors import InputError

DEFAULT_HOURS = 12.0


def session_hours() -> float:
    """Session lifetime in hours: ``WORKBENCH_SESSION_HOURS`` (default 12)."""
    raw = os.environ.get("WORKBENCH_SESSION_HOURS", "").strip()
    if not raw:
        return DEFAULT_HOURS
    try:
        hours = float(raw)
    except ValueError:
        hours = -1.0
    if not 0 < hours <= 24 * 366:
        raise InputError(
            f"WORKBENCH_SESSION_HOURS={raw!r} is not a number of hours between 0 and 8784."
        )
    return hours


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Sessions:
    """Login sessions of one workbench home. ``clock``: unix seconds (tests move it)."""

    def __init__(
        self,
        home: str | Path,
        clock: Callable[[], float] = time.time,
        hours: float | None = None,
    ) -> None:
        self.home = Path(home).expanduser()
        self.clock = clock
        self.hours = session_hours() if hours is None else hours

    def create(self, user: User) -> str:
        """A new session for ``user``: a 256-bit random token (43 URL-safe characters)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with connect(self.home) as db:
            db.execute("DELETE FROM sessions WHERE expires <= ? OR revoked = 1", (now,))
            db.execute(
                "INSERT INTO sessions (token_hash, user, created, expires) VALUES (?, ?, ?, ?)",
                (token_hash(token), user.name, now, now + self.hours * 3600),
            )
        return token

    def user_for(self, token: str | None) -> User | None:
        """The account behind ``token`` with its current role, or None when the token is
        unknown, expired or revoked, or the account was removed or disabled."""
        if not token or not isinstance(token, str) or len(token) > 256:
            return None
        with connect(self.home, write=False) as db:
            row = db.execute(
                "SELECT u.name, u.role FROM sessions s JOIN users u ON u.name = s.user "
                "WHERE s.token_hash = ? AND s.revoked = 0 AND s.expires > ? AND u.disabled = 0",
                (token_hash(token), self.clock()),
            ).fetchone()
        return None if row is None else User(row[0], row[1])

    def revoke(self, token: str | None) -> bool:
        """End a session (logging out). True when it existed."""
        if not token or not isinstance(token, str):
            return False
        with connect(self.home) as db:
            cursor = db.execute(
                "UPDATE sessions SET revoked = 1 WHERE token_hash = ?", (token_hash(token),)
            )
        return bool(cursor.rowcount)

    def revoke_user(self, name: str) -> int:
        """End every session of ``name``; how many there were."""
        with connect(self.home) as db:
            return db.execute("DELETE FROM sessions WHERE user = ?", (name,)).rowcount
