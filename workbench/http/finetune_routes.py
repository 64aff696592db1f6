"""Fine-tune jobs over HTTP: create (with the data in the request), list, get (with the
training metrics), cancel, resume, and progress as server-sent events.

The data travels in the request (``data: {"name": "x.csv", "content": "..."}``) or names a
shipped sample (``sample: "sentiment"``): a remote caller never names a file on the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path

from starlette.responses import StreamingResponse

from engine import access
from engine.errors import InputError
from workbench.http.common import JSON, Call, get_dict, get_str
from workbench.http.errors import bad_request, not_found
from workbench.http.generation import DONE, sse

EVENT_POLL_S = 0.5
DATA_SUFFIXES = (".csv", ".jsonl", ".txt")


def upload_limit() -> int:
    """The largest fine-tune request body for the caller (their role's ``upload_bytes``)."""
    return access.limits_for().upload_bytes + 2**20


def job_dict(info) -> dict:
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(info).items()}
    data.pop("folder", None)  # a server path
    data.pop("pid", None)
    return {"object": "finetune.job", **data, "fraction": info.fraction}


def _jobs(call: Call):
    from engine.finetune import JobStore

    return JobStore(call.workbench.home)


def _get(jobs, job_id: str):
    try:
        return jobs.get(job_id)
    except (InputError, KeyError, access.AccessError) as exc:  # another's job reads as missing
        raise not_found(f"No fine-tune job {job_id!r}.", "job_not_found") from exc


def _submit(jobs, body: dict) -> dict:
    from engine.finetune import JobSpec, sample_path

    access.require("finetune")
    sample = get_str(body, "sample")
    data = get_dict(body, "data")
    spec_fields = {
        k: body[k] for k in ("base", "task", "out", "columns", "train", "processes") if k in body
    }
    if sample:
        return job_dict(
            jobs.submit(JobSpec.from_dict({**spec_fields, "data": str(sample_path(sample))}))
        )
    name = get_str(data, "name", required=True)
    content = get_str(data, "content", required=True)
    suffix = Path(name).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise bad_request(f"data.name must end in {', '.join(DATA_SUFFIXES)} (got {name!r}).")
    with tempfile.TemporaryDirectory(prefix="upload-", dir=jobs.root) as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_text(content, encoding="utf-8")
        return job_dict(jobs.submit(JobSpec.from_dict({**spec_fields, "data": str(path)})))


async def create_job(call: Call):
    """POST /v1/finetune/jobs: ``base``, ``task``, ``out``, ``data`` {name, content} or
    ``sample``, optional ``columns`` and ``train`` (``TrainConfig`` fields)."""
    body = await call.body()
    return JSON(await call.blocking(_submit, _jobs(call), body), status_code=201)


async def list_jobs(call: Call):
    """GET /v1/finetune/jobs."""
    jobs = _jobs(call)
    infos = await call.blocking(jobs.list)
    return JSON({"object": "list", "data": [job_dict(i) for i in infos]})


async def get_job(call: Call):
    """GET /v1/finetune/jobs/{id}: status, step, metrics so far, and the result when done."""
    jobs = _jobs(call)
    job_id = call.request.path_params["job_id"]

    def read() -> dict:
        info = _get(jobs, job_id)
        result = jobs.result(job_id)
        return {
            **job_dict(info),
            "metrics": jobs.metrics(job_id),
            "result": result.to_dict() if result is not None else None,
        }

    return JSON(await call.blocking(read))


async def cancel_job(call: Call):
    """POST /v1/finetune/jobs/{id}/cancel."""
    jobs = _jobs(call)
    job_id = call.request.path_params["job_id"]
    _ = await call.blocking(_get, jobs, job_id)
    return JSON(job_dict(await call.blocking(jobs.cancel, job_id)))


async def resume_job(call: Call):
    """POST /v1/finetune/jobs/{id}/resume (interrupted, failed or cancelled jobs)."""
    jobs = _jobs(call)
    job_id = call.request.path_params["job_id"]
    _ = await call.blocking(_get, jobs, job_id)
    return JSON(job_dict(await call.blocking(jobs.resume, job_id)))


async def job_events(call: Call):
    """GET /v1/finetune/jobs/{id}/events: server-sent events, one job state per change, until
    the job ends (then ``[DONE]``)."""
    jobs = _jobs(call)
    job_id = call.request.path_params["job_id"]
    await call.blocking(_get, jobs, job_id)

    async def events():
        last = None
        with access.acting_as(call.user):
            while True:
                info = await call.blocking(jobs.get, job_id)
                state = job_dict(info)
                key = (state["status"], state["step"], state["phase"], state["message"])
                if key != last:
                    last = key
                    yield sse(state)
                if not info.active:
                    yield DONE
                    return
                await asyncio.sleep(EVENT_POLL_S)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
