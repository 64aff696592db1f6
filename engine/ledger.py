"""The run ledger: an append-only, tamper-evident record of every run.

One SQLite database under ``$WORKBENCH_HOME/ledger/`` (WAL, short transactions, a versioned
schema). Each record names the operation, the model and its weight fingerprint, the
tokenizer / chat-template hash, dtype, device, seed, settings, the input text and token ids,
library versions, duration, and a pointer to the stored result with the sha256 of that file.
Results are files next to the database (JSON, or npz for attention tensors), never blobs.

Tamper evidence: each record stores the hash of the record before it and its own hash over
all its fields (a hash chain). ``verify()`` recomputes the chain and every result file's sha256
and names the first record that does not match.

Crash safety (a process killed with -9 at any point of ``append``): the result is first written
to ``ledger/tmp/`` (fsynced), then, inside the write transaction that adds the record, renamed
to ``results/<id>.<ext>``: a recorded result file is always whole, never overwritten by a later
attempt with the same id, and a half-written one is never referenced. What a kill can leave is
a temporary file (removed when the next ``Ledger`` opens, once its writer is gone) or, in the
instant between the rename and the commit, the result file of a run that was not recorded:
``verify`` ignores it, a later ``append`` of that id replaces it, ``clean_leftovers`` removes it.

    ledger = Ledger(home)
    record = ledger.append(operation="generate", spec={...}, result=result, seconds=1.2)
    ledger.verify().ok
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import access
from engine.errors import EngineError, InputError
from engine.files import DiskError, atomic_write, disk_error
from engine.locks import host_tag, owner_alive, owner_tag

SCHEMA_VERSION = 1
GENESIS = "0" * 64
_COLUMNS = (
    "id",
    "created",
    "user",
    "operation",
    "status",
    "model",
    "fingerprint",
    "tokenizer_hash",
    "dtype",
    "device",
    "seed",
    "spec",
    "input_text",
    "input_ids",
    "versions",
    "seconds",
    "error",
    "result_path",
    "result_sha256",
    "prev_hash",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{c} {'REAL' if c in ('created', 'seconds') else 'TEXT'}" for c in _COLUMNS)},
    hash TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS runs_id ON runs (id);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
"""
# ledger/tmp/<pid>-<start>-<host>-<token>.part: a result being written by that process
_STAGED = re.compile(r"(?P<pid>\d+)-(?P<started>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}\.part")
# engine.files temporaries of older versions in results/: .NAME.PID-TOKEN.tmp
_OLD_TEMP = re.compile(r"\..+\.(?P<pid>\d+)-[0-9a-f]+\.tmp")
FOREIGN_TEMP_AGE_S = 3600.0  # a temporary whose writer cannot be checked: removed after this
# schema version -> statements that bring version - 1 up to it (none yet beyond the first)
_MIGRATIONS: dict[int, list[str]] = {}


class LedgerError(EngineError):
    """The ledger cannot be read or written (a clear message, never a raw sqlite error)."""


@dataclass(frozen=True)
class RunRecord:
    """One ledger record. ``spec`` is the request as plain data (settings, inputs);
    ``result_path`` is relative to the ledger folder (None when the run left no result)."""

    id: str
    created: float
    user: str
    operation: str
    status: str
    model: str | None
    fingerprint: str | None
    tokenizer_hash: str | None
    dtype: str | None
    device: str | None
    seed: int | None
    spec: dict
    input_text: str | None
    input_ids: list[int] | None
    versions: dict
    seconds: float | None
    error: str | None
    result_path: str | None
    result_sha256: str | None
    prev_hash: str
    hash: str
    seq: int = 0

    def summary(self) -> dict:
        """The short form ``history list --json`` prints."""
        return {
            "id": self.id,
            "kind": self.operation,
            "model": self.model,
            "created": self.created,
            "user": self.user,
            "status": self.status,
            "seconds": self.seconds,
            "input": (self.input_text or "")[:200],
        }

    def to_dict(self) -> dict:
        return {c: getattr(self, c) for c in (*_COLUMNS, "hash", "seq")}


@dataclass(frozen=True)
class VerifyReport:
    """``ok`` when every record's hash, chain link and result file check out."""

    ok: bool
    checked: int
    first_bad: str | None = None
    reason: str | None = None
    problems: list[str] = field(default_factory=list)


def max_result_bytes() -> int:
    """``WORKBENCH_LEDGER_MAX_RESULT_MB`` (default 256): larger tensors are not stored."""
    import os

    try:
        return int(float(os.environ.get("WORKBENCH_LEDGER_MAX_RESULT_MB", "256")) * 2**20)
    except ValueError:
        return 256 * 2**20


def canonical(value: Any) -> str:
    """Deterministic JSON for hashing (sorted keys, no spaces, no NaN surprises)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def record_hash(fields: dict) -> str:
    """sha256 over the previous hash and the record's fields (``fields`` includes prev_hash)."""
    return hashlib.sha256(canonical({c: fields.get(c) for c in _COLUMNS}).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain(value: Any) -> Any:
    """A JSON-able copy of a spec value (dataclasses, tuples, numpy scalars and arrays)."""
    from engine.results import _to_plain

    return json.loads(canonical(_to_plain(value)))


class Ledger:
    """The append-only run ledger of one ``WORKBENCH_HOME``; safe across threads and processes."""

    def __init__(self, home: str | Path) -> None:
        self.root = Path(home) / "ledger"
        self.results = self.root / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.staging = self.root / "tmp"
        self.staging.mkdir(exist_ok=True)
        self.path = self.root / "ledger.sqlite"
        with self._connect() as con:
            self._migrate(con)
        self._clean_staging()

    # --- connection and schema ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.row_factory = sqlite3.Row
            return con
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"The run ledger {self.path} cannot be opened ({exc}).") from exc

    def _migrate(self, con: sqlite3.Connection) -> None:
        try:
            con.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                con.execute(statement)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 1
            if version > SCHEMA_VERSION:
                con.execute("ROLLBACK")
                raise LedgerError(
                    f"The run ledger was written by a newer workbench (schema {version}, this "
                    f"one reads up to {SCHEMA_VERSION}): upgrade the workbench."
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(target, []):
                    con.execute(statement)
            con.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise LedgerError(f"The run ledger {self.path} is damaged ({exc}).") from exc

    # --- writing --------------------------------------------------------------------------

    def _result_writer(self, run_id: str, result: Any) -> tuple[Path, Callable[[Path], None]]:
        """Where ``result`` is kept (npz when it has ``save_npz``, else JSON) and how to write
        it into a given file."""
        too_big = getattr(result, "nbytes", 0) > max_result_bytes()
        if hasattr(result, "save_npz") and not too_big:

            def write_npz(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    result.save_npz(fh)

            return self.results / f"{run_id}.npz", write_npz
        if too_big and hasattr(result, "summary"):
            # tensors over the cap are not kept (a class's 1,024-token attention runs would
            # fill the disk); the record keeps everything else, and says so
            text = canonical({"type": "summary", "tensors_kept": False, **plain(result.summary())})
        elif hasattr(result, "to_json"):
            text = result.to_json()
        else:
            text = canonical(plain(result))
        return self.results / f"{run_id}.json", lambda tmp: tmp.write_text(text, encoding="utf-8")

    def store_result(self, run_id: str, result: Any) -> tuple[str, str] | tuple[None, None]:
        """Write ``result`` next to the ledger (npz when it has ``save_npz``, else JSON), in
        place, atomically. ``append`` does not use this: it renames a staged file under its
        write lock, so it never overwrites the file of a recorded run.

        Returns (path relative to the ledger folder, sha256 of the file).
        """
        if result is None:
            return None, None
        target, write = self._result_writer(run_id, result)
        atomic_write(target, write, f"the result of run {run_id}")
        return str(target.relative_to(self.root)), file_sha256(target)

    def _stage_result(self, run_id: str, result: Any) -> tuple[Path, Path, str] | None:
        """Write ``result`` whole into ``tmp/`` (flushed to disk): (staged file, its final
        place, sha256). A full disk raises a one-line ``DiskError`` and leaves nothing."""
        if result is None:
            return None
        target, write = self._result_writer(run_id, result)
        staged = self.staging / f"{owner_tag()}-{secrets.token_hex(4)}.part"
        what = f"the result of run {run_id}"
        try:
            write(staged)
            with open(staged, "rb+") as fh:
                os.fsync(fh.fileno())
            return staged, target, file_sha256(staged)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise disk_error(exc, what) from exc
        except BaseException as exc:
            staged.unlink(missing_ok=True)
            if isinstance(exc, RuntimeError) and ("write" in str(exc) or "basic_ios" in str(exc)):
                raise DiskError(f"Cannot write {what}: the disk may be full ({exc}).") from exc
            raise

    def _clean_staging(self) -> int:
        """Remove staged results whose writer process is gone (killed mid-append); returns how
        many. One from another host, or unreadable, goes only after an hour untouched."""
        removed = 0
        for path in self.staging.iterdir():
            match = _STAGED.fullmatch(path.name)
            if match is not None and match["host"] == host_tag():
                if owner_alive(int(match["pid"]), int(match["started"])):
                    continue
            elif time.time() - _mtime(path) < FOREIGN_TEMP_AGE_S:
                continue
            try:
                path.unlink()
                removed += 1
            except OSError:
                continue  # gone already, or not ours to remove
        return removed

    def clean_leftovers(self) -> int:
        """Remove what killed writers left: staged results (``tmp/``), temporary files of older
        versions in ``results/``, and result files no record points to (a kill between the
        rename and the commit). Holds the write lock while it looks, so no ``append`` is
        halfway; returns how many files were removed."""
        removed = self._clean_staging()
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            kept = {
                row[0]
                for row in con.execute("SELECT result_path FROM runs WHERE result_path IS NOT NULL")
            }
            for path in self.results.iterdir():
                old = _OLD_TEMP.fullmatch(path.name)
                if old is not None:
                    if _pid_alive(int(old["pid"])):
                        continue
                elif str(path.relative_to(self.root)) in kept or not path.is_file():
                    continue
                try:
                    path.unlink()
                    removed += 1
                except OSError:
                    continue
            con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise LedgerError(f"Cannot clean the run ledger ({exc}).") from exc
        finally:
            con.close()
        return removed

    def append(
        self,
        *,
        run_id: str,
        operation: str,
        spec: dict,
        status: str = "done",
        result: Any = None,
        seconds: float | None = None,
        error: str | None = None,
        user: str = "local",
        identity: dict | None = None,
        created: float | None = None,
    ) -> RunRecord:
        """Record one finished run; returns its record (with its place in the chain).

        ``identity``: model, fingerprint, tokenizer_hash, dtype, device, seed, versions (taken
        from the result's provenance when it has one and not given here).
        """
        identity = dict(identity or {})
        provenance = getattr(result, "provenance", None)
        if provenance is not None:
            for key in ("model", "fingerprint", "dtype", "device", "seed", "versions"):
                identity.setdefault(key, getattr(provenance, key, None))
        spec_plain = plain(spec)
        staged = self._stage_result(run_id, result)
        result_path = str(staged[1].relative_to(self.root)) if staged else None
        fields = {
            "id": run_id,
            "created": created if created is not None else time.time(),
            "user": user,
            "operation": operation,
            "status": status,
            "model": identity.get("model") or spec_plain.get("model"),
            "fingerprint": identity.get("fingerprint") or spec_plain.get("fingerprint"),
            "tokenizer_hash": identity.get("tokenizer_hash"),
            "dtype": identity.get("dtype"),
            "device": identity.get("device"),
            "seed": identity.get("seed"),
            "spec": spec_plain,
            "input_text": _input_text(spec_plain),
            "input_ids": spec_plain.get("input_ids") or _result_ids(result),
            "versions": identity.get("versions") or {},
            "seconds": seconds,
            "error": error,
            "result_path": result_path,
            "result_sha256": staged[2] if staged else None,
        }
        placed = False  # the staged result renamed into results/ (undone unless committed)
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")  # one writer at a time: the chain stays a chain
            if con.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                raise sqlite3.IntegrityError("UNIQUE constraint failed: runs.id")
            if staged:  # under the write lock: no other append of this id is halfway
                try:
                    os.replace(staged[0], staged[1])
                except OSError as exc:
                    raise disk_error(exc, f"the result of run {run_id}") from exc
                placed = True
            row = con.execute("SELECT hash FROM runs ORDER BY seq DESC LIMIT 1").fetchone()
            fields["prev_hash"] = row[0] if row else GENESIS
            digest = record_hash(fields)
            values = [
                canonical(fields[c]) if c in ("spec", "input_ids", "versions") else fields[c]
                for c in _COLUMNS
            ]
            cur = con.execute(
                f"INSERT INTO runs ({', '.join(_COLUMNS)}, hash) "
                f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})",
                (*values, digest),
            )
            con.execute("COMMIT")
            placed = False
            seq = int(cur.lastrowid or 0)
        except sqlite3.IntegrityError as exc:
            con.execute("ROLLBACK")
            raise InputError(f"Run {run_id} is already in the ledger.") from exc
        except sqlite3.DatabaseError as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise LedgerError(f"Cannot record run {run_id} in the ledger ({exc}).") from exc
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            if placed and staged:  # renamed but not recorded: no file without its record
                staged[1].unlink(missing_ok=True)
            if staged:
                staged[0].unlink(missing_ok=True)
            con.close()
        return RunRecord(**fields, hash=digest, seq=seq)

    # --- reading --------------------------------------------------------------------------

    def _rows(self, where: str = "", params: tuple = (), limit: int | None = None) -> list:
        sql = f"SELECT * FROM runs {where} ORDER BY seq"
        if limit is not None:
            sql = f"SELECT * FROM ({sql.replace('ORDER BY seq', 'ORDER BY seq DESC')} LIMIT {int(limit)}) ORDER BY seq"
        con = self._connect()
        try:
            return con.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"Cannot read the run ledger ({exc}).") from exc
        finally:
            con.close()

    def records(
        self,
        kind: str | None = None,
        model: str | None = None,
        text: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        user: str | None = None,
    ) -> list[RunRecord]:
        """Records oldest first, filtered by operation, model, a text in the input, time and
        user. Only the acting user's own records, unless their role reads every run
        (``engine.access``: admins, instructors, auditors)."""
        clauses, params = [], []
        if not access.can("runs.read_all"):
            clauses.append("user = ?")
            params.append(access.current_user().name)
        for column, value in (("operation", kind), ("model", model), ("user", user)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if text:
            clauses.append("input_text LIKE ? ESCAPE '\\'")
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params.append(f"%{escaped}%")
        if since is not None:
            clauses.append("created >= ?")
            params.append(since)
        if until is not None:
            clauses.append("created <= ?")
            params.append(until)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return [_record(row) for row in self._rows(where, tuple(params), limit)]

    def get(self, run_id: str, readable_as_owner: str | None = None) -> RunRecord:
        """The record of ``run_id`` if the acting user may read it (their own, or a reading
        role; ``readable_as_owner``: also when it belongs to that user, e.g. the owner of a
        notebook the acting user may read). Another user's run reads as missing."""
        rows = self._rows("WHERE id = ?", (run_id,))
        record = _record(rows[0]) if rows else None
        if record is None or not (access.may_read(record.user) or record.user == readable_as_owner):
            raise InputError(
                f"No run {run_id!r} in the ledger: `workbench history list` shows them."
            )
        return record

    def result_file(self, record: RunRecord) -> Path | None:
        """The stored result file of a record (None when it has none)."""
        if not record.result_path:
            return None
        path = (self.root / record.result_path).resolve()
        if self.results.resolve() not in path.parents:
            raise LedgerError(f"Run {record.id} points outside the ledger: it was tampered with.")
        return path

    def load_result(self, record: RunRecord) -> Any:
        """The stored result as its typed object (``GenerationResult``, ``AttentionResult``,
        ...), or the plain data when its type is unknown; None when the run left none."""
        path = self.result_file(record)
        if path is None or not path.is_file():
            return None
        from engine.result_types import load_result_file

        return load_result_file(path)

    # --- verification ---------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Recompute the hash chain and every result file's sha256; name the first bad record."""
        previous = GENESIS
        problems: list[str] = []
        first_bad: str | None = None
        rows = self._rows()
        for row in rows:
            record = _record(row)
            fields = {c: getattr(record, c) for c in _COLUMNS}
            reason = None
            if record.prev_hash != previous:
                reason = (
                    "its link to the previous record is broken (a record was removed or reordered)"
                )
            elif record_hash(fields) != record.hash:
                reason = "its fields do not match its hash (the record was edited)"
            else:
                reason = self._check_result(record)
            if reason:
                problems.append(f"run {record.id} (#{record.seq}): {reason}")
                first_bad = first_bad or record.id
            previous = record.hash
        return VerifyReport(
            ok=not problems,
            checked=len(rows),
            first_bad=first_bad,
            reason=problems[0] if problems else None,
            problems=problems,
        )

    def _check_result(self, record: RunRecord) -> str | None:
        if not record.result_path:
            return None
        try:
            path = self.result_file(record)
        except LedgerError:
            return "its result path points outside the ledger"
        if path is None or not path.is_file():
            return f"its result file {record.result_path} is missing"
        if file_sha256(path) != record.result_sha256:
            return f"its result file {record.result_path} was changed (sha256 differs)"
        return None


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return time.time()


def _pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def _result_ids(result: Any) -> list[int] | None:
    """The input token ids a result carries (perplexity, attention), when the spec has none."""
    ids = getattr(result, "token_ids", None)
    if ids is None and getattr(result, "sides", None):
        ids = getattr(result.sides[0].result, "token_ids", None)
    return [int(i) for i in ids] if ids is not None else None


def _input_text(spec: dict) -> str | None:
    for key in ("text", "prompt"):
        if isinstance(spec.get(key), str) and spec[key]:
            return spec[key]
    messages = spec.get("messages")
    if isinstance(messages, list) and messages:
        return str(messages[-1].get("content", ""))
    sides = spec.get("sides")  # attention: (label, model, text) per side
    if isinstance(sides, list) and sides and isinstance(sides[0], list) and len(sides[0]) == 3:
        return " | ".join(str(side[2]) for side in sides)
    return None


def _record(row: sqlite3.Row) -> RunRecord:
    data = {c: row[c] for c in _COLUMNS}
    for c in ("spec", "input_ids", "versions"):
        data[c] = json.loads(data[c]) if data[c] is not None else None
    data["spec"] = data["spec"] or {}
    data["versions"] = data["versions"] or {}
    if data["seed"] is not None:
        data["seed"] = int(data["seed"])
    return RunRecord(**data, hash=row["hash"], seq=row["seq"])
