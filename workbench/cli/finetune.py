"""``workbench finetune --base MODEL --task classification|causal-lm --data FILE --out NAME``.

Runs the job in its own process (as the page does), shows progress on stderr and, with
``--json``, prints the job and its result (before/after metrics, store entry, provenance) on
stdout. ``--data`` also takes a shipped sample name (sentiment, instructions, stories).
Epochs, batch size and learning rate left out are chosen from the data size (printed, and under
``settings`` in the JSON, with the reason). ``--status JOB_ID`` shows one job (its one-line
error when it failed, its place in line while it waits for a training slot); ``--max-jobs N``
lets N jobs train at once on this machine (admins); the global
``workbench --allow-pickle finetune ...`` lets a base folder with pickled weights load.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from engine.errors import EngineError
from engine.finetune import ColumnMap, JobSpec, JobStore, TrainConfig
from engine.finetune.data import SAMPLES, sample_path
from workbench.cli.common import print_json


def _data_path(value: str) -> str:
    return str(sample_path(value)) if value in SAMPLES and not Path(value).exists() else value


def _printer():
    last = {"step": -1, "phase": ""}

    def show(info) -> None:
        if (info.step, info.phase) == (last["step"], last["phase"]):
            return
        last.update(step=info.step, phase=info.phase)
        eta = f", ETA {info.eta_s:.0f} s" if info.eta_s is not None else ""
        steps = f" step {info.step}/{info.total_steps}" if info.total_steps else ""
        print(
            f"[{info.fraction:4.0%}] {info.phase}{steps}{eta} {info.message}",
            file=sys.stderr,
            flush=True,
        )

    return show


def _settings(jobs: JobStore, job_id: str) -> dict | None:
    """The job's epochs, batch size, learning rate and steps, which of them were chosen
    automatically and why (``Settings.to_dict()``); None when its data cannot be read."""
    try:
        return jobs.spec(job_id).settings().to_dict()
    except (EngineError, OSError):
        return None


def _job_json(jobs: JobStore, info) -> dict:
    """The job row, its folder, its settings (``_settings``) and its result
    (``FinetuneResult.to_dict()``, or None)."""
    data = {k: v for k, v in asdict(info).items() if k != "folder"}
    result = jobs.result(info.id)
    return {
        **data,
        "folder": str(info.folder),
        "settings": _settings(jobs, info.id),
        "result": result.to_dict() if result else None,
    }


def _report(jobs: JobStore, info, as_json: bool) -> int:
    """Print how a job stands (before/after metrics once completed, else its one-line reason);
    exit status 0 only for a completed job."""
    result = jobs.result(info.id)
    if as_json:
        print_json(_job_json(jobs, info))
    elif info.status == "completed" and result:
        for row in result.comparison():
            before = row["before"] if row["before"] is not None else float("nan")
            print(f"{row['metric']:12} before {before:.4f}  after {row['after']:.4f}")
        where = f"saved as {result.model!r}" if result.model else "adapter saved (not merged)"
        print(f"job {info.id} completed: {where}")
    elif info.active:
        steps = f" step {info.step}/{info.total_steps}" if info.total_steps else ""
        print(f"job {info.id} {info.status_label}:{steps} {info.message}".rstrip(), file=sys.stderr)
    else:
        print(f"job {info.id} {info.status}: {info.error or ''}".rstrip(": "), file=sys.stderr)
    return 0 if info.status == "completed" else 1


def _follow(jobs: JobStore, job_id: str, as_json: bool) -> int:
    try:
        info = jobs.wait(job_id, on_update=_printer())
    except KeyboardInterrupt:
        print("cancelling (a checkpoint is kept; resume with --resume)…", file=sys.stderr)
        jobs.cancel(job_id)
        info = jobs.wait(job_id, timeout_s=120)
    return _report(jobs, info, as_json)


def finetune(args, _extra) -> int:
    jobs = JobStore()
    if args.max_jobs is not None:
        n = jobs.set_max_jobs(args.max_jobs or None)
        print(f"up to {n} fine-tuning job(s) train at once; more wait in line", file=sys.stderr)
        return 0
    if args.status:
        return _report(jobs, jobs.get(args.status), args.json)
    if args.merge:
        result = jobs.merge(args.merge)
        if args.json:
            print_json(result.to_dict())
        else:
            print(f"job {args.merge}: merged and saved as {result.model!r}")
        return 0
    if args.resume:
        info = jobs.resume(args.resume)
        return _follow(jobs, info.id, args.json)
    missing = [f"--{n}" for n in ("base", "task", "data", "out") if not getattr(args, n)]
    if missing:
        print(f"error: {', '.join(missing)} required (or --resume JOB_ID)", file=sys.stderr)
        return 2
    train = TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        lora=args.lora,
        merge_lora=not args.no_merge,
        checkpoint_every=args.checkpoint_every,
    )
    spec = JobSpec(
        base=args.base,
        task=args.task,
        data=_data_path(args.data),
        out=args.out,
        columns=ColumnMap(
            text=args.text_column,
            label=args.label_column,
            prompt=args.prompt_column,
            response=args.response_column,
        ),
        train=train,
        processes=args.processes,
        allow_pickle=bool(getattr(args, "allow_pickle", False)),  # workbench --allow-pickle
    )
    info = jobs.submit(spec)
    how = info.status_label if info.waiting else "started"
    print(f"job {info.id} {how} (folder {info.folder})", file=sys.stderr)
    settings = _settings(jobs, info.id)
    if settings:
        print(f"settings: {settings['why']}", file=sys.stderr)
    if args.no_wait:
        if args.json:
            print_json(
                {
                    "id": info.id,
                    "status": info.status,
                    "position": info.position,  # place in line while waiting for a slot
                    "folder": str(info.folder),
                    "settings": settings,
                }
            )
        return 0
    return _follow(jobs, info.id, args.json)


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model (classification or causal LM)")
    p.add_argument("--base", help="base model: embedded alias, store name or local folder")
    p.add_argument("--task", choices=["classification", "causal-lm"])
    p.add_argument("--data", help="CSV, JSONL or TXT file, or a sample: " + ", ".join(SAMPLES))
    p.add_argument("--out", help="store name for the tuned model")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--prompt-column", help="instruction pairs: the prompt column")
    p.add_argument("--response-column", help="instruction pairs: the response column")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (merged on save)")
    p.add_argument("--no-merge", action="store_true", help="with --lora: keep only the adapter")
    auto = "default: chosen from the data size"
    p.add_argument("--epochs", type=float, default=None, help=auto)
    p.add_argument("--max-steps", type=int, default=0, help="overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=None, help=auto)
    p.add_argument("--lr", type=float, default=None, help=auto)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--processes", type=int, default=1, help="> 1 runs under torchrun (DDP)")
    p.add_argument("--resume", metavar="JOB_ID", help="resume an interrupted/cancelled job")
    p.add_argument("--merge", metavar="JOB_ID", help="merge a --no-merge job's adapter, store it")
    p.add_argument("--status", metavar="JOB_ID", help="show a job (and why it failed)")
    p.add_argument("--no-wait", action="store_true", help="start the job and return")
    p.add_argument(
        "--max-jobs", type=int, metavar="N",
        help="let N jobs train at once on this machine (admins; 0: back to WORKBENCH_MAX_JOBS)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="job, metrics and store entry as JSON")
    p.set_defaults(func=finetune)
