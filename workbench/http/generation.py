"""Generation routes: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``, and
the workbench's own ``/v1/generate`` (the full typed ``GenerationResult``).

OpenAI fields map onto ``GenerationSettings``: ``max_tokens`` (``max_completion_tokens``) ->
``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop`` ->
``stop_sequences``, ``logprobs``/``top_logprobs`` -> ``top_alternatives``. OpenAI has no top-k,
so it is off unless ``top_k`` is sent (as vLLM accepts); ``repetition_penalty`` likewise.
``stream: true`` answers with server-sent events ending in ``data: [DONE]``; a client that
disconnects cancels its run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from engine import access
from workbench.http.common import (
    JSON,
    POLL_MAX_S,
    POLL_MIN_S,
    Call,
    dumps,
    get_bool,
    get_dict,
    get_float,
    get_int,
    get_str,
)
from workbench.http.deltas import TextDeltas
from workbench.http.errors import as_api_error, bad_request, error_body

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
MAX_STOPS = 16


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if (
        isinstance(value, list)
        and all(isinstance(s, str) for s in value)
        and len(value) <= MAX_STOPS
    ):
        return tuple(value)
    raise bad_request(f"'stop' must be a string or a list of at most {MAX_STOPS} strings.")


def openai_settings(body: dict, default_max: int, alternatives: int):
    """``GenerationSettings`` from OpenAI request fields (400 naming a bad one)."""
    from engine.generation import GenerationSettings

    if get_int(body, "n", 1) != 1:
        raise bad_request("Only n = 1 is supported: send one request per completion.")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = get_int({"max_tokens": max_tokens}, "max_tokens", default_max)
    if max_new is not None and max_new < 1:
        raise bad_request(f"'max_tokens' must be at least 1 (got {max_new}).", "invalid_max_tokens")
    temperature = get_float(body, "temperature", 1.0)
    settings = GenerationSettings(
        max_new_tokens=max_new,
        greedy=temperature == 0,
        temperature=temperature,
        top_p=get_float(body, "top_p", 1.0),
        top_k=get_int(body, "top_k", 0, low=0),
        repetition_penalty=get_float(body, "repetition_penalty", 1.0),
        seed=get_int(body, "seed", None),
        stop_sequences=_stops(body.get("stop")),
        top_alternatives=alternatives,
    )
    return settings.validated()


def native_settings(body: dict):
    """``GenerationSettings`` from the ``settings`` object of ``/v1/generate`` (its fields)."""
    from dataclasses import fields

    from engine.generation import GenerationSettings

    given = get_dict(body, "settings")
    known = {f.name for f in fields(GenerationSettings)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise bad_request(
            f"Unknown settings {', '.join(unknown)}: use {', '.join(sorted(known))}.",
            "invalid_settings",
        )
    for name in ("max_new_tokens", "top_k", "seed", "top_alternatives"):
        get_int(given, name)
    for name in ("temperature", "top_p", "repetition_penalty"):
        get_float(given, name)
    for name in ("greedy", "keep_last_tokens"):
        get_bool(given, name)
    stops = _stops(given.get("stop_sequences"))
    return GenerationSettings(**{**given, "stop_sequences": stops}).validated()


def chat_messages(body: dict):
    """``ChatMessage``s from OpenAI ``messages`` (content as a string or text parts)."""
    from engine.generation import ChatMessage

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "'messages' must be a non-empty list of {role, content}.", "invalid_messages"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'.")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [
                p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"
            ]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise bad_request(f"messages[{i}]: only text content parts are supported.")
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string.")
        out.append(ChatMessage(m["role"], content))
    return out


# --- response pieces ----------------------------------------------------------------------


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens, top: int) -> dict:
    return {
        "content": [
            {
                "token": t.text,
                "logprob": t.logprob,
                "bytes": _token_bytes(t.text),
                "top_logprobs": [
                    {"token": a.text, "logprob": a.logprob, "bytes": _token_bytes(a.text)}
                    for a in t.alternatives[:top]
                ],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens, top: int, offset: int = 0) -> dict:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.display if t.display is not None else t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.text: a.logprob for a in t.alternatives[:top]} for t in tokens],
        "text_offset": offsets,
    }


def usage(result) -> dict:
    completion = len(result.tokens)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
    }


def sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else dumps(data)) + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def stream_run(
    run,
    user,
    stops: tuple[str, ...],
    piece: Callable[[str, tuple, str | None], dict | None],
    final: Callable[[Any], list[dict]],
    first: dict | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events for a generation run: ``piece(text, new_tokens, None)`` chunks as
    tokens arrive (None: nothing to send), then ``final(result)`` chunks and ``[DONE]``. An error becomes an
    ``{"error": ...}`` event. Leaving early (the client disconnected) cancels the run."""
    deltas = TextDeltas(stops)
    sent_tokens = 0
    delay = POLL_MIN_S
    try:
        with access.acting_as(user):
            if first is not None:
                yield sse(first)
            while True:
                done = run.done
                partial = run.snapshot().partial
                if partial is not None:
                    text = deltas.update(partial.text)
                    new = partial.tokens[sent_tokens:]
                    if text or new:
                        sent_tokens = len(partial.tokens)
                        chunk = piece(text, new, None)
                        if chunk is not None:
                            yield sse(chunk)
                        delay = POLL_MIN_S
                if done:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, POLL_MAX_S)
            try:
                result = run.wait()
            except Exception as exc:  # noqa: BLE001 - reported in the stream
                yield sse(error_body(as_api_error(exc)))
                yield DONE
                return
            rest = deltas.finish(result.text)
            new = result.tokens[sent_tokens:]
            chunk = piece(rest, new, None) if rest or new else None
            if chunk is not None:
                yield sse(chunk)
            for chunk in final(result):
                yield sse(chunk)
            yield DONE
    finally:
        if not run.done:
            run.cancel()


def event_stream(events: AsyncIterator[bytes], run_id: str) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Run-Id": run_id},
    )


# --- routes -------------------------------------------------------------------------------


async def completions(call: Call):
    """POST /v1/completions: OpenAI text completion (one prompt)."""
    body = await call.body()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (one prompt per request).", "invalid_prompt")
    if get_bool(body, "echo"):
        raise bad_request("'echo' is not supported.")
    top = get_int(body, "logprobs", None, low=0, high=20)
    settings = openai_settings(body, 16, top or 0)
    model = await call.model(body.get("model"))
    run = await call.blocking(model.start_generation, prompt, settings)
    created, cid = int(time.time()), "cmpl-" + run.id

    def choice(text: str, tokens, reason: str | None, offset: int = 0) -> dict:
        logprobs = completion_logprobs(tokens, top, offset) if top is not None else None
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def chunk(choices: list[dict], extra: dict | None = None) -> dict:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": choices,
            "run_id": run.id,
            **(extra or {}),
        }

    if get_bool(body, "stream"):
        include_usage = get_dict(body, "stream_options").get("include_usage") is True

        def final(result) -> list[dict]:
            last = chunk([choice("", (), FINISH.get(result.finish_reason, "stop"))])
            out = [last]
            if include_usage:
                out.append(chunk([], {"usage": usage(result)}))
            return out

        events = stream_run(
            run, call.user, settings.stop_sequences, lambda t, k, r: chunk([choice(t, k, r)]), final
        )
        return event_stream(events, run.id)
    result = await call.finish(run)
    reason = FINISH.get(result.finish_reason, "stop")
    return JSON(chunk([choice(result.text, result.tokens, reason)], {"usage": usage(result)}))


async def chat_completions(call: Call):
    """POST /v1/chat/completions: OpenAI chat completion through the model's chat template."""
    body = await call.body()
    messages = chat_messages(body)
    want_logprobs = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", 0, low=0, high=20)
    settings = openai_settings(body, 256, top if want_logprobs else 0)
    model = await call.model(body.get("model"))
    run = await call.blocking(model.start_generation, "", settings, messages)
    created, cid = int(time.time()), "chatcmpl-" + run.id

    def chunk(choices: list[dict], kind: str, extra: dict | None = None) -> dict:
        return {
            "id": cid,
            "object": kind,
            "created": created,
            "model": model.name,
            "choices": choices,
            "run_id": run.id,
            **(extra or {}),
        }

    if get_bool(body, "stream"):
        include_usage = get_dict(body, "stream_options").get("include_usage") is True

        def piece(text: str, tokens, reason: str | None) -> dict | None:
            if not text and not (want_logprobs and tokens):
                return None
            delta = {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
            if want_logprobs and tokens:
                choice["logprobs"] = chat_logprobs(tokens, top)
            return chunk([choice], "chat.completion.chunk")

        def final(result) -> list[dict]:
            reason = FINISH.get(result.finish_reason, "stop")
            out = [
                chunk([{"index": 0, "delta": {}, "finish_reason": reason}], "chat.completion.chunk")
            ]
            if include_usage:
                out.append(chunk([], "chat.completion.chunk", {"usage": usage(result)}))
            return out

        first = chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            "chat.completion.chunk",
        )
        events = stream_run(run, call.user, settings.stop_sequences, piece, final, first)
        return event_stream(events, run.id)
    result = await call.finish(run)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": chat_logprobs(result.tokens, top) if want_logprobs else None,
        "finish_reason": FINISH.get(result.finish_reason, "stop"),
    }
    return JSON(chunk([choice], "chat.completion", {"usage": usage(result)}))


async def generate(call: Call):
    """POST /v1/generate: the workbench's generation, answered with the full typed result.

    Body: ``model``, ``prompt`` or ``messages``, ``settings`` (``GenerationSettings`` fields),
    ``stream``. Streamed: events ``{"text": piece, "run_id"}``, then ``{"result": {...}}``."""
    body = await call.body()
    settings = native_settings(body)
    messages = chat_messages(body) if body.get("messages") is not None else None
    prompt = get_str(body, "prompt", "", required=messages is None)
    model = await call.model(body.get("model"))
    run = await call.blocking(model.start_generation, prompt, settings, messages)
    if get_bool(body, "stream"):
        events = stream_run(
            run,
            call.user,
            settings.stop_sequences,
            lambda text, _tokens, _reason: {"text": text, "run_id": run.id},
            lambda result: [{"result": result.to_dict(), "run_id": run.id}],
        )
        return event_stream(events, run.id)
    result = await call.finish(run)
    return JSON({"object": "generation", "run_id": run.id, "result": result.to_dict()})
