"""Decode speed of the embedded SmolLM2: the workbench path vs plain ``model.generate``.

Measures in one run, on one loaded model (float32, CPU unless WORKBENCH_DEVICE says otherwise):

- decode tokens/s (after the first token) and time to first token, greedy, same prompt and
  ``max_new_tokens``, through plain ``model.generate`` (stock layers, and with the linear
  layers on oneDNN as the workbench runs them: ``engine.generation.cpu_speed``), ``Model.generate`` (the
  Python API, which the CLI uses) and ``Model.stream`` (the worker thread the page uses);
- the memory-bandwidth ceiling: bytes of weights read per token (every parameter once; the tied
  embedding/lm_head matrix is read once, by the lm_head) over the read bandwidth measured here
  (``sum`` of a 256 MiB tensor, which streams it from DRAM);
- where a decode step goes: the model's own linear layers run alone at batch 1 (the matrix-vector
  products; stock MKL and oneDNN), the lm_head alone, the workbench's own per-token hooks, and the rest (attention,
  norms, Python/transformers overhead).

    .venv/bin/python bench/generation.py [--tokens 40] [--repeats 5] [--profile]

The paths run interleaved and the best run of each is reported (median in brackets): on a shared
machine the least disturbed run is the closest to the true speed. Greedy token ids of the workbench paths are checked against plain ``generate`` (must be equal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.api import Workbench  # noqa: E402
from engine.generation import GenerationSettings  # noqa: E402
from engine.generation.cpu_speed import onednn_linears  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"


class TimingStreamer:
    """A ``generate`` streamer that only records when each token arrives (first put = prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1:
            self.ids.extend(int(v) for v in value.reshape(-1))

    def end(self) -> None:
        pass


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(threads: int) -> float:
    """Bytes/s of reading a 256 MiB float32 tensor (``sum``) with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    data = torch.ones(64 * 2**20)  # 256 MiB, far above any cache
    try:
        return data.nbytes / best_seconds(data.sum, 10)
    finally:
        torch.set_num_threads(before)


def copy_bandwidth() -> float:
    """Bytes/s moved (read + write) copying a 256 MiB tensor."""
    a, b = torch.ones(64 * 2**20), torch.empty(64 * 2**20)
    return 2 * a.nbytes / best_seconds(lambda: b.copy_(a), 10)


def plain_run(model, enc, n: int, pad_id, onednn: bool = False) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tokens/s, new ids) of plain ``model.generate``."""
    streamer = TimingStreamer()
    swap = onednn_linears(model) if onednn else contextlib.nullcontext()
    with torch.inference_mode(), swap:
        start = time.perf_counter()
        model.generate(
            **enc, max_new_tokens=n, do_sample=False, streamer=streamer, pad_token_id=pad_id
        )
    t = streamer.times
    decode = (len(t) - 2) / (t[-1] - t[1]) if len(t) > 2 else float("nan")
    return t[1] - start, decode, streamer.ids


def linear_floor(model, repeats: int) -> tuple[float, float, float, float, float, float]:
    """Seconds per token of every linear layer alone at batch 1 (matrix-vector products).

    Returns (all linears s, lm_head s, their weight bytes, CPU-time/wall-time of the lm_head
    product: 1.0 means one thread did the work), then all linears s and lm_head CPU/wall on
    oneDNN (``engine.generation.cpu_speed``).
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]

    def all_linears() -> None:
        for m, x in zip(linears, inputs, strict=True):
            torch.nn.functional.linear(x, m.weight, m.bias)

    x_head = torch.randn(1, 1, head.in_features)
    with torch.inference_mode():
        all_s = best_seconds(all_linears, repeats)
        head_s = best_seconds(lambda: torch.nn.functional.linear(x_head, head.weight), repeats * 3)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(20):
            torch.nn.functional.linear(x_head, head.weight)
        usage = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        # the op ``engine.generation.cpu_speed`` swaps in, called directly like F.linear above
        dnn = torch.ops.mkldnn._linear_pointwise
        flat = [x.view(1, -1) for x in inputs]

        def all_onednn() -> None:
            for m, x in zip(linears, flat, strict=True):
                dnn(x, m.weight, m.bias, "none", [], "")

        dnn_s = best_seconds(all_onednn, repeats)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(20):
            dnn(x_head.view(1, -1), head.weight, None, "none", [], "")
        dnn_usage = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    return all_s, head_s, nbytes, usage, dnn_s, dnn_usage


def hook_seconds(loaded, ids: list[int]) -> float:
    """Seconds per token of the workbench's own per-step work (``Recorder`` + ``Observer``)."""
    import threading

    from engine.generation.decoding import Observer, Recorder

    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    scores = torch.randn(1, vocab)
    seq = torch.tensor([ids])
    recorder = Recorder(5)
    observer = Observer(loaded.tokenizer, recorder, (), threading.Event())
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(1, len(ids) + 1):
            recorder(seq[:, :i], scores)
            observer(seq[:, :i], scores)
        return (time.perf_counter() - start) / len(ids)


def profile_decode(loaded, enc, n: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        loaded.model.generate(**enc, max_new_tokens=n, do_sample=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of a run")
    args = parser.parse_args(argv)

    home = os.environ.get("WORKBENCH_HOME") or str(REPO / ".cache" / "test-home")
    wb = Workbench(home=home, device=os.environ.get("WORKBENCH_DEVICE", "cpu"))
    started = time.perf_counter()
    model = wb.load("smollm2-135m")
    loaded = model.loaded
    hf, tok = loaded.model, loaded.tokenizer
    print(f"loaded {model.name} in {time.perf_counter() - started:.1f} s from {home}")
    enc = tok(PROMPT, return_tensors="pt").to(loaded.device)
    n = args.tokens
    settings = GenerationSettings(max_new_tokens=n, greedy=True, top_alternatives=5)

    # warm-up (first calls allocate and pick kernels)
    plain_run(hf, enc, 4, tok.pad_token_id)
    model.generate(PROMPT, settings, max_new_tokens=4)

    plain, dnn, api, stream = [], [], [], []
    reference = None
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all paths
        ttft, tps, ids = plain_run(hf, enc, n, tok.pad_token_id)
        plain.append((ttft, tps))
        reference = ids
        ttft, tps, ids = plain_run(hf, enc, n, tok.pad_token_id, onednn=True)
        dnn.append((ttft, tps))
        assert ids == reference, "oneDNN greedy output differs from plain generate"
        r = model.generate(PROMPT, settings)
        api.append((r.first_token_seconds, r.tokens_per_second))
        assert [t.id for t in r.tokens] == ids, "API greedy output differs from plain generate"
        run = model.stream(PROMPT, settings)
        r = run.wait()
        stream.append((r.first_token_seconds, r.tokens_per_second))
        assert [t.id for t in r.tokens] == ids, "streamed greedy output differs from plain"

    threads = torch.get_num_threads()
    bw_all, bw_one, bw_copy = read_bandwidth(threads), read_bandwidth(1), copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # tied: once
    lin_s, head_s, lin_bytes, head_usage, dnn_s, dnn_usage = linear_floor(hf, args.repeats)

    def best(rows, i):  # the least disturbed run: tok/s is the max, TTFT the min
        return max(r[i] for r in rows) if i else min(r[i] for r in rows)

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    hook_s = hook_seconds(loaded, reference)
    p_tps, p_ttft = best(plain, 1), best(plain, 0)
    bw = max(bw_all, bw_one)  # the most the memory system delivered in this run
    ceiling = bw / weight_bytes
    step = 1 / p_tps
    print(
        f"\n{hf.__class__.__name__}, {weight_bytes / 1e6:.0f} MB of weights "
        f"({next(hf.parameters()).dtype}), {threads} torch threads, device {loaded.device}; "
        f"{len(reference)} new tokens, greedy, best of {args.repeats} interleaved runs "
        "(median in brackets)"
    )
    print(f"\n{'path':<35}{'decode tok/s':>20}{'TTFT ms':>14}{'vs plain':>10}{'vs ceiling':>12}")
    for name, rows in (
        ("plain model.generate", plain),
        ("plain generate, oneDNN linears", dnn),
        ("workbench Model.generate (API/CLI)", api),
        ("workbench Model.stream (page)", stream),
    ):
        tps = best(rows, 1)
        print(
            f"{name:<35}{tps:>11.2f} ({med(rows, 1):5.2f}){best(rows, 0) * 1e3:>7.0f} "
            f"({med(rows, 0) * 1e3:4.0f}){tps / p_tps:>10.3f}{tps / ceiling:>12.1%}"
        )
    print(
        f"\nmemory read bandwidth: {bw_all / 1e9:.1f} GB/s ({threads} threads), "
        f"{bw_one / 1e9:.1f} GB/s (1 thread); copy {bw_copy / 1e9:.1f} GB/s (read+write)"
    )
    print(
        f"bandwidth ceiling: {weight_bytes / 1e6:.0f} MB/token / {bw / 1e9:.1f} GB/s = "
        f"{ceiling:.1f} tok/s ({1e3 / ceiling:.1f} ms/token)"
    )
    print(f"\nwhere a plain decode step goes ({step * 1e3:.1f} ms/token):")
    print(
        f"  all linear layers alone, batch 1 : {lin_s * 1e3:6.1f} ms  "
        f"({lin_s / step:5.1%} of the step; {lin_bytes / lin_s / 1e9:.1f} GB/s effective)"
    )
    print(
        f"    of which lm_head (tied 49152x576): {head_s * 1e3:6.1f} ms  "
        f"({head_s / step:5.1%}; CPU/wall {head_usage:.2f} = threads actually used)"
    )
    print(
        f"  everything else (attention, norms, RoPE, sampling, Python): "
        f"{(step - lin_s) * 1e3:6.1f} ms ({(step - lin_s) / step:5.1%})"
    )
    print(
        f"  all linear layers on oneDNN (the workbench path): {dnn_s * 1e3:6.1f} ms  "
        f"({lin_bytes / dnn_s / 1e9:.1f} GB/s effective; lm_head CPU/wall {dnn_usage:.2f}); "
        f"speed-up of the linears {lin_s / dnn_s:.2f}x"
    )
    print(
        f"  workbench hooks per token (log-softmax, top-5, token record, stop check): "
        f"{hook_s * 1e3:.3f} ms ({hook_s / step:.2%} of the step)"
    )
    print(f"\nTTFT plain {p_ttft * 1e3:.0f} ms for a {enc['input_ids'].shape[1]}-token prompt")
    if hasattr(os, "getloadavg"):  # other processes on the cores slow the 2-thread oneDNN path
        print(f"load average at the end (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if args.profile:
        profile_decode(loaded, enc, n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
