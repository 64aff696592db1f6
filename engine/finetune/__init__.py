"""Fine-tuning: data (``data``), hyper-parameters (``config``), background jobs (``jobs``),
their run view (``run``) and result (``result``), the training loop (``train``) and the job
process entry point (``worker``).

    from engine.finetune import JobSpec, JobStore, TrainConfig
    jobs = JobStore()
    job = jobs.submit(JobSpec(base="minilm-l6", task="classification",
                              data=str(sample_path("sentiment")), out="minilm-sentiment"))
    result = jobs.run(job.id).wait()          # a FinetuneResult
    result.metrics_after["accuracy"]

Importing this package does not import torch (the page uses it).
"""

from engine.finetune.config import JobSpec, TrainConfig
from engine.finetune.data import ColumnMap, sample_path, samples
from engine.finetune.jobs import JobInfo, JobStore
from engine.finetune.result import FinetuneProgress, FinetuneResult
from engine.finetune.run import JobRun

__all__ = [
    "ColumnMap",
    "FinetuneProgress",
    "FinetuneResult",
    "JobInfo",
    "JobRun",
    "JobSpec",
    "JobStore",
    "TrainConfig",
    "sample_path",
    "samples",
]
