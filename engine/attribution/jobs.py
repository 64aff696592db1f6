"""Run attributions in a background thread with progress and cancel (UI-free).

The page keeps an ``ExplainJob`` in its session state; the worker thread writes progress to it
and a polling fragment reads it (a thread cannot call Streamlit itself).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from engine.errors import CancelledError, EngineError


@dataclass
class MethodRun:
    """One method to run: its registry name and option values."""

    method: str
    options: dict


@dataclass
class ExplainJob:
    """Several methods on one text and target, run one after another in a thread."""

    model: object  # engine.api.Model
    text: str
    target: str = ""
    label: str | None = None
    contrast: str | None = None
    runs: list[MethodRun] = field(default_factory=list)
    per_token: bool = False
    faithfulness: bool = True
    seed: int = 0
    fraction: float = 0.0
    message: str = "Waiting…"
    results: list = field(default_factory=list)
    error: str | None = None
    cancelled: bool = False
    started: float = 0.0
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    def start(self) -> ExplainJob:
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._work, name="explain-job", daemon=True)
        self.thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.done

    def _work(self) -> None:
        total = max(len(self.runs), 1)
        try:
            for i, run in enumerate(self.runs):

                def progress(fraction: float, message: str, i: int = i, name: str = run.method):
                    self.fraction = (i + fraction) / total
                    self.message = f"{name} ({i + 1}/{total}): {message}"

                self.results.append(
                    self.model.explain(
                        self.text,
                        self.target,
                        label=self.label,
                        contrast=self.contrast,
                        method=run.method,
                        options=run.options,
                        per_token=self.per_token,
                        faithfulness=self.faithfulness,
                        seed=self.seed,
                        progress=progress,
                        cancel=self.cancel_event,
                    )
                )
            self.fraction, self.message = 1.0, "Done."
        except CancelledError as exc:
            self.cancelled, self.error = True, str(exc)
        except EngineError as exc:
            self.error = str(exc)
        except Exception as exc:  # a worker must always finish and report
            self.error = f"Attribution failed: {type(exc).__name__}: {exc}"
        finally:
            self.finished = time.perf_counter()
