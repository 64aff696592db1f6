"""The one SQLite file behind users, sessions, API keys and login attempts.

WAL journal and a busy timeout make it safe for several processes (the served app, the CLI,
the HTTP API) at once; every call opens its own short-lived connection, so no connection is
shared between threads.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from engine.files import DiskError, disk_error

DB_NAME = "auth.db"
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash TEXT,                 -- argon2id; NULL for an OIDC-only account
    identity TEXT UNIQUE,      -- OIDC email or subject mapped to this account
    created REAL NOT NULL,     -- unix seconds
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,   -- sha256 hex of the token
    user TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,     -- sha256 hex of the secret
    created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys(user);
CREATE TABLE IF NOT EXISTS attempts (
    key TEXT NOT NULL,             -- "name:<name>" or "client:<client>"
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_key ON attempts(key, at);
"""

_READY: set[tuple[Path, int]] = set()  # (path, inode) whose schema exists
_READY_LOCK = threading.Lock()


def db_path(home: str | Path) -> Path:
    return Path(home).expanduser() / DB_NAME


def _open(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # owner-only from the start; SQLite gives the -wal and -shm files the same mode
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        return sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    except OSError as exc:
        raise disk_error(exc, f"the account database {path}") from None
    except sqlite3.Error as exc:
        raise _db_error(exc, path) from None


@contextlib.contextmanager
def connect(home: str | Path, *, write: bool = True) -> Iterator[sqlite3.Connection]:
    """A connection to ``HOME/auth.db`` (created on first use) inside one transaction.

    ``write``: take the write lock at once (``BEGIN IMMEDIATE``), so a read-then-write cannot
    interleave with another process; readers use a plain ``BEGIN``.
    """
    path = db_path(home)
    conn = _open(path)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            ready = (path, path.stat().st_ino)
        except OSError as exc:
            raise disk_error(exc, f"the account database {path}") from None
        with _READY_LOCK:
            fresh = ready not in _READY
        if fresh:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            with _READY_LOCK:
                _READY.add(ready)
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise _db_error(exc, path) from None
    finally:
        conn.close()


def _db_error(exc: sqlite3.Error, path: Path) -> DiskError:
    return DiskError(f"The account database {path} is unusable ({exc}); check the disk and retry.")
