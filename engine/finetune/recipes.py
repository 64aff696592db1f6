"""A ready-made job: the MiniLM sentiment classifier trained on the shipped sample.

It is the teaching demo (fine-tune, then explain it on the attribution page) and a reusable
model for tests: ``ensure_sentiment_classifier(home)`` trains it once (about 15 s on 2 CPU
cores: one epoch, 16 steps, about 0.9 held-out accuracy) and later returns the stored one, as
long as it was made from the same data and base weights.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import EngineError, InputError
from engine.finetune.config import JobSpec, TrainConfig
from engine.finetune.data import load, sample_path
from engine.finetune.jobs import JobStore
from engine.store import ModelStore

SENTIMENT_MODEL = "minilm-sentiment"
SENTIMENT_TRAIN = TrainConfig(epochs=1, batch_size=16, max_length=32, learning_rate=2e-4)


def sentiment_spec(out: str = SENTIMENT_MODEL, train: TrainConfig = SENTIMENT_TRAIN) -> JobSpec:
    """MiniLM (``minilm-l6``) + a 2-class head on ``sample_path("sentiment")``."""
    return JobSpec(
        base="minilm-l6",
        task="classification",
        data=str(sample_path("sentiment")),
        out=out,
        train=train,
    )


def _current(store: ModelStore, spec: JobSpec) -> bool:
    """True if the stored model was made from this data split and these base weights."""
    if spec.out not in store.names():
        return False
    manifest = store.get(spec.out).manifest
    cfg = spec.train
    data_hash = load(spec.data, spec.task, spec.columns, cfg.val_fraction, cfg.seed).hash
    base = store.get(spec.base).manifest.fingerprint if spec.base in store.names() else None
    return manifest.extra.get("data_hash") == data_hash and manifest.base_fingerprint == base


def ensure_sentiment_classifier(
    home: str | Path | None = None, spec: JobSpec | None = None, timeout_s: float = 900
) -> str:
    """Store name of the demo classifier in ``home``'s store, trained first if missing or stale.

    Safe to call from several processes at once (test workers sharing one store): one of them
    trains, the others wait for that job instead of training the same model again.
    """
    spec = spec or sentiment_spec()
    jobs = JobStore(home)
    store = ModelStore(jobs.home)
    if _current(store, spec):
        return spec.out
    if spec.out in store.names():
        store.remove(spec.out)
    try:
        job_id = jobs.submit(spec).id
    except InputError:  # another process got the name first: wait for its job
        if _current(store, spec):
            return spec.out
        busy = [j for j in jobs.list() if j.out == spec.out and j.active]
        if not busy:
            raise
        job_id = busy[0].id
    info = jobs.wait(job_id, timeout_s=timeout_s)
    if info.status != "completed":
        raise EngineError(
            f"Training {spec.out} failed ({info.status}: {info.error}); see {info.folder}/log.txt."
        )
    return spec.out
