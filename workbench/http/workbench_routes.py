"""The workbench's own routes: attention, explain, perplexity, classify, the run ledger
(list, get, stored result, reproduce) and notebooks (list, get, export).

Every run's response carries ``run_id``, the id of its ledger record.
"""

from __future__ import annotations

import dataclasses
import json

from starlette.responses import Response

from engine import access
from engine.errors import InputError
from workbench.http.common import JSON, Call, get_bool, get_dict, get_int, get_str
from workbench.http.errors import bad_request, not_found

NPZ = "application/x-npz"


def _range(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise bad_request(f"'{name}' must be [first, last] (whole numbers).")
    return (value[0], value[1])


def attention_view(result, options: dict) -> dict:
    """The aggregated view of an ``AttentionResult`` (``options``: layers, heads,
    merge_words, max_side, top_k), with per-head statistics."""
    from engine.attention import AggregationSettings, aggregate, head_statistics, top_edges

    settings = AggregationSettings(
        layers=_range(options.get("layers"), "aggregate.layers"),
        heads=_range(options.get("heads"), "aggregate.heads"),
        merge_words=get_bool(options, "merge_words"),
        max_side=get_int(options, "max_side", 128),
    )
    view = aggregate(result, settings)
    edges = top_edges(view, get_int(options, "top_k", 20, low=1, high=1000))
    stats = head_statistics(result.attentions)
    return {
        "matrix": view.matrix.tolist(),
        "labels": view.labels,
        "spans": [list(s) for s in view.spans],
        "description": view.description,
        "top_edges": [dataclasses.asdict(e) for e in edges],
        "head_statistics": {
            f.name: getattr(stats, f.name).tolist()
            for f in dataclasses.fields(stats)
            if hasattr(getattr(stats, f.name), "tolist")
        },
    }


async def attention(call: Call):
    """POST /v1/attention: ``model``, ``text``, optional ``max_tokens``, ``truncate``,
    ``add_special_tokens``; ``format`` "aggregated" (default: averaged view, top edges, head
    statistics, ``aggregate`` options) or "npz" (the full (layer, head, query, key) tensor)."""
    from engine.attention import AttentionSettings

    body = await call.body()
    text = get_str(body, "text", required=True)
    form = get_str(body, "format", "aggregated")
    if form not in ("aggregated", "npz"):
        raise bad_request("'format' must be 'aggregated' or 'npz'.")
    settings = AttentionSettings(
        max_tokens=get_int(body, "max_tokens", 1024),
        add_special_tokens=get_bool(body, "add_special_tokens", True),
        truncate=get_bool(body, "truncate"),
    )
    options = get_dict(body, "aggregate")
    model = await call.model(body.get("model"))
    run = await call.blocking(model.start_attention, text, settings)
    result = (await call.finish(run)).sides[0].result
    if form == "npz":
        data = await call.blocking(result.npz_bytes)
        return Response(data, media_type=NPZ, headers={"X-Run-Id": run.id})
    summary = result.summary()
    view = await call.blocking(attention_view, result, options)
    return JSON({"object": "attention", "run_id": run.id, **summary, "view": view})


def _explanation(attribution) -> dict:
    faith = attribution.faithfulness
    return {
        "method": attribution.method,
        "tokens": list(attribution.tokens),
        "scores": attribution.scores.tolist(),
        "target": attribution.target_description,
        "target_score": attribution.target_score,
        "completeness": {
            "target_score": attribution.target_score,
            "baseline_score": attribution.baseline_score,
            "convergence_delta": attribution.convergence_delta,
            "sum_of_scores": float(attribution.scores.sum()),
        },
        "faithfulness": None
        if faith is None
        else {
            "comprehensiveness": faith.comprehensiveness,
            "sufficiency": faith.sufficiency,
            "random_comprehensiveness": faith.random_comprehensiveness,
        },
    }


async def explain(call: Call):
    """POST /v1/explain: ``model``, ``text``, ``target`` (continuation, "" = the model's next
    token), ``label`` / ``contrast``, ``method`` or ``methods`` [{method, options}],
    ``options``, ``per_token``, ``faithfulness``, ``seed``. Answers scores, completeness and
    faithfulness per method, and the full ``ExplanationSet`` as ``result``."""
    from engine.attribution import ExplanationSpec, MethodRun, TargetSpec

    body = await call.body()
    text = get_str(body, "text", required=True)
    methods = body.get("methods")
    if methods is None:
        methods = [
            {
                "method": get_str(body, "method", "integrated_gradients"),
                "options": get_dict(body, "options"),
            }
        ]
    if (
        not isinstance(methods, list)
        or not methods
        or not all(isinstance(m, dict) for m in methods)
    ):
        raise bad_request("'methods' must be a list of {method, options}.")
    runs = tuple(
        MethodRun(get_str(m, "method", required=True), get_dict(m, "options")) for m in methods
    )
    spec = ExplanationSpec(
        text,
        TargetSpec(
            text=get_str(body, "target", ""),
            label=get_str(body, "label"),
            contrast=get_str(body, "contrast"),
        ),
        runs,
        per_token=get_bool(body, "per_token"),
        faithfulness=get_bool(body, "faithfulness", True),
        seed=get_int(body, "seed", 0, low=0),
    )
    model = await call.model(body.get("model"))
    run = await call.blocking(model.start_explanation, spec)
    result = await call.finish(run)
    return JSON(
        {
            "object": "explanation",
            "run_id": run.id,
            "explanations": [_explanation(a) for a in result.attributions],
            "result": await call.blocking(result.to_dict),
        }
    )


async def perplexity(call: Call):
    """POST /v1/perplexity: ``model``, ``text``."""
    body = await call.body()
    text = get_str(body, "text", required=True)
    model = await call.model(body.get("model"))
    run = await call.blocking(model.start_perplexity, text)
    result = await call.finish(run)
    return JSON(
        {
            "object": "perplexity",
            "run_id": run.id,
            "perplexity": result.perplexity,
            "mean_nll": result.mean_nll,
            "result": result.to_dict(),
        }
    )


async def classify(call: Call):
    """POST /v1/classify: ``model`` (a classifier), ``text``, ``max_length``."""
    body = await call.body()
    text = get_str(body, "text", required=True)
    max_length = get_int(body, "max_length", 512, low=2, high=8192)
    model = await call.model(body.get("model"))
    run = await call.blocking(model.start_classification, text, max_length)
    result = await call.finish(run)
    return JSON(
        {
            "object": "classification",
            "run_id": run.id,
            "label": result.label,
            "scores": result.scores,
            "result": result.to_dict(),
        }
    )


# --- the ledger ---------------------------------------------------------------------------


def _record(wb, run_id: str):
    try:
        return wb.ledger.get(run_id)
    except InputError as exc:
        raise not_found(str(exc), "run_not_found") from None


async def list_runs(call: Call):
    """GET /v1/runs?kind=&model=&user=&text=&since=&limit= : the caller's (or, for reading
    roles, everyone's) ledger records, newest last."""
    q = call.request.query_params
    try:
        limit = int(q.get("limit", "50"))
        since = float(q["since"]) if q.get("since") else None
    except ValueError:
        raise bad_request("'limit' and 'since' must be numbers.") from None
    if not 1 <= limit <= 1000:
        raise bad_request("'limit' must be between 1 and 1000.")
    wb = call.workbench
    records = await call.blocking(
        lambda: wb.ledger.records(
            kind=q.get("kind"),
            model=q.get("model"),
            text=q.get("text"),
            since=since,
            limit=limit,
            user=q.get("user"),
        )
    )
    return JSON({"object": "list", "data": [r.summary() for r in records]})


def _result_data(result) -> dict | None:
    if result is None:
        return None
    if hasattr(result, "save_npz"):  # tensors: fetch /v1/runs/{id}/result for the npz
        return {"type": type(result).__name__, "format": "npz", **result.summary()}
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return result


async def get_run(call: Call):
    """GET /v1/runs/{id}: the ledger record and its stored result."""
    wb = call.workbench
    run_id = call.request.path_params["run_id"]

    def read() -> dict:
        record = _record(wb, run_id)
        return {
            **record.to_dict(),
            "run_id": record.id,
            "result": _result_data(wb.ledger.load_result(record)),
        }

    return JSON(await call.blocking(read))


async def run_result(call: Call):
    """GET /v1/runs/{id}/result: the stored result file as it is (JSON or npz)."""
    wb = call.workbench
    run_id = call.request.path_params["run_id"]

    def read() -> tuple[bytes, str]:
        path = wb.ledger.result_file(_record(wb, run_id))
        if path is None or not path.is_file():
            raise not_found(f"Run {run_id} left no result.", "no_result")
        return path.read_bytes(), NPZ if path.suffix == ".npz" else "application/json"

    data, media = await call.blocking(read)
    return Response(data, media_type=media, headers={"X-Run-Id": run_id})


async def reproduce(call: Call):
    """POST /v1/runs/{id}/reproduce: re-run a recorded run and give the verdict (exact,
    within tolerance, mismatch, cannot reproduce); ``run_id`` is the re-run's record."""
    from engine.reproduce import reproduce as rerun

    wb = call.workbench
    run_id = call.request.path_params["run_id"]

    def work():
        return rerun(wb, _record(wb, run_id))

    verdict = await call.blocking(work)
    data = verdict.to_dict()
    # run_id: the re-run's own ledger record; reproduced_run_id: the run it re-ran
    data["reproduced_run_id"] = data.pop("run_id")
    return JSON({"object": "verdict", **data, "run_id": verdict.new_run_id})


# --- notebooks ----------------------------------------------------------------------------


def _may_read(book) -> bool:
    """The caller's own, shared, or (reading roles) anyone's notebook."""
    return getattr(book, "shared", False) or access.may_read(getattr(book, "owner", "local"))


def _notebook(wb, notebook_id: str):
    try:
        book = wb.notebooks.get(notebook_id)
    except InputError as exc:
        raise not_found(str(exc), "notebook_not_found") from None
    if not _may_read(book):
        raise not_found(f"No notebook {notebook_id!r}.", "notebook_not_found")
    return book


async def list_notebooks(call: Call):
    """GET /v1/notebooks: id, name, cells, updated of every notebook the caller may read."""
    wb = call.workbench
    infos = await call.blocking(wb.notebooks.list)
    readable = [i for i in infos if not i.damaged and _may_read(i)]
    return JSON({"object": "list", "data": [dataclasses.asdict(i) for i in readable]})


async def get_notebook(call: Call):
    """GET /v1/notebooks/{id}: the notebook with its cells."""
    wb = call.workbench
    book = await call.blocking(_notebook, wb, call.request.path_params["notebook_id"])
    return JSON(book.to_dict())


async def export_notebook(call: Call):
    """GET /v1/notebooks/{id}/export?format=json|ipynb|html."""
    from engine.notebooks import export as exporter

    wb = call.workbench
    form = call.request.query_params.get("format", "json")
    if form not in ("json", "ipynb", "html"):
        raise bad_request("'format' must be json, ipynb or html.")

    def work() -> tuple[str, str]:
        book = _notebook(wb, call.request.path_params["notebook_id"])
        if form == "json":
            return json.dumps(
                exporter.bundle(book, wb.ledger), ensure_ascii=False
            ), "application/json"
        if form == "ipynb":
            return exporter.to_ipynb(book, wb.ledger), "application/x-ipynb+json"
        return exporter.to_html(book, wb.ledger, wb), "text/html; charset=utf-8"

    text, media = await call.blocking(work)
    return Response(text, media_type=media)
