"""Explanations as runs (``engine.runs``): a spec in, an ``ExplanationSet`` out.

    run = start_explanation(model, ExplanationSpec("The capital of France is",
                                                   TargetSpec(text=" Paris"),
                                                   methods=(MethodRun("ig"), MethodRun("occlusion"))))
    snap = run.snapshot()      # progress, message ("Integrated Gradients (1/2): 20/52 rows"),
                               # partial (the attributions finished so far), error
    run.cancel()               # stops at the next forward pass
    result = run.wait()        # ExplanationSet (attributions, agreement table, provenance)

The methods run one after another on the run's worker thread; each takes the model's lock for
its own duration, so another session's run can use the model between two methods.
"""

from __future__ import annotations

import time

from engine import runs
from engine.attribution.explainer import explain
from engine.attribution.registry import get_method
from engine.attribution.result import ExplanationSet
from engine.attribution.spec import ExplanationSpec
from engine.provenance import Provenance


def _loaded(model):
    """A ``LoadedModel`` from a ``LoadedModel`` or an ``api.Model``."""
    return getattr(model, "loaded", model)


def _work(loaded, spec: ExplanationSpec):
    def work(ctx: runs.RunContext) -> ExplanationSet:
        started = time.perf_counter()
        done = []
        total = len(spec.methods)
        for i, method_run in enumerate(spec.methods):
            title = get_method(method_run.method).title

            def progress(fraction: float, message: str, i: int = i, title: str = title) -> None:
                ctx.progress((i + fraction) / total, f"{title} ({i + 1}/{total}): {message}")

            ctx.check()
            done.append(
                explain(
                    loaded,
                    spec.text,
                    spec.target,
                    method_run.method,
                    method_run.options_dict(),
                    per_token=spec.per_token,
                    faithfulness=spec.faithfulness,
                    seed=spec.seed,
                    progress=progress,
                    cancel=ctx.cancel_event,
                )
            )
            ctx.partial(tuple(done))
        return ExplanationSet.of(
            done,
            Provenance.of(loaded, seed=spec.seed),
            spec,
            time.perf_counter() - started,
        )

    return work


def start_explanation(
    model, spec: ExplanationSpec, *, idle_timeout_s: float | None = None
) -> runs.Run[ExplanationSet]:
    """Start explaining ``spec`` on ``model`` (a ``LoadedModel`` or ``api.Model``); returns at
    once. Methods and options are checked first, in the caller's thread (``InputError``);
    errors found while running (text too long, memory) end the run with a one-line error.

    ``idle_timeout_s``: cancel when nobody has polled ``snapshot()`` for that long (a page
    passes one, so a closed tab frees the model; the CLI and Python callers wait instead).
    """
    loaded = _loaded(model)
    spec = spec.validated(loaded)
    return runs.start("explain", _work(loaded, spec), spec=spec, idle_timeout_s=idle_timeout_s)


def explain_set(model, spec: ExplanationSpec) -> ExplanationSet:
    """Run ``spec`` and wait for its ``ExplanationSet`` (re-raises the run's error)."""
    return start_explanation(model, spec).wait()
