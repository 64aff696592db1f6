"""What a fine-tuning job produces (``FinetuneResult``), what it shows while it runs
(``FinetuneProgress``), and ``read_json`` for the job folder's files. No torch here: the page
reads all of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.finetune.config import TrainConfig
from engine.provenance import Provenance
from engine.results import Result

COMPARED = ("accuracy", "f1", "eval_loss", "perplexity")  # before/after table, in this order


def read_json(path: Path, default: Any = None) -> Any:
    """A job file's JSON, or ``default`` when it is missing or not JSON (files are replaced
    atomically, so a reader never sees half of one)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


@dataclass(frozen=True)
class FinetuneResult(Result):
    """A finished job: the store entry written, the metrics before and after, and how.

    ``model``: the store entry written (None: a LoRA adapter kept unmerged in the job folder
    until ``JobStore.merge``); ``fingerprint``: that entry's sha256 weight fingerprint.
    ``base`` / ``base_fingerprint``: the model tuned (also in ``provenance``). ``labels``:
    class names, index = class id (classification; empty for causal LM). ``data_hash``: sha256
    over the data file, the column mapping, the split fraction and the seed. ``steps``:
    optimizer steps run. ``metrics_before`` / ``metrics_after``: validation metrics of the base
    and of the tuned model: classification ``eval_loss`` (mean cross-entropy, nats),
    ``accuracy`` and macro ``f1`` in [0, 1], ``confusion`` (true class x predicted class,
    counts); causal LM ``eval_loss`` (nats per target token) and ``perplexity``.
    ``hyperparameters``: the ``TrainConfig`` used (learning rate filled in). ``processes``:
    DDP world size. ``peak_memory``: process 0's peak in bytes (``rss``; ``cuda`` on GPUs).
    ``provenance``: base model and fingerprint, device, training dtype, seed, library versions.
    """

    model: str | None
    base: str
    base_fingerprint: str
    task: str
    labels: tuple[str, ...]
    data_hash: str
    steps: int
    metrics_before: dict[str, Any]
    metrics_after: dict[str, Any]
    adapter: bool = False
    fingerprint: str | None = None
    hyperparameters: TrainConfig | None = None
    processes: int = 1
    peak_memory: dict[str, int] = field(default_factory=dict)
    job_id: str = ""
    provenance: Provenance | None = None

    def comparison(self) -> list[dict[str, Any]]:
        """Rows ``{"metric", "before", "after"}`` for the metrics both sides have, in the order
        accuracy, f1, eval_loss, perplexity (the page's and the CLI's before/after table)."""
        return [
            {"metric": k, "before": self.metrics_before.get(k), "after": self.metrics_after[k]}
            for k in COMPARED
            if k in self.metrics_after
        ]


@dataclass(frozen=True)
class FinetuneProgress:
    """A job's progress, the ``partial`` of its ``RunSnapshot``.

    ``status``: the job's own word (queued, running, completed, failed, cancelled,
    interrupted); ``phase``: loading, evaluating, training, saving, done, ...; ``step`` of
    ``total_steps`` optimizer steps; ``eta_s``: seconds left (None when unknown); ``records``:
    every train-log and evaluation record so far, in order (``type`` "train": step, epoch,
    loss, lr, grad_norm; ``type`` "eval": step, tag, eval_loss and the task's metrics).
    """

    status: str
    phase: str
    step: int
    total_steps: int
    eta_s: float | None
    records: tuple[dict, ...] = ()

    @property
    def latest_train(self) -> dict | None:
        return next((r for r in reversed(self.records) if r.get("type") == "train"), None)

    @property
    def latest_eval(self) -> dict | None:
        return next((r for r in reversed(self.records) if r.get("type") == "eval"), None)


def ledger_id(job_id: str) -> str:
    """The run-ledger id of a job's record (one per job, derived from its id)."""
    import hashlib

    return hashlib.sha256(f"finetune:{job_id}".encode()).hexdigest()[:16]


def record_in_ledger(home, spec: dict, result: FinetuneResult, seconds: float | None) -> None:
    """Record a finished job in the run ledger of ``home`` (once: a second call is a no-op),
    as the acting user's run (the worker acts as the job's owner)."""
    import contextlib

    from engine.access import current_user
    from engine.errors import InputError
    from engine.ledger import Ledger

    with contextlib.suppress(InputError):  # already recorded (a resumed job finishing its books)
        Ledger(home).append(
            run_id=ledger_id(result.job_id),
            operation="finetune",
            spec={**spec, "model": spec.get("base"), "job_id": result.job_id},
            result=result,
            seconds=seconds,
            user=current_user().name,
        )
