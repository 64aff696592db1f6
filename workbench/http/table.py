"""The route table: every ``/v1`` route, its handler and its OpenAPI description."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.routing import Route

from workbench.http import embeddings, finetune_routes, generation, workbench_routes
from workbench.http.common import JSON, Api, Call
from workbench.http.errors import error_body, not_found

if TYPE_CHECKING:
    from engine.api import Workbench

VERSION = "1"


async def list_models(call: Call):
    """GET /v1/models: the models this workbench can serve (embedded and in the store)."""
    wb = call.workbench
    entries = await call.blocking(wb.catalog)
    return JSON(
        {
            "object": "list",
            "data": [
                {
                    "id": e.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "workbench",
                    "kind": e.kind,
                    "description": e.description,
                    "loaded": e.loaded,
                }
                for e in entries
                if e.installed
            ],
        }
    )


# (method, path, handler, request body: (required fields, optional fields) or None)
TABLE: list[tuple[str, str, Callable, tuple[tuple[str, ...], tuple[str, ...]] | None]] = [
    ("GET", "/v1/models", list_models, None),
    (
        "POST",
        "/v1/completions",
        generation.completions,
        (
            ("model", "prompt"),
            (
                "max_tokens",
                "temperature",
                "top_p",
                "top_k",
                "seed",
                "stop",
                "logprobs",
                "stream",
                "stream_options",
                "repetition_penalty",
            ),
        ),
    ),
    (
        "POST",
        "/v1/chat/completions",
        generation.chat_completions,
        (
            ("model", "messages"),
            (
                "max_tokens",
                "max_completion_tokens",
                "temperature",
                "top_p",
                "top_k",
                "seed",
                "stop",
                "logprobs",
                "top_logprobs",
                "stream",
                "stream_options",
                "repetition_penalty",
            ),
        ),
    ),
    ("POST", "/v1/embeddings", embeddings.embeddings, (("input",), ("model", "encoding_format"))),
    (
        "POST",
        "/v1/generate",
        generation.generate,
        (("model",), ("prompt", "messages", "settings", "stream")),
    ),
    (
        "POST",
        "/v1/attention",
        workbench_routes.attention,
        (
            ("model", "text"),
            ("format", "max_tokens", "truncate", "add_special_tokens", "aggregate"),
        ),
    ),
    (
        "POST",
        "/v1/explain",
        workbench_routes.explain,
        (
            ("model", "text"),
            (
                "target",
                "label",
                "contrast",
                "method",
                "methods",
                "options",
                "per_token",
                "faithfulness",
                "seed",
            ),
        ),
    ),
    ("POST", "/v1/perplexity", workbench_routes.perplexity, (("model", "text"), ())),
    ("POST", "/v1/classify", workbench_routes.classify, (("model", "text"), ("max_length",))),
    ("GET", "/v1/runs", workbench_routes.list_runs, None),
    ("GET", "/v1/runs/{run_id}", workbench_routes.get_run, None),
    ("GET", "/v1/runs/{run_id}/result", workbench_routes.run_result, None),
    ("POST", "/v1/runs/{run_id}/reproduce", workbench_routes.reproduce, None),
    ("GET", "/v1/notebooks", workbench_routes.list_notebooks, None),
    ("GET", "/v1/notebooks/{notebook_id}", workbench_routes.get_notebook, None),
    ("GET", "/v1/notebooks/{notebook_id}/export", workbench_routes.export_notebook, None),
    (
        "POST",
        "/v1/finetune/jobs",
        finetune_routes.create_job,
        (("base", "task", "out"), ("data", "sample", "columns", "train", "processes")),
    ),
    ("GET", "/v1/finetune/jobs", finetune_routes.list_jobs, None),
    ("GET", "/v1/finetune/jobs/{job_id}", finetune_routes.get_job, None),
    ("POST", "/v1/finetune/jobs/{job_id}/cancel", finetune_routes.cancel_job, None),
    ("POST", "/v1/finetune/jobs/{job_id}/resume", finetune_routes.resume_job, None),
    ("GET", "/v1/finetune/jobs/{job_id}/events", finetune_routes.job_events, None),
]

BODY_LIMITS = {finetune_routes.create_job: finetune_routes.upload_limit}
STREAMS = {
    generation.completions,
    generation.chat_completions,
    generation.generate,
    finetune_routes.job_events,
}

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def openapi() -> dict:
    """The OpenAPI 3.1 description of every route in ``TABLE``."""
    paths: dict[str, dict] = {}
    for method, path, handler, body in TABLE:
        doc = (handler.__doc__ or "").strip()
        summary, _, rest = doc.partition("\n")
        op: dict = {
            "operationId": handler.__name__,
            "summary": summary.split(": ", 1)[-1],
            "description": " ".join(rest.split()) or summary,
            "parameters": [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in (seg[1:-1] for seg in path.split("/") if seg.startswith("{"))
            ],
            "responses": {
                "200": {"description": "OK (JSON; server-sent events when streamed)"},
                **{
                    code: {
                        "description": why,
                        "content": {"application/json": {"schema": ERROR_SCHEMA}},
                    }
                    for code, why in (
                        ("400", "bad input"),
                        ("401", "missing or wrong API key"),
                        ("403", "the role may not do this"),
                        ("404", "unknown model, run, notebook or job"),
                        ("413", "request body too large"),
                        ("429", "over a limit; see Retry-After"),
                        ("500", "unexpected error (one line)"),
                    )
                },
            },
        }
        if body is not None:
            required, optional = body
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": list(required),
                            "properties": {f: {} for f in (*required, *optional)},
                        }
                    }
                },
            }
        if handler in STREAMS:
            op["responses"]["200"]["content"] = {"application/json": {}, "text/event-stream": {}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LLMOS Workbench API",
            "version": VERSION,
            "description": "OpenAI-compatible generation plus attention, explanations, runs, "
            "notebooks and fine-tuning. Authorization: Bearer KEY.",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


def routes(get_workbench: Callable[[], Workbench]) -> list[Route]:
    """Every ``/v1`` route, served on ``get_workbench()`` (called per request: the one shared
    engine), plus ``GET /v1/openapi.json``."""
    api = Api(get_workbench)
    table = [
        Route(
            path,
            api.endpoint(handler, *([BODY_LIMITS[handler]] if handler in BODY_LIMITS else [])),
            methods=[method],
        )
        for method, path, handler, _body in TABLE
    ]
    spec = openapi()

    async def openapi_json(_request: Request) -> JSON:
        return JSON(spec)

    async def unknown(request: Request) -> JSON:
        error = not_found(f"No route {request.method} {request.url.path}: see /v1/openapi.json.")
        return JSON(error_body(error), status_code=404)

    every = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return [
        Route("/v1/openapi.json", openapi_json, methods=["GET"]),
        *table,
        Route("/v1/{rest:path}", unknown, methods=every),
    ]
