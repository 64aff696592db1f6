"""Errors as JSON: ``{"error": {"message", "type", "code"}}`` with the right HTTP status.

Every engine error maps to a status here, in one place; anything else becomes a one-line 500
(the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import logging
import math

from starlette.responses import JSONResponse

from engine import access
from engine.errors import (
    CancelledError,
    EngineError,
    InputError,
    MemoryBudgetError,
    MissingPackageError,
    ModelNotFoundError,
    OfflineError,
    UnsafeModelError,
)
from engine.runs import one_line_error

log = logging.getLogger("workbench.http")


class ApiError(Exception):
    """An HTTP error with a JSON body. ``kind`` is the OpenAI-style ``type``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(404, message, "not_found_error", code)


def as_api_error(exc: BaseException) -> ApiError:
    """The ``ApiError`` for any exception (engine errors by class, the rest as a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, access.LimitError):
        if exc.retry_after_s is not None:
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            return ApiError(
                429, str(exc), "rate_limit_error", "rate_limited", {"Retry-After": retry}
            )
        return ApiError(400, str(exc), "invalid_request_error", "limit_exceeded")
    if isinstance(exc, access.AccessError):
        if not access.acting_user_or_none() and access.auth_required():
            return ApiError(401, str(exc), "authentication_error", "unauthenticated")
        return ApiError(403, str(exc), "permission_error", "forbidden")
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, str(exc), "not_found_error", "model_not_found")
    if isinstance(exc, UnsafeModelError):
        return ApiError(403, str(exc), "permission_error", "unsafe_model")
    if isinstance(exc, MemoryBudgetError):
        return ApiError(503, str(exc), "server_error", "memory_budget", {"Retry-After": "5"})
    if isinstance(exc, OfflineError | MissingPackageError):
        return ApiError(503, str(exc), "server_error", "unavailable")
    if isinstance(exc, CancelledError):
        return ApiError(409, str(exc), "cancelled", "cancelled")
    if isinstance(exc, InputError):
        return bad_request(str(exc))
    if isinstance(exc, EngineError):
        return ApiError(500, one_line_error(exc) or "", "server_error", "engine_error")
    log.exception("unexpected error in the HTTP API", exc_info=exc)
    return ApiError(500, one_line_error(exc, "request") or "", "server_error", "internal_error")


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "code": error.code}}


def error_response(exc: BaseException) -> JSONResponse:
    """A JSON error response for ``exc`` (its status and headers, e.g. Retry-After)."""
    error = as_api_error(exc)
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)
