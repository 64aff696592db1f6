"""Job entry point: ``python -m engine.finetune.worker JOB_ID``.

Also runs under the standard launchers for scale-out (DDP; gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 -m engine.finetune.worker JOB_ID
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m engine.finetune.worker JOB_ID

Process 0 records the job's status in the job table; the outcome is ``completed``,
``cancelled`` (flag file or SIGTERM) or ``failed`` with a one-line error (traceback in log.txt).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

from engine.errors import CancelledError, EngineError
from engine.finetune.jobs import JobStore
from engine.store import workbench_home


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

    def on_term(_signum, _frame) -> None:  # Cancel from the page / Ctrl-C: stop at the next step
        (folder / "CANCEL").write_text("signal")

    signal.signal(signal.SIGTERM, on_term)
    dist = None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        if rank0:
            jobs.attach(job_id)
            jobs.set_status(job_id, "running")
        dist = _dist()
        from engine.finetune import train

        train.run(folder, home, dist)
        if rank0:
            jobs.set_status(job_id, "completed")
        return 0
    except CancelledError as exc:
        if rank0:
            print(str(exc), flush=True)
            jobs.set_status(job_id, "cancelled", str(exc))
        return 1
    except EngineError as exc:
        if rank0:
            print(f"error: {exc}", flush=True)
            jobs.set_status(job_id, "failed", str(exc))
        return 1
    except Exception as exc:  # a crash: one line for the table, the traceback for the log
        traceback.print_exc()
        if rank0:
            first = (str(exc).strip().splitlines() or [""])[0]
            jobs.set_status(job_id, "failed", f"{type(exc).__name__}: {first}"[:500])
        return 1
    finally:
        if dist is not None and dist.world > 1:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
