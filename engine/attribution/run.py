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
from engine.access import check_limit
from engine.attribution.explainer import explain
from engine.attribution.registry import get_method
from engine.attribution.result import ExplanationSet
from engine.attribution.spec import ExplanationSpec
from engine.attribution.targets import tokenize
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
    once. Methods and options are checked first, in the caller's thread (``InputError``), then
    the acting user's limits (``within_limits``: ``LimitError``); errors found while running
    (text too long, memory) end the run with a one-line error.

    ``idle_timeout_s``: cancel when nobody has polled ``snapshot()`` for that long (a page
    passes one, so a closed tab frees the model; the CLI and Python callers wait instead).
    """
    loaded = _loaded(model)
    spec, cost = within_limits(loaded, spec.validated(loaded))
    return runs.start(
        "explain", _work(loaded, spec), spec=spec, idle_timeout_s=idle_timeout_s, cost=cost
    )


def within_limits(loaded, spec: ExplanationSpec) -> tuple[ExplanationSpec, float]:
    """Hold a validated ``spec`` to the acting user's limits; returns (spec, cost).

    ``LimitError`` when the text is over ``max_input_tokens`` or the steps (``spec.steps``:
    each method's steps or samples, summed, times the target tokens with ``per_token``) are
    over ``attribution_steps``. Integrated Gradients' refinement is capped at the limit (the
    returned spec records the lowered ``max_steps``). ``cost``: model rows for the scheduler,
    each method's forward rows times its targets. Text the tokenizer refuses is left to the
    run, which fails with that message.
    """
    try:
        shape = tokenize(loaded, spec.text, spec.target)
    except Exception:  # the run meets it again and reports it
        shape = None
    targets = shape.n_outputs if shape is not None and spec.per_token and shape.is_lm else 1
    limits = runs.enforced_limits()
    if limits is not None:
        if shape is not None:
            check_limit(shape.n_tokens, limits.max_input_tokens, "The text", "tokens")
        spec = spec.refinement_capped(max(limits.attribution_steps // targets, 1))
        check_limit(
            spec.steps(targets),
            limits.attribution_steps,
            f"This explanation ({spec.describe_steps(targets)})",
            "steps",
        )
    if shape is None:
        return spec, float(spec.steps(targets))
    rows = 0
    for run in spec.methods:
        cls = get_method(run.method)
        rows += cls.forward_rows(shape.n_free, cls.make_options(run.options_dict()))
    return spec, float(rows * targets)


def explain_set(model, spec: ExplanationSpec) -> ExplanationSet:
    """Run ``spec`` and wait for its ``ExplanationSet`` (re-raises the run's error)."""
    return start_explanation(model, spec).wait()
