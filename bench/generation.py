"""Decode speed and exactness of the workbench's decode paths, against plain transformers and
llama.cpp, measured in one run on the embedded SmolLM2-135M (CPU, float32 weights holding the
shipped Q4_1 file's values; ``engine.generation.paths``).

Speed, in each phase (idle, then ``--load`` other processes each spinning on a core):

- decode tokens/s after the first token and time to first token (TTFT), greedy, for a 15-token
  prompt: plain ``model.generate`` (the baseline), the workbench's paths through
  ``Model.generate`` (queue, hooks and result included: what the API, CLI and pages get), and
  llama.cpp on the same weights as F32 and on the shipped Q4_1 file (``llama-cpp-python``,
  installed by ``make bench-deps``; without it those rows are skipped, saying so);
- the runs are interleaved and the best of ``--repeats`` is reported (median in brackets);
- the goals: the default path at least 1.0x plain transformers and 0.8x llama.cpp F32, the fast
  path (int8) at least 0.8x llama.cpp Q4_1, TTFT under 150 ms.

Exactness (idle), for each path that is not transformers itself, on the prompts in
``bench/data/prompts.txt``: the fraction of greedy continuations identical to the reference
path's, the first position where the others diverge, and the perplexity of
``engine/data/stories.txt`` (989 tokens) against the reference's (goal: within 1 %).

    .venv/bin/python bench/generation.py [--tokens 40] [--repeats 5] [--load 1] [--quick]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import replace

import _common  # noqa: F401  (offline environment, repo on sys.path)
import _llamacpp
import torch
from _common import HOME, REPO

from engine.api import Workbench
from engine.generation import GenerationSettings
from engine.generation.paths import DEFAULT, decoder_for

PROMPT = "Once upon a time, in a small village by the sea, there lived"  # 15 tokens
PATHS = ("reference", "lean", "int8")
FAST = "int8"


class TimingStreamer:
    """A ``generate`` streamer that records when each token arrives (first put = prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1:
            self.ids.extend(int(v) for v in value.reshape(-1))

    def end(self) -> None:
        pass


def plain_run(hf, tok, n: int) -> tuple[float, float, list[int]]:
    """(TTFT s, decode tok/s, new ids) of plain transformers ``generate``."""
    enc = tok(PROMPT, return_tensors="pt")
    streamer = TimingStreamer()
    with torch.inference_mode():
        start = time.perf_counter()
        hf.generate(
            **enc,
            max_new_tokens=n,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tok.pad_token_id,
        )
    t = streamer.times
    return t[1] - start, (len(t) - 2) / (t[-1] - t[1]), streamer.ids


def spin() -> None:  # a process that keeps one core busy
    while True:
        pass


def measure_speed(model, hf, tok, engines: dict, n: int, repeats: int) -> dict[str, list]:
    """{row name: [(ttft s, tok/s), ...]}; checks the exact paths' tokens against plain."""
    settings = GenerationSettings(max_new_tokens=n, greedy=True, top_alternatives=5)
    rows: dict[str, list] = {"plain transformers generate": []}
    rows.update({f"workbench {p}": [] for p in PATHS})
    rows.update({name: [] for name in engines})
    for _ in range(repeats):  # interleaved: load from elsewhere hits every row alike
        ttft, tps, reference = plain_run(hf, tok, n)
        rows["plain transformers generate"].append((ttft, tps))
        for path in PATHS:
            r = model.generate(PROMPT, replace(settings, decode_path=path))
            rows[f"workbench {path}"].append((r.first_token_seconds, r.tokens_per_second))
            if path == "reference":
                assert [t.id for t in r.tokens] == reference, "reference path differs from plain"
        for name, engine in engines.items():
            ttft, tps, _text = engine.run(PROMPT, n)
            rows[name].append((ttft, tps))
    return rows


def best_tps(runs) -> float:
    return max(r[1] for r in runs)


def print_speed(rows: dict[str, list], phase: str) -> dict[str, float]:
    plain = best_tps(rows["plain transformers generate"])
    print(f"\n{phase}")
    print(f"{'':<36}{'decode tok/s':>17}{'TTFT ms':>14}{'vs plain':>10}")
    for name, runs in rows.items():
        tps, ttft = best_tps(runs), min(r[0] for r in runs)
        med_tps, med_ttft = (
            statistics.median(r[1] for r in runs),
            statistics.median(r[0] for r in runs),
        )
        print(
            f"{name:<36}{tps:>8.1f} ({med_tps:5.1f}){ttft * 1e3:>7.0f} ({med_ttft * 1e3:4.0f})"
            f"{tps / plain:>10.2f}"
        )
    return {name: best_tps(runs) for name, runs in rows.items()} | {
        "ttft": min(r[0] for r in rows[f"workbench {DEFAULT}"])
    }


def goals(speed: dict[str, float], phase: str) -> list[tuple[str, float, float]]:
    """(goal, measured, threshold) rows; llama.cpp rows only when it ran."""
    plain = speed["plain transformers generate"]
    out = [
        (
            f"{phase}: default ({DEFAULT}) vs plain transformers",
            speed[f"workbench {DEFAULT}"] / plain,
            1.0,
        )
    ]
    if "llama.cpp F32" in speed:
        out.append(
            (
                f"{phase}: default vs llama.cpp F32",
                speed[f"workbench {DEFAULT}"] / speed["llama.cpp F32"],
                0.8,
            )
        )
        out.append(
            (
                f"{phase}: fast ({FAST}) vs llama.cpp Q4_1",
                speed[f"workbench {FAST}"] / speed["llama.cpp Q4_1"],
                0.8,
            )
        )
    out.append(
        (f"{phase}: default TTFT, 15-token prompt (ms, at most)", speed["ttft"] * 1e3, 150.0)
    )
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First position where two id lists differ (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def perplexity_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean NLL) of ids[1:] under logits[:-1]; logits (1, T, V), ids (1, T)."""
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(float(nll))


def stepwise_logits(lean, ids: torch.Tensor) -> torch.Tensor:
    """Logits (1, T, V) of ``ids`` (1, T) fed one token at a time, as decode steps compute
    them (the int8 path quantizes only single-row products)."""
    steps = [lean.prefill(ids[:, :1], None, ids.shape[1])]
    for i in range(1, ids.shape[1]):
        steps.append(lean.step(ids[0, i : i + 1]))
    lean.release()
    return torch.stack(steps, dim=1)


def exactness(model, tok, engines: dict, n: int, prompts: list[str]) -> None:
    settings = GenerationSettings(max_new_tokens=n, greedy=True, top_alternatives=0)
    outputs = {p: [] for p in PATHS}
    for prompt in prompts:
        for path in PATHS:
            r = model.generate(prompt, replace(settings, decode_path=path))
            outputs[path].append(([t.id for t in r.tokens], r.text))
    reference = outputs["reference"]
    text = (REPO / "engine" / "data" / "stories.txt").read_text()
    ids = tok(text, return_tensors="pt")["input_ids"]
    loaded = model.loaded
    with loaded.use(), torch.inference_mode():
        ppl = {"reference": perplexity_of(loaded.model(input_ids=ids).logits, ids)}
        for path in PATHS[1:]:
            ppl[path] = perplexity_of(stepwise_logits(decoder_for(loaded, path).lean, ids), ids)
    print(
        f"\nexactness against the reference path: {len(prompts)} prompts x {n} greedy tokens; "
        f"perplexity of engine/data/stories.txt ({ids.shape[1]} tokens, fed as decode steps)"
    )
    print(
        f"{'':<24}{'identical':>10}{'first divergence (median, min)':>33}{'perplexity':>12}{'vs ref':>9}"
    )
    for path in PATHS:
        pairs = [
            first_divergence(a[0], b[0]) for a, b in zip(reference, outputs[path], strict=True)
        ]
        diverged = [d for d in pairs if d is not None]
        where = f"{statistics.median(diverged):.0f}, {min(diverged)}" if diverged else "-"
        print(
            f"workbench {path:<14}{pairs.count(None)}/{len(pairs):<7}{where:>33}"
            f"{ppl[path]:>12.4f}{ppl[path] / ppl['reference'] - 1:>+9.3%}"
        )
    for name, engine in engines.items():  # llama.cpp gives text: compared as text
        same = sum(engine.run(p, n)[2] == ref[1] for p, ref in zip(prompts, reference, strict=True))
        print(f"{name:<24}{same}/{len(prompts):<7}{'(text compared)':>33}")
    print("goal: every path's perplexity within 1 % of the reference's")


def step_breakdown(loaded, tok, n: int) -> None:
    """Where a decode step goes on the lean paths: the products against everything else (the
    most a compiled step, which fuses the rest, could save)."""
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    print(f"\nwhere a decode step goes ({n} steps, batch 1)")
    spent = [0.0]

    def timed(product):
        def run(x):
            started = time.perf_counter()
            out = product(x)
            spent[0] += time.perf_counter() - started
            return out

        return run

    for path in PATHS[1:]:
        lean = decoder_for(loaded, path).lean

        saved = [
            (layer, name, getattr(layer, name))
            for layer in lean.layers
            for name in ("qkv", "o", "gate_up", "down")
        ]
        saved.append((lean, "head", lean.head))
        for owner, name, product in saved:
            setattr(owner, name, timed(product))
        try:
            with loaded.use(), torch.inference_mode():
                logits = lean.prefill(ids, None, n)
                spent[0], started = 0.0, time.perf_counter()
                for _ in range(n - 1):
                    logits = lean.step(logits.argmax(-1))
                step = (time.perf_counter() - started) / (n - 1)
                lean.release()
        finally:
            for owner, name, product in saved:
                setattr(owner, name, product)
        products = spent[0] / (n - 1)
        print(
            f"  {path:<6}{step * 1e3:6.1f} ms: products {products * 1e3:5.1f} ms ({products / step:4.0%}), "
            f"everything else {(step - products) * 1e3:4.1f} ms -> at most {step / products:.2f}x "
            "from fusing the rest (torch.compile)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row and phase")
    parser.add_argument(
        "--load",
        type=int,
        default=1,
        help="spinning processes in the loaded phase (0: no loaded phase)",
    )
    parser.add_argument("--prompts", type=int, default=20, help="prompts for exactness")
    parser.add_argument(
        "--quick", action="store_true", help="2 repeats, 5 prompts, no loaded phase"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.prompts, args.load = 2, 5, 0

    wb = Workbench(home=os.environ.get("WORKBENCH_HOME") or HOME, device="cpu")
    model = wb.load("smollm2-135m")
    hf, tok = model.loaded.model, model.loaded.tokenizer
    threads = torch.get_num_threads()
    engines = {}
    if _llamacpp.available():
        q4 = _llamacpp.shipped_gguf()
        f32 = _llamacpp.f32_copy(q4, REPO / ".cache" / "smollm2-135m-f32.gguf")
        engines = {
            "llama.cpp F32": _llamacpp.LlamaCpp(f32, threads),
            "llama.cpp Q4_1": _llamacpp.LlamaCpp(q4, threads),
        }
    else:
        print("llama.cpp rows skipped: llama-cpp-python is not installed (make bench-deps)")
    print(
        f"SmolLM2-135M float32 on CPU, {threads} torch threads, {os.cpu_count()} CPUs; "
        f"{args.tokens} new tokens, greedy, best of {args.repeats} interleaved runs (median)"
    )
    for path in PATHS:  # warm-up: build each path's decoder, first calls pick kernels
        model.generate(PROMPT, GenerationSettings(max_new_tokens=4, greedy=True, decode_path=path))
    plain_run(hf, tok, 4)
    for engine in engines.values():
        engine.run(PROMPT, 4)

    results = []
    phases = [("idle", 0)] + (
        [(f"under load ({args.load} spinning processes)", args.load)] if args.load else []
    )
    for phase, spinners in phases:
        procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(spinners)]
        for p in procs:
            p.start()
        try:
            time.sleep(0.5 if spinners else 0)
            rows = measure_speed(model, hf, tok, engines, args.tokens, args.repeats)
            load = os.getloadavg()[0]
        finally:
            for p in procs:
                p.kill()
        speed = print_speed(rows, f"{phase}; 1-min load average {load:.2f}")
        results += goals(speed, phase.split(" (")[0])
    print("\ngoals")
    for name, value, threshold in results:
        ok = value <= threshold if "at most" in name else value >= threshold
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:.2f} (goal {threshold:g})")

    step_breakdown(model.loaded, tok, args.tokens)
    prompts = (REPO / "bench" / "data" / "prompts.txt").read_text().splitlines()[: args.prompts]
    exactness(model, tok, engines, 32, prompts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
