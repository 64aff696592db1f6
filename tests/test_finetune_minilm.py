"""Fine-tuning the embedded MiniLM encoder on the shipped sentiment sample (slow: real model),
then explaining the tuned classifier. The model stays in the shared store as
``minilm-sentiment`` for later runs and other tests (``ensure_sentiment_classifier``)."""

from __future__ import annotations

import time

import pytest

from engine.finetune import JobStore
from engine.finetune.recipes import SENTIMENT_MODEL, ensure_sentiment_classifier, sentiment_spec
from engine.store import ModelStore


@pytest.mark.slow
def test_minilm_learns_sentiment_well_above_chance(shared_home, real_workbench):
    jobs, store = JobStore(shared_home), ModelStore(shared_home)
    if SENTIMENT_MODEL in {m.name for m in real_workbench.loaded()}:
        real_workbench.unload(SENTIMENT_MODEL)
    if SENTIMENT_MODEL in store.names():
        store.remove(SENTIMENT_MODEL)  # always train here: this test is the proof that it learns
    start = time.monotonic()
    job = jobs.submit(sentiment_spec())
    info = jobs.wait(job.id, timeout_s=400)
    seconds = time.monotonic() - start
    assert info.status == "completed", jobs.log_tail(job.id)
    result = jobs.result(job.id)
    before, after = result.metrics_before, result.metrics_after
    print(
        f"\nheld-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
        f"F1 {after['f1']:.3f}, {info.total_steps} steps, {seconds:.0f} s for the whole job"
    )
    # 64 held-out sentences, two balanced classes: chance is 0.5
    assert after["accuracy"] >= 0.8 > before["accuracy"]
    assert after["f1"] >= 0.8 and sum(map(sum, after["confusion"])) == 64
    manifest = store.get(SENTIMENT_MODEL).manifest
    assert manifest.kind == "classifier" and manifest.base_model == "minilm-l6"
    assert manifest.base_fingerprint == store.get("minilm-l6").manifest.fingerprint
    assert manifest.extra["metrics_after"] == after and manifest.extra["labels"] == [
        "negative",
        "positive",
    ]

    n_jobs = len(jobs.list())  # reusable: the stored model is current, nothing is retrained
    assert ensure_sentiment_classifier(shared_home) == SENTIMENT_MODEL
    assert len(jobs.list()) == n_jobs

    model = real_workbench.load(SENTIMENT_MODEL)
    good = "The food was delicious and the staff were lovely."
    assert model.classify(good).label == "positive"
    assert model.classify("The room was dirty and the staff were rude.").label == "negative"

    # fine-tune then explain: the sentiment words carry the label
    att = model.explain(
        good, label="positive", method="integrated_gradients", options={"steps": 16},
        faithfulness=False,
    )  # fmt: skip
    words = {t.strip("#").lower(): s for t, s in zip(att.tokens, att.scores, strict=True)}
    assert att.label_probabilities["positive"] > 0.5
    assert max(words["delicious"], words["lovely"]) > max(words["the"], words["staff"])
    jobs.delete(job.id)  # the job folder goes; the stored model stays
