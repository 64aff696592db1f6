"""API keys for the HTTP API: one user each, shown once, stored as sha256.

    key_id, secret = ApiKeys(home).create("ana")   # secret: "wb-" + 43 URL-safe characters
    ApiKeys(home).verify(secret)                   # -> User("ana", <current role>) | None

A key acts as its user with the user's current role; removing or disabling the user, or
revoking the key, makes ``verify`` return None at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine import access
from engine.access import User
from engine.auth._db import connect
from engine.errors import InputError

PREFIX = "wb-"
MAX_SECRET = 256


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key as listed (never its secret or hash). ``created``: unix seconds."""

    id: str
    user: str
    created: float
    revoked: bool


class ApiKeys:
    """API keys of one workbench home.

    Creating a key for oneself needs only an account; for another user, ``users.manage``.
    Listing or revoking others' keys likewise. ``verify`` needs no permission.
    """

    def __init__(self, home: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.home = Path(home).expanduser()
        self.clock = clock

    def create(self, user_name: str) -> tuple[str, str]:
        """A new key for the account ``user_name``: ``(key_id, secret)``; the secret is
        returned only here."""
        _require_for(user_name)
        key_id = "key-" + secrets.token_hex(6)
        secret = PREFIX + secrets.token_urlsafe(32)
        with connect(self.home) as db:
            if not db.execute("SELECT 1 FROM users WHERE name = ?", (user_name,)).fetchone():
                raise InputError(
                    f"No user {user_name!r}: add one with `workbench users add NAME --role ROLE`."
                )
            db.execute(
                "INSERT INTO api_keys (id, user, hash, created) VALUES (?, ?, ?, ?)",
                (key_id, user_name, secret_hash(secret), self.clock()),
            )
        return key_id, secret

    def verify(self, secret: str | None) -> User | None:
        """The user a key acts as (current role), or None for an unknown, revoked or
        malformed key, or a removed or disabled user.

        The lookup is by the sha256 of the secret (a 256-bit random string, so the index
        leaks nothing useful); the stored hash is then compared in constant time.
        """
        if not isinstance(secret, str) or not secret.startswith(PREFIX):
            return None
        if len(secret) > MAX_SECRET:
            return None
        digest = secret_hash(secret)
        with connect(self.home, write=False) as db:
            row = db.execute(
                "SELECT k.hash, u.name, u.role FROM api_keys k JOIN users u ON u.name = k.user "
                "WHERE k.hash = ? AND k.revoked = 0 AND u.disabled = 0",
                (digest,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return User(row[1], row[2])

    def list(self, user: str | None = None) -> list[ApiKey]:
        """Keys of ``user`` (default: every user's, which needs ``users.manage``)."""
        if user is None:
            access.require("users.manage")
        else:
            _require_for(user)
        query = "SELECT id, user, created, revoked FROM api_keys"
        args: tuple = ()
        if user is not None:
            query, args = query + " WHERE user = ?", (user,)
        with connect(self.home, write=False) as db:
            rows = db.execute(query + " ORDER BY created, id", args).fetchall()
        return [ApiKey(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def revoke(self, key_id: str) -> None:
        """Revoke a key (its owner, or a user manager)."""
        with connect(self.home) as db:
            row = db.execute("SELECT user FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise InputError(f"No API key {key_id!r}: see `workbench keys list`.")
            _require_for(row[0])
            db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,))


def _require_for(owner: str) -> None:
    """Acting on ``owner``'s keys: oneself, or someone who may manage users."""
    if access.current_user().name != owner:
        access.require("users.manage")
