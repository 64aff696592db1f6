"""Fine-tuning overhead: a workbench job vs a plain transformers training loop.

Both fine-tune the embedded MiniLM encoder with a fresh 2-class head on the shipped sentiment
sample with the same device and dtype, train split and batches (same examples in the same
order, padded to the longest in the batch), AdamW + linear warm-up/decay and gradient
clipping at 1.0. The plain loop tokenizes each batch and steps; the workbench job also writes
state.json and metrics.jsonl, checks for Cancel, reseeds dropout every step, writes a
checkpoint every ``--checkpoint-every`` steps, evaluates before and after and stores the model.

1. Once each in their own process, as a user runs them: ``JobStore.submit`` (the worker
   process, polled once a second like the page) vs this file with ``--baseline``. This gives
   peak memory (each process's peak resident set size; the CUDA peak on a GPU) and the job's
   wall time with start-up, evaluation and the store write.
2. Paired, ``--rounds`` times, alternating in this process: the plain loop, then the job's own
   training function (``engine.finetune.train.run``, what the job process runs). Start-up is
   paid once, so short rounds can alternate often, which cancels the drift of a shared machine.

Seconds per optimizer step are the gaps between consecutive step-end timestamps after
``--skip`` warm-up steps; the median is robust to the noise of a shared machine. Steps that
also wrote a checkpoint are reported apart. Run: ``.venv/bin/python bench/finetune.py``
(about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASE = "minilm-l6"


def base_folder() -> Path:
    """The MiniLM folder in the user's store (converted once if missing)."""
    from engine.finetune.train import find_base
    from engine.store import ModelStore

    return find_base(BASE, ModelStore()).folder


def baseline(folder: str, steps: int, batch: int, max_length: int, seed: int) -> dict:
    """A plain loop: tokenizer(padding=True), model(**batch).loss, AdamW, linear schedule."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    from engine.devices import choose_placement
    from engine.finetune import data as ftdata
    from engine.finetune.train import batch_indices, peak_memory

    placement = choose_placement()
    device = torch.device(placement.device)
    prepared = ftdata.load(ftdata.sample_path("sentiment"), "classification", seed=seed)
    texts = [ex.text for ex in prepared.train]
    labels = [ex.label for ex in prepared.train]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, ignore_mismatched_sizes=True, dtype=torch.float32
    ).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=5e-5,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, round(0.1 * steps), steps)
    model.train()
    ends, cpu = [], []
    for step in range(steps):
        idx = batch_indices(step, len(texts), batch, seed)
        enc = tokenizer(
            [texts[i] for i in idx],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        ).to(device)
        target = torch.tensor([labels[i] for i in idx], device=device)
        with torch.autocast(
            device.type, dtype=placement.dtype, enabled=placement.dtype != torch.float32
        ):
            loss = model(**enc, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a loop logs its loss (and waits for the device)
        ends.append(time.time())
        cpu.append(time.process_time())
    return {"ends": ends, "cpu": cpu, "peak_memory": peak_memory(device), "device": str(device)}


def run_baseline(folder: Path, args) -> dict:
    cmd = [
        sys.executable, __file__, "--baseline", str(folder), "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if out.returncode:
        raise SystemExit(f"baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def job_spec(folder: Path, args, n: int, checkpoint_every: int):
    from engine.finetune import JobSpec, TrainConfig, sample_path

    return JobSpec(
        base=str(folder),
        task="classification",
        data=str(sample_path("sentiment")),
        out=f"bench-{n}",
        train=TrainConfig(
            max_steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            eval_every=10**6,  # evaluation only before and after, outside the timed steps
            checkpoint_every=checkpoint_every,
        ),
    )


def steps_of(jobs, job_id: str) -> dict:
    train = [r for r in jobs.metrics(job_id) if r["type"] == "train"]
    return {"ends": [r["time"] for r in train], "cpu": [r["cpu_s"] for r in train]}


def job_here(folder: Path, home: Path, args, n: int) -> dict:
    """The job's training function, in this process (no checkpoints: paired timing only)."""
    from engine.finetune import JobStore
    from engine.finetune.train import run

    jobs = JobStore(home)
    job = jobs.submit(job_spec(folder, args, n, checkpoint_every=10**6), start=False)
    with contextlib.redirect_stdout(io.StringIO()):
        run(job.folder, home)
    return steps_of(jobs, job.id)


def job_process(folder: Path, home: Path, args, n: int) -> dict:
    """A real job: its own process, polled once a second (as the page polls)."""
    from engine.finetune import JobStore

    jobs = JobStore(home)
    start = time.time()
    info = jobs.wait(
        jobs.submit(job_spec(folder, args, n, args.checkpoint_every)).id, timeout_s=600, poll_s=1
    )
    if info.status != "completed":
        raise SystemExit(f"job {info.id} {info.status}: {info.error}\n{jobs.log_tail(info.id)}")
    return {
        **steps_of(jobs, info.id),
        "peak_memory": jobs.result(info.id).peak_memory,
        "wall": time.time() - start,
    }


def per_step(ends: list[float], skip: int) -> list[float]:
    return [b - a for a, b in zip(ends[skip:], ends[skip + 1 :], strict=False)]


def gaps(ends: list[float], skip: int, exclude: set[int] = frozenset()) -> list[float]:
    """Seconds of steps skip+2 .. n (gap k is step k + 2), leaving out the steps in exclude."""
    return [g for k, g in enumerate(per_step(ends, 0)) if k + 2 > skip + 1 and k + 2 not in exclude]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--checkpoint-every", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out")
    parser.add_argument("--baseline", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        out = baseline(args.baseline, args.steps, args.batch_size, args.max_length, seed=0)
        print(json.dumps(out))
        return 0

    t0 = time.time()
    folder = base_folder()
    wall = {"plain": [], "job": []}
    cpu = {"plain": [], "job": []}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as home:
        # own processes first, while this one is idle (no compute threads of its own yet)
        proc_plain = run_baseline(folder, args)
        proc_job = job_process(folder, Path(home), args, args.rounds)
        for n in range(args.rounds):
            with contextlib.redirect_stdout(io.StringIO()):
                plain = baseline(str(folder), args.steps, args.batch_size, args.max_length, 0)
            job = job_here(folder, Path(home), args, n)
            for who, r in (("plain", plain), ("job", job)):
                wall[who] += gaps(r["ends"], args.skip)
                cpu[who] += gaps(r["cpu"], args.skip)
        device = plain["device"]
    # a checkpoint is written right after step s (s % every == 0): it lands in step s + 1
    saved = {s + 1 for s in range(args.checkpoint_every, args.steps, args.checkpoint_every)}
    proc_gaps = dict(zip(range(2, args.steps + 1), per_step(proc_job["ends"], 0), strict=False))
    med = {who: statistics.median(v) for who, v in wall.items()}
    job_steps = gaps(proc_job["ends"], args.skip, saved)
    rows = [
        ("median s/step (wall)", med["plain"], med["job"]),
        ("mean s/step (wall)", statistics.mean(wall["plain"]), statistics.mean(wall["job"])),
        ("median CPU s/step", statistics.median(cpu["plain"]), statistics.median(cpu["job"])),
    ]
    procs = [
        (
            "median s/step (wall)",
            statistics.median(gaps(proc_plain["ends"], args.skip)),
            statistics.median(job_steps),
        ),
        *[
            (f"peak {k} MiB", v / 2**20, proc_job["peak_memory"].get(k, 0) / 2**20)
            for k, v in sorted(proc_plain["peak_memory"].items())
        ],
    ]
    print(
        f"\nMiniLM classifier on the sentiment sample: batch {args.batch_size}, max length "
        f"{args.max_length}, {args.steps} steps a run (first {args.skip} left out), device {device}"
    )
    header = f"{'plain loop':>12} {'workbench job':>14} {'job / plain':>12}"
    print(f"\n{'paired, ' + str(args.rounds) + ' rounds, in process':30} {header}")
    for name, p, w in rows:
        print(f"  {name:28} {p:12.4f} {w:14.4f} {w / p:12.3f}")
    print(f"{'one run each, own processes':30} {header}")
    for name, p, w in procs:
        print(f"  {name:28} {p:12.4f} {w:14.4f} {w / p:12.3f}")
    print(
        f"\noverhead per optimizer step (paired median): {med['job'] / med['plain'] - 1:+.1%} "
        "(goal <= +5%)"
    )
    ckpt = [proc_gaps[s] for s in saved if s in proc_gaps]
    if ckpt:
        extra = statistics.median(ckpt) - statistics.median(job_steps)
        print(
            f"checkpoint: {extra:.2f} s each; every {args.checkpoint_every} steps that adds "
            f"{extra / args.checkpoint_every / med['plain']:+.1%} a step (default every 50 steps: "
            f"{extra / 50 / med['plain']:+.1%})"
        )
    print(
        f"job process wall time incl. start-up, eval before/after and store write: "
        f"{proc_job['wall']:.1f} s; bench total {time.time() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
