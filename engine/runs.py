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

Limits: starting a run counts against the acting user's ``requests_per_minute`` (a sliding
60 s window per user name; ``LimitError`` with ``retry_after_s`` in the caller's thread, so a
refused request never hangs). Runs started by another run's work are part of that request and
do not count, and the implicit local user (a laptop, the CLI, Python without a login) is not
limited (``enforced_limits``). A run that runs out of memory (CUDA, or the CPU allocator) ends
failed with one line saying what ran out and what to do; its tensors are dropped and the
allocator's cache emptied, so the next run on the same model works.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import math
import os
import queue
import re
import secrets
import sys
import threading
import time
import traceback
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


# --- limits: who may start what -----------------------------------------------------------


def enforced_limits(user: access.User | None = None) -> access.Limits | None:
    """The acting user's limits, or None for the implicit local user (``access.LOCAL``: a
    laptop, the CLI or Python without a login), who is not limited: nothing changes for a
    single user. Every entry point checks its sizes against what this returns."""
    user = user or access.current_user()
    if user == access.LOCAL:
        return None
    return access.limits_for(user)


class RequestRate:
    """Runs started per user name in a sliding window (thread-safe).

    ``admit(user, limit)`` counts one request or raises ``LimitError``; a ``limit`` of 0
    means the role may start no runs at all. ``clock``: seconds, monotonic (tests inject one).
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._started: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, user: access.User, limit: int) -> float:
        """Count a request by ``user`` (returns its time stamp, for ``forget``), or raise
        ``LimitError`` when ``limit`` requests already started in the window."""
        if limit <= 0:
            raise access.LimitError(
                f"{_a(user.role).capitalize()} may not start runs here (requests_per_minute is 0 in "
                "limits.toml): ask an admin."
            )
        now = self._clock()
        with self._lock:
            started = self._started.setdefault(user.name, collections.deque())
            while started and started[0] <= now - self.window_s:
                started.popleft()
            if len(started) >= limit:
                # the request whose expiry brings the count under the limit
                expires = started[len(started) - limit] + self.window_s
                retry = max(expires - now, 0.001)
                raise access.LimitError(
                    f"You started {len(started)} runs in the last minute ({_a(user.role)} may "
                    f"start {limit}): try again in {math.ceil(retry)} s.",
                    retry_after_s=retry,
                )
            started.append(now)
            return now

    def forget(self, user: access.User, stamp: float) -> None:
        """Un-count a request that did not start after all (e.g. its result did not fit)."""
        with self._lock:
            started = self._started.get(user.name)
            if started and stamp in started:
                started.remove(stamp)

    def count(self, user: access.User) -> int:
        """Requests ``user`` started in the current window."""
        now = self._clock()
        with self._lock:
            return sum(1 for t in self._started.get(user.name, ()) if t > now - self.window_s)

    def reset(self) -> None:
        with self._lock:
            self._started.clear()


REQUEST_RATE = RequestRate()


def _a(role: str) -> str:
    return f"{'an' if role[:1] in 'aeiou' else 'a'} {role}"


# --- out of memory ------------------------------------------------------------------------

_OOM_TEXT = re.compile(
    r"out of memory|can't allocate memory|cannot allocate memory|ALLOC_FAILED", re.IGNORECASE
)
_ASKED = (
    (re.compile(r"Tried to allocate ([\d.]+ ?[KMGT]i?B)"), None),  # CUDA
    (re.compile(r"you tried to allocate (\d+) bytes"), 1),  # torch's CPU allocator
    (re.compile(r"Unable to allocate ([\d.]+ ?[KMGT]i?B)"), None),  # numpy
)
_FREE = re.compile(r"of which ([\d.]+ ?[KMGT]i?B) (?:is )?free")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from) is an allocation failure: torch's
    ``OutOfMemoryError`` (CUDA, MPS), a ``MemoryError``, or the CPU allocator's RuntimeError."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError):
            return True
        torch = sys.modules.get("torch")
        oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
        if oom_type is not None and isinstance(exc, oom_type):
            return True
        if isinstance(exc, RuntimeError) and _OOM_TEXT.search(str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def out_of_memory_error(exc: BaseException, operation: str = "run") -> MemoryBudgetError:
    """The one-line error for an allocation failure: what ran out, how much was asked (when
    the allocator said), and what to do."""
    text = str(exc)
    torch = sys.modules.get("torch")
    cuda_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    on_gpu = (cuda_type is not None and isinstance(exc, cuda_type)) or "CUDA" in text
    where = "GPU" if on_gpu else ("Apple GPU" if "MPS" in text else "CPU")
    details = []
    for pattern, as_bytes in _ASKED:
        match = pattern.search(text)
        if match:
            asked = _gib(int(match.group(1))) if as_bytes else match.group(1)
            details.append(f"it asked for {asked} more")
            break
    free = _FREE.search(text)
    if free:
        details.append(f"{free.group(1)} was free")
    detail = f" ({', '.join(details)})" if details else ""
    return MemoryBudgetError(
        f"{operation.capitalize()} ran out of {where} memory{detail}; the memory was freed: "
        "try a shorter input, a smaller batch size, fewer steps or samples, or a smaller model."
    )


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Clear the locals of the frames an error (and the errors it was raised from) holds."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def free_memory() -> None:
    """Collect garbage and return cached allocator blocks to the device (after an OOM).

    Never imports torch: with torch not imported there are no tensors to free."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


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

    @property
    def cost(self) -> float:
        """The run's scheduling cost (``engine.scheduler``); 1.0 once nobody holds the run."""
        run = self._run_ref()
        return float(run.cost) if run is not None else 1.0

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
        stamp = self._admit()  # LimitError here, past the user's requests per minute
        self._on_finish = on_finish
        self.record_error: str | None = None
        self.operation = operation
        self.spec = spec
        self.idle_timeout_s = idle_timeout_s
        self.started = time.time()
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        self._work: Callable[[RunContext], R] | None = work
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
            try:
                self._ticket = budget.reserve(reserve_bytes, f"This {operation} result")
            except BaseException:
                if stamp is not None:  # refused before it started: it does not count
                    REQUEST_RATE.forget(self.user, stamp)
                raise
            # Released when nobody holds the run any more (a closed session, a replaced result).
            self._release = weakref.finalize(self, budget.release, self._ticket)
        _WORKERS.submit(self._main)

    def _admit(self) -> float | None:
        """Count this run against its user's requests per minute (``LimitError`` here, in the
        caller's thread). Runs started by a running run's work, and the local user's, are
        not counted. Returns the time stamp counted, or None."""
        if current() is not None:
            return None
        limits = enforced_limits(self.user)
        if limits is None:
            return None
        return REQUEST_RATE.admit(self.user, limits.requests_per_minute)

    def _main(self) -> None:
        _CURRENT.context = self.context
        out_of_memory = False
        try:
            with access.acting_as(self.user):
                result = self._work(self.context)
            state: State = "done"
        except CancelledError as exc:
            result, state, self._error = None, "cancelled", exc
        except BaseException as exc:  # noqa: BLE001 - a run always ends and reports
            result, state = None, "failed"
            if is_out_of_memory(exc) and not isinstance(exc, MemoryBudgetError):
                # Keep only the message: the traceback's frames hold the work's tensors.
                self._error = out_of_memory_error(exc, self.operation)
                _drop_tracebacks(exc)
                out_of_memory = True
            else:
                self._error = exc
        finally:
            _CURRENT.context = None
            self._work = None  # the work's closure (its inputs) is not needed any more
        if out_of_memory:
            free_memory()
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
