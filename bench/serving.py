"""Serving a class: many users generating at once on one model, against one-by-one.

Simulated users are threads through the Python API (``engine.api.Workbench``), each acting as
its own student (``engine.access.User``; the rate limit is raised so nobody is refused, one
running request per student as in class). For ``--seconds`` each user sends short greedy
requests (``--tokens`` new tokens, varied prompts) one after another. The baseline runs the
prompts one by one in the same process (``--passes`` times; each prompt's fastest time
counts, which favours the baseline). Reported for each: requests/s, generated tokens/s,
p50/p95 latency (submit to result); for the concurrent runs also the ratio to the baseline,
fairness (most-served / least-served user), how many requests were batched or shared an
identical computation, and wrong answers (each answer's token ids must equal that prompt's
single-user answer: 0).

    .venv/bin/python bench/serving.py [--users 8,30] [--seconds 60] [--tokens 16]

Runs are recorded into a temporary ledger (the real serving path writes one record a run).
Heavy: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HOME, SENTENCES  # noqa: E402

from engine import access  # noqa: E402
from engine.api import Workbench  # noqa: E402
from engine.generation import GenerationSettings  # noqa: E402

TOPICS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "Photosynthesis is the process by which plants",
    "A good way to learn a new language is",
    "def add(a, b):",
    "Water boils at",
    "The first computers were",
    "My favourite season is autumn because",
    "To make a cup of tea, first",
)


def prompts() -> list[str]:
    """About 55 different prompts, 4 to about 40 tokens."""
    out = list(TOPICS)
    for sentence in SENTENCES:
        words = sentence.split()
        out += [sentence, " ".join(words[: len(words) // 2])]
    for topic in TOPICS:
        out += [f"{topic} In short,", f"Question: {topic}? Answer:"]
    for i, sentence in enumerate(SENTENCES):
        out += [f"{sentence} {TOPICS[i]}", f"{TOPICS[-1 - i]} {sentence}"]
    return list(dict.fromkeys(out))[:60]


@dataclass(frozen=True)
class Done:
    user: str
    prompt: str
    ids: tuple[int, ...]
    latency: float
    batch_size: int
    shared_by: int


def summarise(name: str, done: list[Done], wall: float) -> dict:
    latencies = sorted(d.latency for d in done)
    tokens = sum(len(d.ids) for d in done)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    row = {
        "name": name,
        "requests": len(done),
        "req_s": len(done) / wall,
        "tok_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p95": p95,
    }
    print(
        f"{name:>10}: {len(done):4d} requests in {wall:5.1f} s  {row['req_s']:5.2f} req/s  "
        f"{row['tok_s']:6.1f} tok/s  latency p50 {row['p50']:5.2f} s  p95 {row['p95']:5.2f} s",
        flush=True,
    )
    return row


def serial(model, texts: list[str], settings: GenerationSettings, passes: int) -> tuple[dict, dict]:
    """Each prompt ``passes`` times, one by one: the baseline (each prompt's fastest time, so
    a burst of load from other processes does not flatter the ratio) and the single-user
    answers (every pass must give the same)."""
    reference: dict[str, tuple[int, ...]] = {}
    best: dict[str, float] = {}
    for _ in range(passes):
        for prompt in texts:
            t0 = time.perf_counter()
            result = model.generate(prompt, settings)
            took = time.perf_counter() - t0
            ids = tuple(t.id for t in result.tokens)
            assert reference.setdefault(prompt, ids) == ids, f"serial answers differ: {prompt!r}"
            best[prompt] = min(best.get(prompt, took), took)
    done = [Done("serial", p, reference[p], best[p], 1, 1) for p in texts]
    return summarise("serial", done, sum(best.values())), reference


def concurrent(
    model, users: int, texts: list[str], settings: GenerationSettings, seconds: float
) -> tuple[dict, list[Done]]:
    """``users`` threads, each a student, sending requests back to back for ``seconds``."""
    done: list[Done] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    start_line = threading.Barrier(users)

    def session(u: int) -> None:
        user = access.User(f"student{u:02d}", "student")
        k = 0
        with access.acting_as(user):
            start_line.wait()
            while time.perf_counter() < stop_at:
                prompt = texts[(u * 7 + k * 13) % len(texts)]
                k += 1
                t0 = time.perf_counter()
                result = model.generate(prompt, settings)
                item = Done(
                    user.name,
                    prompt,
                    tuple(t.id for t in result.tokens),
                    time.perf_counter() - t0,
                    result.batch_size,
                    result.shared_by,
                )
                with lock:
                    done.append(item)

    threads = [threading.Thread(target=session, args=(u,)) for u in range(users)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarise(f"{users} users", done, time.perf_counter() - start), done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="8,30", help="comma-separated user counts")
    parser.add_argument("--seconds", type=float, default=60.0, help="per concurrent run")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passes", type=int, default=2, help="serial passes (best kept)")
    args = parser.parse_args()
    table = dict(access.DEFAULT_LIMITS)
    table["student"] = replace(table["student"], requests_per_minute=1_000_000)
    access.set_limits(table)

    shared = Workbench(home=HOME, device="cpu")
    loaded = shared.load(args.model).loaded
    with tempfile.TemporaryDirectory() as tmp:
        model = Workbench(home=tmp, device="cpu").model(loaded)  # records into a temp ledger
        settings = GenerationSettings(max_new_tokens=args.tokens, greedy=True)
        texts = prompts()
        model.generate(texts[0], settings)  # warm-up
        print(f"{args.model}, {args.tokens} new tokens, greedy, {len(texts)} prompts", flush=True)
        base, reference = serial(model, texts, settings, args.passes)
        for users in (int(u) for u in args.users.split(",")):
            row, done = concurrent(model, users, texts, settings, args.seconds)
            wrong = sum(d.ids != reference[d.prompt] for d in done)
            counts = Counter(d.user for d in done)
            batched = sum(d.batch_size > 1 for d in done)
            shared_n = sum(d.shared_by > 1 for d in done)
            sizes = Counter(d.batch_size for d in done)
            print(
                f"{'':>10}  x{row['req_s'] / base['req_s']:.2f} requests/s and "
                f"x{row['tok_s'] / base['tok_s']:.2f} tokens/s of serial; fairness "
                f"{max(counts.values())}/{min(counts.values())} (most/least served of "
                f"{len(counts)} users); batched {batched}/{len(done)} (batch sizes "
                f"{dict(sorted(sizes.items()))}); shared an identical computation {shared_n}; "
                f"wrong answers {wrong}",
                flush=True,
            )
            if len(counts) < users:
                print(f"{'':>10}  {users - len(counts)} users got no request through!")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
