"""Running one attribution method on one target: input -> ``Attribution``.

    result = explain(loaded, "The capital of France is", TargetSpec(text=" Paris"),
                     "integrated_gradients", {"steps": 50})

Progress is reported as forward rows done / rows expected; ``cancel`` (a ``threading.Event``)
stops the run at the next forward pass with ``CancelledError``.

Integrated Gradients refines its steps by default: while the completeness error is above 1% of
|f(input) - f(baseline)| it re-runs with twice the steps (up to ``max_steps``), keeps the run with
the smallest error and records every (steps, error) tried. Each extra run adds its rows to the
progress total, so the bar steps back when a refinement starts.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.attribution import budget, calibration
from engine.attribution.calibration import frozen_parameters
from engine.attribution.faithfulness import curve_points
from engine.attribution.faithfulness import faithfulness as measure_faithfulness
from engine.attribution.registry import Method, Options, check_compatible, get_method
from engine.attribution.result import (
    DELTA_TOLERANCE,
    Attribution,
    Estimate,
    sentence_ids,
    word_ids,
)
from engine.attribution.targets import Target, TargetSpec, Tokenized, tokenize
from engine.errors import CancelledError, MemoryBudgetError
from engine.manager import LoadedModel
from engine.provenance import Provenance

ProgressFn = Callable[[float, str], None]


def _quiet(_fraction: float, _message: str) -> None:
    return None


class _Meter:
    """Counts forward rows, reports progress and honours a cancel request."""

    def __init__(self, total: int, progress: ProgressFn, cancel: threading.Event | None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.progress = progress
        self.cancel = cancel
        self.prefix = ""  # e.g. "Refining: 100 steps · "

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("Attribution cancelled: nothing was computed.")

    def add(self, rows: int) -> None:
        self.check()
        self.done += rows
        self.progress(
            min(self.done / self.total, 0.99),
            f"{self.prefix}{self.done}/{self.total} forward rows",
        )


@dataclass
class RunContext:
    """What a method needs: the score function over free-token embeddings and its inputs.

    inputs / baselines: (1, k, d) embeddings of the free tokens and their baseline.
    fn: (B, k, d) -> (B,) the score being explained (one output column, or their sum).
    """

    loaded: LoadedModel
    target: Target
    options: Options
    inputs: torch.Tensor
    baselines: torch.Tensor
    fn: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    seed: int


def _resolve(method: str | type[Method], options: Options | dict | None):
    cls = get_method(method) if isinstance(method, str) else method
    opts = options.validated() if isinstance(options, Options) else cls.make_options(options)
    return cls, opts


def _used_options(opts, batch: int) -> dict:
    """The options as run: an automatic internal batch size (0) becomes the one used."""
    used = opts.to_dict()
    if used.get("internal_batch_size") == 0:
        used["internal_batch_size"] = int(batch)
    return used


def _plan(loaded, shape: Tokenized, cls, opts, per_token: bool, timing: bool = False) -> Estimate:
    """Rows, batch and memory of one run; with ``timing``, its seconds from the measured rates
    (or the arithmetic fallback when none are measured yet)."""
    rows = cls.forward_rows(shape.n_free, opts)
    if per_token and shape.n_outputs > 1:
        rows *= shape.n_outputs
    tokens = shape.n_tokens + (shape.longest_target if shape.is_lm else 0)
    outputs = shape.n_outputs if shape.is_lm else 0
    asked = int(getattr(opts, "internal_batch_size", 0) or 0)
    gradient = cls.family == "gradient"
    rates = calibration.cached(loaded, tokens) if timing else None
    return budget.estimate(loaded, cls.name, rows, tokens, outputs, gradient, asked, rates)


def estimate(
    loaded: LoadedModel,
    text: str,
    target: TargetSpec,
    method: str,
    options: Options | dict | None = None,
    per_token: bool = False,
    faithfulness: bool = False,
    *,
    wait: bool = True,
) -> Estimate:
    """Pre-flight: forward rows, tokens, expected seconds (a range) and memory of ``explain``.

    Tokenizes only: no model lock, no forward pass, except the one-off timing benchmark of
    this model and length bucket (``calibration.rates``, about a second under the model's
    lock, then cached). ``wait=False`` (pages) never blocks: without measured rates it starts
    the benchmark in the background and returns the arithmetic estimate (``calibrated``
    False), to be asked again later.

    ``rows`` counts the method's rows; with ``faithfulness`` the curves' forward-only rows
    are added to the seconds (and given as ``extra_rows``).
    """
    cls, opts = _resolve(method, options)
    check_compatible(cls, loaded)
    shape = tokenize(loaded, text, target)
    tokens = shape.n_tokens + (shape.longest_target if shape.is_lm else 0)
    calibration.rates(loaded, tokens, wait=wait)
    plans = [_plan(loaded, shape, cls, o, per_token, timing=True) for o in cls.attempts(opts)]
    plan = dataclasses.replace(
        plans[0],
        attempts=len(plans),
        worst_rows=sum(p.rows for p in plans),
        worst_seconds=sum(p.seconds for p in plans),
        worst_seconds_high=sum(p.seconds_high for p in plans),
        peak_bytes=max(p.peak_bytes for p in plans),  # later runs may batch more rows
    )
    if not faithfulness:
        return plan
    extra = 3 * len(curve_points(shape.n_free))
    outputs = shape.n_outputs if shape.is_lm else 0
    rates = calibration.cached(loaded, tokens)
    low, mid, high = budget.seconds(loaded, extra, tokens, outputs, False, rates)
    return dataclasses.replace(
        plan,
        seconds=plan.seconds + mid,
        seconds_low=plan.seconds_low + low,
        seconds_high=plan.seconds_high + high,
        worst_seconds=plan.worst_seconds + mid,
        worst_seconds_high=plan.worst_seconds_high + high,
        extra_rows=extra,
    )


def explain(
    loaded: LoadedModel,
    text: str,
    target: TargetSpec | None = None,
    method: str = "integrated_gradients",
    options: Options | dict | None = None,
    *,
    per_token: bool = False,
    faithfulness: bool = True,
    seed: int = 0,
    progress: ProgressFn = _quiet,
    cancel: threading.Event | None = None,
) -> Attribution:
    """Explain ``target`` on ``text`` with ``method``; see ``Attribution`` for the fields.

    per_token: for multi-token continuations, also attribute each output token (a matrix;
    costs one run per output token; the sequence scores are then the rows' sum).
    faithfulness: also compute deletion/insertion curves and AOPC.
    """
    target = target or TargetSpec()
    cls, opts = _resolve(method, options)
    check_compatible(cls, loaded)
    with loaded.use(), frozen_parameters(loaded.model):
        prepared = Target(loaded, text, target)
        shape = prepared.tokenized
        plan = _plan(loaded, shape, cls, opts, per_token)
        if not plan.fits:
            raise MemoryBudgetError(
                f"One row of {plan.tokens} tokens needs about {plan.peak_bytes / 2**30:.1f} GiB "
                f"but only {plan.available_bytes / 2**30:.1f} GiB is free: shorten the text or "
                "pick a perturbation method."
            )
        meter = _Meter(plan.rows, progress, cancel)
        meter.check()
        baseline_name = getattr(opts, "baseline", "pad")
        inputs = prepared.free_embeds().requires_grad_(cls.family == "gradient")
        baselines = prepared.baseline_free_embeds(baseline_name)

        with torch.no_grad():
            both = prepared.score(torch.cat([inputs, baselines]))
        target_score, baseline_score = float(both[0]), float(both[1])
        gap = abs(target_score - baseline_score)
        started = time.perf_counter()

        def run_once(attempt: Options, batch_size: int):
            """One run with ``attempt``'s options: (free scores (k,), delta, matrix or None)."""

            def context(column: int | None) -> RunContext:
                def fn(x: torch.Tensor) -> torch.Tensor:
                    meter.add(x.shape[0])
                    out = prepared.forward(x)
                    return out.sum(-1) if column is None else out[:, column]

                return RunContext(
                    loaded, prepared, attempt, inputs, baselines, fn, batch_size, seed
                )

            method_obj = cls()
            if per_token and prepared.n_outputs > 1:
                rows = [method_obj.run(context(j)) for j in range(prepared.n_outputs)]
                deltas = [r.convergence_delta for r in rows]
                matrix = np.zeros((prepared.n_outputs, prepared.n_tokens))
                for j, r in enumerate(rows):
                    matrix[j, prepared.free_mask()] = r.scores
                delta = None if deltas[0] is None else float(np.sum(deltas))
                return np.sum([r.scores for r in rows], axis=0), delta, matrix
            out = method_obj.run(context(None))
            if cls.family == "attention":  # rollout reads the model directly: one row
                meter.add(1)
            return out.scores, out.convergence_delta, None

        # Integrated Gradients with step refinement: re-run with more steps while the
        # completeness error is above tolerance; keep the run with the smallest error.
        attempts = cls.attempts(opts)
        best: tuple | None = None  # (relative error, steps, scores, delta, matrix)
        kept_batch = plan.batch_size  # the batch of the run kept (recorded: batching moves
        # floating-point sums, so a re-run with the recorded batch gives the same numbers)
        trials: list[tuple[int, float]] = []
        for n, attempt in enumerate(attempts):
            batch_size = plan.batch_size
            if n:
                meter.check()
                again = _plan(loaded, shape, cls, attempt, per_token)
                batch_size = again.batch_size
                meter.total += again.rows
                meter.prefix = (
                    f"Refining: {attempt.steps} steps ({trials[-1][1]:.1%} error at "
                    f"{trials[-1][0]}) · "
                )
            free_scores, delta, matrix = run_once(attempt, batch_size)
            if delta is None:  # no completeness error to refine on
                kept_batch = batch_size
                break
            rel = abs(delta) / gap if gap > 0 else float("inf")
            trials.append((int(attempt.steps), float(rel)))
            if best is None or rel < best[0]:
                best = (rel, int(attempt.steps), free_scores, delta, matrix)
                kept_batch = batch_size
            if rel <= DELTA_TOLERANCE:
                break
        steps_used = None
        if best is not None:
            _rel, steps_used, free_scores, delta, matrix = best
        seconds = time.perf_counter() - started
        if cls.family != "attention":  # the next estimate learns from this run's speed
            calibration.observe(loaded, plan.tokens, cls.family == "gradient", meter.done, seconds)
        free = prepared.free_mask()
        scores = np.zeros(prepared.n_tokens)
        scores[free] = free_scores
        faith = None
        if faithfulness:
            progress(0.99, "Faithfulness: re-scoring with the top tokens removed…")
            # forward-only rows (3 curves of up to 21 points): their own, larger batch
            faith_batch = budget.choose_batch(
                loaded, plan.tokens, prepared.n_outputs if prepared.is_lm else 0, False, 63, 0
            )
            faith = measure_faithfulness(
                prepared, free_scores, baseline_name, faith_batch, seed, meter.check
            )
        probs = None
        if not prepared.is_lm:
            labels = prepared._labels()
            probs = {labels[i]: float(p) for i, p in enumerate(prepared.probabilities)}
    progress(1.0, "Done.")
    return Attribution(
        model=loaded.name,
        text=text,
        target={
            "text": target.text,
            "label": target.label,
            "contrast": target.contrast,
            "anchor_first": prepared.anchored,
        },
        target_description=prepared.description,
        output_tokens=tuple(prepared.output_tokens),
        method=cls.name,
        method_title=cls.title,
        options=_used_options(opts, kept_batch),
        tokens=tuple(prepared.token_texts()),
        offsets=np.asarray(prepared.offsets, dtype=int).reshape(-1, 2),
        free=free,
        scores=scores,
        word_ids=word_ids(prepared.word_ids, free),
        sentence_ids=sentence_ids(text, prepared.offsets, free),
        target_score=target_score,
        seconds=seconds,
        forward_rows=meter.done,
        provenance=Provenance.of(loaded, seed=seed),
        token_matrix=matrix,
        baseline_score=baseline_score if delta is not None else None,
        convergence_delta=delta,
        steps_used=steps_used,
        step_trials=tuple(trials),
        faithfulness=faith,
        label_probabilities=probs,
    )
