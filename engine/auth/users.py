"""Built-in accounts: names, roles and argon2id password hashes in ``HOME/auth.db``.

Logging in is rate-limited (``MAX_FAILURES`` wrong passwords per name, ``MAX_CLIENT_FAILURES``
per client address (higher: a class behind one NAT address shares it), within ``WINDOW_S``; then ``LimitError`` with ``retry_after_s``) and costs the same for a name that
does not exist (its password is checked against a dummy hash), so neither the answer nor its
timing tells an attacker which names exist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from engine import access
from engine.access import ROLES, LimitError, User
from engine.auth._db import connect
from engine.errors import InputError
from engine.names import name_problem

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 takes any length; a cap keeps a hostile request cheap
MAX_FAILURES = 5  # per name
MAX_CLIENT_FAILURES = 20  # per client address, over all names
WINDOW_S = 300.0
MAX_KEY = 200  # characters of a name or client kept in the attempts table
WRONG = "Wrong name or password."

_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (argon2-cffi's default)
_DUMMY: list[str] = []
_DUMMY_LOCK = threading.Lock()


def _dummy_hash() -> str:
    """A hash of a random password, made once per process, for unknown names."""
    with _DUMMY_LOCK:
        if not _DUMMY:
            import secrets

            _DUMMY.append(_HASHER.hash(secrets.token_urlsafe(16)))
        return _DUMMY[0]


@dataclass(frozen=True)
class StoredUser:
    """One account as listed (never its hash). ``created``: unix seconds."""

    name: str
    role: str
    created: float
    disabled: bool
    has_password: bool
    identity: str | None

    def to_user(self) -> User:
        return User(self.name, self.role)  # type: ignore[arg-type]


def validate_user_name(name: object) -> str:
    """``name`` if it is a valid account name (the store-name rule), else ``InputError``."""
    problem = name_problem(name)
    if problem is not None:
        shown = repr(name)[:40] if isinstance(name, str) else type(name).__name__
        problem = problem.replace("model name", "user name")
        raise InputError(f"Invalid user name {shown}: {problem}.")
    return name  # type: ignore[return-value]


def validate_role(role: object) -> str:
    if role not in ROLES:
        raise InputError(f"Unknown role {role!r}: choose one of {', '.join(ROLES)}.")
    return role  # type: ignore[return-value]


def _check_password(password: object) -> str:
    if not isinstance(password, str):
        raise InputError("The password must be text.")
    if len(password) < MIN_PASSWORD:
        raise InputError(f"The password is too short: use at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD:
        raise InputError(f"The password is too long: use at most {MAX_PASSWORD} characters.")
    return password


class UserStore:
    """The built-in accounts of one workbench home (``HOME/auth.db``).

    Managing accounts (add, remove, set_role, set_password, disable, list) requires the
    acting user to have ``users.manage`` (the CLI acts as the local admin); ``authenticate``,
    ``get`` and ``count`` do not.

    ``clock``: unix seconds (tests inject one to move time).
    """

    def __init__(self, home: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.home = Path(home).expanduser()
        self.clock = clock

    # --- managing ------------------------------------------------------------------------

    def add(
        self, name: str, role: str, password: str | None, *, identity: str | None = None
    ) -> User:
        """Create an account. ``password`` (>= 8 characters) may be None only for an account
        reached through OIDC, when ``identity`` (the provider's email or subject) is given."""
        access.require("users.manage")
        validate_user_name(name)
        validate_role(role)
        if password is None and not identity:
            raise InputError("Give a password (at least 8 characters) or an OIDC identity.")
        hashed = None if password is None else _HASHER.hash(_check_password(password))
        identity = _clean_identity(identity)
        with connect(self.home) as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise InputError(f"User {name!r} already exists: pick another name.")
            if (
                identity
                and db.execute("SELECT 1 FROM users WHERE identity = ?", (identity,)).fetchone()
            ):
                raise InputError(f"The identity {identity!r} already belongs to another user.")
            db.execute(
                "INSERT INTO users (name, role, hash, identity, created) VALUES (?, ?, ?, ?, ?)",
                (name, role, hashed, identity, self.clock()),
            )
        return User(name, role)  # type: ignore[arg-type]

    def remove(self, name: str) -> None:
        """Delete an account with its login sessions and API keys."""
        access.require("users.manage")
        with connect(self.home) as db:
            if not db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount:
                raise InputError(f"No user {name!r}: see `workbench users list`.")
            db.execute("DELETE FROM sessions WHERE user = ?", (name,))
            db.execute("DELETE FROM api_keys WHERE user = ?", (name,))

    def set_role(self, name: str, role: str) -> User:
        """Change a role; it applies to open sessions and API keys at once."""
        access.require("users.manage")
        validate_role(role)
        self._update(name, "role = ?", (role,))
        return User(name, role)  # type: ignore[arg-type]

    def set_password(self, name: str, password: str) -> None:
        """Replace a password; the account's open login sessions end."""
        access.require("users.manage")
        hashed = _HASHER.hash(_check_password(password))
        self._update(name, "hash = ?", (hashed,))
        with connect(self.home) as db:
            db.execute("DELETE FROM sessions WHERE user = ?", (name,))

    def set_disabled(self, name: str, disabled: bool = True) -> None:
        """Disable (or enable) an account: while disabled, its sessions and keys do nothing."""
        access.require("users.manage")
        self._update(name, "disabled = ?", (int(disabled),))

    def _update(self, name: str, assignment: str, values: tuple) -> None:
        with connect(self.home) as db:
            cursor = db.execute(f"UPDATE users SET {assignment} WHERE name = ?", (*values, name))
            if not cursor.rowcount:
                raise InputError(f"No user {name!r}: see `workbench users list`.")

    def list(self) -> list[StoredUser]:
        """Every account, by name (never a hash)."""
        access.require("users.manage")
        with connect(self.home, write=False) as db:
            rows = db.execute(
                "SELECT name, role, created, disabled, hash IS NOT NULL, identity FROM users "
                "ORDER BY name"
            ).fetchall()
        return [StoredUser(r[0], r[1], r[2], bool(r[3]), bool(r[4]), r[5]) for r in rows]

    # --- reading -------------------------------------------------------------------------

    def count(self) -> int:
        """How many enabled accounts exist (``workbench serve`` checks login is possible)."""
        if not (self.home / "auth.db").is_file():
            return 0
        with connect(self.home, write=False) as db:
            return db.execute("SELECT COUNT(*) FROM users WHERE disabled = 0").fetchone()[0]

    def get(self, name: str) -> User | None:
        """The enabled account ``name`` as a ``User`` (its current role), or None."""
        with connect(self.home, write=False) as db:
            row = db.execute(
                "SELECT role FROM users WHERE name = ? AND disabled = 0", (name,)
            ).fetchone()
        return None if row is None else User(name, row[0])

    def for_identity(self, *identities: str | None) -> User | None:
        """The enabled account mapped to the first of ``identities`` (OIDC email, subject)
        that has one, or None."""
        with connect(self.home, write=False) as db:
            for identity in identities:
                identity = _clean_identity(identity)
                if not identity:
                    continue
                row = db.execute(
                    "SELECT name, role FROM users WHERE identity = ? AND disabled = 0",
                    (identity,),
                ).fetchone()
                if row is not None:
                    return User(row[0], row[1])
        return None

    def identity_disabled(self, *identities: str | None) -> bool:
        """True when one of ``identities`` is linked to a disabled account."""
        wanted = [i for i in map(_clean_identity, identities) if i]
        if not wanted:
            return False
        with connect(self.home, write=False) as db:
            marks = ",".join("?" * len(wanted))
            row = db.execute(
                f"SELECT 1 FROM users WHERE disabled = 1 AND identity IN ({marks})", wanted
            ).fetchone()
        return row is not None

    # --- logging in ----------------------------------------------------------------------

    def authenticate(self, name: str, password: str, client: str = "") -> User:
        """The account ``name`` if ``password`` is right.

        Raises ``InputError`` ("Wrong name or password.") for a wrong password, an unknown
        or disabled name alike, and ``LimitError`` (with ``retry_after_s``) after
        ``MAX_FAILURES`` failures for this name, or ``MAX_CLIENT_FAILURES`` for this client
        (an address), within
        ``WINDOW_S`` seconds. ``client`` "" counts only per name.
        """
        name = str(name)[:MAX_KEY]
        password = str(password)[: MAX_PASSWORD + 1]
        keys = [f"name:{name}"] + ([f"client:{str(client)[:MAX_KEY]}"] if client else [])
        now = self.clock()
        with connect(self.home) as db:
            db.execute("DELETE FROM attempts WHERE at <= ?", (now - WINDOW_S,))
            wait = self._retry_after(db, keys, now)
            row = None
            if wait is None:
                row = db.execute(
                    "SELECT role, hash, disabled FROM users WHERE name = ?", (name,)
                ).fetchone()
        if wait is not None:
            minutes = max(1, round(wait / 60))
            raise LimitError(
                f"Too many failed logins: wait about {minutes} minute{'s' * (minutes > 1)} "
                "and try again.",
                retry_after_s=wait,
            )
        stored = row[1] if row is not None and row[1] else None
        ok = _verify(stored or _dummy_hash(), password) and stored is not None and not row[2]
        with connect(self.home) as db:
            if ok:
                db.execute("DELETE FROM attempts WHERE key = ?", (keys[0],))
                if _HASHER.check_needs_rehash(stored):
                    db.execute(
                        "UPDATE users SET hash = ? WHERE name = ?", (_HASHER.hash(password), name)
                    )
            else:
                db.executemany(
                    "INSERT INTO attempts (key, at) VALUES (?, ?)", [(k, now) for k in keys]
                )
        if not ok:
            raise InputError(WRONG)
        return User(name, row[0])

    def _retry_after(self, db, keys: list[str], now: float) -> float | None:
        """Seconds until the oldest counted failure leaves the window, if a key is over."""
        wait = None
        for key in keys:
            limit = MAX_CLIENT_FAILURES if key.startswith("client:") else MAX_FAILURES
            times = [
                r[0]
                for r in db.execute(
                    "SELECT at FROM attempts WHERE key = ? AND at > ? ORDER BY at DESC LIMIT ?",
                    (key, now - WINDOW_S, limit),
                )
            ]
            if len(times) >= limit:
                # allowed again when the limit-th most recent failure leaves the window
                left = times[-1] + WINDOW_S - now
                wait = max(wait or 0.0, left)
        return wait


def _verify(hashed: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _clean_identity(identity: str | None) -> str | None:
    if identity is None:
        return None
    identity = str(identity).strip().lower()
    if not identity:
        return None
    if len(identity) > 320 or any(ord(c) < 32 for c in identity):
        raise InputError("An OIDC identity is an email or subject of at most 320 characters.")
    return identity
