"""A fine-tuning job seen through the one run interface (``engine.runs``).

A job runs in its own process with its state on disk; ``JobRun`` reads that state and answers
like an in-process ``Run``: ``snapshot()`` (a ``RunSnapshot`` whose ``partial`` is a
``FinetuneProgress`` and whose ``result`` is the ``FinetuneResult``), ``cancel()``,
``wait(timeout)``, ``join(timeout)`` and ``done``. The job's own status maps onto run states:

    queued, running -> running     completed -> done     failed, interrupted -> failed
    cancelled -> cancelled         queued waiting in the lane for a slot -> waiting

No torch here, and no import of ``jobs``: ``JobStore.run(job_id)`` makes one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from engine.errors import CancelledError, EngineError, InputError
from engine.finetune.result import FinetuneProgress, FinetuneResult
from engine.runs import FINISHED, RunSnapshot, State, one_line_error

OPERATION = "finetune"
STATES: dict[str, State] = {
    "queued": "running",
    "running": "running",
    "completed": "done",
    "failed": "failed",
    "interrupted": "failed",
    "cancelled": "cancelled",
}


class JobRun:
    """The run interface over job ``job_id`` of ``jobs`` (a ``JobStore``).

    Every call reads the job's current state (SQLite row, state.json, metrics.jsonl), so a
    ``JobRun`` never goes stale and several may watch one job. ``poll_s``: seconds between
    reads while ``wait``/``join`` block.
    """

    operation = OPERATION

    def __init__(self, jobs: Any, job_id: str, poll_s: float = 0.25) -> None:
        self.jobs = jobs
        self.id = job_id
        self.poll_s = poll_s
        jobs.get(job_id)  # an unknown id is an InputError here, not at the first snapshot

    def _state(self) -> tuple[Any, State]:
        info = self.jobs.get(self.id)
        if getattr(info, "waiting", False):
            return info, "waiting"  # in line for a training slot ("queued: 2nd in line")
        return info, STATES.get(info.status, "failed")

    def snapshot(self) -> RunSnapshot[FinetuneResult]:
        """The job now: state, fraction = step / total steps, message, seconds since it was
        created (until its last update once finished), partial = ``FinetuneProgress`` (latest
        metrics included), result once done, one-line error once failed or cancelled. A job
        waiting in the lane is ``waiting`` with the message "Queued: 2nd in line ..."."""
        info, state = self._state()
        progress = FinetuneProgress(
            status=info.status,
            phase=info.phase,
            step=info.step,
            total_steps=info.total_steps,
            eta_s=info.eta_s,
            records=tuple(self.jobs.metrics(self.id)),
        )
        end = info.updated if state in FINISHED else time.time()
        return RunSnapshot(
            id=self.id,
            operation=OPERATION,
            state=state,
            fraction=1.0 if state == "done" else info.fraction,
            message=info.message or info.phase,
            seconds=max(0.0, end - info.created),
            partial=progress,
            result=self.jobs.result(self.id) if state == "done" else None,
            error=_error_line(info) if state in ("failed", "cancelled") else None,
        )

    @property
    def done(self) -> bool:
        """True once the job has ended (completed, failed, cancelled or interrupted)."""
        return self._state()[1] in FINISHED

    def cancel(self) -> None:
        """Ask the job to stop at its next step (it keeps a checkpoint; resume continues).
        Does nothing when it is not running, like ``Run.cancel``."""
        with contextlib.suppress(InputError):
            self.jobs.cancel(self.id)

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever); True when the job has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)
        return True

    def wait(self, timeout: float | None = None) -> FinetuneResult | None:
        """The result once done. A cancelled job raises ``CancelledError``, a failed or
        interrupted one ``EngineError`` (its one-line reason); ``TimeoutError`` if still going."""
        if not self.join(timeout):
            raise TimeoutError(f"fine-tuning job {self.id} is still going")
        snap = self.snapshot()
        if snap.state == "cancelled":
            raise CancelledError(snap.error or "Cancelled.")
        if snap.state == "failed":
            raise EngineError(snap.error or f"Fine-tuning job {self.id} failed.")
        return snap.result

    @property
    def result(self) -> FinetuneResult | None:
        return self.jobs.result(self.id) if self._state()[1] == "done" else None

    def error_message(self) -> str | None:
        """One line for a failed, interrupted or cancelled job, None otherwise."""
        info, state = self._state()
        return _error_line(info) if state in ("failed", "cancelled") else None

    def __repr__(self) -> str:
        return f"JobRun({self.id!r})"


def _error_line(info: Any) -> str:
    if info.status == "interrupted":
        text = (
            f"Job {info.id} was interrupted (its process ended without finishing): resume it "
            "to continue from its last checkpoint."
        )
    elif info.error:
        text = info.error
    elif info.status == "cancelled":
        text = "Cancelled."
    else:
        text = f"Job {info.id} failed: see its log ({info.folder}/log.txt)."
    return one_line_error(EngineError(text), OPERATION) or text
