"""The API served by `workbench serve` (one process with the pages) on the embedded models:
the official openai package, the CLI's greedy output, llmos remote == llmos local, a client
that leaves its stream."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest

from tests.conftest import run_cli, served_workbench

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(shared_home):
    """`workbench serve` on a free local port over the shared test store; its base URL."""
    with served_workbench(shared_home, ready="/v1/openapi.json", name="api-server") as url:
        yield url


def test_openai_package_streams_a_chat_and_greedy_equals_the_cli(served, shared_home):
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key="unused-on-localhost", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    whole = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=12, temperature=0
    )
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].message.content

    completion = client.completions.create(
        model="smollm2-135m", prompt=PROMPT, max_tokens=16, temperature=0
    )
    cli = run_cli("generate", "smollm2-135m", PROMPT, "--greedy", "--max-new-tokens", "16",
                  "--json", home=shared_home)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert completion.choices[0].text == json.loads(cli.stdout)["text"]

    vectors = client.embeddings.create(model="minilm-l6", input=["a cat", "a kitten", "tax law"])
    a, b, c = (np.array(d.embedding) for d in vectors.data)
    assert np.isclose(np.linalg.norm(a), 1.0) and a @ b > a @ c  # related sentences are closer

    # the pages are served by the same process
    with urllib.request.urlopen(served + "/_stcore/health", timeout=5) as r:
        assert r.status == 200


def test_llmos_remote_equals_local(served, real_workbench):
    import llmos

    remote = llmos.Client(served).load_model("smollm2-135m")
    local = llmos.Client(workbench=real_workbench).load_model("smollm2-135m")

    r, lo = (m.generate_text(PROMPT, max_new_tokens=10, greedy=True) for m in (remote, local))
    assert r.text == lo.text and [t.id for t in r.tokens] == [t.id for t in lo.tokens]
    assert [t.logprob for t in r.tokens] == pytest.approx([t.logprob for t in lo.tokens], abs=1e-5)
    assert r.run_id and r.run_id != lo.run_id
    assert "".join(remote.stream_text(PROMPT, max_new_tokens=10, greedy=True)) == lo.text

    ra, la = (m.attention("The cat sat on the mat.") for m in (remote, local))
    assert ra.tokens == la.tokens and np.allclose(ra.attentions, la.attentions, atol=1e-6)

    options = {"steps": 16}
    re_, le = (m.explain(PROMPT, " Paris", options=options) for m in (remote, local))
    assert re_.tokens == le.tokens
    assert np.allclose(re_.scores, le.scores, atol=1e-5)
    assert re_.convergence_delta == pytest.approx(le.convergence_delta, abs=1e-5)

    client = llmos.Client(served)
    assert any(run["id"] == r.run_id for run in client.runs(limit=20))
    assert client.reproduce(r.run_id).verdict == "exact"


def test_leaving_a_stream_cancels_the_generation(served):
    body = json.dumps(
        {"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 400,
         "temperature": 0, "stream": True}
    ).encode()  # fmt: skip
    request = urllib.request.Request(
        served + "/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        for raw in response:
            if raw.startswith(b"data: "):
                run_id = json.loads(raw[6:])["run_id"]
                break
    deadline = time.monotonic() + 60
    record = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{served}/v1/runs/{run_id}", timeout=5) as r:
                record = json.loads(r.read())
                break
        except urllib.error.HTTPError:
            time.sleep(0.2)
    assert record is not None, "the run never ended"
    result = record["result"]
    assert result["finish_reason"] == "cancelled" and len(result["tokens"]) < 400


def test_stopping_serve_stops_the_server_it_started(tmp_path):
    """`workbench serve` becomes the Streamlit process: stopping it leaves nothing listening
    (it used to run Streamlit as a child that outlived it)."""
    import socket

    with served_workbench(tmp_path / "home", name="stop-server") as url:
        port = int(url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return  # nothing listens any more
        time.sleep(0.2)
    pytest.fail(f"a server still listens on port {port} after `workbench serve` was stopped")
