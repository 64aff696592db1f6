"""Concurrent generation requests on one model, decoded together; identical ones once.

Each generation becomes a ``Request`` that waits in the model's fair queue
(``engine.scheduler``) as a batchable ticket. The thread that is granted the model decodes its
own request and every request the scheduler took along with it:

- identical requests (same model fingerprint, input ids and settings, seed included) share one
  *row*: computed once, the result fanned out (``GenerationResult.shared_by``);
- rows of greedy causal-LM requests without a repetition penalty are decoded together in one
  ``generate`` call, left-padded with an attention mask (``GenerationResult.batch_size``). Each
  row keeps its own recorder view, stop sequences, ``max_new_tokens``, streaming callback and
  cancel: a cancelled row stops, the others go on.

Greedy rows give the tokens of the single-request decode: the padded positions are masked, so
only float rounding differs (tests/test_generation_batching.py measures the log-probabilities).
Sampled requests are never batched with other requests: a row's logits in a batch differ from
its single-request logits by rounding, which can move a draw of its seeded generator. They run
alone (identical seeded requests still share one computation, which is exact). So do requests
on the ``int8`` decode path: there a batch's float rounding moves int8 roundings, which changed
the tokens of 7 of 16 SmolLM2 prompts against their single-request answers.
``WORKBENCH_BATCHING=0`` turns batching off (identical requests are still computed once).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from engine.errors import CancelledError
from engine.generation.chat import ChatMessage
from engine.generation.core import (
    GenerationResult,
    GenerationSettings,
    Prepared,
    _eos_ids,
    generate_kwargs,
    prepare,
)
from engine.generation.decoding import Observer, TokenStep
from engine.generation.paths import choose_decode_path, decoder_for, generation_eos
from engine.manager import LoadedModel
from engine.provenance import Provenance

__all__ = ["Request", "batching_enabled", "generate", "run_generation", "serve"]

ENV = "WORKBENCH_BATCHING"


def batching_enabled() -> bool:
    """False when ``WORKBENCH_BATCHING`` is 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(eq=False)
class Request:
    """One generation waiting to be decoded (a batchable payload of a scheduler ticket).

    ``settings`` are validated with the seed fixed. ``batch_key``: requests with equal keys may
    be decoded in one batch; ``dedup_key``: requests with equal keys are computed once.
    ``path``: the decode path it takes (``engine.generation.paths``).
    """

    prepared: Prepared
    settings: GenerationSettings
    cancel: threading.Event
    on_step: Callable[[TokenStep, str], None] | None
    batch_key: Hashable
    dedup_key: Hashable
    path: str
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    error: BaseException | None = None
    # (steps, text, seconds since the decode started) when this request stopped alone
    frozen: tuple[tuple[TokenStep, ...], str, float] | None = None

    @classmethod
    def make(
        cls,
        loaded: LoadedModel,
        prepared: Prepared,
        settings: GenerationSettings,
        cancel: threading.Event | None = None,
        on_step: Callable[[TokenStep, str], None] | None = None,
    ) -> Request:
        path = choose_decode_path(loaded.model, loaded.kind, settings.decode_path)
        dedup = (loaded.fingerprint, path, tuple(prepared.input_ids[0].tolist()), settings)
        batchable = (
            batching_enabled()
            and loaded.kind == "causal-lm"
            and not settings.sampling
            and settings.repetition_penalty == 1.0  # it would also penalise the pad tokens
            and path != "int8"  # int8 rounding turns a batch's float rounding into other tokens
        )
        batch = ("greedy", path) if batchable else ("alone", dedup)
        return cls(prepared, settings, cancel or threading.Event(), on_step, batch, dedup, path)


def serve(loaded: LoadedModel, request: Request, timeout_s: float = 600.0) -> GenerationResult:
    """Queue ``request`` on ``loaded``'s fair queue and return its result.

    A request granted alone is decoded on this thread. A grant that took others along is
    computed on a batch thread that holds the model until the whole batch is done; every
    request in it (this one included) returns as soon as its own row is done. Raises the decode's error (``CancelledError`` for a run
    cancelled while it waited in the queue).
    """
    with loaded.queue.use(timeout_s, batch=request) as grant:
        loaded.last_used = time.monotonic()
        if not grant.seated and request.batch_key[0] == "greedy":  # rows can join: worth it
            with contextlib.suppress(Exception):  # an optimisation: never fail the batch
                grant.gather()  # the users of the last batch, back with their next request
        if grant.seated:
            request.done.wait()
        elif len(grant.members) > 1 and grant.ticket is not None:
            # computed on a batch thread: this request returns when its own row is done
            _BATCH_THREADS.submit(_compute, loaded, grant.hand_over())
            request.done.wait()
        else:
            decode(loaded, grant.members)
        loaded.last_used = time.monotonic()
    if request.error is not None:
        raise request.error
    assert request.result is not None
    return request.result


def run_generation(
    loaded: LoadedModel,
    prepared: Prepared,
    settings: GenerationSettings,
    cancel: threading.Event | None = None,
    on_step: Callable[[TokenStep, str], None] | None = None,
) -> GenerationResult:
    """Decode a prepared request through the model's fair queue (``engine.scheduler``).

    Concurrent compatible requests are decoded in one batch and identical ones once
    (``engine.generation.batching``; the result's ``batch_size`` and ``shared_by`` say so).
    ``on_step(token, text_so_far)`` is called after every token (possibly from the thread
    that decodes the batch); setting ``cancel`` ends this request after the current token.
    """
    settings = settings.validated()
    if settings.sampling and settings.seed is None:
        settings = replace(settings, seed=secrets.randbelow(2**31))
    return serve(loaded, Request.make(loaded, prepared, settings, cancel, on_step))


def generate(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
) -> GenerationResult:
    """Generate a continuation of ``prompt`` (or a chat reply to ``messages``) with ``settings``."""
    return run_generation(loaded, prepare(loaded, prompt, settings, messages), settings)


# Threads that compute handed-over batches (kept: a new thread pays torch's start-up).
_BATCH_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="workbench-batch")


def _compute(loaded: LoadedModel, grant) -> None:
    grant.adopt()
    try:
        decode(loaded, grant.members)
    finally:
        loaded.last_used = time.monotonic()
        grant.release()


# --- decoding ------------------------------------------------------------------------------


class _AllCancelled:
    """The cancel "event" of a row: set once every request sharing it has stopped."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests

    def is_set(self) -> bool:
        return all(r.frozen is not None or r.cancel.is_set() for r in self.requests)


class _RowScores:
    """What an ``Observer`` reads from its recorder, for one row of a batch."""

    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None  # (vocab,)
        self.top: tuple[list[float], list[int]] = ([], [])


@dataclass(eq=False)
class _Row:
    requests: list[Request]
    observer: Observer | None = None
    scores: _RowScores = field(default_factory=_RowScores)
    finished: bool = False
    end: float | None = None

    @property
    def lead(self) -> Request:
        return self.requests[0]


def _fan_out(row: _Row, started: list[float]) -> Callable[[TokenStep, str], None]:
    """The row's ``on_step``: stream to every request still listening; freeze one that was
    cancelled (its result is the tokens so far), the others go on."""

    def on_step(step: TokenStep, text: str) -> None:
        steps = None
        for request in row.requests:
            if request.frozen is not None:
                continue
            try:
                if request.on_step is not None:
                    request.on_step(step, text)
                stopped = request.cancel.is_set()
            except CancelledError:  # nobody holds its run any more
                stopped = True
            if stopped and len(row.requests) > 1:
                if steps is None:
                    steps = tuple(row.observer.steps)
                request.frozen = (steps, text, time.perf_counter() - started[0])

    return on_step


def decode(loaded: LoadedModel, requests: list[Request]) -> None:
    """Decode ``requests`` (identical ones once, compatible ones in one batch) and deliver each
    one's result or error to it (never raises). Call holding ``loaded``'s grant."""
    try:
        rows: dict[Hashable, _Row] = {}
        for request in requests:  # one cancelled already stops after its first token
            rows.setdefault(request.dedup_key, _Row([])).requests.append(request)
        batch = list(rows.values())
        if len(batch) == 1:
            _decode_alone(loaded, batch[0])
        elif batch:
            _decode_together(loaded, batch)
    except BaseException as exc:  # noqa: BLE001 - each request's caller re-raises it
        for request in requests:
            if not request.done.is_set():
                request.error = exc
                request.done.set()
    finally:
        for request in requests:
            request.done.set()


def _observer(loaded: LoadedModel, row: _Row, recorder, started: list[float]) -> Observer:
    settings = row.lead.settings
    row.observer = Observer(
        loaded.tokenizer,
        recorder,
        settings.stop_sequences,
        _AllCancelled(row.requests),
        _fan_out(row, started),
        tokenizer_lock=loaded.tokenizer_lock,
    )
    return row.observer


def _decode_alone(loaded: LoadedModel, row: _Row) -> None:
    """One computation (possibly for several identical requests): the single-request decode."""
    from transformers import StoppingCriteriaList

    lead = row.lead
    kwargs, recorder = generate_kwargs(loaded, lead.prepared, lead.settings)
    started = [time.perf_counter()]
    observer = _observer(loaded, row, recorder, started)
    kwargs["stopping_criteria"] = StoppingCriteriaList([observer])
    decoder = decoder_for(loaded, lead.path)
    with torch.inference_mode():
        started[0] = time.perf_counter()
        decoder.generate(**kwargs)
        seconds = time.perf_counter() - started[0]
    _deliver(loaded, row, started[0], seconds, batch_size=1)


class _BatchRecorder:
    """First logits processor of a batch: keeps every row's raw log-probabilities."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows
        self.top_k = max(r.lead.settings.top_alternatives for r in rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)  # (rows, vocab)
        values = indices = None
        if self.top_k:
            top = torch.topk(logprobs, min(self.top_k, logprobs.shape[-1]), dim=-1)
            values, indices = top.values.tolist(), top.indices.tolist()
        for r, row in enumerate(self.rows):
            row.scores.logprobs = logprobs[r]
            k = row.lead.settings.top_alternatives
            row.scores.top = (values[r][:k], indices[r][:k]) if values and k else ([], [])
        return scores


class _BatchObserver:
    """The batch's stopping criterion: each unfinished row's ``Observer``, and its own end
    (end of text, its ``max_new_tokens``, a stop sequence, or all its requests cancelled)."""

    def __init__(self, rows: list[_Row], eos: set[int], on_end: Callable[[_Row], None]) -> None:
        self.rows = rows
        self.eos = eos
        self.on_end = on_end

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = []
        for r, row in enumerate(self.rows):
            if not row.finished:
                stop = bool(row.observer(input_ids[r : r + 1], scores)[0])
                ids = row.observer.ids
                if stop or ids[-1] in self.eos or len(ids) >= row.lead.settings.max_new_tokens:
                    row.finished, row.end = True, time.perf_counter()
                    self.on_end(row)  # its requests get their results now
            done.append(row.finished)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _decode_together(loaded: LoadedModel, rows: list[_Row]) -> None:
    """Greedy rows in one left-padded ``generate`` call."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    kwargs, _ = generate_kwargs(loaded, rows[0].lead.prepared, rows[0].lead.settings)
    prompts = [row.lead.prepared.input_ids[0] for row in rows]
    width = max(int(p.shape[0]) for p in prompts)
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        pad = min(generation_eos(loaded.model) or {0})
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        input_ids[r, width - prompt.shape[0] :] = prompt
        mask[r, width - prompt.shape[0] :] = 1
    recorder = _BatchRecorder(rows)
    started = [time.perf_counter()]
    for row in rows:
        _observer(loaded, row, row.scores, started)

    def on_end(row: _Row) -> None:
        _deliver(loaded, row, started[0], row.end - started[0], batch_size=len(rows))

    kwargs.update(
        input_ids=input_ids.to(loaded.device),
        attention_mask=mask.to(loaded.device),
        max_new_tokens=max(row.lead.settings.max_new_tokens for row in rows),
        logits_processor=LogitsProcessorList([recorder]),
        stopping_criteria=StoppingCriteriaList(
            [_BatchObserver(rows, generation_eos(loaded.model), on_end)]
        ),
    )
    decoder = decoder_for(loaded, rows[0].lead.path)
    with torch.inference_mode():
        started[0] = time.perf_counter()
        decoder.generate(**kwargs)
        ended = time.perf_counter()
    for row in rows:
        if not row.finished:  # generate ended at the longest max_new_tokens
            row.finished, row.end = True, ended
            on_end(row)


def _deliver(loaded: LoadedModel, row: _Row, started: float, seconds: float, batch_size: int):
    """Build each request's ``GenerationResult`` from its row and hand it over."""
    observer = row.observer
    finish = observer.finish_reason
    if finish is None:
        last = observer.ids[-1] if observer.ids else None
        finish = "eos" if last is not None and last in _eos_ids(loaded) else "length"
    first = observer.first_token_at - started if observer.first_token_at is not None else None
    for request in row.requests:
        steps, text, took, reason = tuple(observer.steps), observer.text, seconds, finish
        if request.frozen is not None:
            steps, text, took = request.frozen
            reason = "cancelled"
        prepared, settings = request.prepared, request.settings
        request.result = GenerationResult(
            prompt=prepared.prompt,
            text=text,
            tokens=steps,
            settings=settings,
            provenance=Provenance.of(loaded, seed=settings.seed, decode_path=request.path),
            finish_reason=reason,
            seconds=took,
            first_token_seconds=first,
            prompt_tokens=int(prepared.input_ids.shape[1]),
            dropped_prompt_tokens=prepared.dropped_prompt_tokens,
            mode=prepared.mode,
            model_input=prepared.model_input,
            messages=prepared.messages,
            batch_size=batch_size,
            shared_by=len(row.requests),
        )
        request.done.set()
