"""Hooks into ``transformers``' ``generate`` loop: record, sample, observe and stop.

``generate`` stays the decoding loop (so greedy output is identical to plain ``generate`` and
encoder-decoder models work); these small objects plug into it:

- ``Recorder`` (a logits processor, first in the chain) keeps the log-softmax of the raw logits
  of each step, so token probabilities are the model's own distribution.
- ``Sampler`` (last in the chain) draws the next token with a private ``torch.Generator``:
  seeded runs are reproducible and never touch (or race on) the global RNG.
- ``Observer`` (a stopping criterion, called once per new token) turns each token into a
  ``TokenStep``, reports it, and stops on a stop sequence or a cancel event.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclass(frozen=True)
class Alternative:
    """A candidate token at one step: id, decoded text and log-probability (natural log)."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenStep:
    """One generated token: id, decoded text, log-probability and the top alternatives.

    ``alternatives`` are the most likely tokens at that step (best first, the chosen token
    included when it is among them), under the model's raw distribution. ``display`` is what
    this token adds to the decoded text: byte-level pieces of one character (emoji, Hebrew,
    Arabic) decode alone to "\ufffd", so the first pieces add "" and the last adds the whole
    character; None when unknown (then ``text`` is shown).
    """

    id: int
    text: str
    logprob: float
    alternatives: tuple[Alternative, ...] = ()
    display: str | None = None

    @property
    def prob(self) -> float:
        import math

        return math.exp(self.logprob)


class Recorder(LogitsProcessor):
    """Keeps the raw log-probabilities of the latest step (returns the scores unchanged)."""

    def __init__(self, top_k: int = 5) -> None:
        self.top_k = top_k
        self.logprobs: torch.Tensor | None = None  # (vocab,) float32 on the model device
        self.top: tuple[list[float], list[int]] = ([], [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores[0].float(), dim=-1)
        self.logprobs = logprobs
        if self.top_k:
            values, indices = torch.topk(logprobs, min(self.top_k, logprobs.shape[-1]))
            self.top = (values.tolist(), indices.tolist())
        return scores


class Sampler(LogitsProcessor):
    """Samples from the processed scores with its own generator; leaves only the draw.

    ``generate`` then runs with ``do_sample=False`` and its argmax picks exactly this draw.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=self.generator)  # (batch, 1)
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, choice, 0.0)
        return out


class Observer(StoppingCriteria):
    """Called once per generated token: records it, streams it, checks stops and cancel."""

    def __init__(
        self,
        tokenizer,
        recorder: Recorder,
        stop_sequences: Sequence[str],
        cancel: threading.Event,
        on_step: Callable[[TokenStep, str], None] | None = None,
        tokenizer_lock: AbstractContextManager | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # Fast tokenizers are not thread-safe: decode under the model's tokenizer lock.
        self.tokenizer_lock = tokenizer_lock or contextlib.nullcontext()
        self.recorder = recorder
        self.stop_sequences = [s for s in stop_sequences if s]
        self.cancel = cancel
        self.on_step = on_step
        self.steps: list[TokenStep] = []
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self._decoded: dict[int, str] = {}
        self._stable = ""  # the decoded text so far, without a trailing incomplete character

    def _piece(self, token_id: int) -> str:
        piece = self._decoded.get(token_id)
        if piece is None:
            with self.tokenizer_lock:
                piece = self.tokenizer.decode([token_id])
            self._decoded[token_id] = piece
        return piece

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        token_id = int(input_ids[0, -1])
        logprobs = self.recorder.logprobs
        logprob = float(logprobs[token_id]) if logprobs is not None else float("nan")
        values, indices = self.recorder.top
        alternatives = tuple(
            Alternative(i, self._piece(i), v) for v, i in zip(values, indices, strict=True)
        )
        self.ids.append(token_id)
        with self.tokenizer_lock:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stable = text.rstrip("\ufffd")
        display = stable[len(self._stable) :] if stable.startswith(self._stable) else None
        self._stable = stable
        step = TokenStep(token_id, self._piece(token_id), logprob, alternatives, display)
        self.steps.append(step)
        stop = False
        for sequence in self.stop_sequences:
            at = text.find(sequence)
            if at >= 0:
                text, stop = text[:at], True
                self.finish_reason = "stop"
                break
        self.text = text
        if self.on_step is not None:
            self.on_step(step, text)
        if not stop and self.cancel.is_set():
            stop, self.finish_reason = True, "cancelled"
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
