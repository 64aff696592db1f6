"""What the HTTP API costs over the in-process call, on the embedded SmolLM2 (CPU, float32).

Starts ``workbench serve`` (the pages and the API in one process) on a free port over the test
store, loads the same model in this process, and measures, interleaved:

- a 32-token greedy generation: wall time in process (``Model.generate``) and through
  ``POST /v1/completions`` (keep-alive connection); and the API's own overhead: wall time of the
  request minus the server's decode time for that run (``POST /v1/generate`` reports it), next
  to the same difference in process;
- time to the first streamed token: in process (a run's snapshot polled every 1 ms, as fast as
  any page could see it) and through ``/v1/completions`` with ``stream: true`` (first SSE chunk
  with text);
- requests/s with 8 concurrent API clients: 16-token greedy completions, and ``GET /v1/models``
  (no model work: the HTTP stack alone).

    .venv/bin/python bench/api.py [--repeats 7] [--seconds 20]

Best and median of the repeats are reported (the machine is shared; the best run is the least
disturbed one). Greedy texts through the API and in process are checked equal.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from _common import HOME, REPO

PROMPT = "The history of the bridge over the river began"
MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh(conn: http.client.HTTPConnection) -> http.client.HTTPConnection:
    """``conn`` connected anew (outside any timing: the server closes idle keep-alives)."""
    conn.close()
    conn.connect()
    return conn


def post(conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {data}")
    return data


def first_streamed_token(port: int, tokens: int) -> float:
    """Seconds from sending a streamed completion to its first chunk with text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = None
    for raw in response:
        if raw.startswith(b"data: {") and first is None:
            chunk = json.loads(raw[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    conn.close()
    return first


def local_first_token(model, tokens: int) -> float:
    from engine.generation import GenerationSettings

    t0 = time.perf_counter()
    run = model.start_generation(PROMPT, GenerationSettings(max_new_tokens=tokens, greedy=True))
    while True:
        partial = run.snapshot().partial
        if partial is not None and partial.text:
            first = time.perf_counter() - t0
            break
        time.sleep(0.001)
    run.wait()
    return first


def concurrent(port: int, clients: int, seconds: float, request) -> tuple[int, float]:
    """``request(conn)`` in a loop on ``clients`` threads for ``seconds``: (done, elapsed)."""
    done = [0] * clients
    stop = time.monotonic() + seconds
    errors: list[str] = []

    def loop(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while time.monotonic() < stop:
            try:
                request(conn)
                done[i] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return sum(done), time.perf_counter() - t0


def fmt(values: list[float], unit: str = "ms", scale: float = 1000) -> str:
    return f"best {min(values) * scale:.1f} {unit} (median {statistics.median(values) * scale:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    port = free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(HOME), "WORKBENCH_DEVICE": "cpu"}
    env.pop("WORKBENCH_AUTH", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "serve", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        from engine.api import Workbench

        model = Workbench(home=HOME, device="cpu").load(MODEL)
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                conn.request("GET", "/v1/models")
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        completion = {"model": MODEL, "prompt": PROMPT, "max_tokens": 32, "temperature": 0}
        native = {
            "model": MODEL,
            "prompt": PROMPT,
            "settings": {"max_new_tokens": 32, "greedy": True},
        }
        # warm up both sides (model load, first-call costs)
        api_text = post(fresh(conn), "/v1/completions", completion)["choices"][0]["text"]
        local_text = model.generate(PROMPT, max_new_tokens=32, greedy=True).text
        assert api_text == local_text, (api_text, local_text)
        post(fresh(conn), "/v1/generate", native)

        local_wall, api_wall, local_extra, api_extra = [], [], [], []
        local_ttft, api_ttft = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = model.generate(PROMPT, max_new_tokens=32, greedy=True)
            wall = time.perf_counter() - t0
            local_wall.append(wall)
            local_extra.append(wall - result.seconds)

            fresh(conn)
            t0 = time.perf_counter()
            post(conn, "/v1/completions", completion)
            api_wall.append(time.perf_counter() - t0)

            fresh(conn)
            t0 = time.perf_counter()
            data = post(conn, "/v1/generate", native)
            api_extra.append(time.perf_counter() - t0 - data["result"]["seconds"])

            local_ttft.append(local_first_token(model, 32))
            api_ttft.append(first_streamed_token(port, 32))

        best_local, best_api = min(local_wall), min(api_wall)
        print(f"32-token greedy generation, {MODEL}, CPU float32, {args.repeats} repeats")
        print(f"  in process (Model.generate):   {fmt(local_wall)}")
        print(f"  API (POST /v1/completions):    {fmt(api_wall)}")
        print(f"  wall-time ratio (best):        {100 * (best_api / best_local - 1):+.1f} %")
        print(f"  outside the decode, in process: {fmt(local_extra)}")
        print(f"  outside the decode, API:        {fmt(api_extra)}")
        extra = min(api_extra) - min(local_extra)
        print(
            f"  API overhead (best):           {extra * 1000:.1f} ms = {100 * extra / best_local:.1f} % of the call"
        )
        print("time to first streamed token")
        print(f"  in process (run snapshot):     {fmt(local_ttft)}")
        print(f"  API (SSE /v1/completions):     {fmt(api_ttft)}")
        print(
            f"  difference (best):             {(min(api_ttft) - min(local_ttft)) * 1000:+.1f} ms"
        )

        gen16 = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        n, secs = concurrent(
            port, args.clients, args.seconds, lambda c: post(c, "/v1/completions", gen16)
        )
        print(f"{args.clients} concurrent clients, 16-token greedy completions: "
              f"{n / secs:.2f} requests/s ({n} in {secs:.1f} s, {16 * n / secs:.0f} tokens/s)")  # fmt: skip

        def models(c: http.client.HTTPConnection) -> None:
            c.request("GET", "/v1/models")
            c.getresponse().read()

        n, secs = concurrent(port, args.clients, min(args.seconds, 10), models)
        print(f"{args.clients} concurrent clients, GET /v1/models: {n / secs:.0f} requests/s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
