"""Job entry point: ``python -m engine.finetune.worker JOB_ID``.

Also runs under the standard launchers for scale-out (DDP; gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 -m engine.finetune.worker JOB_ID
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m engine.finetune.worker JOB_ID

Process 0 claims the job (compare-and-set: a second worker on a running job is refused) and
records its outcome in the job table: ``completed``, ``cancelled`` (flag file or SIGTERM) or
``failed`` with a one-line error (a full disk included; the traceback of a crash is in
log.txt). Then it starts the next job waiting in the lane, if any (``JobStore.pump``).

Every process acts as the job's owner (``engine.access.acting_as``): a server with login
required (``WORKBENCH_AUTH=required``, inherited) has nobody acting otherwise, and the store
entry and the ledger record the job writes belong to its owner. Before training, process 0
removes what a killed earlier attempt left: temporary files in the job folder and temporary
store folders whose writer is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import sys
import traceback
from pathlib import Path

import psutil

from engine import access
from engine.errors import CancelledError, EngineError
from engine.files import atomic_write_json
from engine.finetune.jobs import ACTIVE, JobStore
from engine.finetune.result import read_json
from engine.runs import one_line_error
from engine.store import ModelStore, workbench_home

# engine.files temporary files (".NAME.PID-TOKEN.tmp") and save_adapter's folder (".NAME.PID.tmp")
_TEMP = re.compile(r"\..+\.(?P<pid>\d+)(-[0-9a-f]+)?\.tmp")


def _dist():
    from engine.finetune.train import Dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # NCCL collectives use this process's own GPU
    torch.distributed.init_process_group()  # gloo for CPU tensors, NCCL for GPU ones
    return Dist(
        rank=torch.distributed.get_rank(),
        world=world,
        local_rank=local_rank,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m engine.finetune.worker JOB_ID", file=sys.stderr)
        return 2
    job_id = argv[0]
    home = Path(os.environ.get("WORKBENCH_HOME") or workbench_home())
    jobs = JobStore(home)
    folder = jobs.folder(job_id)
    if not folder.is_dir():
        print(f"No job folder {folder}", file=sys.stderr)
        return 2
    try:
        owner = jobs.owner(job_id)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with access.acting_as(owner):
        code = _main(jobs, job_id, folder, home)
    if int(os.environ.get("RANK", "0")) == 0:
        try:  # this job's slot is free: start the next one waiting in the lane
            jobs.pump()
        except (EngineError, sqlite3.Error, OSError) as exc:
            print(f"could not start the next queued job: {exc}", flush=True)
    return code


def _main(jobs: JobStore, job_id: str, folder: Path, home: Path) -> int:
    """Attach to the job, train it and record how it ended (acting as its owner)."""

    def on_term(_signum, _frame) -> None:  # Cancel from the page / Ctrl-C: stop at the next step
        (folder / "CANCEL").write_text("signal")

    signal.signal(signal.SIGTERM, on_term)
    dist = None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    attached = False  # only the process that holds the job may record how it ended

    def finish(status: str, error: str | None = None) -> None:
        if rank0 and attached:
            _record(jobs, job_id, folder, status, error)

    try:
        if rank0:
            jobs.attach(job_id)  # compare-and-set: refuses a second worker on a running job
            attached = True
            clean_leftovers(folder, home)
        dist = _dist()
        from engine.finetune import train

        train.run(folder, home, dist)
        finish("completed")
        return 0
    except CancelledError as exc:
        if rank0:
            print(str(exc), flush=True)
        finish("cancelled", str(exc))
        return 1
    except EngineError as exc:  # bad input, a full disk (DiskError), ...: its own one line
        if rank0:
            print(f"error: {exc}", flush=True)
        finish("failed", one_line_error(exc, "fine-tuning"))
        return 1
    except Exception as exc:  # a crash: one line for the table, the traceback for the log
        traceback.print_exc()
        finish("failed", one_line_error(exc, "fine-tuning"))
        return 1
    finally:
        if dist is not None and dist.world > 1:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def clean_leftovers(folder: Path, home: Path) -> int:
    """Remove what a killed earlier run of this job left: temporary files and folders in the
    job folder and its checkpoints whose writer process is gone, and the store's temporary
    folders of dead writers. Returns how many were removed. Only the process that holds the
    job calls this, so no live writer of this job is touched.
    """
    removed = 0
    for place in (folder, folder / "checkpoints"):
        if not place.is_dir():
            continue
        for path in place.iterdir():
            match = _TEMP.fullmatch(path.name)
            if match is None or psutil.pid_exists(int(match["pid"])):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    with contextlib.suppress(OSError, EngineError):
        removed += ModelStore(home).clean_leftovers()
    return removed


def _record(jobs: JobStore, job_id: str, folder: Path, status: str, error: str | None) -> None:
    """Record the job's end (running -> completed, failed or cancelled) and its phase.

    Best effort on a broken file system: if even the job table cannot be written (a disk so
    full that SQLite fails), the job shows as interrupted once this process has exited, and
    the reason is in log.txt.
    """
    try:
        jobs.set_status(job_id, status, error, expect=ACTIVE)  # as the owner: may_control
    except sqlite3.Error as exc:
        print(f"could not record the job's status ({status}: {error}): {exc}", flush=True)
    if status == "failed":
        state = read_json(folder / "state.json", {}) or {}
        message = f"Failed: {error}" if error else "Failed."
        with contextlib.suppress(EngineError):  # the job table already holds the reason
            atomic_write_json(
                folder / "state.json", {**state, "phase": "failed", "message": message}
            )


if __name__ == "__main__":
    sys.exit(main())
