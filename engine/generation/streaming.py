"""Generation as a run: tokens stream into the run's snapshot, Stop ends it after one token.

    run = start_generation(loaded, "Once upon a time", GenerationSettings(max_new_tokens=200))
    snap = run.snapshot()          # snap.partial is a StreamedText while it runs
    run.cancel(); result = run.wait()   # a stopped run still returns its partial result

Stopping sets the run's cancel event, which the decode loop checks after every token, so the
model's lock is released within one forward pass; the result then has finish_reason
"cancelled" and the tokens generated so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine import runs
from engine.generation.batching import run_generation
from engine.generation.chat import ChatMessage
from engine.generation.core import GenerationResult, GenerationSettings, Prepared, prepare
from engine.generation.decoding import TokenStep
from engine.manager import LoadedModel


@dataclass(frozen=True)
class StreamedText:
    """A generation's output so far (a run's ``partial``): text and the tokens behind it."""

    text: str
    tokens: tuple[TokenStep, ...]


def generation_spec(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
    input_ids: Sequence[int] = (),
) -> dict:
    """What was asked for, as plain data (kept with the run for provenance and re-runs).

    ``input_ids``: the token ids the model sees (after the chat template and truncation).
    """
    return {
        "model": loaded.name,
        "fingerprint": loaded.fingerprint,
        "prompt": prompt,
        "messages": [{"role": m.role, "content": m.content} for m in messages or ()],
        "settings": settings,
        "input_ids": list(input_ids),
    }


def start_generation(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
    idle_timeout_s: float | None = None,
) -> runs.Run[GenerationResult]:
    """Validate in the caller's thread (``InputError`` for bad input, ``LimitError`` past the
    user's limits), then generate as a run through the model's fair queue.

    With ``idle_timeout_s``, the run stops itself when ``snapshot()`` has not been called for
    that long (a closed browser tab must not keep the model busy).
    """
    prepared = prepare(loaded, prompt, settings, messages)
    total = settings.max_new_tokens

    def work(ctx: runs.RunContext) -> GenerationResult:
        tokens: list[TokenStep] = []

        def on_step(step: TokenStep, text: str) -> None:
            tokens.append(step)
            ctx.partial(StreamedText(text, tuple(tokens)))
            ctx.progress(len(tokens) / total, f"{len(tokens)} tokens")

        return run_generation(loaded, prepared, settings, ctx.cancel_event, on_step)

    return runs.start(
        "generate",
        work,
        spec=generation_spec(loaded, prompt, settings, messages, prepared.input_ids[0].tolist()),
        idle_timeout_s=idle_timeout_s,
        cost=generation_cost(prepared, settings),
    )


def generation_cost(prepared: Prepared, settings: GenerationSettings) -> int:
    """Scheduling cost of a generation (``engine.scheduler``): prompt tokens + max_new_tokens."""
    return int(prepared.input_ids.shape[1]) + settings.max_new_tokens
