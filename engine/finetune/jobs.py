"""Fine-tuning jobs: a SQLite table plus one folder per job under ``$WORKBENCH_HOME/jobs``.

Each job runs in its own process (``python -m engine.finetune.worker JOB_ID``, or under
``torchrun`` for several processes), started in its own session so it outlives the page, the
browser and the app. Everything about a job is on disk:

    jobs/jobs.db                 status table (id, status, pid, spec, error, times)
    jobs/<id>/spec.json          the JobSpec
    jobs/<id>/data.<ext>         a copy of the data file
    jobs/<id>/state.json         phase, step / total steps, timing (rewritten atomically)
    jobs/<id>/metrics.jsonl      one JSON object per train log / evaluation
    jobs/<id>/log.txt            the worker's stdout and stderr
    jobs/<id>/checkpoints/       the last checkpoint (resume point)
    jobs/<id>/result.json        final metrics and the store entry written
    jobs/<id>/CANCEL             flag file asking the worker to stop

Every status change is a compare-and-set on the row (``UPDATE ... WHERE status = ? AND pid IS
?``, row count checked), so two Resume clicks, two submissions or a second worker never start
two processes on one job, and two jobs never produce the same store name at once. Every file
is written atomically (``engine.files``): a full disk fails the write with a one-line
``DiskError`` and leaves no partial file.

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

from engine.catalog import resolve
from engine.errors import EngineError, InputError, UnsafeModelError
from engine.files import atomic_write, atomic_write_json, atomic_write_text
from engine.finetune import data as ftdata
from engine.finetune.config import JobSpec
from engine.finetune.result import FinetuneResult, read_json
from engine.finetune.run import JobRun
from engine.store import ModelStore, weight_files, workbench_home

ACTIVE = ("queued", "running")  # stored statuses of a job that is (or should be) running
RESUMABLE = ("interrupted", "failed", "cancelled")
REPO = Path(__file__).resolve().parents[2]
_children: dict[int, subprocess.Popen] = {}  # reaped on refresh so they do not stay zombies
# The row of another job still producing the same store name (queued, running or interrupted).
_SAME_OUT_BUSY = (
    "SELECT 1 FROM jobs AS other WHERE other.out = ? AND other.id != ? "
    "AND other.status IN ('queued', 'running')"
)

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


@dataclass(frozen=True)
class JobInfo:
    """A job as the page and the CLI show it. ``eta_s``: seconds left, None when unknown."""

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

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE


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
        with self._db() as db:
            db.execute(_SCHEMA)

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

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    # --- creating and running ------------------------------------------------------------

    def submit(self, spec: JobSpec, start: bool = True) -> JobInfo:
        """Validate ``spec``, its base and its data, copy the data into a new job folder and
        start the job (``start=False``: leave it queued for a worker started by hand).

        Refused with a one-line ``InputError`` when ``spec.out`` is already in the store or
        another job (queued, running or interrupted) is producing it: the check and the new
        row are one SQLite statement, so of two racing submissions exactly one gets the name.
        ``WORKBENCH_ALLOW_PICKLE=1`` sets ``allow_pickle`` (recorded in the job's spec).
        """
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
        source = Path(spec.data)
        ftdata.load(source, spec.task, spec.columns, spec.train.val_fraction, spec.train.seed)
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.folder(job_id)
        folder.mkdir(parents=True)
        owner = _me() if start else (None, None)
        try:
            copy = folder / f"data{source.suffix.lower()}"
            atomic_write(copy, lambda tmp: shutil.copyfile(source, tmp), "the job's data copy")
            spec = JobSpec.from_dict({**spec.to_dict(), "data": str(copy)})
            atomic_write_json(folder / "spec.json", spec.to_dict(), "the job's spec")
            now = time.time()
            with self._db() as db:
                inserted = db.execute(
                    "INSERT INTO jobs (id, created, updated, status, base, task, out, spec, pid, "
                    f"pid_started) SELECT ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ? "
                    f"WHERE NOT EXISTS ({_SAME_OUT_BUSY})",
                    (
                        job_id, now, now, spec.base, spec.task, spec.out,
                        json.dumps(spec.to_dict()), *owner, spec.out, job_id,
                    ),
                ).rowcount  # fmt: skip
            if inserted != 1:
                self._refuse_busy_out(spec.out, job_id)
                raise InputError(f"Another job is producing {spec.out!r}: choose another name.")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if start:
            self._spawn(job_id, owner)
        return self.get(job_id)

    def _refuse_busy_out(self, out: str, job_id: str) -> None:
        """InputError naming the other job (queued, running or interrupted) producing ``out``."""
        producing = (*ACTIVE, "interrupted")
        busy = [j for j in self.list() if j.out == out and j.id != job_id and j.status in producing]
        if busy:
            other = busy[0]
            hint = " (resume or delete it)" if other.status == "interrupted" else ""
            raise InputError(
                f"Job {other.id} ({other.status}{hint}) is already producing {out!r}: "
                "choose another name."
            )

    def command(self, job_id: str) -> list[str]:
        """The command line that runs a job (torchrun when it asks for several processes)."""
        processes = self.spec(job_id).processes
        worker = ["-m", "engine.finetune.worker", job_id]
        if processes > 1:
            return [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(processes), *worker,
            ]  # fmt: skip
        return [sys.executable, *worker]

    def launch(self, job_id: str) -> JobInfo:
        """Start the process of a job that is not running (interrupted, failed, cancelled, or
        queued with no live process). The job is claimed with one compare-and-set first: of
        two concurrent calls exactly one starts a process, the other gets an ``InputError``."""
        owner = self._claim(job_id)
        self._spawn(job_id, owner)
        return self.get(job_id)

    def _claim(self, job_id: str) -> tuple[int, float]:
        """Mark a resumable job queued and owned by this process, if nobody changed it since
        we read it and no other job is producing its store name; returns the owner."""
        row = self._row(job_id)
        info = self._info(row)
        if not info.resumable:
            raise InputError(
                f"Job {job_id} is {info.status}: only interrupted, failed or cancelled jobs resume."
            )
        owner = _me()
        with self._db() as db:
            claimed = db.execute(
                "UPDATE jobs SET status = 'queued', pid = ?, pid_started = ?, error = NULL, "
                "updated = ? WHERE id = ? AND status = ? AND pid IS ? AND pid_started IS ? "
                f"AND NOT EXISTS ({_SAME_OUT_BUSY})",
                (
                    *owner, time.time(), job_id, row["status"], row["pid"], row["pid_started"],
                    row["out"], job_id,
                ),
            ).rowcount  # fmt: skip
        if claimed != 1:
            self._refuse_busy_out(row["out"], job_id)
            now = self.get(job_id)
            raise InputError(
                f"Job {job_id} was just started by another request (it is {now.status} now): "
                "nothing to do."
            )
        return owner

    def _spawn(self, job_id: str, owner: tuple[int | None, float | None]) -> None:
        """Start the job's process in its own session (it survives the app); the job must be
        claimed by ``owner`` (this process). A failed start marks the job failed."""
        folder = self.folder(job_id)
        (folder / "CANCEL").unlink(missing_ok=True)
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
            self.set_status(job_id, "failed", f"Could not start the job's process: {exc}")
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
        this process claims it, by compare-and-set. Raises ``InputError`` when another live
        process already runs the job or it has completed.
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
            if not self.set_status(job_id, "running", expect=ACTIVE):
                raise InputError(f"Job {job_id} changed while starting: it is no longer queued.")
            return
        with self._db() as db:
            claimed = db.execute(
                "UPDATE jobs SET status = 'running', pid = ?, pid_started = ?, error = NULL, "
                "updated = ? WHERE id = ? AND status = ? AND pid IS ? AND pid_started IS ?",
                (
                    me.pid, me.create_time(), time.time(), job_id, row["status"], row["pid"],
                    row["pid_started"],
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
        completed, failed or cancelled)."""
        marks = ", ".join("?" * len(expect))
        with self._db() as db:
            changed = db.execute(
                f"UPDATE jobs SET status = ?, error = ?, updated = ? "
                f"WHERE id = ? AND status IN ({marks})",
                (status, error, time.time(), job_id, *expect),
            ).rowcount
        return changed == 1

    def cancel(self, job_id: str) -> JobInfo:
        """Ask a job to stop: a flag file every process checks each step (it saves a checkpoint
        and exits; resume continues from there)."""
        info = self.get(job_id)
        if not info.active:
            raise InputError(f"Job {job_id} is {info.status}, not running: nothing to cancel.")
        atomic_write_text(self.folder(job_id) / "CANCEL", str(time.time()), "the cancel flag")
        return self.get(job_id)

    def resume(self, job_id: str) -> JobInfo:
        """Restart an interrupted, failed or cancelled job from its last checkpoint.

        Two concurrent calls (two Resume clicks) start one process: the other is refused."""
        info = self.get(job_id)
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
            if self.result(job_id) is None:
                result = _result_from_manifest(job_id, info.out, manifest)
                atomic_write_json(
                    self.folder(job_id) / "result.json", result.to_dict(), "the job's result"
                )
            self.set_status(job_id, "completed", expect=(*ACTIVE, *RESUMABLE))
            return self.get(job_id)
        return self.launch(job_id)

    def merge(self, job_id: str) -> FinetuneResult:
        """Merge a completed LoRA job's adapter (kept unmerged) into its base and store the
        model under the job's name; returns the updated result. Runs here (seconds)."""
        info = self.get(job_id)
        if info.status != "completed":
            raise InputError(f"Job {job_id} is {info.status}: only a completed job can merge.")
        if info.out in ModelStore(self.home).names():
            raise InputError(f"{info.out!r} is already in the store: nothing to merge.")
        from engine.finetune.train import merge_adapter

        return merge_adapter(self.folder(job_id), self.home)

    def delete(self, job_id: str) -> None:
        """Remove a finished job's folder and row (the stored model stays)."""
        row = self._row(job_id)
        info = self._info(row)
        if info.active:
            raise InputError(f"Job {job_id} is still {info.status}: cancel it first.")
        with self._db() as db:  # compare-and-set: not if a Resume started it meanwhile
            deleted = db.execute(
                "DELETE FROM jobs WHERE id = ? AND status = ? AND pid IS ?",
                (job_id, row["status"], row["pid"]),
            ).rowcount
        if deleted != 1:
            raise InputError(f"Job {job_id} changed meanwhile (it is {self.get(job_id).status}).")
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    # --- reading -------------------------------------------------------------------------

    def _row(self, job_id: str) -> sqlite3.Row:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise InputError(f"No fine-tuning job {job_id!r}: see the list of jobs.")
        return row

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.from_dict(json.loads(self._row(job_id)["spec"]))

    def _info(self, row: sqlite3.Row) -> JobInfo:
        folder = self.folder(row["id"])
        status = row["status"]
        if status in ACTIVE and not _alive(row["pid"], row["pid_started"]):
            status = "interrupted"  # killed (-9, OOM, reboot): resumable
        state = read_json(folder / "state.json", {}) or {}
        return JobInfo(
            id=row["id"],
            status=status,
            base=row["base"],
            task=row["task"],
            out=row["out"],
            created=row["created"],
            updated=row["updated"],
            error=row["error"],
            phase=state.get("phase", "queued" if status in ACTIVE else status),
            step=int(state.get("step", 0)),
            total_steps=int(state.get("total_steps", 0)),
            eta_s=_eta(state) if status == "running" else None,
            message=state.get("message", ""),
            folder=folder,
            pid=row["pid"],
        )

    def get(self, job_id: str) -> JobInfo:
        return self._info(self._row(job_id))

    def run(self, job_id: str) -> JobRun:
        """The job through the run interface: ``snapshot()``, ``cancel()``, ``wait()``, ``done``."""
        return JobRun(self, job_id)

    def list(self) -> list[JobInfo]:
        """All jobs, newest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC").fetchall()
        return [self._info(r) for r in rows]

    def metrics(self, job_id: str) -> list[dict]:
        """Train-log and evaluation records, in order (``type`` is "train" or "eval")."""
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
