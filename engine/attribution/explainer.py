"""Running one attribution method on one target: input -> ``Attribution``.

    result = explain(loaded, "The capital of France is", TargetSpec(text=" Paris"),
                     "integrated_gradients", {"steps": 50})

Progress is reported as forward rows done / rows expected; ``cancel`` (a ``threading.Event``)
stops the run at the next forward pass with ``CancelledError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine.attribution import budget
from engine.attribution.faithfulness import curve_points
from engine.attribution.faithfulness import faithfulness as measure_faithfulness
from engine.attribution.registry import Method, Options, check_compatible, get_method
from engine.attribution.result import Attribution, Estimate, sentence_ids, word_ids
from engine.attribution.targets import Target, TargetSpec
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

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("Attribution cancelled: nothing was computed.")

    def add(self, rows: int) -> None:
        self.check()
        self.done += rows
        self.progress(min(self.done / self.total, 0.99), f"{self.done}/{self.total} forward rows")


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


@contextlib.contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Gradients flow to the input embeddings only: skipping the weights' gradients saves about
    a third of each backward pass. Restored afterwards (call inside ``loaded.use()``)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _resolve(method: str | type[Method], options: Options | dict | None):
    cls = get_method(method) if isinstance(method, str) else method
    opts = options.validated() if isinstance(options, Options) else cls.make_options(options)
    return cls, opts


def _plan(loaded, target: Target, cls, opts, per_token: bool) -> Estimate:
    k = int(target.free.sum())
    rows = cls.forward_rows(k, opts)
    if per_token and target.n_outputs > 1:
        rows *= target.n_outputs
    tokens = target.n_tokens + (max(len(t) for t in target.targets) if target.is_lm else 0)
    outputs = target.n_outputs if target.is_lm else 0
    asked = int(getattr(opts, "internal_batch_size", 0) or 0)
    return budget.estimate(loaded, cls.name, rows, tokens, outputs, cls.family == "gradient", asked)


def estimate(
    loaded: LoadedModel,
    text: str,
    target: TargetSpec,
    method: str,
    options: Options | dict | None = None,
    per_token: bool = False,
    faithfulness: bool = False,
) -> Estimate:
    """Pre-flight: forward rows, tokens, expected seconds and memory of ``explain``.

    ``rows`` counts the method's rows; with ``faithfulness`` the curves' forward-only rows
    are added to ``seconds`` (and given as ``extra_rows``).
    """
    cls, opts = _resolve(method, options)
    check_compatible(cls, loaded)
    with loaded.use():
        prepared = Target(loaded, text, target)
        plan = _plan(loaded, prepared, cls, opts, per_token)
        if not faithfulness:
            return plan
        extra = 3 * len(curve_points(int(prepared.free.sum())))
        outputs = prepared.n_outputs if prepared.is_lm else 0
        seconds = extra * budget.row_seconds(loaded, plan.tokens, outputs, False)
        return dataclasses.replace(plan, seconds=plan.seconds + seconds, extra_rows=extra)


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
    with loaded.use(), _frozen_parameters(loaded.model):
        prepared = Target(loaded, text, target)
        plan = _plan(loaded, prepared, cls, opts, per_token)
        if not plan.fits:
            raise MemoryBudgetError(
                f"One row of {plan.tokens} tokens needs about {plan.peak_bytes / 2**30:.1f} GiB "
                f"but only {plan.available_bytes / 2**30:.1f} GiB is free: shorten the text or "
                "pick a perturbation method."
            )
        meter = _Meter(plan.rows, progress, cancel)
        meter.check()
        started = time.perf_counter()
        baseline_name = getattr(opts, "baseline", "pad")
        inputs = prepared.free_embeds().requires_grad_(cls.family == "gradient")
        baselines = prepared.baseline_free_embeds(baseline_name)

        def context(column: int | None) -> RunContext:
            def fn(x: torch.Tensor) -> torch.Tensor:
                meter.add(x.shape[0])
                out = prepared.forward(x)
                return out.sum(-1) if column is None else out[:, column]

            return RunContext(loaded, prepared, opts, inputs, baselines, fn, plan.batch_size, seed)

        method_obj = cls()
        matrix = None
        if per_token and prepared.n_outputs > 1:
            rows = [method_obj.run(context(j)) for j in range(prepared.n_outputs)]
            free_scores = np.sum([r.scores for r in rows], axis=0)
            deltas = [r.convergence_delta for r in rows]
            delta = None if deltas[0] is None else float(np.sum(deltas))
            matrix = np.zeros((prepared.n_outputs, prepared.n_tokens))
            for j, r in enumerate(rows):
                matrix[j, prepared.free_mask()] = r.scores
        else:
            out = method_obj.run(context(None))
            free_scores, delta = out.scores, out.convergence_delta
            if cls.family == "attention":  # rollout reads the model directly: one row
                meter.add(1)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            both = prepared.score(torch.cat([inputs, baselines]))
        target_score, baseline_score = float(both[0]), float(both[1])
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
        options=opts.to_dict(),
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
        faithfulness=faith,
        label_probabilities=probs,
    )
