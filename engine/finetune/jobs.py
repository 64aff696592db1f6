"""Fine-tuning jobs: a SQLite table plus one folder per job under ``$WORKBENCH_HOME/jobs``.

Each job runs in its own process (``python -m engine.finetune.worker JOB_ID``, or under
``torchrun`` for several processes), started in its own session so it outlives the page, the
browser and the app. Everything about a job is on disk:

    jobs/jobs.db                 status table (id, owner, status, pid, spec, error, times)
    jobs/<id>/spec.json          the JobSpec
    jobs/<id>/data.<ext>         a copy of the data file
    jobs/<id>/state.json         phase, step / total steps, timing (rewritten atomically)
    jobs/<id>/metrics.jsonl      one JSON object per train log / evaluation
    jobs/<id>/log.txt            the worker's stdout and stderr
    jobs/<id>/checkpoints/       the last checkpoint (resume point)
    jobs/<id>/result.json        final metrics and the store entry written
    jobs/<id>/CANCEL             flag file asking the worker to stop

Owners: a job belongs to the user who submitted it (``engine.access``). ``list`` shows only
the jobs the acting user may read; reading another user's job raises ``AccessError`` unless
their role reads every run; cancel, resume, delete and merge need ``may_control``; the worker
acts as the job's owner, so its store entry and ledger record carry the owner's name.

The lane: at most ``max_jobs()`` jobs train at once on this machine (``WORKBENCH_MAX_JOBS``,
default 1; an admin may raise it with ``set_max_jobs``). A submitted or resumed job waits in
line (status ``queued``, ``JobInfo.position`` 1, 2, ...; instructors' and admins' jobs first,
then by arrival) and starts when a slot frees: the finishing worker, or whoever reads the job
store next, launches it. Each user may have ``limits_for(user).concurrent_jobs`` jobs queued or
running (``LimitError`` past it).

Every status change is a compare-and-set on the row (``UPDATE ... WHERE status = ? AND pid IS
?``, row count checked), and taking lane slots happens in one ``BEGIN IMMEDIATE`` transaction,
so two Resume clicks, two submissions, two pollers or a second worker never start two
processes on one job, never run more than ``max_jobs()`` at once, and two jobs never produce
the same store name at once. Every file is written atomically (``engine.files``): a full disk
fails the write with a one-line ``DiskError`` and leaves no partial file. A job whose process
died (kill -9, out of memory, a reboot) shows as ``interrupted`` and resumes from its last
checkpoint.

No torch import here: the page uses this module.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from engine import access
from engine.access import AccessError, LimitError, User
from engine.catalog import resolve
from engine.errors import EngineError, InputError, UnsafeModelError
from engine.files import atomic_write, atomic_write_json, atomic_write_text
from engine.finetune import data as ftdata
from engine.finetune.config import JobSpec
from engine.finetune.result import FinetuneResult, read_json, record_in_ledger
from engine.finetune.run import JobRun
from engine.store import ModelStore, weight_files, workbench_home

ACTIVE = ("queued", "running")  # stored statuses of a job that is (or should be) running
RESUMABLE = ("interrupted", "failed", "cancelled")
REPO = Path(__file__).resolve().parents[2]
MAX_JOBS_CAP = 64  # the most jobs an admin may let train at once
_children: dict[int, subprocess.Popen] = {}  # reaped on refresh so they do not stay zombies
# The row of another job still producing the same store name (queued, running or interrupted).
_SAME_OUT_BUSY = (
    "SELECT 1 FROM jobs AS other WHERE other.out = ? AND other.id != ? "
    "AND other.status IN ('queued', 'running')"
)
# A row waiting in the lane: queued, no process yet, a place in line.
_WAITING = "status = 'queued' AND pid IS NULL AND waiting_since IS NOT NULL"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT NOT NULL,
    base TEXT NOT NULL,
    task TEXT NOT NULL,
    out TEXT NOT NULL,
    spec TEXT NOT NULL,
    pid INTEGER,
    pid_started REAL,
    error TEXT
)
"""
# Columns added since the first schema (older job tables get them, existing rows "local").
_ADDED = {
    "owner": "TEXT NOT NULL DEFAULT 'local'",
    "owner_role": "TEXT NOT NULL DEFAULT 'admin'",
    "priority": "INTEGER NOT NULL DEFAULT 0",  # User.priority of the owner: lower goes first
    "waiting_since": "REAL",  # set while the job waits in the lane for a slot
}
_SETTINGS = "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class JobInfo:
    """A job as the page and the CLI show it. ``eta_s``: seconds left, None when unknown.
    ``owner``: the user who submitted it; ``position``: its place in the lane (1 = next to
    start) while it waits for a slot, else None."""

    id: str
    status: str  # queued | running | completed | failed | cancelled | interrupted
    base: str
    task: str
    out: str
    created: float
    updated: float
    error: str | None
    phase: str
    step: int
    total_steps: int
    eta_s: float | None
    message: str
    folder: Path
    pid: int | None = None  # the job's process (torchrun's when it runs several)
    owner: str = "local"
    position: int | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE

    @property
    def waiting(self) -> bool:
        """True while the job waits in the lane for a free slot."""
        return self.position is not None

    @property
    def status_label(self) -> str:
        """The status for people: "queued: 2nd in line" while waiting, else the status."""
        if self.position is not None:
            return f"queued: {ordinal(self.position)} in line"
        return self.status


def _alive(pid: int | None, started: float | None) -> bool:
    """True if ``pid`` is the process we started (same start time) and not a zombie."""
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)
        return False
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 2:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _me() -> tuple[int, float]:
    """This process's (pid, start time): the placeholder owner of a job being launched."""
    proc = psutil.Process()
    return proc.pid, proc.create_time()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _is_waiting(row: sqlite3.Row) -> bool:
    return row["status"] == "queued" and row["pid"] is None and row["waiting_since"] is not None


def _live(row: sqlite3.Row) -> bool:
    """A row that is queued or running for real: waiting in line, or with a live process."""
    if row["status"] not in ACTIVE:
        return False
    return _is_waiting(row) or _alive(row["pid"], row["pid_started"])


def _line(rows: list[sqlite3.Row]) -> list[sqlite3.Row]:
    """The waiting rows in the order they start: priority, then arrival."""
    waiting = [r for r in rows if _is_waiting(r)]
    return sorted(waiting, key=lambda r: (r["priority"], r["waiting_since"], r["created"], r["id"]))


def default_max_jobs() -> int:
    """``WORKBENCH_MAX_JOBS`` (default 1): jobs training at once when no admin set a value."""
    raw = os.environ.get("WORKBENCH_MAX_JOBS", "").strip()
    try:
        value = int(raw) if raw else 1
    except ValueError:
        return 1
    return min(max(value, 1), MAX_JOBS_CAP)


def check_base(spec: JobSpec, store: ModelStore) -> None:
    """Refuse, before any job starts, a base fine-tuning cannot use: an unknown name, a hub id
    (training needs local weights) or a folder of pickled weights without ``allow_pickle``."""
    ref = resolve(spec.base, store.names())
    if ref.source == "hub":
        raise InputError(
            f"Fine-tuning needs a local base model, not the hub id {spec.base!r}: use an "
            "embedded model, a store entry or a local folder."
        )
    if ref.source != "local" or spec.allow_pickle:
        return
    files = weight_files(Path(ref.location))
    if files and not any(p.suffix == ".safetensors" for p in files):
        raise UnsafeModelError(
            f"{ref.location} has only pickled weights (.bin/.pt), which can run code when "
            "loaded: convert them to safetensors, or opt in for this job with `workbench "
            "--allow-pickle finetune ...` (Python: JobSpec(allow_pickle=True))."
        )


class JobStore:
    """The job table and folders. Safe to use from several threads and processes (SQLite, WAL;
    every status change is a compare-and-set)."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home).expanduser() if home else workbench_home()
        self.root = self.home / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        with self._tx() as db:
            db.execute(_SCHEMA)
            db.execute(_SETTINGS)
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED.items():
                if column not in have:  # an older table: its rows were made by "local"
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "jobs.db", timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.row_factory = sqlite3.Row
            with db:
                yield db
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction taken up front (``BEGIN IMMEDIATE``): whatever is read inside
        cannot change before it commits (lane slots, per-user counts, schema migration)."""
        db = sqlite3.connect(self.root / "jobs.db", timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    # --- owners ---------------------------------------------------------------------------

    def _check_read(self, row: sqlite3.Row) -> None:
        if not access.may_read(row["owner"]):
            raise AccessError(
                f"Job {row['id']} belongs to another user: you may see only your own jobs."
            )

    def _check_control(self, row: sqlite3.Row) -> None:
        if not access.may_control(row["owner"]):
            raise AccessError(
                f"Job {row['id']} belongs to another user: only its owner or an admin may "
                "cancel, resume, merge or delete it."
            )

    def owner(self, job_id: str) -> User:
        """The user a job belongs to (the worker acts as this user). No access check: it
        reveals only a name and a role, and the worker needs it before anyone acts."""
        row = self._row(job_id)
        return User(row["owner"], row["owner_role"])

    def _check_limit(self, db: sqlite3.Connection, user: User, job_id: str = "") -> None:
        """``LimitError`` when ``user`` already has their limit of jobs queued or running."""
        limit = access.limits_for(user).concurrent_jobs
        rows = db.execute(
            "SELECT * FROM jobs WHERE owner = ? AND id != ? AND status IN ('queued', 'running')",
            (user.name, job_id),
        ).fetchall()
        live = [r["id"] for r in rows if _live(r)]
        if len(live) >= limit:
            held = f" (you have {len(live)}: {', '.join(live[:3])})" if live else ""
            raise LimitError(
                f"A {user.role} may have at most {limit} fine-tuning job(s) queued or running"
                f"{held}: wait for one to finish or cancel it (limits.toml sets this)."
            )

    # --- the lane -------------------------------------------------------------------------

    def max_jobs(self) -> int:
        """Jobs that may train at once on this machine: the admin's setting, else
        ``WORKBENCH_MAX_JOBS`` (default 1)."""
        with self._db() as db:
            row = db.execute("SELECT value FROM settings WHERE key = 'max_jobs'").fetchone()
        return int(row["value"]) if row else default_max_jobs()

    def set_max_jobs(self, n: int | None) -> int:
        """Let ``n`` jobs train at once (admins only; None: back to ``WORKBENCH_MAX_JOBS``);
        waiting jobs start at once if that frees slots. Returns the value now in force."""
        access.require("runs.control_all")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
            raise InputError(f"The number of concurrent jobs must be a whole number, not {n!r}.")
        if n is not None and not 1 <= n <= MAX_JOBS_CAP:
            raise InputError(f"Concurrent fine-tuning jobs must be 1-{MAX_JOBS_CAP} (got {n}).")
        with self._db() as db:
            if n is None:
                db.execute("DELETE FROM settings WHERE key = 'max_jobs'")
            else:
                db.execute(
                    "INSERT OR REPLACE INTO settings (key, value) VALUES ('max_jobs', ?)", (str(n),)
                )
        self.pump()
        return self.max_jobs()

    def pump(self) -> list[str]:
        """Start waiting jobs while slots are free; returns the ids started here.

        Taking slots is one ``BEGIN IMMEDIATE`` transaction (count the jobs whose process is
        alive, hand the first waiting ones to this process): of several processes pumping at
        once, each waiting job is started by exactly one and never more than ``max_jobs()``
        train. Called by ``submit``/``resume``, by every read of the store and by a worker
        that finishes. Acts for the machine, not for the acting user (no access check).
        """
        with self._db() as db:
            if db.execute(f"SELECT 1 FROM jobs WHERE {_WAITING} LIMIT 1").fetchone() is None:
                return []
        limit = self.max_jobs()
        me = _me()
        started: list[str] = []
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running')").fetchall()
            busy = sum(1 for r in rows if not _is_waiting(r) and _alive(r["pid"], r["pid_started"]))
            for row in _line(rows)[: max(0, limit - busy)]:
                claimed = db.execute(
                    "UPDATE jobs SET pid = ?, pid_started = ?, waiting_since = NULL, updated = ? "
                    f"WHERE id = ? AND {_WAITING}",
                    (*me, time.time(), row["id"]),
                ).rowcount
                if claimed == 1:
                    started.append(row["id"])
        for job_id in started:
            try:
                self._spawn(job_id, me)
            except EngineError:
                continue  # recorded as failed by _spawn; the next job may still start
        return started

    # --- creating and running ------------------------------------------------------------

    def submit(self, spec: JobSpec, start: bool = True) -> JobInfo:
        """Validate ``spec``, its base and its data, copy the data into a new job folder and
        put the job in the lane (it starts now if a slot is free, else waits in line as
        ``queued``); ``start=False``: leave it for a worker started by hand.

        The job belongs to the acting user, who must be allowed to fine-tune
        (``AccessError``) and be under their limit of jobs queued or running (``LimitError``).
        Refused with a one-line ``InputError`` when ``spec.out`` is already in the store or
        another job (queued, running or interrupted) is producing it: the checks and the new
        row are one transaction, so of two racing submissions exactly one gets the name.
        ``WORKBENCH_ALLOW_PICKLE=1`` sets ``allow_pickle`` (recorded in the job's spec).
        """
        user = access.require("finetune")
        spec = spec.validated()
        if not spec.allow_pickle and _env_flag("WORKBENCH_ALLOW_PICKLE"):
            spec = replace(spec, allow_pickle=True)
        store = ModelStore(self.home)
        check_base(spec, store)  # unknown, hub or pickled base: clear error now, not in the job
        if spec.out in store.names():
            raise InputError(
                f"A model named {spec.out!r} is already in the store: choose another name."
            )
        self._refuse_busy_out(spec.out, "")  # early, friendly; the INSERT below decides
        with self._db() as db:
            self._check_limit(db, user)  # early too: no data copy for a refused job
        source = Path(spec.data)
        ftdata.load(source, spec.task, spec.columns, spec.train.val_fraction, spec.train.seed)
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.folder(job_id)
        folder.mkdir(parents=True)
        try:
            copy = folder / f"data{source.suffix.lower()}"
            atomic_write(copy, lambda tmp: shutil.copyfile(source, tmp), "the job's data copy")
            spec = JobSpec.from_dict({**spec.to_dict(), "data": str(copy)})
            atomic_write_json(folder / "spec.json", spec.to_dict(), "the job's spec")
            now = time.time()
            with self._tx() as db:
                self._check_limit(db, user)
                inserted = db.execute(
                    "INSERT INTO jobs (id, created, updated, status, base, task, out, spec, "
                    "owner, owner_role, priority, waiting_since) "
                    "SELECT ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ? "
                    f"WHERE NOT EXISTS ({_SAME_OUT_BUSY})",
                    (
                        job_id, now, now, spec.base, spec.task, spec.out,
                        json.dumps(spec.to_dict()), user.name, user.role, user.priority,
                        now if start else None, spec.out, job_id,
                    ),
                ).rowcount  # fmt: skip
            if inserted != 1:
                self._refuse_busy_out(spec.out, job_id)
                raise InputError(f"Another job is producing {spec.out!r}: choose another name.")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if start:
            self.pump()
        return self.get(job_id)

    def _refuse_busy_out(self, out: str, job_id: str) -> None:
        """InputError naming the other job (queued, running or interrupted) producing ``out``
        (another user's job is not named)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE out = ? AND id != ? ORDER BY created DESC", (out, job_id)
            ).fetchall()
        producing = (*ACTIVE, "interrupted")
        busy = [(r, self._info(r)) for r in rows]
        busy = [(r, i) for r, i in busy if i.status in producing]
        if not busy:
            return
        row, other = busy[0]
        if not access.may_read(row["owner"]):
            raise InputError(
                f"Another user's job is already producing {out!r}: choose another name."
            )
        hint = " (resume or delete it)" if other.status == "interrupted" else ""
        raise InputError(
            f"Job {other.id} ({other.status}{hint}) is already producing {out!r}: "
            "choose another name."
        )

    def command(self, job_id: str) -> list[str]:
        """The command line that runs a job (torchrun when it asks for several processes)."""
        processes = self._spec(job_id).processes
        worker = ["-m", "engine.finetune.worker", job_id]
        if processes > 1:
            return [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(processes), *worker,
            ]  # fmt: skip
        return [sys.executable, *worker]

    def launch(self, job_id: str) -> JobInfo:
        """Put a job that is not running (interrupted, failed, cancelled, or queued with no live
        process) back in the lane; it starts at once if a slot is free. The job is claimed
        with one compare-and-set first: of two concurrent calls exactly one succeeds, the
        other gets an ``InputError``. Needs ``may_control`` on the job."""
        self._check_control(self._row(job_id))
        self._claim(job_id)
        self.pump()
        return self.get(job_id)

    def _claim(self, job_id: str) -> None:
        """Put a resumable job back in line (queued, waiting), if nobody changed it since we
        read it, no other job is producing its store name and its owner is under their limit."""
        row = self._row(job_id)
        info = self._info(row)
        if not info.resumable:
            raise InputError(
                f"Job {job_id} is {info.status}: only interrupted, failed or cancelled jobs resume."
            )
        (self.folder(job_id) / "CANCEL").unlink(missing_ok=True)  # an old request to stop
        with self._tx() as db:
            self._check_limit(db, User(row["owner"], row["owner_role"]), job_id)
            claimed = db.execute(
                "UPDATE jobs SET status = 'queued', pid = NULL, pid_started = NULL, error = NULL, "
                "waiting_since = ?, updated = ? WHERE id = ? AND status = ? AND pid IS ? "
                f"AND pid_started IS ? AND waiting_since IS ? AND NOT EXISTS ({_SAME_OUT_BUSY})",
                (
                    time.time(), time.time(), job_id, row["status"], row["pid"],
                    row["pid_started"], row["waiting_since"], row["out"], job_id,
                ),
            ).rowcount  # fmt: skip
        if claimed != 1:
            self._refuse_busy_out(row["out"], job_id)
            now = self._info(self._row(job_id))
            raise InputError(
                f"Job {job_id} was just started by another request (it is {now.status} now): "
                "nothing to do."
            )

    def _spawn(self, job_id: str, owner: tuple[int | None, float | None]) -> None:
        """Start the job's process in its own session (it survives the app); the job must be
        claimed by ``owner`` (this process). A failed start marks the job failed."""
        folder = self.folder(job_id)
        env = {
            **os.environ,
            "WORKBENCH_HOME": str(self.home),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            with open(folder / "log.txt", "a") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting job {job_id}\n")
                log.flush()
                proc = subprocess.Popen(
                    self.command(job_id),
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            self._set_status(job_id, "failed", f"Could not start the job's process: {exc}")
            raise EngineError(f"Could not start fine-tuning job {job_id}: {exc}.") from exc
        _children[proc.pid] = proc
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = None
        with self._db() as db:  # hand the job from its placeholder owner (us) to its process
            db.execute(
                "UPDATE jobs SET pid = ?, pid_started = ?, updated = ? "
                "WHERE id = ? AND pid IS ? AND pid_started IS ?",
                (proc.pid, started, time.time(), job_id, *owner),
            )

    def attach(self, job_id: str) -> None:
        """Called by the worker (process 0) before it trains: mark the job running.

        A job launched from here is owned by this worker's parent (``python`` or ``torchrun``)
        or grandparent (the app, for the moment before the hand-over); a job started by hand
        (``torchrun ... -m engine.finetune.worker JOB_ID`` on a cluster) has no live owner, so
        this process claims it, by compare-and-set (a job waiting in the lane leaves the line).
        Raises ``InputError`` when another live process already runs the job or it has
        completed.
        """
        row = self._row(job_id)
        me = psutil.Process()
        mine = {me.pid, *(p.pid for p in me.parents())}
        if row["status"] == "completed":
            raise InputError(f"Job {job_id} has already completed: nothing to run.")
        if _alive(row["pid"], row["pid_started"]):
            if row["pid"] not in mine:
                raise InputError(
                    f"Job {job_id} is already running in process {row['pid']}: "
                    "a second worker would train it twice."
                )
            if not self._set_status(job_id, "running", expect=ACTIVE):
                raise InputError(f"Job {job_id} changed while starting: it is no longer queued.")
            return
        with self._db() as db:
            claimed = db.execute(
                "UPDATE jobs SET status = 'running', pid = ?, pid_started = ?, error = NULL, "
                "waiting_since = NULL, updated = ? WHERE id = ? AND status = ? AND pid IS ? "
                "AND pid_started IS ? AND waiting_since IS ?",
                (
                    me.pid, me.create_time(), time.time(), job_id, row["status"], row["pid"],
                    row["pid_started"], row["waiting_since"],
                ),
            ).rowcount  # fmt: skip
        if claimed != 1:
            raise InputError(f"Job {job_id} was just started by another process.")

    def set_status(
        self,
        job_id: str,
        status: str,
        error: str | None = None,
        expect: tuple[str, ...] = (*ACTIVE, "failed", "cancelled"),
    ) -> bool:
        """Compare-and-set: give the job ``status`` (and ``error``) only if its stored status is
        one of ``expect``; True when it did. The worker ends a job with this (running ->
        completed, failed or cancelled). Needs ``may_control`` on the job."""
        self._check_control(self._row(job_id))
        return self._set_status(job_id, status, error, expect)

    def _set_status(
        self,
        job_id: str,
        status: str,
        error: str | None = None,
        expect: tuple[str, ...] = (*ACTIVE, "failed", "cancelled"),
    ) -> bool:
        marks = ", ".join("?" * len(expect))
        with self._db() as db:
            changed = db.execute(
                f"UPDATE jobs SET status = ?, error = ?, updated = ?, waiting_since = NULL "
                f"WHERE id = ? AND status IN ({marks})",
                (status, error, time.time(), job_id, *expect),
            ).rowcount
        return changed == 1

    def cancel(self, job_id: str) -> JobInfo:
        """Stop a job. One waiting in the lane leaves the line at once (``cancelled``, never
        started); a running one gets a flag file every process checks each step (it saves a
        checkpoint and exits; resume continues from there). Needs ``may_control``."""
        row = self._row(job_id)
        self._check_control(row)
        info = self._info(row)
        if not info.active:
            raise InputError(f"Job {job_id} is {info.status}, not running: nothing to cancel.")
        if info.waiting:
            with self._db() as db:
                left = db.execute(
                    "UPDATE jobs SET status = 'cancelled', waiting_since = NULL, error = ?, "
                    f"updated = ? WHERE id = ? AND {_WAITING}",
                    ("Cancelled while queued (it never started); resume to queue it again.",
                     time.time(), job_id),
                ).rowcount  # fmt: skip
            if left == 1:
                return self.get(job_id)
            # it was started meanwhile: stop the process like any running job
        atomic_write_text(self.folder(job_id) / "CANCEL", str(time.time()), "the cancel flag")
        return self.get(job_id)

    def resume(self, job_id: str) -> JobInfo:
        """Restart an interrupted, failed or cancelled job from its last checkpoint (it waits in
        the lane when every slot is taken). Needs ``may_control``.

        Two concurrent calls (two Resume clicks) start one process: the other is refused."""
        row = self._row(job_id)
        self._check_control(row)
        info = self._info(row)
        if not info.resumable:
            raise InputError(
                f"Job {job_id} is {info.status}: only interrupted, failed or cancelled jobs resume."
            )
        store = ModelStore(self.home)
        if info.out in store.names():
            manifest = store.get(info.out).manifest
            if manifest.source != f"finetune:{job_id}":
                raise InputError(f"{info.out!r} is already in the store: nothing to resume.")
            # killed after the atomic store write, before it was marked done: finish the books
            # (the result file and the ledger record, each written once, as the job's owner)
            result = self.result(job_id)
            if result is None:
                result = _result_from_manifest(job_id, info.out, manifest)
                atomic_write_json(
                    self.folder(job_id) / "result.json", result.to_dict(), "the job's result"
                )
            with access.acting_as(User(row["owner"], row["owner_role"])):
                seconds = manifest.created - info.created if manifest.created else None
                record_in_ledger(self.home, self._spec(job_id).to_dict(), result, seconds)
            self._set_status(job_id, "completed", expect=(*ACTIVE, *RESUMABLE))
            shutil.rmtree(self.folder(job_id) / "checkpoints", ignore_errors=True)
            return self.get(job_id)
        return self.launch(job_id)

    def merge(self, job_id: str) -> FinetuneResult:
        """Merge a completed LoRA job's adapter (kept unmerged) into its base and store the
        model under the job's name; returns the updated result. Runs here (seconds), as the
        job's owner (the store entry and ledger record carry the owner). Needs
        ``may_control``."""
        row = self._row(job_id)
        self._check_control(row)
        info = self._info(row)
        if info.status != "completed":
            raise InputError(f"Job {job_id} is {info.status}: only a completed job can merge.")
        if info.out in ModelStore(self.home).names():
            raise InputError(f"{info.out!r} is already in the store: nothing to merge.")
        from engine.finetune.train import merge_adapter

        with access.acting_as(User(row["owner"], row["owner_role"])):
            return merge_adapter(self.folder(job_id), self.home)

    def delete(self, job_id: str) -> None:
        """Remove a finished job's folder and row (the stored model stays). Needs
        ``may_control``."""
        row = self._row(job_id)
        self._check_control(row)
        info = self._info(row)
        if info.active:
            raise InputError(f"Job {job_id} is still {info.status}: cancel it first.")
        with self._db() as db:  # compare-and-set: not if a Resume started it meanwhile
            deleted = db.execute(
                "DELETE FROM jobs WHERE id = ? AND status = ? AND pid IS ?",
                (job_id, row["status"], row["pid"]),
            ).rowcount
        if deleted != 1:
            now = self._info(self._row(job_id)).status
            raise InputError(f"Job {job_id} changed meanwhile (it is {now}).")
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    # --- reading -------------------------------------------------------------------------

    def _row(self, job_id: str) -> sqlite3.Row:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise InputError(f"No fine-tuning job {job_id!r}: see the list of jobs.")
        return row

    def _readable_row(self, job_id: str) -> sqlite3.Row:
        row = self._row(job_id)
        self._check_read(row)
        return row

    def spec(self, job_id: str) -> JobSpec:
        """The job's spec (``AccessError`` for another user's job unless the role reads all)."""
        self._readable_row(job_id)
        return self._spec(job_id)

    def _spec(self, job_id: str) -> JobSpec:
        return JobSpec.from_dict(json.loads(self._row(job_id)["spec"]))

    def _info(self, row: sqlite3.Row, position: int | None = None) -> JobInfo:
        folder = self.folder(row["id"])
        status = row["status"]
        if status in ACTIVE and not _is_waiting(row) and not _alive(row["pid"], row["pid_started"]):
            status = "interrupted"  # killed (-9, OOM, reboot): resumable
        if _is_waiting(row) and position is None:
            position = self._position(row["id"])
        state = read_json(folder / "state.json", {}) or {}
        phase = state.get("phase", "queued" if status in ACTIVE else status)
        if status in ("interrupted", "queued") and phase in ("cancelled", "failed", "done"):
            phase = status  # the phase of an earlier attempt (a resumed job waiting again)
        message = state.get("message", "")
        if position is not None:
            message = f"Queued: {ordinal(position)} in line for a training slot."
        return JobInfo(
            id=row["id"],
            status=status,
            base=row["base"],
            task=row["task"],
            out=row["out"],
            created=row["created"],
            updated=row["updated"],
            error=row["error"],
            phase=phase,
            step=int(state.get("step", 0)),
            total_steps=int(state.get("total_steps", 0)),
            eta_s=_eta(state) if status == "running" else None,
            message=message,
            folder=folder,
            pid=row["pid"],
            owner=row["owner"],
            position=position if _is_waiting(row) else None,
        )

    def _position(self, job_id: str) -> int | None:
        with self._db() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE {_WAITING}").fetchall()
        ids = [r["id"] for r in _line(rows)]
        return ids.index(job_id) + 1 if job_id in ids else None

    def get(self, job_id: str) -> JobInfo:
        """The job now (``AccessError`` for another user's job unless the role reads all).
        Starts waiting jobs first if slots are free (``pump``)."""
        self.pump()
        return self._info(self._readable_row(job_id))

    def run(self, job_id: str) -> JobRun:
        """The job through the run interface: ``snapshot()``, ``cancel()``, ``wait()``, ``done``."""
        return JobRun(self, job_id)

    def list(self) -> list[JobInfo]:
        """The jobs the acting user may read (their own; every job for admins, instructors and
        auditors), newest first. Starts waiting jobs first if slots are free (``pump``)."""
        self.pump()
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC").fetchall()
        places = {r["id"]: i + 1 for i, r in enumerate(_line(rows))}
        return [self._info(r, places.get(r["id"])) for r in rows if access.may_read(r["owner"])]

    def line(self) -> list[JobInfo]:
        """The jobs waiting for a slot that the acting user may read, next to start first."""
        return sorted((j for j in self.list() if j.waiting), key=lambda j: j.position or 0)

    def metrics(self, job_id: str) -> list[dict]:
        """Train-log and evaluation records, in order (``type`` is "train" or "eval")."""
        self._readable_row(job_id)
        path = self.folder(job_id) / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
        return records

    def result(self, job_id: str) -> FinetuneResult | None:
        """Final metrics (before/after), the store entry and provenance, once completed."""
        self._readable_row(job_id)
        data = read_json(self.folder(job_id) / "result.json")
        if not isinstance(data, dict):
            return None
        try:
            return FinetuneResult.from_dict(data)
        except (TypeError, ValueError, KeyError) as exc:
            raise EngineError(
                f"The result of job {job_id} is unreadable ({type(exc).__name__}): "
                f"see {self.folder(job_id) / 'result.json'}."
            ) from exc

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        """The last ``lines`` lines of the job's log (its worker's output)."""
        self._readable_row(job_id)
        path = self.folder(job_id) / "log.txt"
        if not path.exists():
            return ""
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64_000))
            text = fh.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait(
        self,
        job_id: str,
        timeout_s: float = 3600,
        poll_s: float = 0.5,
        on_update: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """Block until the job is no longer active; ``on_update(info)`` is called each poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.get(job_id)
            if on_update is not None:
                on_update(info)
            if not info.active:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"Job {job_id} still {info.status} after {timeout_s:.0f} s.")
            time.sleep(poll_s)


def _result_from_manifest(job_id: str, out: str, manifest) -> FinetuneResult:
    """The result of a job whose store entry was written but not yet recorded."""
    extra = manifest.extra
    data = {
        "model": out,
        "fingerprint": manifest.fingerprint,
        "base": manifest.base_model,
        "base_fingerprint": manifest.base_fingerprint,
        "task": extra.get("task"),
        "labels": extra.get("labels", []),
        "data_hash": extra.get("data_hash"),
        "steps": extra.get("steps"),
        "metrics_before": extra.get("metrics_before", {}),
        "metrics_after": extra.get("metrics_after", {}),
        "adapter": extra.get("hyperparameters", {}).get("lora", False),
        "hyperparameters": extra.get("hyperparameters"),
        "processes": extra.get("processes", 1),
        "job_id": job_id,
        "provenance": extra.get("provenance"),
    }
    return FinetuneResult.from_dict(data)


def _eta(state: dict) -> float | None:
    """Seconds left from the speed of this run segment (steps since the last (re)start)."""
    done = state.get("step", 0) - state.get("segment_start_step", 0)
    elapsed = state.get("updated", 0) - state.get("segment_started", 0)
    total = state.get("total_steps", 0)
    if done <= 0 or elapsed <= 0 or not total:
        return None
    return max(0.0, (total - state["step"]) * elapsed / done)
