"""A fair scheduler in front of each model: who runs next, how many at once, and batches.

Every engine call that runs a model takes a *grant* on it (``LoadedModel.use()`` asks here).
One grant per model at a time; the others wait in that model's queue as *tickets*:

- **Order**: instructors and admins first (``User.priority``), then start-time fair queueing
  by cost: a ticket's start tag is ``max(virtual time, the user's last finish tag)`` and its
  finish tag adds its cost (tokens; attribution steps x targets). The ticket with the smallest
  start tag goes next, so a user who queued ten 1,000-token requests gets one of them, then
  every other user's short request goes before their second. FIFO within a user.
- **Per-user concurrency**: at most ``access.limits_for(user).concurrent_runs`` threads of a
  user hold a grant (or a batch seat) at once, across all models; their next request waits.
- **Re-entrant**: a thread that holds a model may ``use()`` it again (nested calls).
- **Batches**: a ticket may carry a batchable request (``batch``, with ``batch_key`` and
  ``dedup_key`` attributes). When such a ticket is granted, the waiting tickets with the same
  ``batch_key`` are taken along in fair order (up to ``MAX_BATCH_ROWS`` distinct
  ``dedup_key`` s): they become *seats* of the grant, and the grant's holder computes them all.
- **Waiting is visible and cancellable**: inside a run, a waiting ticket reports "Waiting for
  NAME: another run is using it; 3rd in line, about 12 s" (the estimate: a moving average of
  seconds per cost unit measured on that model), and a cancelled run leaves the queue at once.

Everything here is guarded by one process-wide condition: grants on one model depend on the
users' seats on every other model.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import weakref
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from engine import access, runs
from engine.errors import CancelledError, EngineError

__all__ = ["MAX_BATCH_REQUESTS", "MAX_BATCH_ROWS", "Batchable", "Grant", "ModelQueue", "ordinal"]

MAX_BATCH_ROWS = 16  # distinct computations decoded together in one grant
MAX_BATCH_REQUESTS = 64  # requests served by one grant (identical ones share a row)
EWMA_ALPHA = 0.3
GATHER_S = 0.05  # a batch's holder waits at most this long for recent users to come back
RECENT_S = 2.0  # users served on a model this recently are expected to send more
POLL_S = 0.1  # how often a waiter checks its run for a cancel

_COND = threading.Condition(threading.Lock())
_SEQ = itertools.count()
# user name -> thread idents holding a grant or a seat (a Counter: nested grants count twice)
_ACTIVE: dict[str, Counter[int]] = {}
_QUEUES: weakref.WeakSet[ModelQueue] = weakref.WeakSet()
_HANDING_OVER = -1  # holder while a batch passes from its leader to the thread computing it


class Batchable(Protocol):
    """A request that may be computed together with others (engine.generation.batching)."""

    batch_key: Hashable  # requests with equal keys may share a grant
    dedup_key: Hashable  # requests with equal keys are computed once


@dataclass(eq=False)
class Ticket:
    """One waiting or served use of a model."""

    user: access.User
    cost: float
    start_tag: float
    seq: int
    thread: int
    batch: Batchable | None
    state: Literal["waiting", "granted", "seated", "left"] = "waiting"
    grant: Grant | None = None

    @property
    def order(self) -> tuple[int, float, int]:
        return (self.user.priority, self.start_tag, self.seq)


@dataclass(eq=False)
class Grant:
    """What a ``use()`` holds. ``members``: the batch payloads this grant computes (its own
    first); ``seated``: True for a request taken along in another thread's grant (its result
    comes from that thread)."""

    queue: ModelQueue
    ticket: Ticket | None
    members: list[Any] = field(default_factory=list)
    seated: bool = False
    started: float = field(default_factory=time.monotonic)
    cost: float = 1.0
    measured: bool = False  # counts towards the seconds-per-cost estimate (a run's work)
    owner: bool = False  # holds the model for a batch thread (no user seat)

    def hand_over(self) -> Grant:
        """Pass the model to a thread that computes this grant's batch; returns that thread's
        grant (``adopt`` it there, and ``release`` it when the batch is done).

        This grant keeps only its user's seat, like a request taken along: its thread may
        return as soon as its own result is in (a short request or a Stop in a batch with
        a long one does not wait for the whole batch)."""
        with _COND:
            queue = self.queue
            assert self.ticket is not None and not self.seated and queue.depth == 1
            batch = Grant(queue, None, self.members, started=self.started, cost=self.cost)
            batch.measured, batch.owner = self.measured, True
            self.seated = True
            queue.seats += 1
            queue.grant, queue.holder = batch, _HANDING_OVER
            return batch

    def adopt(self) -> None:
        """Called by the thread that computes a handed-over batch: it now holds the model."""
        with _COND:
            assert self.owner and self.queue.holder == _HANDING_OVER
            self.queue.holder = threading.get_ident()

    def release(self) -> None:
        """Release a handed-over batch's hold on the model (from the computing thread)."""
        self.queue._release(self)

    def gather(self, wait_s: float = GATHER_S) -> None:
        """Before computing a batch: wait up to ``wait_s`` for the users served on this model
        in the last ``RECENT_S`` seconds (and not in this batch) to send their next request,
        and take those along. A batch granted the moment the previous one ended would
        otherwise hold only the requests that waited through it, and the users would split
        into groups that take turns. Nothing to wait for (a lone user): returns at once."""
        if self.ticket is None or self.seated or not self.members:
            return
        queue, lead = self.queue, self.members[0]
        deadline = time.monotonic() + wait_s
        with _COND:
            while True:
                queue._seat_along(self, lead)
                now = time.monotonic()
                recent = sum(1 for t in queue.recent.values() if now - t < RECENT_S)
                target = min(recent, MAX_BATCH_ROWS, MAX_BATCH_REQUESTS)
                if len(self.members) >= target or now >= deadline:
                    return
                _COND.wait(deadline - now)


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _limit(user: access.User) -> int:
    return access.limits_for(user).concurrent_runs


def _seat_free(user: access.User, thread: int, taken: Counter[str] | None = None) -> bool:
    """Whether ``thread`` of ``user`` may take one more grant (it already holds one, or the
    user is under their concurrency limit; ``taken``: seats promised in this dispatch)."""
    held = _ACTIVE.get(user.name, Counter())
    if held.get(thread):
        return True
    extra = taken[user.name] if taken else 0
    return len(held) + extra < _limit(user)


def _take_seat(user: access.User, thread: int) -> None:
    _ACTIVE.setdefault(user.name, Counter())[thread] += 1


def _drop_seat(user: access.User, thread: int) -> None:
    held = _ACTIVE.get(user.name)
    if held is None:
        return
    held[thread] -= 1
    if held[thread] <= 0:
        del held[thread]
    if not held:
        del _ACTIVE[user.name]


def _current_cost() -> tuple[float, bool]:
    """The cost of the run executing on this thread (1 outside a run), and whether in a run."""
    context = runs.current()
    if context is None:
        return 1.0, False
    return context.cost, True


class ModelQueue:
    """The queue of one model: its holder, its waiting tickets and its speed estimate."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting: list[Ticket] = []
        self.holder: int | None = None  # thread ident of the grant holder
        self.depth = 0  # nested use() by the holder
        self.grant: Grant | None = None
        self.seats = 0  # requests seated in the current or an earlier grant, not yet done
        self.vtime = 0.0
        self.finish: dict[str, float] = {}  # user name -> finish tag of their last ticket
        self.seconds_per_cost: float | None = None
        self.served: Counter[str] = Counter()  # grants and seats per user (tests, the bench)
        self.recent: dict[str, float] = {}  # user name -> when last granted or seated
        with _COND:
            _QUEUES.add(self)

    # --- what the manager and pages read ---------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while anything holds, waits for or is seated on this model."""
        with _COND:
            return self.holder is not None or bool(self.waiting) or self.seats > 0

    def users_count(self) -> int:
        """Requests holding, seated on or waiting for this model (a batch thread's hold
        counts through the requests seated in it, or as one once they all have results)."""
        with _COND:
            batch = self.grant is not None and self.grant.owner
            holding = self.holder is not None and not batch
            count = holding + self.seats + len(self.waiting)
            return max(count, 1) if self.holder is not None else count

    def waiting_count(self) -> int:
        with _COND:
            return len(self.waiting)

    # --- taking and releasing grants -------------------------------------------------------

    @contextlib.contextmanager
    def use(self, timeout_s: float = 600.0, batch: Batchable | None = None) -> Iterator[Grant]:
        """Hold this model for the block; yields the ``Grant``.

        Waits in fair order (see the module docstring). Inside a run the wait shows in its
        snapshot and a cancel leaves the queue (``CancelledError``). ``EngineError`` after
        ``timeout_s`` of waiting; ``LimitError`` if the user may not run anything at once.
        """
        grant = self._acquire(timeout_s, batch)
        try:
            yield grant
        finally:
            self._release(grant)

    def _acquire(self, timeout_s: float, batch: Batchable | None) -> Grant:
        me = threading.get_ident()
        user = access.current_user()
        cost, in_run = _current_cost()
        with _COND:
            if self.holder == me:  # nested use by the holder: no queueing, no batch
                self.depth += 1
                return Grant(self, None, [batch] if batch is not None else [], cost=cost)
            if _limit(user) < 1:
                access.check_limit(1, 0, "Running a model", "runs at once")
            start = max(self.vtime, self.finish.get(user.name, 0.0))
            ticket = Ticket(user, cost, start, next(_SEQ), me, batch)
            self.finish[user.name] = start + cost
            self.waiting.append(ticket)
            _dispatch_all()
            if ticket.state != "waiting":
                return self._granted(ticket, in_run)
        return self._wait(ticket, timeout_s, in_run)

    def _wait(self, ticket: Ticket, timeout_s: float, in_run: bool) -> Grant:
        context = runs.current()
        deadline = time.monotonic() + timeout_s
        shown = None
        try:
            while True:
                with _COND:
                    state = ticket.state
                    message = self._message(ticket) if state == "waiting" else None
                if state == "seated":
                    return self._granted(ticket, in_run)
                if context is not None and _cancelled(context):
                    self._leave(ticket)  # a grant that came meanwhile is handed on
                    context.check()  # raises with the run's reason
                    raise CancelledError("Cancelled.")
                if state == "granted":
                    return self._granted(ticket, in_run)
                if context is not None and message != shown:
                    context.waiting(message)
                    shown = message
                if time.monotonic() > deadline:
                    self._leave(ticket)
                    raise EngineError(
                        f"{self.name} stayed busy for {timeout_s:.0f} s: try again later."
                    )
                with _COND:
                    if ticket.state == "waiting":
                        _COND.wait(POLL_S)
        finally:
            if context is not None and shown is not None:
                context.resumed()

    def _granted(self, ticket: Ticket, in_run: bool) -> Grant:
        """Called under the lock once ``ticket`` left the waiting list by a grant or a seat."""
        grant = ticket.grant
        assert grant is not None
        grant.measured = in_run
        return grant

    def _leave(self, ticket: Ticket) -> None:
        """Take a waiting ticket out of the queue (cancel, timeout); a ticket granted in the
        meantime is released instead."""
        with _COND:
            if ticket.state == "waiting":
                self.waiting.remove(ticket)
                ticket.state = "left"
                # give back the share it had reserved, if nothing of the user's came after it
                if self.finish.get(ticket.user.name) == ticket.start_tag + ticket.cost:
                    self.finish[ticket.user.name] = ticket.start_tag
                _dispatch_all()
                return
        if ticket.grant is not None:
            self._release(ticket.grant)

    def _release(self, grant: Grant) -> None:
        with _COND:
            if grant.owner:  # a batch thread's hold: no seat
                self._free(grant)
                _dispatch_all()
                return
            if grant.ticket is None:  # a nested use
                self.depth -= 1
                return
            if grant.ticket.state == "left":
                return
            if grant.seated:
                self.seats -= 1
            else:
                self.depth -= 1
                if self.depth > 0:
                    return
                self._free(grant)
            grant.ticket.state = "left"
            _drop_seat(grant.ticket.user, grant.ticket.thread)
            _dispatch_all()

    def _free(self, grant: Grant) -> None:
        """The model is free again; learn its speed from the grant. Under the lock."""
        self.holder, self.grant, self.depth = None, None, 0
        if grant.measured:
            seconds = time.monotonic() - grant.started
            rate = seconds / max(grant.cost, 1.0)
            old = self.seconds_per_cost
            self.seconds_per_cost = (
                rate if old is None else EWMA_ALPHA * rate + (1 - EWMA_ALPHA) * old
            )

    # --- dispatch (under the lock) -------------------------------------------------------

    def _eligible(self) -> list[Ticket]:
        """Waiting tickets whose user has a seat free, in grant order."""
        return sorted(
            (t for t in self.waiting if _seat_free(t.user, t.thread)), key=lambda t: t.order
        )

    def _dispatch(self) -> bool:
        """Grant the model to the next eligible ticket if it is free; True if it did."""
        if self.holder is not None or not self.waiting:
            return False
        eligible = self._eligible()
        if not eligible:
            return False
        ticket = eligible[0]
        self.waiting.remove(ticket)
        ticket.state = "granted"
        self.holder, self.depth = ticket.thread, 1
        _take_seat(ticket.user, ticket.thread)
        self.vtime = max(self.vtime, ticket.start_tag)
        self._served(ticket.user)
        grant = Grant(self, ticket, cost=ticket.cost)
        if ticket.batch is not None:
            grant.members.append(ticket.batch)
            self._seat_along(grant, ticket.batch)
        ticket.grant = self.grant = grant
        return True

    def _served(self, user: access.User) -> None:
        self.served[user.name] += 1
        now = time.monotonic()
        self.recent[user.name] = now
        if len(self.recent) > 4 * MAX_BATCH_REQUESTS:  # forget users long gone
            self.recent = {k: t for k, t in self.recent.items() if now - t < RECENT_S}

    def _seat_along(self, grant: Grant, lead: Batchable) -> None:
        """Take the waiting tickets that can share ``lead``'s batch into ``grant``."""
        rows = {getattr(m, "dedup_key", None) for m in grant.members}
        taken: Counter[str] = Counter()
        for other in sorted(self.waiting, key=lambda t: t.order):
            if len(grant.members) >= MAX_BATCH_REQUESTS:
                break
            req = other.batch
            if req is None or req.batch_key != lead.batch_key:
                continue
            if req.dedup_key not in rows and len(rows) >= MAX_BATCH_ROWS:
                continue
            if not _seat_free(other.user, other.thread, taken):
                continue
            if not _ACTIVE.get(other.user.name, Counter()).get(other.thread):
                taken[other.user.name] += 1
            rows.add(req.dedup_key)
            self.waiting.remove(other)
            other.state = "seated"
            other.grant = Grant(self, other, [req], seated=True, cost=other.cost)
            _take_seat(other.user, other.thread)
            self.seats += 1
            self.vtime = max(self.vtime, other.start_tag)
            self._served(other.user)
            grant.members.append(req)
            grant.cost += other.cost

    # --- what a waiter is told -------------------------------------------------------------

    def _message(self, ticket: Ticket) -> str:
        if not _seat_free(ticket.user, ticket.thread):
            limit = _limit(ticket.user)
            runs_word = "run" if limit == 1 else "runs"
            return (
                f"Waiting for {self.name}: your other {runs_word} must finish first "
                f"(a {ticket.user.role} runs {limit} at a time)."
            )
        ahead = [t for t in self._eligible() if t.order < ticket.order]
        text = (
            f"Waiting for {self.name}: another run is using it; {ordinal(len(ahead) + 1)} in line"
        )
        if self.seconds_per_cost is not None:
            remaining = 0.0
            if self.grant is not None:
                expected = self.grant.cost * self.seconds_per_cost
                remaining = max(expected - (time.monotonic() - self.grant.started), 0.0)
            seconds = remaining + sum(t.cost for t in ahead) * self.seconds_per_cost
            text += f", about {_duration(seconds)}"
        return text + "."


def _cancelled(context: runs.RunContext) -> bool:
    try:
        return context.cancelled
    except CancelledError:  # nobody holds the run any more
        return True


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def _dispatch_all() -> None:
    """Grant every free model whose next ticket may run (a seat freed on one model can let a
    ticket on another go). Call under the lock."""
    for queue in list(_QUEUES):
        queue._dispatch()
    _COND.notify_all()  # the granted wake up; the others refresh their position messages


def active_users() -> dict[str, int]:
    """User name -> threads holding a grant or seat now (for tests and the Models page)."""
    with _COND:
        return {name: len(held) for name, held in _ACTIVE.items()}
