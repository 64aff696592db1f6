"""What every route shares: who is calling, the request body, the engine, waiting for runs.

A route is ``async def handler(call: Call) -> Response``; ``Api.endpoint(handler)`` wraps it
so the caller is authenticated (``Authorization: Bearer KEY``), the handler runs as that user
(``engine.access.acting_as``) and any error becomes a JSON error response. Blocking engine calls
(model loads, tokenizing, the ledger) go through ``call.blocking(fn)``: a worker thread, acting
as the same user, so the event loop never waits on the engine.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from engine import access
from workbench.http.errors import ApiError, bad_request, error_response

if TYPE_CHECKING:
    from engine.api import Model, Workbench
    from engine.runs import Run

DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # WORKBENCH_API_MAX_BODY_MB overrides
POLL_MIN_S = 0.001  # how often a waiting request looks at its run: 1 ms, growing to 4 ms
POLL_MAX_S = 0.004
DISCONNECT_CHECK_S = 0.25  # how often a waiting request checks whether its client left


def max_body_bytes() -> int:
    raw = os.environ.get("WORKBENCH_API_MAX_BODY_MB", "").strip()
    try:
        return int(float(raw) * 2**20) if raw else DEFAULT_MAX_BODY_BYTES
    except ValueError:
        return DEFAULT_MAX_BODY_BYTES


class ClientGone(Exception):
    """The client disconnected while its run was going (the run was cancelled)."""


def _non_finite_to_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _non_finite_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_non_finite_to_none(v) for v in value]
    return value


def dumps(data: Any) -> bytes:
    """Strict JSON (NaN and infinities become null)."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_non_finite_to_none(data), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


@dataclass
class Api:
    """The routes' shared state: how to get the one engine, and the API keys."""

    get_workbench: Callable[[], Workbench]
    limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(16))
    _keys: Any = None
    _keys_lock: threading.Lock = field(default_factory=threading.Lock)

    def api_keys(self):
        """``engine.auth.ApiKeys`` for the engine's home; None while that module is missing."""
        with self._keys_lock:
            if self._keys is None:
                try:
                    from engine.auth import ApiKeys
                except ImportError:
                    return None
                self._keys = ApiKeys(self.get_workbench().home)
            return self._keys

    async def authenticate(self, request: Request) -> access.User | None:
        """The caller's ``User`` from ``Authorization: Bearer KEY``; None = the local default.

        With login required (``WORKBENCH_AUTH=required``): 401 without a valid key. Without
        it, a valid key acts as its user and any other key is ignored (the local user).
        """
        header = request.headers.get("authorization", "").strip()
        if not header:
            if access.auth_required():
                raise ApiError(
                    401,
                    "This workbench requires an API key: send 'Authorization: Bearer KEY' "
                    "(an admin creates one with `workbench keys create --user NAME`).",
                    "authentication_error",
                    "missing_api_key",
                )
            return None
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise ApiError(
                401,
                "Malformed Authorization header: use 'Authorization: Bearer KEY'.",
                "authentication_error",
                "invalid_api_key",
            )
        keys = await anyio.to_thread.run_sync(self.api_keys, limiter=self.limiter)
        if keys is None:
            if access.auth_required():
                raise ApiError(
                    401,
                    "API keys are not available on this server yet.",
                    "authentication_error",
                    "invalid_api_key",
                )
            return None
        user = await anyio.to_thread.run_sync(keys.verify, secret, limiter=self.limiter)
        if user is None and not access.auth_required():
            # a local server needs no key: OpenAI SDKs always send one (any placeholder)
            return None
        if user is None:
            raise ApiError(
                401,
                "Invalid or revoked API key: ask an admin for a new one.",
                "authentication_error",
                "invalid_api_key",
            )
        return user

    def endpoint(
        self,
        handler: Callable[[Call], Awaitable[Response]],
        max_body: Callable[[], int] = max_body_bytes,
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` as a Starlette endpoint: authenticated, acting as the caller, errors as
        JSON. ``max_body``: the largest request body accepted (bytes; 413 beyond it)."""

        async def route(request: Request) -> Response:
            try:
                user = await self.authenticate(request)
            except ApiError as exc:
                return error_response(exc)
            with access.acting_as(user):
                try:
                    return await handler(Call(self, request, user, max_body))
                except ClientGone:
                    return Response(status_code=499)
                except Exception as exc:  # noqa: BLE001 - every error is a JSON response
                    return error_response(exc)

        route.__name__ = handler.__name__
        route.__doc__ = handler.__doc__
        return route


@dataclass
class Call:
    """One request: the raw request, the acting user, the parsed body and the engine."""

    api: Api
    request: Request
    user: access.User | None
    max_body: Callable[[], int] = max_body_bytes
    _body: dict | None = None

    @property
    def workbench(self) -> Workbench:
        return self.api.get_workbench()

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker thread, acting as this call's user."""
        user = self.user

        def as_user() -> Any:
            with access.acting_as(user):
                return fn(*args)

        return await anyio.to_thread.run_sync(as_user, limiter=self.api.limiter)

    async def body(self) -> dict:
        """The JSON object sent (400 malformed, 413 over ``max_body`` bytes)."""
        if self._body is not None:
            return self._body
        limit = self.max_body()
        declared = self.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in self.request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            self._body = {}
            return self._body
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(
                400, f"Malformed JSON body: {exc}.", "invalid_request_error", "invalid_json"
            ) from None
        if not isinstance(data, dict):
            raise bad_request("The request body must be a JSON object.", "invalid_json")
        self._body = data
        return data

    async def model(self, name: Any) -> Model:
        """The loaded model ``name`` (loaded on first use). Only catalog models (embedded and
        store) unless the caller may manage models (then folders and hub ids too); 404 else."""
        if not isinstance(name, str) or not name.strip():
            raise bad_request("'model' is required: GET /v1/models lists them.", "missing_model")
        return await self.blocking(load_model, self.workbench, name.strip())

    async def finish(self, run: Run) -> Any:
        """Wait for ``run`` without blocking the loop; cancel it when the client goes away.

        Returns the result (re-raises the run's error)."""
        delay = POLL_MIN_S
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_CHECK_S
        try:
            while not run.done:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, POLL_MAX_S)
                run.touch()
                if loop.time() >= next_check:
                    next_check = loop.time() + DISCONNECT_CHECK_S
                    if await self.request.is_disconnected():
                        raise ClientGone
        except BaseException:
            run.cancel()
            raise
        return run.wait()


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is {size:,} bytes; this server accepts at most {limit:,} "
        "(WORKBENCH_API_MAX_BODY_MB sets this).",
        "invalid_request_error",
        "request_too_large",
    )


def load_model(wb: Workbench, name: str) -> Model:
    """``wb``'s shared model ``name`` (see ``Call.model``); blocking."""
    from engine.errors import ModelNotFoundError

    loaded = wb.manager.get(name)
    if loaded is not None:
        return wb.model(loaded)
    if not access.can("models.manage"):
        known = {entry.name for entry in wb.catalog() if entry.installed}
        if name not in known:
            raise ModelNotFoundError(
                f"Unknown model {name[:80]!r}: use one of {', '.join(sorted(known))} "
                "(GET /v1/models)."
            )
    return wb.load(name)


# --- reading fields -----------------------------------------------------------------------


def _field_error(name: str, what: str, value: Any) -> ApiError:
    shown = json.dumps(value)[:60] if _jsonable(value) else type(value).__name__
    return bad_request(f"'{name}' must be {what} (got {shown}).", "invalid_" + name)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def get_str(body: dict, name: str, default: str | None = None, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required.", "missing_" + name)
        return default  # type: ignore[return-value]
    if not isinstance(value, str):
        raise _field_error(name, "a string", value)
    return value


def get_int(
    body: dict,
    name: str,
    default: int | None = None,
    low: int | None = None,
    high: int | None = None,
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _field_error(name, "a whole number", value)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise bad_request(f"'{name}' must be {rng} (got {value}).", "invalid_" + name)
    return value


def get_float(body: dict, name: str, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _field_error(name, "a number", value)
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _field_error(name, "true or false", value)
    return value


def get_dict(body: dict, name: str) -> dict:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _field_error(name, "an object", value)
    return value
