"""One prompt on several *variants*, one after another, side by side: different models
(a base model and its fine-tuned version), or one model under different settings (greedy vs
sampled, two temperatures).

Models load through the shared manager, so the memory budget holds: an idle model may be
evicted to make room for the next one. With a seed, every variant samples from the same seed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from engine import runs
from engine.errors import EngineError, InputError
from engine.generation.batching import run_generation
from engine.generation.chat import ChatMessage
from engine.generation.core import GenerationResult, GenerationSettings, prepare
from engine.provenance import Provenance
from engine.results import Result

MAX_MODELS = 4


@dataclass(frozen=True)
class Variant:
    """One side of a comparison: a model and its settings (None: the shared settings)."""

    model: str
    settings: GenerationSettings | None = None
    label: str = ""


@dataclass(frozen=True)
class ModelOutcome:
    """One variant's side of a comparison: its result, or the one-line error it raised.
    ``label`` names the variant (the model, plus the settings that differ)."""

    model: str
    result: GenerationResult | None
    error: str | None
    label: str = ""


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


def _provenance(workbench, variants: Sequence[Variant], outcomes, seed: int | None) -> Provenance:
    prints = []
    for i in range(len(variants)):
        done = outcomes[i].result if i < len(outcomes) else None
        prints.append(done.provenance.fingerprint if done is not None else "unavailable")
    placement = workbench.placement
    return Provenance(
        model=", ".join(v.model for v in variants),
        fingerprint=", ".join(prints),
        dtype=placement.dtype_name,
        device=placement.device,
        seed=seed,
    )


def _label(model: str, settings: GenerationSettings, shared: GenerationSettings) -> str:
    changed = [
        f"{name.replace('_', ' ')} {getattr(settings, name)}"
        for name in ("greedy", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
        if getattr(settings, name) != getattr(shared, name)
    ]
    return model + (" · " + ", ".join(changed) if changed else "")


def check_request(
    variants: Sequence[str | Variant | dict],
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
) -> tuple[list[Variant], GenerationSettings]:
    """The checked variants (each with its own settings filled in) and the shared settings.

    A variant is a model name, a ``Variant`` or a dict ``{"model", "settings", "label"}``.
    ``InputError`` for bad input: fewer than two variants, two identical ones, too many.
    """
    settings = settings.validated()
    if settings.sampling and settings.seed is None:
        settings = replace(settings, seed=0)  # same draws on every variant, recorded
    checked: list[Variant] = []
    for item in variants:
        if isinstance(item, str):
            item = Variant(item)
        elif isinstance(item, dict):
            own = item.get("settings")
            if isinstance(own, dict):
                own = GenerationSettings(
                    **{**own, "stop_sequences": tuple(own.get("stop_sequences") or ())}
                )
            item = Variant(str(item.get("model", "")), own, str(item.get("label", "")))
        name = item.model.strip()
        if not name:
            continue
        own = (item.settings or settings).validated()
        if own.sampling and own.seed is None:
            own = replace(own, seed=settings.seed or 0)
        checked.append(Variant(name, own, item.label or _label(name, own, settings)))
    if len(checked) < 2:
        raise InputError(
            "Pick at least two variants to compare: two models, or one model twice with "
            "different settings."
        )
    keys = [(v.model, v.settings) for v in checked]
    if len(set(keys)) != len(keys):
        raise InputError("Two variants are the same model with the same settings: change one.")
    if len(checked) > MAX_MODELS:
        raise InputError(f"Compare at most {MAX_MODELS} variants at a time.")
    if not messages and not (prompt or "").strip():
        raise InputError("The prompt is empty: type some text to continue.")
    return checked, settings


def compare(
    workbench,
    names: Sequence[str | Variant | dict],
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
    cancel: threading.Event | None = None,
    report: Callable[[float, str], None] | None = None,
) -> Comparison:
    """Generate with each variant in ``names`` (model names, ``Variant``s or dicts; see
    ``check_request``). A variant that fails gets its error, not a crash.

    Setting ``cancel`` ends the current variant's run after its next token (its outcome is a
    result with finish_reason "cancelled") and skips the variants not started yet: the
    comparison then holds fewer outcomes than ``names``.
    """
    variants, settings = check_request(names, prompt, settings, messages)
    outcomes = []
    for i, variant in enumerate(variants):
        if cancel is not None and cancel.is_set():
            break
        if report is not None:
            report(i / len(variants), f"{variant.label}: loading and generating…")
        try:
            model = workbench.load(variant.model)
            prepared = prepare(model.loaded, prompt, variant.settings, messages)
            result = run_generation(model.loaded, prepared, variant.settings, cancel)
            outcomes.append(ModelOutcome(variant.model, result, None, variant.label))
        except EngineError as exc:
            outcomes.append(ModelOutcome(variant.model, None, str(exc), variant.label))
    if report is not None:
        report(1.0, "done")
    outcomes = tuple(outcomes)
    provenance = _provenance(workbench, variants, outcomes, settings.seed)
    return Comparison(prompt, settings, outcomes, provenance)


def start_comparison(
    workbench,
    names: Sequence[str | Variant | dict],
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
) -> runs.Run[Comparison]:
    """``compare`` as a run: progress per model, Stop ends the current model and skips the rest.

    Bad input raises ``InputError`` here, before the run starts.
    """
    variants, settings = check_request(names, prompt, settings, messages)

    def work(ctx: runs.RunContext) -> Comparison:
        return compare(
            workbench, variants, prompt, settings, messages, ctx.cancel_event, ctx.progress
        )

    spec = {
        "models": [v.model for v in variants],
        "variants": [
            {"model": v.model, "settings": v.settings, "label": v.label} for v in variants
        ],
        "prompt": prompt,
        "settings": settings,
        "messages": [{"role": m.role, "content": m.content} for m in messages or ()],
    }
    return runs.start("compare", work, spec=spec)
