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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.catalog import resolve
from engine.errors import InputError
from engine.finetune import data as ftdata
from engine.finetune.config import JobSpec
from engine.store import ModelStore, workbench_home

ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "failed", "cancelled")
REPO = Path(__file__).resolve().parents[2]
_children: dict[int, subprocess.Popen] = {}  # reaped on refresh so they do not stay zombies

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


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, value) -> None:
    """Atomic write (temp file + rename): readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


class JobStore:
    """The job table and folders. Safe to use from several processes (SQLite, WAL)."""

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
        """Validate ``spec`` and its data, copy the data into a new job folder, start the job."""
        spec = spec.validated()
        store = ModelStore(self.home)
        resolve(spec.base, store.names())  # unknown base: clear error now, not in the job
        if spec.out in store.names():
            raise InputError(
                f"A model named {spec.out!r} is already in the store: choose another name."
            )
        busy = [j for j in self.list() if j.active and j.out == spec.out]
        if busy:
            raise InputError(
                f"Job {busy[0].id} is already producing {spec.out!r}: choose another name."
            )
        source = Path(spec.data)
        ftdata.load(source, spec.task, spec.columns, spec.train.val_fraction, spec.train.seed)
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.folder(job_id)
        folder.mkdir(parents=True)
        copy = folder / f"data{source.suffix.lower()}"
        shutil.copyfile(source, copy)
        spec = JobSpec.from_dict({**spec.to_dict(), "data": str(copy)})
        write_json(folder / "spec.json", spec.to_dict())
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, created, updated, status, base, task, out, spec) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, now, now, spec.base, spec.task, spec.out, json.dumps(spec.to_dict())),
            )
        if start:
            self.launch(job_id)
        return self.get(job_id)

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

    def launch(self, job_id: str) -> None:
        """Start the job's process in its own session (it survives the app)."""
        folder = self.folder(job_id)
        (folder / "CANCEL").unlink(missing_ok=True)
        env = {
            **os.environ,
            "WORKBENCH_HOME": str(self.home),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
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
        _children[proc.pid] = proc
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = None
        self._update(job_id, status="queued", pid=proc.pid, pid_started=started, error=None)

    def attach(self, job_id: str) -> None:
        """Called by the worker (process 0): a job started by hand (``torchrun ... -m
        engine.finetune.worker JOB_ID`` on a cluster) has no live process on record yet, so
        record this one; it is what the job's liveness is judged by."""
        row = self._row(job_id)
        if not _alive(row["pid"], row["pid_started"]):
            me = psutil.Process()
            self._update(job_id, pid=me.pid, pid_started=me.create_time())

    def set_status(self, job_id: str, status: str, error: str | None = None) -> None:
        """Called by the worker: running, completed, failed or cancelled."""
        self._update(job_id, status=status, error=error)

    def _update(self, job_id: str, **fields) -> None:
        fields["updated"] = time.time()
        names = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    def cancel(self, job_id: str) -> JobInfo:
        """Ask a job to stop: a flag file every process checks each step (it saves a checkpoint
        and exits; resume continues from there)."""
        info = self.get(job_id)
        if not info.active:
            raise InputError(f"Job {job_id} is {info.status}, not running: nothing to cancel.")
        (self.folder(job_id) / "CANCEL").write_text(str(time.time()))
        return self.get(job_id)

    def resume(self, job_id: str) -> JobInfo:
        """Restart an interrupted, failed or cancelled job from its last checkpoint."""
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
                extra = manifest.extra
                write_json(
                    self.folder(job_id) / "result.json",
                    {
                        "model": info.out,
                        "base": manifest.base_model,
                        "base_fingerprint": manifest.base_fingerprint,
                        "task": extra.get("task"),
                        "labels": extra.get("labels", []),
                        "data_hash": extra.get("data_hash"),
                        "steps": extra.get("steps"),
                        "metrics_before": extra.get("metrics_before", {}),
                        "metrics_after": extra.get("metrics_after", {}),
                        "adapter": extra.get("hyperparameters", {}).get("lora", False),
                    },
                )
            self.set_status(job_id, "completed")
            return self.get(job_id)
        self.launch(job_id)
        return self.get(job_id)

    def merge(self, job_id: str) -> dict:
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
        info = self.get(job_id)
        if info.active:
            raise InputError(f"Job {job_id} is still {info.status}: cancel it first.")
        with self._db() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
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

    def result(self, job_id: str) -> dict | None:
        """Final metrics (before/after) and the store entry, once the job completed."""
        return read_json(self.folder(job_id) / "result.json")

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        path = self.folder(job_id) / "log.txt"
        if not path.exists():
            return ""
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64_000))
            text = fh.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait(
        self, job_id: str, timeout_s: float = 3600, poll_s: float = 0.5, on_update=None
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


def _eta(state: dict) -> float | None:
    """Seconds left from the speed of this run segment (steps since the last (re)start)."""
    done = state.get("step", 0) - state.get("segment_start_step", 0)
    elapsed = state.get("updated", 0) - state.get("segment_started", 0)
    total = state.get("total_steps", 0)
    if done <= 0 or elapsed <= 0 or not total:
        return None
    return max(0.0, (total - state["step"]) * elapsed / done)
