"""The same prompt and settings on several models, one after another, side by side.

Models load through the shared manager, so the memory budget holds: an idle model may be
evicted to make room for the next one. With a seed, every model samples from the same seed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from engine import runs
from engine.errors import EngineError, InputError
from engine.generation.chat import ChatMessage
from engine.generation.core import GenerationResult, GenerationSettings, prepare, run_generation
from engine.provenance import Provenance
from engine.results import Result

MAX_MODELS = 4


@dataclass(frozen=True)
class ModelOutcome:
    """One model's side of a comparison: its result, or the one-line error it raised."""

    model: str
    result: GenerationResult | None
    error: str | None


@dataclass(frozen=True)
class Comparison(Result):
    """Outcomes in the order the models were given.

    ``provenance`` names every model compared (``model``: names joined by ", ",
    ``fingerprint``: their fingerprints, in the same order; "unavailable" for a model that
    failed to load); each outcome's result carries its own full provenance too.
    """

    prompt: str
    settings: GenerationSettings
    outcomes: tuple[ModelOutcome, ...]
    provenance: Provenance


def _provenance(workbench, names: Sequence[str], outcomes, seed: int | None) -> Provenance:
    prints = []
    for name in names:
        done = next((o.result for o in outcomes if o.model == name and o.result), None)
        prints.append(done.provenance.fingerprint if done is not None else "unavailable")
    placement = workbench.placement
    return Provenance(
        model=", ".join(names),
        fingerprint=", ".join(prints),
        dtype=placement.dtype_name,
        device=placement.device,
        seed=seed,
    )


def check_request(
    names: Sequence[str],
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
) -> tuple[list[str], GenerationSettings]:
    """The cleaned model names and settings of a comparison; ``InputError`` for bad input."""
    names = [n.strip() for n in names if n and n.strip()]
    if len(names) < 2:
        raise InputError("Pick at least two models to compare.")
    if len(set(names)) != len(names):
        raise InputError("Each model can appear only once in a comparison.")
    if len(names) > MAX_MODELS:
        raise InputError(f"Compare at most {MAX_MODELS} models at a time.")
    settings = settings.validated()
    if settings.sampling and settings.seed is None:
        settings = replace(settings, seed=0)  # same draws on every model, recorded
    if not messages and not (prompt or "").strip():
        raise InputError("The prompt is empty: type some text to continue.")
    return names, settings


def compare(
    workbench,
    names: Sequence[str],
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
    cancel: threading.Event | None = None,
    report: Callable[[float, str], None] | None = None,
) -> Comparison:
    """Generate with each model in ``names``. A model that fails gets its error, not a crash.

    Setting ``cancel`` ends the current model's run after its next token (its outcome is a
    result with finish_reason "cancelled") and skips the models not started yet: the
    comparison then holds fewer outcomes than ``names``.
    """
    names, settings = check_request(names, prompt, settings, messages)
    outcomes = []
    for i, name in enumerate(names):
        if cancel is not None and cancel.is_set():
            break
        if report is not None:
            report(i / len(names), f"{name}: loading and generating…")
        try:
            model = workbench.load(name)
            prepared = prepare(model.loaded, prompt, settings, messages)
            result = run_generation(model.loaded, prepared, settings, cancel)
            outcomes.append(ModelOutcome(name, result, None))
        except EngineError as exc:
            outcomes.append(ModelOutcome(name, None, str(exc)))
    if report is not None:
        report(1.0, "done")
    outcomes = tuple(outcomes)
    provenance = _provenance(workbench, names, outcomes, settings.seed)
    return Comparison(prompt, settings, outcomes, provenance)


def start_comparison(
    workbench,
    names: Sequence[str],
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
) -> runs.Run[Comparison]:
    """``compare`` as a run: progress per model, Stop ends the current model and skips the rest.

    Bad input raises ``InputError`` here, before the run starts.
    """
    names, settings = check_request(names, prompt, settings, messages)

    def work(ctx: runs.RunContext) -> Comparison:
        return compare(workbench, names, prompt, settings, messages, ctx.cancel_event, ctx.progress)

    spec = {"models": names, "prompt": prompt, "settings": settings}
    return runs.start("compare", work, spec=spec)
