"""``llmos.Client``: one API for a workbench in this process or over HTTP.

    import llmos
    client = llmos.Client()                                   # the engine in this process
    client = llmos.Client("http://lab:8501", api_key="wb-...")  # a served workbench
    model = client.load_model("smollm2-135m")
    result = model.generate_text("The capital of France is", max_new_tokens=8, greedy=True)
    result.text, result.tokens, result.run_id
    for piece in model.stream_text("Once upon a time", max_new_tokens=40): print(piece, end="")

Both give the same typed results (``GenerationResult``, ``AttentionResult``, ``Attribution``,
``PerplexityResult``, ``ClassificationResult``, ``Verdict``), each with ``run_id``, the id of
its run-ledger record. Settings are ``GenerationSettings`` fields (``max_new_tokens``,
``greedy``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_sequences``, ...).

Errors: in-process calls raise the engine's errors (``InputError``, ...); remote calls raise
``RemoteError`` with the HTTP ``status``, the error ``type`` and ``code``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

STREAM_POLL_S = 0.005


class RemoteError(Exception):
    """An error answered by a remote workbench: ``status`` (HTTP), ``kind``, ``code``."""

    def __init__(self, status: int, message: str, kind: str = "", code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code


def _with_run_id(result: Any, run_id: str | None) -> Any:
    """``result`` with a ``run_id`` attribute (a frozen dataclass: set past its __setattr__)."""
    if result is not None and not isinstance(result, dict | list):
        object.__setattr__(result, "run_id", run_id)
    return result


def _messages(messages: Sequence) -> list[dict]:
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": m["role"], "content": m["content"]})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


class Client:
    """A workbench: in this process (``url`` None; ``workbench`` or a new ``Workbench()``)
    or a served one at ``url`` (``api_key``: a key from ``workbench keys create``)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        workbench=None,
        timeout: float = 600.0,
    ) -> None:
        if url is None:
            if workbench is None:
                from engine.api import Workbench

                workbench = Workbench()
            self._backend: _Backend = _Local(workbench)
        else:
            self._backend = _Remote(url, api_key, timeout)

    @property
    def remote(self) -> bool:
        return isinstance(self._backend, _Remote)

    def load_model(self, name: str) -> Model:
        """A handle on model ``name`` (loaded on first use)."""
        self._backend.load(name)
        return Model(self._backend, name)

    def models(self) -> list[dict]:
        """Installed models: ``{"id", "kind", "description", "loaded"}``."""
        return self._backend.models()

    def runs(self, limit: int = 50, **filters: Any) -> list[dict]:
        """Ledger records, newest last (``kind``, ``model``, ``text``, ``user`` filters)."""
        return self._backend.runs(limit, filters)

    def run(self, run_id: str) -> dict:
        """One ledger record; ``"result"`` is its typed result (None when it left none)."""
        return self._backend.run(run_id)

    def reproduce(self, run_id: str):
        """Re-run a recorded run: an ``engine.reproduce.Verdict`` (its ``new_run_id``)."""
        return self._backend.reproduce(run_id)

    def embed(self, texts: str | Sequence[str], model: str = "minilm-l6") -> list[list[float]]:
        """Mean-pooled, L2-normalised sentence vectors (one per text)."""
        return self._backend.embed([texts] if isinstance(texts, str) else list(texts), model)

    def finetune(
        self,
        base: str,
        out: str,
        *,
        task: str = "classification",
        data: str | Path | None = None,
        sample: str | None = None,
        columns: dict | None = None,
        train: dict | None = None,
    ) -> Job:
        """Start a fine-tune job on ``data`` (a CSV/JSONL/TXT file here) or a shipped
        ``sample``; ``train``: ``TrainConfig`` fields. Returns a ``Job``."""
        if (data is None) == (sample is None):
            raise ValueError("Give either data (a file) or sample (a shipped data set).")
        spec = {"base": base, "task": task, "out": out}
        if columns:
            spec["columns"] = columns
        if train:
            spec["train"] = train
        info = self._backend.finetune(spec, Path(data) if data is not None else None, sample)
        return Job(self._backend, info["id"])

    def job(self, job_id: str) -> Job:
        return Job(self._backend, job_id)

    def __repr__(self) -> str:
        return f"Client({self._backend!r})"


class Model:
    """One model of a ``Client``. Every method returns a typed result with ``run_id``."""

    def __init__(self, backend: _Backend, name: str) -> None:
        self._backend = backend
        self.name = name

    def generate_text(self, prompt: str, **settings: Any):
        """Continue ``prompt``: a ``GenerationResult`` (``text`` is the continuation)."""
        return self._backend.generate(self.name, prompt, None, settings)

    def chat(self, messages: Sequence, **settings: Any):
        """Reply to ``messages`` ({role, content} dicts or ``ChatMessage``s) through the
        model's chat template: a ``GenerationResult``."""
        return self._backend.generate(self.name, "", _messages(messages), settings)

    def stream_text(self, prompt: str, **settings: Any) -> Iterator[str]:
        """The continuation of ``prompt`` in pieces as they are generated (joined, they equal
        ``generate_text(...).text``). Leaving the loop early stops the generation."""
        return self._backend.stream(self.name, prompt, None, settings)

    def attention(self, text: str, **settings: Any):
        """Every layer's and head's attention: an ``AttentionResult`` whose ``attentions`` is
        float32 (layer, head, query, key). ``settings``: ``AttentionSettings`` fields."""
        return self._backend.attention(self.name, text, settings)

    def explain(
        self,
        text: str,
        target: str = "",
        *,
        label: str | None = None,
        contrast: str | None = None,
        method: str = "integrated_gradients",
        options: dict | None = None,
        per_token: bool = False,
        faithfulness: bool = True,
        seed: int = 0,
    ):
        """Attribute ``target`` (continuation; "" = the next token) or ``label`` to the input
        tokens: an ``Attribution`` (scores, completeness, faithfulness)."""
        request = {
            "text": text,
            "target": target,
            "label": label,
            "contrast": contrast,
            "method": method,
            "options": dict(options or {}),
            "per_token": per_token,
            "faithfulness": faithfulness,
            "seed": seed,
        }
        return self._backend.explain(self.name, request)

    def perplexity(self, text: str):
        """Perplexity of ``text``: a ``PerplexityResult``."""
        return self._backend.simple(self.name, "perplexity", text)

    def classify(self, text: str):
        """Label and class probabilities: a ``ClassificationResult``."""
        return self._backend.simple(self.name, "classify", text)

    def __repr__(self) -> str:
        return f"llmos.Model({self.name!r})"


class Job:
    """A fine-tune job: ``status()``, ``metrics()``, ``wait()``, ``cancel()``, ``resume()``."""

    def __init__(self, backend: _Backend, job_id: str) -> None:
        self._backend = backend
        self.id = job_id

    def status(self) -> dict:
        """The job now: status, phase, step, total_steps, eta_s, metrics, result."""
        return self._backend.job(self.id)

    def metrics(self) -> list[dict]:
        return self.status()["metrics"]

    def cancel(self) -> dict:
        return self._backend.job_action(self.id, "cancel")

    def resume(self) -> dict:
        return self._backend.job_action(self.id, "resume")

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> dict:
        """Poll until the job ends; its final status (``TimeoutError`` after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if state["status"] not in ("queued", "running"):
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {state['status']}")
            time.sleep(poll_s)

    def __repr__(self) -> str:
        return f"llmos.Job({self.id!r})"


# --- backends -----------------------------------------------------------------------------


class _Backend:
    def load(self, name: str) -> None: ...


class _Local(_Backend):
    """The engine in this process (``engine.api.Workbench``)."""

    def __init__(self, workbench) -> None:
        self.wb = workbench

    def __repr__(self) -> str:
        return f"local {self.wb.home}"

    def load(self, name: str) -> None:
        self.wb.load(name)

    def _model(self, name: str):
        return self.wb.load(name)

    def _settings(self, settings: dict):
        from engine.generation import GenerationSettings

        if "stop_sequences" in settings:
            settings = {**settings, "stop_sequences": tuple(settings["stop_sequences"])}
        return GenerationSettings(**settings).validated()

    def _start(self, name, prompt, messages, settings):
        from engine.generation import ChatMessage

        chat = [ChatMessage(m["role"], m["content"]) for m in messages] if messages else None
        return self._model(name).start_generation(prompt, self._settings(settings), chat)

    def generate(self, name, prompt, messages, settings):
        run = self._start(name, prompt, messages, settings)
        return _with_run_id(run.wait(), run.id)

    def stream(self, name, prompt, messages, settings) -> Iterator[str]:
        from workbench.http.deltas import TextDeltas

        run = self._start(name, prompt, messages, settings)
        deltas = TextDeltas(self._settings(settings).stop_sequences)
        try:
            while True:
                done = run.done
                partial = run.snapshot().partial
                if partial is not None:
                    piece = deltas.update(partial.text)
                    if piece:
                        yield piece
                if done:
                    break
                time.sleep(STREAM_POLL_S)
            rest = deltas.finish(run.wait().text)
            if rest:
                yield rest
        finally:
            if not run.done:
                run.cancel()

    def attention(self, name, text, settings):
        from engine.attention import AttentionSettings

        run = self._model(name).start_attention(text, AttentionSettings(**settings))
        return _with_run_id(run.wait().sides[0].result, run.id)

    def explain(self, name, request):
        from engine.attribution import ExplanationSpec, MethodRun, TargetSpec

        spec = ExplanationSpec(
            request["text"],
            TargetSpec(
                text=request["target"], label=request["label"], contrast=request["contrast"]
            ),
            (MethodRun(request["method"], request["options"]),),
            per_token=request["per_token"],
            faithfulness=request["faithfulness"],
            seed=request["seed"],
        )
        run = self._model(name).start_explanation(spec)
        return _with_run_id(run.wait().attributions[0], run.id)

    def simple(self, name, operation, text):
        model = self._model(name)
        start = model.start_perplexity if operation == "perplexity" else model.start_classification
        run = start(text)
        return _with_run_id(run.wait(), run.id)

    def models(self) -> list[dict]:
        return [
            {"id": e.name, "kind": e.kind, "description": e.description, "loaded": e.loaded}
            for e in self.wb.catalog()
            if e.installed
        ]

    def runs(self, limit, filters) -> list[dict]:
        return [r.summary() for r in self.wb.ledger.records(limit=limit, **filters)]

    def run(self, run_id: str) -> dict:
        record = self.wb.ledger.get(run_id)
        return {**record.to_dict(), "result": self.wb.ledger.load_result(record)}

    def reproduce(self, run_id: str):
        from engine.reproduce import reproduce

        verdict = reproduce(self.wb, run_id)
        return _with_run_id(verdict, verdict.new_run_id)

    def embed(self, texts, model):
        from workbench.http.embeddings import start_embedding

        run = start_embedding(self.wb.load(model), texts)
        return run.wait()["vectors"]

    def _jobs(self):
        from engine.finetune import JobStore

        return JobStore(self.wb.home)

    def finetune(self, spec, data, sample) -> dict:
        import dataclasses

        from engine.finetune import JobSpec, sample_path

        path = str(sample_path(sample)) if sample else str(data)
        info = self._jobs().submit(JobSpec.from_dict({**spec, "data": path}))
        return dataclasses.asdict(info)

    def job(self, job_id: str) -> dict:
        from workbench.http.finetune_routes import job_dict

        jobs = self._jobs()
        result = jobs.result(job_id)
        return {
            **job_dict(jobs.get(job_id)),
            "metrics": jobs.metrics(job_id),
            "result": result,
        }

    def job_action(self, job_id: str, action: str) -> dict:
        from workbench.http.finetune_routes import job_dict

        jobs = self._jobs()
        return job_dict(jobs.cancel(job_id) if action == "cancel" else jobs.resume(job_id))


class _Remote(_Backend):
    """A served workbench, over its ``/v1`` HTTP API (stdlib ``urllib``, no extra packages)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def __repr__(self) -> str:
        return self.url

    def _open(self, method: str, path: str, body: dict | None = None):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                error = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                error = {"message": raw.decode("utf-8", "replace")[:300]}
            raise RemoteError(
                exc.code, error.get("message", ""), error.get("type", ""), error.get("code")
            ) from None

    def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def _events(self, path: str, body: dict) -> Iterator[dict]:
        response = self._open("POST", path, body)
        try:
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    raise RemoteError(
                        500, error.get("message", ""), error.get("type", ""), error.get("code")
                    )
                yield event
        finally:
            response.close()  # an early exit disconnects: the server cancels the run

    def load(self, name: str) -> None:
        return None  # the server loads on first use (and answers 404 for unknown models)

    @staticmethod
    def _settings(settings: dict) -> dict:
        if "stop_sequences" in settings:
            settings = {**settings, "stop_sequences": list(settings["stop_sequences"])}
        return settings

    def generate(self, name, prompt, messages, settings):
        from engine.generation import GenerationResult

        body = {"model": name, "prompt": prompt, "settings": self._settings(settings)}
        if messages:
            body["messages"] = messages
        data = self._json("POST", "/v1/generate", body)
        return _with_run_id(GenerationResult.from_dict(data["result"]), data["run_id"])

    def stream(self, name, prompt, messages, settings) -> Iterator[str]:
        body = {
            "model": name,
            "prompt": prompt,
            "settings": self._settings(settings),
            "stream": True,
        }
        if messages:
            body["messages"] = messages
        for event in self._events("/v1/generate", body):
            if event.get("text"):
                yield event["text"]

    def attention(self, name, text, settings):
        import io

        from engine.attention import AttentionResult

        with self._open(
            "POST", "/v1/attention", {"model": name, "text": text, "format": "npz", **settings}
        ) as r:
            run_id = r.headers.get("X-Run-Id")
            result = AttentionResult.load_npz(io.BytesIO(r.read()))
        return _with_run_id(result, run_id)

    def explain(self, name, request):
        from engine.attribution import ExplanationSet

        data = self._json("POST", "/v1/explain", {"model": name, **request})
        return _with_run_id(
            ExplanationSet.from_dict(data["result"]).attributions[0], data["run_id"]
        )

    def simple(self, name, operation, text):
        from engine.result_types import result_class

        data = self._json("POST", f"/v1/{operation}", {"model": name, "text": text})
        cls = result_class(data["result"]["type"])
        return _with_run_id(cls.from_dict(data["result"]), data["run_id"])

    def models(self) -> list[dict]:
        keep = ("id", "kind", "description", "loaded")
        return [{k: m[k] for k in keep} for m in self._json("GET", "/v1/models")["data"]]

    def runs(self, limit, filters) -> list[dict]:
        from urllib.parse import urlencode

        query = urlencode({"limit": limit, **{k: v for k, v in filters.items() if v is not None}})
        return self._json("GET", f"/v1/runs?{query}")["data"]

    def run(self, run_id: str) -> dict:
        import io

        from engine.result_types import result_class

        data = self._json("GET", f"/v1/runs/{run_id}")
        data.pop("run_id", None)
        result = data.get("result")
        if isinstance(result, dict) and result.get("format") == "npz":
            from engine.attention import AttentionResult

            with self._open("GET", f"/v1/runs/{run_id}/result") as r:
                data["result"] = AttentionResult.load_npz(io.BytesIO(r.read()))
        elif isinstance(result, dict) and result_class(result.get("type")) is not None:
            data["result"] = result_class(result["type"]).from_dict(result)
        return data

    def reproduce(self, run_id: str):
        from engine.reproduce import Verdict

        data = self._json("POST", f"/v1/runs/{run_id}/reproduce")
        data.pop("object", None)
        data["run_id"] = data.pop("reproduced_run_id", None)
        return _with_run_id(Verdict.from_dict(data), data.get("new_run_id"))

    def embed(self, texts, model):
        data = self._json("POST", "/v1/embeddings", {"model": model, "input": texts})
        return [item["embedding"] for item in data["data"]]

    def finetune(self, spec, data, sample) -> dict:
        body = dict(spec)
        if sample:
            body["sample"] = sample
        else:
            body["data"] = {"name": data.name, "content": data.read_text(encoding="utf-8")}
        return self._json("POST", "/v1/finetune/jobs", body)

    def job(self, job_id: str) -> dict:
        from engine.finetune import FinetuneResult

        data = self._json("GET", f"/v1/finetune/jobs/{job_id}")
        if data.get("result"):
            data["result"] = FinetuneResult.from_dict(data["result"])
        return data

    def job_action(self, job_id: str, action: str) -> dict:
        return self._json("POST", f"/v1/finetune/jobs/{job_id}/{action}")
