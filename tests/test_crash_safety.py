"""kill -9, for real: of the server that owns a running fine-tune and of its worker, and of a
process appending runs to the ledger. After a restart (new objects on the same home) the job
shows as interrupted and resumes from its last checkpoint to a verified store entry, and the
ledger's chain and result files check out, with no temporary file left behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.access import User, acting_as
from engine.errors import InputError
from engine.finetune import JobStore
from engine.finetune import jobs as jobs_module
from engine.ledger import Ledger
from engine.store import ModelStore
from tests.test_finetune_jobs import clf_spec, train_steps

REPO = Path(__file__).resolve().parents[1]
ANA = User("ana", "student")


def python(script: str, home: Path, *args: str) -> subprocess.Popen:
    """``python -c script ARGS`` from the repository (this process's environment, which the
    test sets), its stdout a pipe (line by line)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env={**os.environ, "WORKBENCH_HOME": str(home)},
        stdout=subprocess.PIPE,
        text=True,
    )


def kill9(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def temp_leftovers(home: Path) -> list[str]:
    """Temporary files and folders anywhere under ``home`` (store, jobs, ledger)."""
    found = []
    for path in home.rglob("*"):
        name = path.name
        if name.startswith((".tmp-", ".trash-")) or name.endswith((".tmp", ".part")):
            found.append(str(path.relative_to(home)))
    return found


# --- the fine-tune job --------------------------------------------------------------------


SERVER = """
    import sys, time
    from engine.access import User, acting_as
    from engine.finetune import JobSpec, JobStore
    spec = JobSpec.from_dict(__import__("json").loads(sys.argv[1]))
    with acting_as(User("ana", "student")):  # the logged-in user of this (served) app
        job = JobStore().submit(spec)
    print(job.id, flush=True)
    time.sleep(600)  # the server keeps running until it is killed
"""

HALF_WRITER = """
    import sys, threading, time
    from pathlib import Path
    from engine.files import atomic_write
    from engine.store import ModelStore
    home, job = Path(sys.argv[1]), Path(sys.argv[2])
    def slow(tmp):
        (tmp / "model.safetensors").write_bytes(b"half") if tmp.is_dir() else tmp.write_bytes(b"h")
        with said:  # one whole line per writer
            sys.stdout.write("writing\\n")
            sys.stdout.flush()
        time.sleep(600)
    said = threading.Lock()
    (job / "checkpoints").mkdir(exist_ok=True)
    threading.Thread(target=atomic_write, args=(job / "checkpoints" / "step-0000015.pt", slow),
                     daemon=True).start()
    ModelStore(home).write("crash-model", slow, kind="classifier", source="t", licence="t")
"""


def test_kill_9_of_server_and_worker_mid_training_then_resume_to_a_clean_store(
    tmp_path, tiny_models, clf_data, monkeypatch
):
    home = tmp_path / "home"
    # a served app: login required, so the worker must act as the job's owner by itself
    env = {
        "WORKBENCH_AUTH": "required",
        "WORKBENCH_DEVICE": "cpu",
        "WORKBENCH_FT_STEP_DELAY": "0.1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    base = tiny_models["classifier"]
    store = ModelStore(home)  # students tune store models (a folder needs an admin)
    store.write(
        "tiny-clf", lambda tmp: shutil.copytree(base, tmp, dirs_exist_ok=True),
        kind="classifier", source="test", licence="test",
    )  # fmt: skip
    spec = clf_spec("tiny-clf", clf_data, out="crash-model", epochs=10, checkpoint_every=5)
    server = python(SERVER, home, json.dumps(spec.to_dict()))
    job_id = server.stdout.readline().strip()
    assert job_id, "the server did not submit the job"

    with acting_as(ANA):
        jobs = JobStore(home)
        deadline = time.monotonic() + 60
        while (info := jobs.get(job_id)).step < 12:
            assert info.active and time.monotonic() < deadline, jobs.log_tail(job_id)
            time.sleep(0.05)
        assert info.status == "running" and info.owner == "ana"
        kill9(server.pid, info.pid)  # the server and its worker, at once
        server.wait(10)

        # "restart": a new store object on the same home, in a new session of the app
        jobs = JobStore(home)
        deadline = time.monotonic() + 10
        while (killed := jobs.get(job_id)).status != "interrupted":
            assert time.monotonic() < deadline, f"still {killed.status} after the kill"
            time.sleep(0.1)
    assert killed.resumable and killed.error is None  # interrupted, not silently failed
    assert 12 <= killed.step < killed.total_steps == 40
    with acting_as(ANA):
        reason = JobStore(home).run(job_id).error_message()
    assert "interrupted" in reason and "resume" in reason
    checkpoints = sorted(p.name for p in (killed.folder / "checkpoints").glob("step-*.pt"))
    assert checkpoints and checkpoints[-1] >= "step-0000010.pt"
    resume_from = int(checkpoints[-1][5:12])
    assert ModelStore(home).names() == {"tiny-clf"}

    # a writer killed halfway through a checkpoint and a store entry leaves temporaries
    half = python(HALF_WRITER, home, str(home), str(killed.folder))
    assert half.stdout.readline().strip() == "writing"
    assert half.stdout.readline().strip() == "writing"
    kill9(half.pid)
    half.wait(10)
    assert len(temp_leftovers(home)) == 2, temp_leftovers(home)

    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0")
    with acting_as(ANA):
        jobs = JobStore(home)
        clicked = time.time()
        jobs.resume(job_id)
        # time to resume: from the click to the first step trained by the new worker
        while not [r for r in jobs.metrics(job_id) if r["type"] == "train" and r["time"] > clicked]:
            assert time.time() - clicked < 60, jobs.log_tail(job_id)
            time.sleep(0.05)
        time_to_resume = time.time() - clicked
        done = jobs.wait(job_id, timeout_s=60)
        assert done.status == "completed", jobs.log_tail(job_id)
        log = jobs.log_tail(job_id, 200)
    print(
        f"\nkill -9 at step {killed.step}; resumed from step {resume_from} in {time_to_resume:.1f} s"
    )

    monkeypatch.delenv("WORKBENCH_AUTH")  # checks below as the local admin
    # the planned steps exactly once, continued from the checkpoint
    assert train_steps(JobStore(home), job_id) == list(range(1, 41))
    assert f"Resumed from step-{resume_from:07d}.pt" in log
    store = ModelStore(home)
    assert store.names() == {"tiny-clf", "crash-model"} and store.verify("crash-model")
    manifest = store.get("crash-model").manifest
    assert manifest.extra["steps"] == 40 and manifest.extra["owner"] == "ana"
    assert manifest.source == f"finetune:{job_id}"
    assert store.damaged() == []
    ledger = Ledger(home)
    record = [r for r in ledger._rows() if r["operation"] == "finetune"]
    assert len(record) == 1 and record[0]["user"] == "ana"
    assert ledger.verify().ok
    assert temp_leftovers(home) == []  # the checkpoint's and the store's, cleaned by the worker
    assert not (done.folder / "checkpoints").exists()


# --- the ledger ---------------------------------------------------------------------------

APPENDER = """
    import sys
    from engine.ledger import Ledger
    ledger = Ledger(sys.argv[1])
    prefix, i = sys.argv[2], 0
    while True:
        size = (0, 10, 2000, 60000)[i % 4]  # no result, small ones and a 500 kB one
        ledger.append(run_id=f"{prefix}-{i}", operation="generate", spec={"text": f"run {i}"},
                      result={"payload": list(range(size))} if size else None)
        i += 1
        if i == 3:
            print("writing", flush=True)
"""

# kill -9 at one exact point of append: inside the result write, or after the result file
# is in place and before the record is committed
AT_POINT = """
    import os, signal, sys
    from pathlib import Path
    import engine.ledger as module
    from engine.ledger import Ledger
    point = sys.argv[2]
    if point == "staging":
        real = Path.write_text
        def half(self, text, *a, **k):
            real(self, text[: len(text) // 2], *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        Path.write_text = half
    else:
        real = os.replace
        def placed(src, dst):
            real(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)
        module.os.replace = placed
    Ledger(sys.argv[1]).append(run_id=f"at-{point}", operation="generate", spec={"text": "x"},
                               result={"payload": list(range(5000))})
"""


def check_ledger(home: Path) -> tuple[int, int]:
    """Assert the ledger is intact, independently of ``verify``: every referenced result file
    exists, is whole JSON and matches its recorded sha256. Returns (records, orphan files)."""
    ledger = Ledger(home)  # a restart: opening it removes staged files of dead writers
    report = ledger.verify()
    assert report.ok, report.problems
    records = ledger._rows()
    referenced = set()
    for row in records:
        if row["result_path"] is None:
            continue
        path = ledger.root / row["result_path"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["result_sha256"], row["id"]
        assert "payload" in json.loads(data)  # whole, never half a file
        referenced.add(path.name)
    assert not list(ledger.staging.iterdir())  # no half-written staged result stays
    orphans = [p.name for p in ledger.results.iterdir() if p.name not in referenced]
    assert all(not name.startswith(".") for name in orphans), orphans
    return len(records), len(orphans)


def test_kill_9_while_appending_to_the_ledger_at_random_points(tmp_path):
    home = tmp_path / "home"
    rng = random.Random(11)
    counts = []
    for round_ in range(8):
        proc = python(APPENDER, home, str(home), f"r{round_}")
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.0, 0.4))
        kill9(proc.pid)
        proc.wait(10)
        records, _orphans = check_ledger(home)
        counts.append(records)
    assert counts == sorted(counts) and counts[-1] >= 8 * 3  # every round added records
    print(f"\n8 random kill points; records after each: {counts}")

    for point in ("staging", "placed"):  # the two windows a random kill rarely hits
        proc = python(AT_POINT, home, str(home), point)
        assert proc.wait(30) == -signal.SIGKILL
        records, orphans = check_ledger(home)
        assert records == counts[-1]  # the killed append recorded nothing
        ledger = Ledger(home)
        assert f"at-{point}" not in {r["id"] for r in ledger._rows()}
        if point == "placed":  # a whole result file of an unrecorded run: harmless, cleanable
            assert f"at-{point}.json" in {p.name for p in ledger.results.iterdir()}
            assert orphans >= 1

    ledger = Ledger(home)
    assert ledger.clean_leftovers() >= 1
    assert check_ledger(home) == (counts[-1], 0)
    # the same id again after the kill: recorded, with its own whole result file
    again = ledger.append(
        run_id="at-placed", operation="generate", spec={}, result={"payload": [1, 2, 3]}
    )
    assert json.loads(ledger.result_file(again).read_text()) == {"payload": [1, 2, 3]}
    assert ledger.verify().ok


def test_a_second_append_of_a_recorded_id_leaves_its_result_untouched(tmp_path):
    """A merged LoRA fine-tune records its job id again: refused, and the recorded result
    file must not be overwritten on the way (it was, before results were staged)."""
    ledger = Ledger(tmp_path)
    first = ledger.append(run_id="job", operation="finetune", spec={}, result={"p": "first"})
    with pytest.raises(InputError, match="already in the ledger"):
        ledger.append(run_id="job", operation="finetune", spec={}, result={"p": "second"})
    assert json.loads(ledger.result_file(first).read_text()) == {"p": "first"}
    assert ledger.verify().ok
    assert list(ledger.staging.iterdir()) == []


# kill -9 of the worker at an exact point of saving: right after the store entry is in place,
# or after result.json too, before the run is in the ledger
AT_SAVE = """
    import os, signal, sys
    import engine.finetune.train as train
    from engine.finetune import worker
    point = sys.argv[2]
    if point == "stored":
        real = train.ModelStore.write
        def write_then_die(self, *a, **k):
            real(self, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        train.ModelStore.write = write_then_die
    else:
        train.record_in_ledger = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    worker.main([sys.argv[1]])
"""


@pytest.mark.parametrize("point", ["stored", "result-written"])
def test_kill_9_while_saving_then_resume_finishes_the_books(
    point, tmp_path, tiny_models, clf_data, monkeypatch
):
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    jobs = JobStore(home)
    with acting_as(User("root", "admin")):
        job = jobs.submit(clf_spec(tiny_models["classifier"], clf_data, out="saved"), False)
    proc = python(AT_SAVE, home, job.id, point)
    assert proc.wait(120) == -signal.SIGKILL
    killed = jobs.get(job.id)
    assert killed.status == "interrupted"
    assert ModelStore(home).names() == {"saved"}  # the entry is whole: written atomically
    assert (killed.folder / "result.json").exists() == (point == "result-written")
    assert Ledger(home).records() == []

    started = set(jobs_module._children)
    done = jobs.resume(job.id)  # nothing to train again: the books are finished here
    assert done.status == "completed"
    assert set(jobs_module._children) == started
    result = jobs.result(job.id)
    store = ModelStore(home)
    assert result.model == "saved" and result.fingerprint == store.get("saved").manifest.fingerprint
    assert store.verify("saved") and temp_leftovers(home) == []
    assert not (killed.folder / "checkpoints").exists()  # the resume point is not needed
    [record] = Ledger(home).records()
    assert record.operation == "finetune" and record.user == "root"
    assert record.spec["job_id"] == job.id and Ledger(home).verify().ok
    with pytest.raises(InputError, match="only interrupted, failed or cancelled"):
        jobs.resume(job.id)
