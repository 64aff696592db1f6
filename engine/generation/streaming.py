"""Long work in a worker thread: a streaming, cancellable generation and a generic job.

The UI never waits on these: it polls ``snapshot()`` (a consistent copy of the progress) and
calls ``stop()``. Stopping sets an event that the decode loop checks after every token, so
the model's lock is released within one forward pass.

    run = start_generation(loaded, "Once upon a time", GenerationSettings(max_new_tokens=200))
    while not run.snapshot().done: ...
    run.stop(); result = run.wait()
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from engine.errors import EngineError
from engine.generation.chat import ChatMessage
from engine.generation.core import GenerationResult, GenerationSettings, prepare, run_generation
from engine.generation.decoding import TokenStep
from engine.manager import LoadedModel

T = TypeVar("T")


@dataclass(frozen=True)
class RunSnapshot:
    """Progress of a streaming run at one instant.

    ``tokens`` are those generated so far; ``error`` is the one-line message of a failed run.
    """

    text: str
    tokens: tuple[TokenStep, ...]
    done: bool
    cancelled: bool
    seconds: float
    error: str | None
    result: GenerationResult | None


class _Workers:
    """Long-lived daemon threads that run jobs, one job per thread at a time.

    A fresh thread per run would pay torch's per-thread start-up (OpenMP team, MKL buffers)
    every time: about 30 ms more time-to-first-token and a slower first tokens. A job never
    waits behind another: with no idle worker, a new one starts.
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
            threading.Thread(target=self._loop, daemon=True, name="workbench-worker").start()

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            finally:
                with self._lock:
                    self._idle += 1


_WORKERS = _Workers()


class Job(Generic[T]):
    """Runs ``work(cancel, report)`` in a worker thread; ``report(fraction, message)``."""

    def __init__(self, work: Callable[[threading.Event, Callable[[float, str], None]], T]) -> None:
        self._work = work
        self.cancel = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.fraction = 0.0
        self.message = ""
        self.result: T | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        _WORKERS.submit(self._main)

    def _report(self, fraction: float, message: str) -> None:
        with self._lock:
            self.fraction, self.message = fraction, message

    def _main(self) -> None:
        try:
            self.result = self._work(self.cancel, self._report)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller via wait()/error
            self.error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the end; True when done."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        """Ask the work to stop at its next check."""
        self.cancel.set()

    def wait(self, timeout: float | None = None) -> T:
        """The result; re-raises the work's error. ``TimeoutError`` if still running."""
        if not self._done.wait(timeout):
            raise TimeoutError("the job is still running")
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    def error_message(self) -> str | None:
        if self.error is None:
            return None
        if isinstance(self.error, EngineError):
            return str(self.error)
        return f"{type(self.error).__name__}: {self.error}"


class GenerationRun(Job[GenerationResult]):
    """A generation in a worker thread that streams tokens and stops on request."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompt: str,
        settings: GenerationSettings,
        messages: Sequence[ChatMessage] | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        # Validate in the caller's thread: bad input raises here, before any thread starts.
        self.prepared = prepare(loaded, prompt, settings, messages)
        self.settings = settings
        self.idle_timeout_s = idle_timeout_s
        self._last_polled = time.monotonic()
        self._tokens: list[TokenStep] = []
        self._text = ""
        self._loaded = loaded
        super().__init__(self._decode)

    def _on_step(self, step: TokenStep, text: str) -> None:
        with self._lock:
            self._tokens.append(step)
            self._text = text
        idle = time.monotonic() - self._last_polled
        if self.idle_timeout_s is not None and idle > self.idle_timeout_s:
            self.cancel.set()  # nobody is watching (tab closed): free the model

    def _decode(self, cancel: threading.Event, _report) -> GenerationResult:
        return run_generation(self._loaded, self.prepared, self.settings, cancel, self._on_step)

    def snapshot(self) -> RunSnapshot:
        self._last_polled = time.monotonic()
        done = self.done
        with self._lock:
            text, tokens = self._text, tuple(self._tokens)
        result = self.result if done and self.error is None else None
        if result is not None:
            text, tokens = result.text, result.tokens
        return RunSnapshot(
            text=text,
            tokens=tokens,
            done=done,
            cancelled=self.cancel.is_set(),
            seconds=time.perf_counter() - self.started,
            error=self.error_message() if done else None,
            result=result,
        )


def start_generation(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
    idle_timeout_s: float | None = None,
) -> GenerationRun:
    """Validate, then generate in a worker thread. Raises ``InputError`` for bad input.

    With ``idle_timeout_s``, the run cancels itself when ``snapshot()`` has not been called for
    that long (a closed browser tab must not keep the model busy).
    """
    return GenerationRun(loaded, prompt, settings, messages, idle_timeout_s)


def start_job(work: Callable[[threading.Event, Callable[[float, str], None]], T]) -> Job[T]:
    """Run ``work(cancel_event, report)`` in a worker thread."""
    return Job(work)
