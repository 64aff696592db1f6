"""The fair scheduler in front of each model (engine.scheduler), without a model: who goes
next, how many at once per user, what a waiting run is told, cancel, re-entrancy, unload."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from engine import access, runs
from engine.access import LimitError, User
from engine.errors import EngineError
from engine.scheduler import ModelQueue, active_users, ordinal


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture(autouse=True)
def default_limits():
    access.set_limits(dict(access.DEFAULT_LIMITS))
    yield
    access.set_limits(None)


class Holder:
    """Holds a queue from another thread until ``release()`` (another session mid-call)."""

    def __init__(self, queue: ModelQueue, user: User = access.LOCAL) -> None:
        self.queue, self.user = queue, user
        self._held, self._go = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()
        assert self._held.wait(5)

    def _hold(self) -> None:
        with access.acting_as(self.user), self.queue.use():
            self._held.set()
            self._go.wait(30)

    def release(self) -> None:
        self._go.set()
        self._thread.join(5)


def queued_run(queue: ModelQueue, user: User, cost: float, log: list, hold=None) -> runs.Run:
    """A run as ``user`` whose work takes the queue, logs its name, and (with ``hold``) keeps
    the model until that event is set."""

    def work(ctx: runs.RunContext) -> str:
        with queue.use():
            log.append(user.name)
            if hold is not None:
                hold.wait(30)
        return user.name

    with access.acting_as(user):
        return runs.start("test", work, cost=cost)


def queued(queue: ModelQueue, n: int) -> bool:
    return wait_until(lambda: queue.waiting_count() == n)


def test_a_heavy_users_queue_does_not_starve_the_light_users():
    q = ModelQueue("m-fair")
    heavy = User("heavy", "student")
    lights = [User(f"light{i}", "student") for i in range(12)]
    log: list[str] = []
    blocker = Holder(q)
    started = []
    for _ in range(5):  # five 1,000-token requests queued first
        started.append(queued_run(q, heavy, 1000, log))
        time.sleep(0.01)  # arrival order: the heavy user's requests are all older
    assert queued(q, 5)
    for user in lights:
        started.append(queued_run(q, user, 20, log))
    assert queued(q, 17)
    blocker.release()
    for run in started:
        assert run.wait(30) in ("heavy", *(u.name for u in lights))
    assert len(log) == 17
    # first come heavy's first request (oldest), then every light request, then the rest
    assert log[0] == "heavy"
    last_light = max(i for i, name in enumerate(log) if name != "heavy")
    second_heavy = [i for i, name in enumerate(log) if name == "heavy"][1]
    assert last_light < second_heavy, log
    assert q.served["heavy"] == 5 and all(q.served[u.name] == 1 for u in lights)


def test_fair_by_cost_interleaves_users_with_equal_costs_fifo_within_a_user():
    q = ModelQueue("m-rr")
    a, b = User("a", "student"), User("b", "student")
    log: list[str] = []
    blocker = Holder(q)
    order = [a, a, a, b, b, b]  # a's three requests all arrive before b's
    started = []
    for user in order:
        started.append(queued_run(q, user, 10, log))
        assert queued(q, len(started))
    blocker.release()
    for run in started:
        run.wait(30)
    assert log == ["a", "b", "a", "b", "a", "b"]


def test_instructors_go_first():
    q = ModelQueue("m-prio")
    students = [User(f"s{i}", "student") for i in range(4)]
    teacher = User("teacher", "instructor")
    log: list[str] = []
    blocker = Holder(q)
    started = [queued_run(q, s, 5, log) for s in students]
    assert queued(q, 4)
    started.append(queued_run(q, teacher, 500, log))  # last to arrive, and expensive
    assert queued(q, 5)
    blocker.release()
    for run in started:
        run.wait(30)
    assert log[0] == "teacher", log
    assert sorted(log[1:]) == [s.name for s in students]


def test_one_running_request_per_student_across_models():
    qa, qb = ModelQueue("m-a"), ModelQueue("m-b")
    ana, bob = User("ana", "student"), User("bob", "student")
    log: list[str] = []
    hold_a = threading.Event()
    first = queued_run(qa, ana, 5, log, hold=hold_a)  # ana runs on model A...
    assert wait_until(lambda: qa.busy and log == ["ana"])
    second = queued_run(qb, ana, 5, log)  # ...so her request on the free model B waits
    assert wait_until(lambda: second.snapshot().waiting)
    message = second.snapshot().message
    assert "your other run must finish first" in message and "student runs 1" in message
    other = queued_run(qb, bob, 5, log)  # another student is not held up by ana
    assert other.wait(10) == "bob"
    assert not second.done and active_users() == {"ana": 1}
    hold_a.set()
    assert first.wait(10) == "ana" and second.wait(10) == "ana"
    assert log == ["ana", "bob", "ana"]
    assert active_users() == {}


def test_concurrent_runs_limit_is_read_from_the_limits_table():
    q1, q2 = ModelQueue("m-l1"), ModelQueue("m-l2")
    two = dict(access.DEFAULT_LIMITS)
    two["student"] = replace(two["student"], concurrent_runs=2)
    access.set_limits(two)
    ana = User("ana", "student")
    hold = threading.Event()
    log: list[str] = []
    first = queued_run(q1, ana, 1, log, hold=hold)
    second = queued_run(q2, ana, 1, log, hold=hold)  # a second seat: runs at once
    assert wait_until(lambda: log == ["ana", "ana"])
    assert active_users() == {"ana": 2}
    hold.set()
    first.wait(10), second.wait(10)
    none = dict(two)
    none["student"] = replace(two["student"], concurrent_runs=0)
    access.set_limits(none)
    with access.acting_as(ana), pytest.raises(LimitError, match="at most 0"), q1.use():
        pass


def test_waiting_runs_are_told_their_place_and_the_expected_wait_as_the_queue_moves():
    q = ModelQueue("smollm2-135m")
    q.seconds_per_cost = 0.5  # as measured by earlier runs
    users = [User(f"u{i}", "student") for i in range(3)]
    holds = [threading.Event() for _ in users]
    log: list[str] = []
    blocker = Holder(q)
    started = []
    for user, hold in zip(users, holds, strict=True):
        started.append(queued_run(q, user, 8, log, hold=hold))
        assert queued(q, len(started))

    def message(i: int) -> str:
        return started[i].snapshot().message

    for i in range(3):
        assert wait_until(lambda i=i: f"{ordinal(i + 1)} in line" in message(i)), message(i)
    assert message(0).startswith("Waiting for smollm2-135m: another run is using it")
    # 8 units ahead of the 2nd at 0.5 s a unit = 4 s (the blocker, cost 1, has < 0.5 s left)
    assert "about 4 s" in message(1) and "about 8 s" in message(2), (message(1), message(2))
    blocker.release()  # u0 runs; u1 and u2 move up
    assert wait_until(lambda: log == ["u0"])
    assert wait_until(lambda: "1st in line" in message(1) and "2nd in line" in message(2))
    assert started[0].snapshot().state == "running"
    holds[0].set()
    assert wait_until(lambda: log == ["u0", "u1"] and "1st in line" in message(2))
    for hold in holds:
        hold.set()
    for run in started:
        run.wait(10)
    assert q.seconds_per_cost != 0.5  # the moving average took the measured runs in


def test_a_cancelled_run_leaves_the_queue_at_once():
    q = ModelQueue("m-cancel")
    a, b = User("a", "student"), User("b", "student")
    log: list[str] = []
    blocker = Holder(q)
    first = queued_run(q, a, 5, log)
    second = queued_run(q, b, 5, log)
    assert queued(q, 2)
    assert wait_until(lambda: "2nd in line" in second.snapshot().message)
    first.cancel()
    assert first.join(2), "a cancelled run must stop waiting at once"
    assert first.snapshot().state == "cancelled"
    assert q.waiting_count() == 1
    assert wait_until(lambda: "1st in line" in second.snapshot().message)
    blocker.release()
    assert second.wait(10) == "b" and log == ["b"]


def test_an_idle_run_nobody_watches_leaves_the_queue():
    q = ModelQueue("m-idle")
    blocker = Holder(q)

    def work(ctx):
        with q.use():
            return "ran"

    with access.acting_as(User("gone", "student")):
        run = runs.start("test", work, idle_timeout_s=0.3)
    assert queued(q, 1)
    assert run.join(5), "a closed tab's run must leave the queue after its idle timeout"
    assert q.waiting_count() == 0 and "idle timeout" in run.error_message()
    blocker.release()


def test_use_is_reentrant_for_the_holding_thread():
    q = ModelQueue("m-nested")
    errors: list[str] = []

    def other_thread() -> None:
        try:
            with q.use(timeout_s=0.2):
                errors.append("granted while held")
        except EngineError as exc:
            errors.append(str(exc))

    with q.use():
        with q.use(), q.use():  # nested in the same thread: must not deadlock
            assert q.busy
        other = threading.Thread(target=other_thread)
        other.start()
        other.join(5)
        assert errors == ["m-nested stayed busy for 0 s: try again later."]
        assert q.busy
    assert not q.busy

    def nested_in_a_run(ctx):
        with q.use(), q.use():
            return "ok"

    assert runs.start("test", nested_in_a_run).wait(5) == "ok"
    assert not q.busy and active_users() == {}


def test_a_waiter_times_out_with_a_clear_message():
    q = ModelQueue("m-timeout")
    blocker = Holder(q)
    errors = []

    def wait_briefly():
        try:
            with q.use(timeout_s=0.3):
                pass
        except EngineError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=wait_briefly)
    thread.start()
    thread.join(5)
    blocker.release()
    assert errors == ["m-timeout stayed busy for 0 s: try again later."]
    assert q.waiting_count() == 0 and not q.busy


def test_many_threads_never_share_the_model_and_respect_per_user_seats():
    queues = [ModelQueue(f"m-many{i}") for i in range(3)]
    users = [User(f"u{i}", "student" if i % 3 else "instructor") for i in range(10)]
    holding: dict[str, int] = {q.name: 0 for q in queues}
    seats: dict[str, int] = {}
    violations: list[str] = []
    done: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(user: User, i: int) -> tuple[str, int]:
        q = queues[i % 3]
        with q.use():
            with lock:
                holding[q.name] += 1
                seats[user.name] = seats.get(user.name, 0) + 1
                if holding[q.name] > 1:
                    violations.append(f"{q.name} held twice")
                if seats[user.name] > access.limits_for(user).concurrent_runs:
                    violations.append(f"{user.name} over its seats")
            time.sleep(0.002)
            with lock:
                holding[q.name] -= 1
                seats[user.name] -= 1
        return user.name, i

    started = []
    for i in range(60):
        user = users[i % len(users)]
        with access.acting_as(user):
            started.append(runs.start("test", lambda ctx, u=user, i=i: work(u, i), cost=1 + i))
    for i, run in enumerate(started):
        done.append(run.wait(60))
        assert done[-1] == (users[i % len(users)].name, i)
    assert violations == []
    assert sum(sum(q.served.values()) for q in queues) == 60
    assert not any(q.busy for q in queues) and active_users() == {}


def test_ordinal():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "111th",
    ]


def test_unloading_a_model_in_use_refuses_and_says_why(tiny_models, tmp_path):
    from engine import Workbench
    from engine.generation import GenerationSettings

    wb = Workbench(home=tmp_path / "h", device="cpu")
    name = str(tiny_models["llama"])
    model = wb.load(name)
    holder = Holder(model.loaded.queue)  # one run generating...
    waiting = model.start_generation("hello world", GenerationSettings(max_new_tokens=2))
    assert queued(model.loaded.queue, 1)  # ...and one waiting for it
    with pytest.raises(EngineError, match=rf"^{name} is in use by 2 runs; try again when"):
        wb.unload(name)
    assert [m.name for m in wb.loaded()] == [name], "a model in use must stay loaded"
    # waiting for it (bounded) succeeds once the runs finish
    threading.Timer(0.3, holder.release).start()
    wb.manager.unload(name, wait_s=10)
    assert waiting.wait(10).tokens and wb.loaded() == []


def test_a_model_with_waiters_is_busy_and_not_evicted(tiny_models, tmp_path):
    from engine import Workbench
    from engine.errors import MemoryBudgetError

    probe = Workbench(home=tmp_path / "probe", device="cpu")
    size = probe.load(str(tiny_models["llama"])).info().memory_bytes
    wb = Workbench(home=tmp_path / "h", device="cpu", memory_budget_bytes=int(size * 1.5))
    loaded = wb.load(str(tiny_models["llama"])).loaded
    holder = Holder(loaded.queue)
    release_waiter = threading.Event()

    def wait_then_hold():
        with loaded.use():
            release_waiter.wait(10)

    waiter = threading.Thread(target=wait_then_hold)
    waiter.start()
    assert queued(loaded.queue, 1)
    holder.release()  # now only the waiter holds it: still busy
    assert wait_until(lambda: loaded.queue.waiting_count() == 0)
    assert loaded.busy and loaded.info().busy
    with pytest.raises(MemoryBudgetError, match="busy"):
        wb.load(str(tiny_models["bert"]))
    release_waiter.set()
    waiter.join(5)
    assert not loaded.busy


class FakeRequest:
    """A batchable payload: equal ``batch_key`` s share a grant."""

    def __init__(self, name: str) -> None:
        self.name, self.batch_key, self.dedup_key = name, ("greedy",), name


def test_a_batch_waits_briefly_for_the_users_of_the_last_batch():
    q = ModelQueue("m-gather")
    a, b = User("a", "student"), User("b", "student")
    members: list[list[str]] = []

    def ask(user: User, name: str, gather: bool) -> None:
        with access.acting_as(user), q.use(batch=FakeRequest(name)) as grant:
            if not grant.seated:
                if gather:
                    grant.gather(wait_s=2.0)
                members.append([m.name for m in grant.members])

    ask(a, "a1", False)
    ask(b, "b1", False)  # a and b were both served just now
    t0 = time.monotonic()
    first = threading.Thread(target=ask, args=(a, "a2", True))
    first.start()
    time.sleep(0.1)  # b comes back a little later: taken along, not left for the next grant
    ask(b, "b2", True)
    first.join(5)
    assert members[-1] == ["a2", "b2"] and time.monotonic() - t0 < 1.9
    q.recent.clear()  # a lone user: nothing to wait for
    t0 = time.monotonic()
    ask(a, "a3", True)
    assert members[-1] == ["a3"] and time.monotonic() - t0 < 0.5
