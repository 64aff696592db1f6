"""Job state changes are compare-and-set: racing Resume clicks, racing submissions and a second
worker never start two trainings of one job or two jobs producing one store name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.finetune import JobStore
from engine.finetune import jobs as jobs_module
from engine.store import ModelStore
from tests.test_finetune_jobs import clf_spec, train_steps, wait_for_step

REPO = Path(__file__).resolve().parents[1]
THREADS = 8


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    return tmp_path / "home"


def race(n: int, call) -> list:
    """Run ``call(i)`` in ``n`` threads released together; each outcome is its return value
    or the exception it raised."""
    barrier = threading.Barrier(n)
    outcomes: list = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = call(i)
        except Exception as exc:  # noqa: BLE001 - every outcome is checked by the test
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcomes


def new_workers(before: set[int]) -> list[int]:
    """Worker processes this test process started since ``before``."""
    return sorted(set(jobs_module._children) - before)


def test_racing_resume_clicks_start_exactly_one_worker(home, tiny_models, clf_data):
    jobs = JobStore(home)
    job = jobs.submit(clf_spec(tiny_models["classifier"], clf_data), start=False)
    assert jobs.get(job.id).status == "interrupted"  # queued, no process: resumable
    before = set(jobs_module._children)

    # Each click is its own request with its own JobStore, as two sessions of the page are.
    outcomes = race(THREADS, lambda _i: JobStore(home).resume(job.id).id)

    started = [o for o in outcomes if o == job.id]
    refused = [o for o in outcomes if isinstance(o, InputError)]
    assert len(started) == 1 and len(refused) == THREADS - 1, outcomes
    assert all(job.id in str(e) for e in refused)
    assert len(new_workers(before)) == 1
    info = jobs.wait(job.id, timeout_s=120)
    assert info.status == "completed", jobs.log_tail(job.id)
    assert (info.folder / "log.txt").read_text().count(f"starting job {job.id}") == 1
    assert train_steps(jobs, job.id) == list(range(1, info.total_steps + 1))  # one training
    # and a finished job is not resumable any more
    with pytest.raises(InputError, match="only interrupted, failed or cancelled"):
        jobs.resume(job.id)


def test_racing_submissions_of_one_store_name_start_exactly_one_job(home, tiny_models, clf_data):
    spec = clf_spec(tiny_models["classifier"], clf_data, out="same-name")
    before = set(jobs_module._children)

    outcomes = race(THREADS, lambda _i: JobStore(home).submit(spec).id)

    ids = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if isinstance(o, InputError)]
    assert len(ids) == 1 and len(refused) == THREADS - 1, outcomes
    assert all("already producing 'same-name'" in str(e) for e in refused), refused
    assert all(len(str(e).splitlines()) == 1 for e in refused)
    jobs = JobStore(home)
    assert [j.id for j in jobs.list()] == ids  # one row; refused submissions left nothing
    assert sorted(p.name for p in jobs.root.iterdir() if p.is_dir()) == ids
    assert len(new_workers(before)) == 1
    assert jobs.wait(ids[0], timeout_s=120).status == "completed", jobs.log_tail(ids[0])

    # once stored, the name is refused at submit, before any training
    with pytest.raises(InputError, match="already in the store"):
        jobs.submit(spec)
    assert len(jobs.list()) == 1 and len(new_workers(before)) == 1


def test_an_interrupted_job_keeps_its_store_name(home, tiny_models, clf_data):
    jobs = JobStore(home)
    first = jobs.submit(clf_spec(tiny_models["classifier"], clf_data, out="kept"), start=False)
    with pytest.raises(InputError, match=rf"Job {first.id} \(interrupted \(resume or delete it"):
        jobs.submit(clf_spec(tiny_models["classifier"], clf_data, out="kept"))
    assert [j.id for j in jobs.list()] == [first.id]
    jobs.delete(first.id)  # deleted: the name is free again
    second = jobs.submit(clf_spec(tiny_models["classifier"], clf_data, out="kept"), start=False)
    assert [j.id for j in jobs.list()] == [second.id]


def test_resume_is_refused_while_another_job_produces_the_name(home, tiny_models, clf_data):
    jobs = JobStore(home)
    spec = clf_spec(tiny_models["classifier"], clf_data, out="contested")
    old = jobs.submit(spec, start=False)
    jobs.set_status(old.id, "failed", "test: failed")  # a failed job frees the name...
    new = jobs.submit(spec, start=False)  # ...so another job may take it
    before = set(jobs_module._children)
    with pytest.raises(InputError, match=rf"Job {new.id} .* already producing 'contested'"):
        jobs.resume(old.id)  # ...and the failed one cannot come back while that one lives
    assert jobs.get(old.id).status == "failed" and not new_workers(before)


def test_a_second_worker_on_a_running_job_is_refused(home, tiny_models, clf_data, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0.2")
    jobs = JobStore(home)
    job = jobs.submit(clf_spec(tiny_models["classifier"], clf_data))
    running = wait_for_step(jobs, job.id, 1)
    assert running.status == "running"
    second = subprocess.run(
        [sys.executable, "-m", "engine.finetune.worker", job.id],
        env={**os.environ, "WORKBENCH_HOME": str(home)},
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"already running in process {running.pid}" in second.stdout
    info = jobs.get(job.id)
    assert info.status == "running" and info.pid == running.pid and info.error is None
    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0")
    done = jobs.wait(job.id, timeout_s=120)
    assert done.status == "completed", jobs.log_tail(job.id)
    assert train_steps(jobs, job.id) == list(range(1, done.total_steps + 1))
    assert ModelStore(home).names() == {"tiny-sentiment"}


def test_racing_ensure_trains_the_demo_classifier_once(home, tiny_models, clf_data):
    from engine.finetune.recipes import ensure_sentiment_classifier

    spec = clf_spec(tiny_models["classifier"], clf_data, out="demo")
    before = set(jobs_module._children)
    outcomes = race(4, lambda _i: ensure_sentiment_classifier(home, spec, timeout_s=120))
    assert outcomes == ["demo"] * 4, outcomes  # the losers waited for the winner's job
    assert len(JobStore(home).list()) == 1 and len(new_workers(before)) == 1
    assert ModelStore(home).verify("demo")
