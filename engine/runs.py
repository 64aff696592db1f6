"""One run mechanism for every capability: a spec in, a typed result with provenance out.

Generation, comparison, evaluation, attention, explanation and classification all start a
``Run``: the work runs on a long-lived worker thread and talks to the run only through its
``RunContext`` (progress, partial output, cancel checks). Callers (pages, CLI, HTTP, Python)
never wait on the work: they poll ``snapshot()``, a consistent copy of the run's state, and
call ``cancel()``. A run ends in exactly one of three ways: a result, a one-line error, or a
cancellation.

    run = start("generate", work, spec=settings, idle_timeout_s=30)
    while not run.snapshot().finished: ...
    run.cancel(); result = run.wait()

A run nobody polls for ``idle_timeout_s`` cancels itself (a closed browser tab must not keep
a model busy). A run whose result is large reserves its estimated size in the process's
``ResultBudget`` before it starts; the reservation is released when nobody holds the run any
more (or when it ends without a result).
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from engine import access
from engine.errors import CancelledError, EngineError, MemoryBudgetError

R = TypeVar("R")
# Operations that run a model: only roles allowed to "run" may start them (a re-run inside
# ``access.reproducing()`` needs "reproduce" only).
MODEL_OPERATIONS = frozenset(
    {"generate", "compare", "perplexity", "classify", "attention", "explain", "calibrate"}
)
State = Literal["running", "waiting", "done", "failed", "cancelled"]
FINISHED: tuple[State, ...] = ("done", "failed", "cancelled")


# --- the result budget --------------------------------------------------------------------


def default_result_budget() -> int:
    """``WORKBENCH_RESULT_BUDGET_GB``, else a quarter of the RAM capped at 8 GiB (bytes)."""
    raw = os.environ.get("WORKBENCH_RESULT_BUDGET_GB", "").strip()
    if raw:
        try:
            return int(float(raw) * 2**30)
        except ValueError:
            pass
    import psutil

    return min(psutil.virtual_memory().total // 4, 8 * 2**30)


class ResultBudget:
    """Bytes of run results held in this process, against a fixed budget (thread-safe)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_result_budget()
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()
        self._next = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def reserve(self, nbytes: int, what: str) -> int:
        """Reserve ``nbytes`` for ``what``; returns a ticket for ``release``.

        Raises ``MemoryBudgetError`` saying how much is free when it does not fit.
        """
        with self._lock:
            used = sum(self._held.values())
            if used + nbytes > self.budget_bytes:
                free = max(self.budget_bytes - used, 0)
                raise MemoryBudgetError(
                    f"{what} would need {_gib(nbytes)} of memory but the result budget has "
                    f"{_gib(free)} free of {_gib(self.budget_bytes)}: shorten the input, close "
                    "other results, or raise WORKBENCH_RESULT_BUDGET_GB."
                )
            self._next += 1
            self._held[self._next] = nbytes
            return self._next

    def release(self, ticket: int) -> None:
        with self._lock:
            self._held.pop(ticket, None)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.0f} MiB"


_BUDGET: ResultBudget | None = None
_BUDGET_LOCK = threading.Lock()


def result_budget() -> ResultBudget:
    """The process-wide result budget (created on first use)."""
    global _BUDGET
    with _BUDGET_LOCK:
        if _BUDGET is None:
            _BUDGET = ResultBudget()
        return _BUDGET


# --- worker threads -----------------------------------------------------------------------


class _Workers:
    """Long-lived daemon threads that run work, one item per thread at a time.

    A fresh thread per run would pay torch's per-thread start-up (OpenMP team, MKL buffers)
    every time: about 30 ms more time-to-first-token. Work never waits behind other work: with
    no idle worker, a new one starts.
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting for a task that no submit has reserved yet

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._tasks.put(task)
        if spawn:
            threading.Thread(target=self._loop, daemon=True, name="workbench-run").start()

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            finally:
                del task  # an idle worker must not keep the last run (and its result) alive
                with self._lock:
                    self._idle += 1


_WORKERS = _Workers()
_CURRENT = threading.local()


@contextlib.contextmanager
def recording(on_finish: Callable[[Run], None]) -> Iterator[None]:
    """Runs started on this thread inside the block call ``on_finish(run)`` when they end.

    The API layer wraps every capability's ``start_*`` in this, so each run is recorded in its
    workbench's ledger without the capability knowing about ledgers.
    """
    previous = getattr(_CURRENT, "on_finish", None)
    _CURRENT.on_finish = on_finish
    try:
        yield
    finally:
        _CURRENT.on_finish = previous


def current() -> RunContext | None:
    """The context of the run executing on this thread, if any (the model lock reports waits)."""
    return getattr(_CURRENT, "context", None)


# --- runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSnapshot(Generic[R]):
    """A run's state at one instant.

    ``fraction``: progress in [0, 1]; ``message``: what it is doing (or waiting for);
    ``seconds``: wall time since the start; ``partial``: output so far, capability-specific
    (e.g. the streamed text), None when there is none; ``result`` once done; ``error``: the
    one-line message of a failed or cancelled run.
    """

    id: str
    operation: str
    state: State
    fraction: float
    message: str
    seconds: float
    partial: Any
    result: R | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def cancelled(self) -> bool:
        return self.state == "cancelled"

    @property
    def waiting(self) -> bool:
        return self.state == "waiting"


class RunContext:
    """What the work sees of its run: report progress and partial output, check for cancel."""

    def __init__(self, run: Run) -> None:
        # A weak reference: the run holds its context, and a run nobody holds must be freed at
        # once (its result's budget reservation is released then), not at the next GC cycle.
        self._run_ref = weakref.ref(run)
        self.cancel_event = threading.Event()

    @property
    def _run(self) -> Run:
        run = self._run_ref()
        if run is None:  # the work outlived every holder of its run: nobody wants the result
            self.cancel_event.set()
            raise CancelledError("Stopped: nobody holds this run any more.")
        return run

    @property
    def cancelled(self) -> bool:
        """True once cancelled, or once nobody has polled for longer than the idle timeout."""
        run = self._run
        idle = time.monotonic() - run._last_polled
        timed_out = run.idle_timeout_s is not None and idle > run.idle_timeout_s
        if timed_out and not self.cancel_event.is_set():
            run._cancel_reason = "Stopped: nobody was watching this run (idle timeout)."
            self.cancel_event.set()
        return self.cancel_event.is_set()

    def check(self) -> None:
        """Raise ``CancelledError`` when the run was cancelled."""
        if self.cancelled:
            raise CancelledError(self._run._cancel_reason)

    def progress(self, fraction: float, message: str = "") -> None:
        with self._run._lock:
            self._run._fraction = min(max(float(fraction), 0.0), 1.0)
            if message:
                self._run._message = message
        self.cancelled  # noqa: B018 - evaluates the idle timeout

    def partial(self, value: Any) -> None:
        """Publish output so far (an immutable value: the snapshot hands it out as is)."""
        with self._run._lock:
            self._run._partial = value
        self.cancelled  # noqa: B018 - evaluates the idle timeout

    def waiting(self, message: str) -> None:
        """The work is blocked on a shared resource (e.g. another run holds the model)."""
        with self._run._lock:
            self._run._state, self._run._waiting_for = "waiting", message

    def resumed(self) -> None:
        with self._run._lock:
            self._run._state, self._run._waiting_for = "running", None


class Run(Generic[R]):
    """One capability's work on a worker thread; see the module docstring.

    ``spec`` is what was asked for (kept for provenance and re-runs); ``operation`` names the
    capability ("generate", "attention", ...). ``user`` is who started it (the acting user at
    start; the work acts as them); ``cost`` is what it asks of the model in scheduling units
    (tokens, or attribution steps x targets), for fair queueing.
    """

    def __init__(
        self,
        operation: str,
        work: Callable[[RunContext], R],
        *,
        spec: Any = None,
        idle_timeout_s: float | None = None,
        reserve_bytes: int = 0,
        budget: ResultBudget | None = None,
        on_finish: Callable[[Run], None] | None = None,
        cost: float = 1.0,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.user = access.current_user()
        if operation in MODEL_OPERATIONS:
            access.require_run()  # the engine, not only the page, refuses a role that may not
        self.cost = max(float(cost), 1.0)
        self._on_finish = on_finish
        self.record_error: str | None = None
        self.operation = operation
        self.spec = spec
        self.idle_timeout_s = idle_timeout_s
        self.started = time.time()
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        self._work = work
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._state: State = "running"
        self._fraction = 0.0
        self._message = "Starting…"
        self._waiting_for: str | None = None
        self._partial: Any = None
        self._result: R | None = None
        self._error: BaseException | None = None
        self._cancel_reason = "Cancelled."
        self._last_polled = time.monotonic()
        self.context = RunContext(self)
        self._ticket: int | None = None
        if reserve_bytes > 0:
            budget = budget or result_budget()
            self._ticket = budget.reserve(reserve_bytes, f"This {operation} result")
            # Released when nobody holds the run any more (a closed session, a replaced result).
            self._release = weakref.finalize(self, budget.release, self._ticket)
        _WORKERS.submit(self._main)

    def _main(self) -> None:
        _CURRENT.context = self.context
        try:
            with access.acting_as(self.user):
                result = self._work(self.context)
            state: State = "done"
        except CancelledError as exc:
            result, state, self._error = None, "cancelled", exc
        except BaseException as exc:  # noqa: BLE001 - a run always ends and reports
            result, state, self._error = None, "failed", exc
        finally:
            _CURRENT.context = None
        if state == "done" and self.context.cancel_event.is_set() and result is None:
            state = "cancelled"
        with self._lock:
            self._result, self._state = result, state
            if state == "done":
                self._fraction, self._message = 1.0, "Done."
            self._t1 = time.perf_counter()
        if state != "done" and self._ticket is not None:
            self._release()
        if self._on_finish is not None:
            try:  # e.g. the run ledger: a failure to record must not lose the result
                with access.acting_as(self.user):
                    self._on_finish(self)
            except Exception as exc:  # noqa: BLE001
                self.record_error = one_line_error(exc, "recording")
        self._done.set()

    # --- what callers use -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the run has ended (result, error or cancellation)."""
        return self._done.is_set()

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def seconds(self) -> float:
        return (self._t1 or time.perf_counter()) - self._t0

    def cancel(self) -> None:
        """Ask the work to stop at its next check (within one forward pass or token)."""
        self.context.cancel_event.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True when the run has ended."""
        return self._done.wait(timeout)

    def wait(self, timeout: float | None = None) -> R:
        """The result; re-raises the work's error. ``TimeoutError`` if still running."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the {self.operation} run is still going")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    @property
    def result(self) -> R | None:
        return self._result if self.done else None

    @property
    def error(self) -> BaseException | None:
        return self._error if self.done else None

    def error_message(self) -> str | None:
        """One line for a failed or cancelled run, None otherwise."""
        return one_line_error(self._error, self.operation) if self.done else None

    def touch(self) -> None:
        """Record that somebody is watching (``snapshot`` does this too)."""
        self._last_polled = time.monotonic()

    def snapshot(self) -> RunSnapshot[R]:
        """A consistent copy of the run's state; also counts as a poll for the idle timeout.

        A run shows as finished only once it is completely over (its ``on_finish``, e.g. the
        ledger record, included), so whoever sees "done" can also find its record.
        """
        self.touch()
        return self.outcome(final_only=True)

    def outcome(self, final_only: bool = False) -> RunSnapshot[R]:
        """The run's state as it is, without counting as a poll: what an ``on_finish``
        callback reads (the run has ended but ``done`` is not set until the callback returns).
        ``final_only``: report an ended run as still running until ``done`` is set."""
        with self._lock:
            state = self._state
            if final_only and state in FINISHED and not self._done.is_set():
                state = "running"
            message = self._waiting_for or self._message
            return RunSnapshot(
                id=self.id,
                operation=self.operation,
                state=state,
                fraction=self._fraction,
                message=message,
                seconds=self.seconds,
                partial=self._partial,
                result=self._result if state == "done" else None,
                error=one_line_error(self._error, self.operation) if state in FINISHED else None,
            )

    def __repr__(self) -> str:
        return f"Run({self.operation!r}, id={self.id}, state={self.state})"


def one_line_error(exc: BaseException | None, operation: str = "run") -> str | None:
    """The user-facing line for an error: an ``EngineError``'s own message, else type + text."""
    if exc is None:
        return None
    if isinstance(exc, EngineError):
        text = str(exc)
    else:
        text = f"{operation.capitalize()} failed: {type(exc).__name__}: {exc}"
    line = " ".join(text.split())
    return line if len(line) <= 500 else line[:497] + "…"


def start(
    operation: str,
    work: Callable[[RunContext], R],
    *,
    spec: Any = None,
    idle_timeout_s: float | None = None,
    reserve_bytes: int = 0,
    on_finish: Callable[[Run], None] | None = None,
    cost: float = 1.0,
) -> Run[R]:
    """Start ``work(ctx)`` as a run on a worker thread and return at once.

    ``reserve_bytes``: the result's estimated size, reserved in the result budget before the
    run starts (``MemoryBudgetError`` here, in the caller's thread, when it does not fit).
    ``on_finish(run)``: called once on the worker thread when the run has ended, before
    ``wait()`` returns (the run ledger records it there).
    ``cost``: scheduling units (tokens; attribution steps x targets) for the fair scheduler.
    The run belongs to the acting user (``engine.access``); with login required and nobody
    logged in, ``AccessError`` is raised here.
    """
    return Run(
        operation,
        work,
        spec=spec,
        idle_timeout_s=idle_timeout_s,
        reserve_bytes=reserve_bytes,
        on_finish=on_finish or getattr(_CURRENT, "on_finish", None),
        cost=cost,
    )
