"""The /v1 HTTP API in process (Starlette's TestClient) on tiny random models.

Every answer is checked against the engine called directly (or plain transformers), every
error for its status and its JSON body.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from engine import access
from workbench.http import api_app
from workbench.http.errors import error_response


@pytest.fixture
def client(workbench):
    return TestClient(api_app(lambda: workbench))


def _events(text: str) -> list:
    """The data of each server-sent event ("[DONE]" kept as a string)."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    return error


def test_completion_greedy_equals_the_engine(client, workbench, tiny_models):
    llama = str(tiny_models["llama"])
    body = {"model": llama, "prompt": "the cat", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    direct = workbench.load(llama).generate("the cat", max_new_tokens=6, greedy=True)
    choice = data["choices"][0]
    assert choice["text"] == direct.text
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([t.logprob for t in direct.tokens])
    assert all(len(top) == 3 for top in choice["logprobs"]["top_logprobs"])
    assert choice["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 6
    record = workbench.ledger.get(data["run_id"])
    assert record.operation == "generate" and record.status == "done"


def test_chat_stream_matches_the_whole_answer_and_ends_with_done(client, tiny_models):
    llama = str(tiny_models["llama"])
    body = {
        "model": llama,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.post("/v1/chat/completions", json=body).json()
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    streamed = [
        t for c in chunks for t in (c["choices"][0].get("logprobs") or {}).get("content", [])
    ]
    assert [t["logprob"] for t in streamed] == pytest.approx(
        [t["logprob"] for t in whole["choices"][0]["logprobs"]["content"]]
    )
    assert all(len(t["top_logprobs"]) == 2 for t in streamed)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["run_id"] for c in chunks}) == 1


def test_seeded_sampling_repeats_and_stop_cuts(client, workbench, tiny_models):
    llama = str(tiny_models["llama"])
    body = {"model": llama, "prompt": "a", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b
    greedy = workbench.load(llama).generate("a", max_new_tokens=10, greedy=True).text
    stop = greedy.split()[2]  # a word the greedy continuation reaches
    body = {"model": llama, "prompt": "a", "max_tokens": 10, "temperature": 0, "stop": [stop]}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["finish_reason"] == "stop" and stop not in whole["text"]
    streamed = _events(client.post("/v1/completions", json={**body, "stream": True}).text)
    text = "".join(c["choices"][0]["text"] for c in streamed[:-1] if c["choices"])
    assert text == whole["text"]


def test_native_generate_returns_the_typed_result(client, workbench, tiny_models):
    from engine.generation import GenerationResult

    llama = str(tiny_models["llama"])
    body = {"model": llama, "prompt": "the dog", "settings": {"max_new_tokens": 5, "greedy": True}}
    data = client.post("/v1/generate", json=body).json()
    result = GenerationResult.from_dict(data["result"])
    direct = workbench.load(llama).generate("the dog", max_new_tokens=5, greedy=True)
    assert result.text == direct.text and [t.id for t in result.tokens] == [
        t.id for t in direct.tokens
    ]
    bad = client.post("/v1/generate", json={**body, "settings": {"max_new_tokens": 5, "warp": 1}})
    assert "warp" in _assert_error(bad, 400)["message"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "LLAMA", "prompt": "x", "max_tokens": -1}).encode(), 400, None),
        (json.dumps({"model": "LLAMA", "prompt": "x", "max_tokens": "many"}).encode(), 400, None),
        (json.dumps({"model": "LLAMA", "prompt": "x", "temperature": 99}).encode(), 400, None),
        (json.dumps({"model": "LLAMA", "prompt": 5}).encode(), 400, None),
        (json.dumps({"model": "LLAMA", "prompt": "x", "n": 3}).encode(), 400, None),
        (
            json.dumps({"model": "LLAMA", "prompt": "x" * 10_000_000}).encode(),
            413,
            "request_too_large",
        ),
    ],
)
def test_bad_requests_get_a_status_and_a_json_error(client, tiny_models, body, status, code):
    body = body.replace(b"LLAMA", str(tiny_models["llama"]).encode())
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    _assert_error(r, status, code)


def test_unknown_routes_and_embedding_input_errors(client):
    _assert_error(client.get("/v1/nothing-here"), 404)
    _assert_error(client.post("/v1/embeddings", json={"input": []}), 400)
    _assert_error(client.post("/v1/chat/completions", json={"model": "x", "messages": "hi"}), 400)
    _assert_error(client.get("/v1/runs/doesnotexist"), 404, "run_not_found")
    _assert_error(client.get("/v1/notebooks/0123456789ab"), 404)
    _assert_error(client.get("/v1/finetune/jobs/nope"), 404)


def test_limit_errors_become_429_with_retry_after():
    r = error_response(access.LimitError("Too many requests: wait.", retry_after_s=2.2))
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert json.loads(r.body)["error"]["type"] == "rate_limit_error"
    r = error_response(RuntimeError("boom\n  File x"))
    assert r.status_code == 500 and "\n" not in json.loads(r.body)["error"]["message"]


def test_attention_aggregated_and_full_tensor(client, workbench, tiny_models):
    from engine.attention import AttentionResult

    llama = str(tiny_models["llama"])
    r = client.post("/v1/attention", json={"model": llama, "text": "the cat sat"})
    assert r.status_code == 200, r.text
    data = r.json()
    matrix = np.array(data["view"]["matrix"])
    assert np.allclose(matrix.sum(1), 1.0, atol=1e-5)
    direct = workbench.load(llama).attention("the cat sat")
    assert np.allclose(matrix, direct.attentions.mean((0, 1)), atol=1e-5)
    full = client.post(
        "/v1/attention", json={"model": llama, "text": "the cat sat", "format": "npz"}
    )
    import io

    result = AttentionResult.load_npz(io.BytesIO(full.content))
    assert np.array_equal(result.attentions, direct.attentions)
    assert workbench.ledger.get(full.headers["x-run-id"]).operation == "attention"


def test_explain_perplexity_and_reproduce(client, workbench, tiny_models):
    llama = str(tiny_models["llama"])
    body = {"model": llama, "text": "the cat sat", "target": " on", "options": {"steps": 16}}
    r = client.post("/v1/explain", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    direct = workbench.load(llama).explain("the cat sat", " on", options={"steps": 16})
    (got,) = data["explanations"]
    assert got["scores"] == pytest.approx(direct.scores.tolist(), abs=1e-6)
    assert got["completeness"]["convergence_delta"] == pytest.approx(
        direct.convergence_delta, abs=1e-6
    )
    assert got["faithfulness"]["comprehensiveness"] == pytest.approx(
        direct.faithfulness.comprehensiveness, abs=1e-6
    )

    ppl = client.post(
        "/v1/perplexity", json={"model": llama, "text": "the cat sat on the mat"}
    ).json()
    assert ppl["perplexity"] == pytest.approx(
        workbench.load(llama).perplexity("the cat sat on the mat").perplexity
    )

    verdict = client.post(f"/v1/runs/{data['run_id']}/reproduce").json()
    assert (
        verdict["verdict"] in ("exact", "within tolerance")
        and verdict["reproduced_run_id"] == data["run_id"]
    )
    assert workbench.ledger.get(verdict["run_id"]).operation == "explain"
    runs = client.get("/v1/runs", params={"kind": "explain"}).json()["data"]
    assert {r["id"] for r in runs} >= {data["run_id"], verdict["run_id"]}
    record = client.get(f"/v1/runs/{data['run_id']}").json()
    assert record["result"]["type"] == "ExplanationSet" and record["operation"] == "explain"


def test_embeddings_are_mean_pooled_hidden_states(client, tiny_models):
    import torch
    from transformers import AutoModel, AutoTokenizer

    bert = str(tiny_models["bert"])
    texts = ["the cat sat", "a much longer sentence about a dog"]
    data = client.post("/v1/embeddings", json={"model": bert, "input": texts}).json()
    got = np.array([d["embedding"] for d in data["data"]])
    tok = AutoTokenizer.from_pretrained(bert)
    ref_model = AutoModel.from_pretrained(bert).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.allclose(got, ref, atol=1e-5)
    assert data["usage"]["prompt_tokens"] == int(batch["attention_mask"].sum())


def test_openapi_lists_every_route(client):
    from workbench.http.table import TABLE

    spec = client.get("/v1/openapi.json").json()
    for method, path, _handler, _body in TABLE:
        assert method.lower() in spec["paths"][path]
    assert spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]


def test_notebooks_list_get_export(client, workbench):
    book = workbench.notebooks.create("API book")
    listed = client.get("/v1/notebooks").json()["data"]
    assert book.id in {b["id"] for b in listed}
    assert client.get(f"/v1/notebooks/{book.id}").json()["name"] == "API book"
    ipynb = client.get(f"/v1/notebooks/{book.id}/export", params={"format": "ipynb"})
    assert ipynb.status_code == 200 and json.loads(ipynb.text)["nbformat"] == 4
    _assert_error(client.get(f"/v1/notebooks/{book.id}/export", params={"format": "pdf"}), 400)


def test_finetune_job_requests_are_checked(client):
    r = client.post(
        "/v1/finetune/jobs",
        json={
            "base": "minilm-l6",
            "task": "classification",
            "out": "x",
            "data": {"name": "a.exe", "content": "x"},
        },
    )
    _assert_error(r, 400)
    assert client.get("/v1/finetune/jobs").json()["object"] == "list"


# --- keys ---------------------------------------------------------------------------------


@pytest.fixture
def keyed(workbench, monkeypatch):
    """A student's key on a workbench that requires one."""
    auth = pytest.importorskip("engine.auth")
    auth.UserStore(workbench.home).add("ana", "student", "a long password")
    _key_id, secret = auth.ApiKeys(workbench.home).create("ana")
    monkeypatch.setenv("WORKBENCH_AUTH", "required")
    return secret


def test_keys_required_wrong_and_right(client, workbench, keyed, tiny_models):
    body = {"model": "no-such-model", "prompt": "x"}
    _assert_error(client.post("/v1/completions", json=body), 401, "missing_api_key")
    _assert_error(client.get("/v1/models"), 401)
    wrong = {"Authorization": "Bearer wb-not-a-key"}
    _assert_error(client.post("/v1/completions", json=body, headers=wrong), 401, "invalid_api_key")
    _assert_error(client.get("/v1/runs", headers={"Authorization": "Basic abc"}), 401)
    right = {"Authorization": f"Bearer {keyed}"}
    assert client.get("/v1/models", headers=right).status_code == 200
    # a student may not load a folder: only catalog models exist for them
    folder = {"model": str(tiny_models["llama"]), "prompt": "x"}
    _assert_error(
        client.post("/v1/completions", json=folder, headers=right), 404, "model_not_found"
    )
    assert client.get("/v1/runs", headers=right).json()["data"] == []


@pytest.mark.slow
def test_finetune_job_over_http_with_progress_events(shared_home, tmp_path, clf_data):
    """A job created from data in the request trains, streams its progress and ends with
    metrics and a result (MiniLM, 4 steps, in the job's own process)."""
    import shutil

    from engine import Workbench

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(shared_home / "models" / "minilm-l6", home / "models" / "minilm-l6")
    wb = Workbench(home=home, device="cpu")
    client = TestClient(api_app(lambda: wb))
    body = {
        "base": "minilm-l6",
        "task": "classification",
        "out": "api-sentiment",
        "data": {"name": "sentiment.csv", "content": clf_data.read_text()},
        "train": {"max_steps": 4, "batch_size": 8},
    }
    created = client.post("/v1/finetune/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert "folder" not in created.json()  # no server paths
    with client.stream("GET", f"/v1/finetune/jobs/{job_id}/events") as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert events and events[-1]["status"] == "completed", events[-1]
    job = client.get(f"/v1/finetune/jobs/{job_id}").json()
    assert any(m.get("type") == "train" for m in job["metrics"])
    assert job["result"]["type"] == "FinetuneResult"
    assert "api-sentiment" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    again = client.post("/v1/finetune/jobs", json=body)  # the name is taken now
    _assert_error(again, 400)


@pytest.mark.slow
def test_a_user_over_the_request_rate_gets_429_with_retry_after(shared_home, tmp_path, monkeypatch):
    import shutil
    from dataclasses import replace

    from engine import Workbench

    auth = pytest.importorskip("engine.auth")
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(shared_home / "models" / "minilm-l6", home / "models" / "minilm-l6")
    wb = Workbench(home=home, device="cpu")
    auth.UserStore(home).add("ben", "student", "a long password")
    _key_id, secret = auth.ApiKeys(home).create("ben")
    limits = dict(access.DEFAULT_LIMITS)
    limits["student"] = replace(limits["student"], requests_per_minute=1)
    access.set_limits(limits)
    monkeypatch.setenv("WORKBENCH_AUTH", "required")
    try:
        client = TestClient(api_app(lambda: wb))
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"model": "minilm-l6", "input": "a cat"}
        first = client.post("/v1/embeddings", json=body, headers=headers)
        assert first.status_code == 200, first.text
        with access.acting_as(access.LOCAL):
            assert wb.ledger.get(first.json()["run_id"]).user == "ben"
        second = client.post("/v1/embeddings", json=body, headers=headers)
        _assert_error(second, 429, "rate_limited")
        assert 1 <= int(second.headers["retry-after"]) <= 60
    finally:
        access.set_limits(None)
