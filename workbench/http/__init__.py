"""The HTTP API, served in the app's own process (``workbench serve``) on the one engine.

    from workbench.http import routes
    app = st.App("workbench/app.py", routes=routes(get_workbench))

``routes(get_workbench)`` gives every ``/v1`` route (OpenAI-compatible generation and
embeddings, attention, explain, perplexity, classify, runs, notebooks, fine-tune jobs, and
``/v1/openapi.json``); ``api_app(get_workbench)`` the same routes as a bare Starlette app (tests).
Modules: ``common`` (auth, bodies, waiting on runs), ``errors`` (JSON errors), ``generation``,
``embeddings``, ``workbench_routes``, ``finetune_routes``, ``table`` (the route table and OpenAPI),
``deltas`` (settled streamed text), ``asgi`` (the served app).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from engine.api import Workbench


def routes(get_workbench: Callable[[], Workbench]) -> list[Route]:
    """Every ``/v1`` route on ``get_workbench()`` (see ``workbench.http.table``)."""
    from workbench.http.table import routes as build

    return build(get_workbench)


def api_app(get_workbench: Callable[[], Workbench]) -> Starlette:
    """The routes alone as a Starlette app (for ``starlette.testclient.TestClient``)."""
    from starlette.applications import Starlette

    return Starlette(routes=routes(get_workbench))
