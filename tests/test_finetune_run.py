"""A fine-tuning job through the run interface (``JobStore.run``), its typed result with
provenance, and the pickled-base opt-in reaching the worker: real tiny jobs."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from engine.errors import CancelledError, EngineError, UnsafeModelError
from engine.finetune import FinetuneProgress, FinetuneResult, JobSpec, JobStore
from engine.provenance import library_versions
from engine.runs import RunSnapshot
from engine.store import ModelStore, fingerprint
from tests.test_finetune_jobs import clf_spec
from workbench.cli import main as cli

OLD_KEYS = {
    "model", "base", "base_fingerprint", "task", "labels", "data_hash", "steps",
    "metrics_before", "metrics_after", "adapter", "peak_memory",
}  # fmt: skip


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    return tmp_path / "home"


def snapshots_until(run, predicate, timeout_s: float = 60) -> list[RunSnapshot]:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(run.snapshot())
        if predicate(seen[-1]):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no snapshot matched; last: {seen[-1] if seen else None}")


def test_job_run_snapshots_then_typed_result_with_provenance(
    home, tiny_models, clf_data, monkeypatch
):
    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0.1")
    jobs = JobStore(home)
    spec = clf_spec(tiny_models["classifier"], clf_data, eval_every=4, seed=3)
    run = jobs.run(jobs.submit(spec).id)

    seen = snapshots_until(run, lambda s: s.partial.step >= 3)
    live = seen[-1]
    assert all(s.state == "running" and not s.finished for s in seen)
    assert isinstance(live.partial, FinetuneProgress) and live.partial.status == "running"
    assert live.partial.total_steps == 16 and live.fraction == live.partial.step / 16
    assert live.operation == "finetune" and live.id == run.id and live.seconds > 0
    assert live.result is None and live.error is None and not run.done
    train = [r for r in live.partial.records if r["type"] == "train"]
    assert train and live.partial.latest_train == train[-1]
    assert live.partial.latest_eval["tag"] == "before"  # the base model's evaluation
    fractions = [s.fraction for s in seen]
    assert fractions == sorted(fractions)  # progress never goes back

    result = run.wait(timeout=120)
    assert run.done and isinstance(result, FinetuneResult)
    done = run.snapshot()
    assert done.state == "done" and done.fraction == 1.0 and done.error is None
    assert done.result == result == jobs.result(run.id) and done.partial.status == "completed"

    # the result against independent references: the job's own records, the store, the files
    evals = [r for r in jobs.metrics(run.id) if r["type"] == "eval"]
    meta = {"type", "step", "tag", "time"}
    assert result.metrics_after == {k: v for k, v in evals[-1].items() if k not in meta}
    assert result.metrics_before == {k: v for k, v in evals[0].items() if k not in meta}
    assert evals[-1]["tag"] == "after" and evals[0]["tag"] == "before"
    entry = ModelStore(home).get("tiny-sentiment")
    assert result.model == "tiny-sentiment" and result.fingerprint == fingerprint(entry.path)
    assert result.base == str(tiny_models["classifier"])
    assert result.base_fingerprint == fingerprint(tiny_models["classifier"])
    assert result.labels == ("negative", "positive") and result.steps == 16
    assert result.hyperparameters == spec.train.validated() and result.processes == 1
    assert result.job_id == run.id and result.peak_memory["rss"] > 2**20
    prov = result.provenance
    assert (prov.model, prov.fingerprint) == (result.base, result.base_fingerprint)
    assert (prov.device, prov.dtype, prov.seed) == ("cpu", "float32", 3)
    assert prov.versions == library_versions() and prov.versions["torch"] == torch.__version__
    assert entry.manifest.extra["provenance"]["fingerprint"] == result.base_fingerprint

    # data: JSON round trip, and the old keys stay for readers of result.json
    data = json.loads((jobs.folder(run.id) / "result.json").read_text())
    assert data["type"] == "FinetuneResult" and set(data) >= OLD_KEYS
    assert FinetuneResult.from_dict(json.loads(result.to_json())) == result
    assert [r["metric"] for r in result.comparison()] == ["accuracy", "f1", "eval_loss"]


def test_job_run_cancel_and_failure_states(home, tiny_models, clf_data, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0.2")
    jobs = JobStore(home)
    run = jobs.run(jobs.submit(clf_spec(tiny_models["classifier"], clf_data)).id)
    snapshots_until(run, lambda s: s.partial.step >= 1)
    run.cancel()
    with pytest.raises(CancelledError, match="Cancelled at step"):
        run.wait(timeout=60)
    snap = run.snapshot()
    assert snap.state == "cancelled" and snap.cancelled and snap.finished
    assert snap.error.startswith("Cancelled at step") and snap.result is None
    assert 1 <= snap.partial.step < 16 and snap.fraction == snap.partial.step / 16
    run.cancel()  # nothing running: no error, like Run.cancel

    # queued with no process (a killed job, or one left for a worker started by hand)
    idle = jobs.run(jobs.submit(clf_spec(tiny_models["classifier"], clf_data, out="x"), False).id)
    snap = idle.snapshot()
    assert snap.state == "failed" and snap.partial.status == "interrupted"
    assert "interrupted" in snap.error and "resume" in snap.error
    with pytest.raises(EngineError, match="interrupted"):
        idle.wait(timeout=1)
    with pytest.raises(TimeoutError):
        jobs.run(jobs.resume(idle.id).id).wait(timeout=0.01)  # resumed: running again
    jobs.wait(idle.id, timeout_s=120)


def pickled_copy(source, target):
    """The tiny classifier with its weights as a pickle (pytorch_model.bin) only."""
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(source, target)
    model = AutoModelForSequenceClassification.from_pretrained(target)
    (target / "model.safetensors").unlink()
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    return target


def test_pickled_base_needs_the_opt_in_and_the_opt_in_reaches_the_worker(
    home, tiny_models, clf_data, tmp_path, monkeypatch, capsys
):
    # set (then removed at teardown) rather than deleted: the in-process CLI call below sets
    # it for the process, and it must not leak into later tests
    monkeypatch.setenv("WORKBENCH_ALLOW_PICKLE", "0")
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    base = pickled_copy(tiny_models["classifier"], tmp_path / "pickled")
    jobs = JobStore(home)
    spec = clf_spec(base, clf_data, out="from-pickle")
    with pytest.raises(UnsafeModelError, match=r"workbench --allow-pickle finetune"):
        jobs.submit(spec)
    assert jobs.list() == []

    # Python: the spec's opt-in alone (no environment variable) lets the worker load it
    allowed = JobSpec.from_dict({**spec.to_dict(), "allow_pickle": True})
    info = jobs.wait(jobs.submit(allowed).id, timeout_s=120)
    assert info.status == "completed", jobs.log_tail(info.id)
    assert jobs.result(info.id).base_fingerprint == fingerprint(base)  # the .bin weights

    # CLI: the global flag the refusal suggests is honoured by fine-tuning
    args = [
        "finetune", "--base", str(base), "--task", "classification", "--data", str(clf_data),
        "--epochs", "1", "--batch-size", "8", "--out", "from-pickle-cli", "--json",
    ]  # fmt: skip
    assert cli(args) == 2 and "--allow-pickle" in capsys.readouterr().err
    assert cli(["--allow-pickle", *args]) == 0, capsys.readouterr().err
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "completed" and jobs.spec(job["id"]).allow_pickle
    assert "from-pickle-cli" in ModelStore(home).names()
