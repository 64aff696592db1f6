"""Fine-tuning jobs belong to their user, and train in one lane: who may see and control a
job, per-user limits, the line of queued jobs (positions, priority, cancel) and the finishing
worker starting the next job by itself. Real jobs on a tiny classifier."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from engine.access import AccessError, LimitError, User, acting_as
from engine.finetune import JobStore
from engine.finetune.jobs import ordinal
from engine.ledger import Ledger
from engine.store import ModelStore
from tests.conftest import REPO
from tests.test_finetune_jobs import clf_spec, train_steps

ANA = User("ana", "student")
BEN = User("ben", "student")
IDA = User("ida", "instructor")
AUDREY = User("audrey", "auditor")
ADMIN = User("root", "admin")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    monkeypatch.delenv("WORKBENCH_MAX_JOBS", raising=False)
    monkeypatch.delenv("WORKBENCH_AUTH", raising=False)
    return tmp_path / "home"


def stored_base(home, folder) -> str:
    """The tiny classifier as a store entry (students may tune store models, not folders)."""
    import shutil

    store = ModelStore(home)
    if BASE not in store.names():
        store.write(
            BASE, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True),
            kind="classifier", source="test", licence="test",
        )  # fmt: skip
    return BASE


BASE = "tiny-clf"


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 103, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "103rd", "111th",
    ]  # fmt: skip


def test_jobs_are_seen_and_controlled_by_their_owner_and_the_roles_that_may(
    home, tiny_models, clf_data
):
    jobs = JobStore(home)
    with acting_as(ANA):
        mine = jobs.submit(
            clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="ana-model"), False
        )
    assert mine.owner == "ana"
    with acting_as(BEN):
        theirs = jobs.submit(
            clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="ben-model"), False
        )

    # students see only their own jobs; reading another's is refused, whatever the call
    with acting_as(BEN):
        assert [j.id for j in jobs.list()] == [theirs.id]
        for read in (jobs.get, jobs.metrics, jobs.log_tail, jobs.result, jobs.spec, jobs.run):
            with pytest.raises(AccessError, match=f"Job {mine.id} belongs to another user"):
                read(mine.id)
        for act in (jobs.cancel, jobs.resume, jobs.delete, jobs.merge, jobs.launch):
            with pytest.raises(AccessError, match="only its owner or an admin"):
                act(mine.id)
        with pytest.raises(AccessError):
            jobs.set_status(mine.id, "failed", "forged")
        # the store name another user's job produces is refused without naming that job
        with pytest.raises(Exception, match="Another user's job is already producing 'ana-model'"):
            jobs.submit(
                clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="ana-model"),
                False,
            )
    assert JobStore(home).get(mine.id).status == "interrupted"  # (local admin) untouched

    # instructors and auditors read every job but control only their own
    for reader in (IDA, AUDREY):
        with acting_as(reader):
            assert {j.id for j in jobs.list()} == {mine.id, theirs.id}
            assert jobs.get(mine.id).owner == "ana" and jobs.spec(mine.id).out == "ana-model"
            with pytest.raises(AccessError, match="only its owner or an admin"):
                jobs.delete(mine.id)
    with acting_as(AUDREY), pytest.raises(AccessError, match="Auditors may not fine-tune"):
        jobs.submit(
            clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="audit"), False
        )

    # admins control every job; the owner controls their own
    with acting_as(ADMIN):
        jobs.delete(theirs.id)
    with acting_as(ANA):
        jobs.delete(mine.id)
        assert jobs.list() == []
    assert sorted(p.name for p in jobs.root.iterdir() if p.is_dir()) == []


def test_with_login_required_nobody_reads_or_submits_jobs(home, tiny_models, clf_data, monkeypatch):
    monkeypatch.setenv("WORKBENCH_AUTH", "required")
    jobs = JobStore(home)
    with acting_as(ANA):
        job = jobs.submit(
            clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="ana-model"), False
        )
    with pytest.raises(AccessError, match="Log in first"):
        jobs.list()
    with pytest.raises(AccessError, match="Log in first"):
        jobs.get(job.id)
    with pytest.raises(AccessError, match="Log in first"):
        jobs.submit(
            clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="anon"), False
        )


def test_an_older_job_table_gets_owners_local(home):
    """A jobs.db from before owners existed: its rows become the local user's."""
    root = home / "jobs"
    root.mkdir(parents=True)
    db = sqlite3.connect(root / "jobs.db")
    db.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, "
        "status TEXT NOT NULL, base TEXT NOT NULL, task TEXT NOT NULL, out TEXT NOT NULL, "
        "spec TEXT NOT NULL, pid INTEGER, pid_started REAL, error TEXT)"
    )
    db.execute(
        "INSERT INTO jobs VALUES ('old', 1.0, 2.0, 'completed', 'b', 'classification', 'o', "
        "'{}', NULL, NULL, NULL)"
    )
    db.commit()
    db.close()
    jobs = JobStore(home)
    [old] = jobs.list()  # the local admin
    assert (old.id, old.owner, old.status, old.position) == ("old", "local", "completed", None)
    assert jobs.owner("old") == User("local", "admin")
    with acting_as(ANA):
        assert jobs.list() == []  # another user's (the laptop's) job
    with acting_as(IDA):
        assert [j.id for j in jobs.list()] == ["old"]


def running_rows(home) -> list[str]:
    """Ids of rows that hold a process now (read straight from the table, no JobStore)."""
    db = sqlite3.connect(home / "jobs" / "jobs.db")
    try:
        rows = db.execute(
            "SELECT id FROM jobs WHERE status IN ('queued', 'running') AND pid IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return [r[0] for r in rows]


def test_the_lane_queues_jobs_by_priority_and_the_finishing_worker_starts_the_next(
    home, tiny_models, clf_data, monkeypatch
):
    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0.15")
    jobs = JobStore(home)
    assert jobs.max_jobs() == 1

    def spec(out: str):
        return clf_spec(
            stored_base(home, tiny_models["classifier"]), clf_data, out=out, max_steps=12
        )

    first = jobs.submit(spec("lane-first"))  # local admin: takes the only slot
    assert first.active and first.position is None
    with acting_as(ANA):
        ana = jobs.submit(spec("lane-ana"))
        assert (ana.status, ana.position, ana.status_label) == ("queued", 1, "queued: 1st in line")
        with pytest.raises(LimitError, match="A student may have at most 1 fine-tuning job"):
            jobs.submit(spec("lane-ana-2"))  # one job queued or running per student
    with acting_as(BEN):
        ben = jobs.submit(spec("lane-ben"))
        assert ben.position == 2 and ben.status_label == "queued: 2nd in line"
        assert "2nd in line" in ben.message
    with acting_as(IDA):
        ida = jobs.submit(spec("lane-ida"))  # instructors go first
        assert ida.position == 1
        extra = jobs.submit(spec("lane-ida-2"))  # an instructor may hold two
        assert extra.position == 2
        snap = jobs.run(extra.id).snapshot()
        assert snap.state == "waiting" and "2nd in line" in snap.message and not snap.finished
        jobs.cancel(extra.id)  # leaves the line at once, never started
        gone = jobs.get(extra.id)
        assert gone.status == "cancelled" and "never started" in gone.error
        assert not (gone.folder / "state.json").exists() and gone.pid is None
    with acting_as(ANA):
        assert [(j.id, j.position) for j in jobs.line()] == [(ana.id, 2)]  # only her own
        assert jobs.get(ana.id).position == 2
    assert [(j.id, j.position) for j in jobs.line()] == [(ida.id, 1), (ana.id, 2), (ben.id, 3)]
    with acting_as(ANA), pytest.raises(AccessError, match="Students may not"):
        jobs.set_max_jobs(2)

    # nobody reads the store now: the first job's worker, finishing, starts the next one
    deadline = time.monotonic() + 90
    while not (jobs.folder(ida.id) / "state.json").exists():
        assert time.monotonic() < deadline, "the next job never started"
        assert len(running_rows(home)) <= 1
        time.sleep(0.1)
    assert json.loads((jobs.folder(first.id) / "result.json").read_text())["model"]
    assert running_rows(home) == [ida.id]

    # an admin opens a second slot: the next in line starts at once, the lane never exceeds 2
    assert jobs.set_max_jobs(2) == 2
    assert jobs.get(ana.id).position is None and jobs.get(ben.id).position == 1
    seen = set()
    while any(jobs.get(j.id).active for j in (ida, ana, ben)):
        holding = running_rows(home)
        assert len(holding) <= 2, holding
        seen.add(tuple(sorted(holding)))
        assert time.monotonic() < deadline + 60, "the lane did not finish"
        time.sleep(0.1)
    assert tuple(sorted([ida.id, ana.id])) in seen  # two trained at once

    for job in (first, ida, ana, ben):
        info = jobs.get(job.id)
        assert info.status == "completed", jobs.log_tail(job.id)
        assert (info.folder / "log.txt").read_text().count("starting job") == 1
        assert train_steps(jobs, job.id) == list(range(1, 13))
    starts = {j.id: jobs.metrics(j.id)[0]["time"] for j in (first, ida, ana, ben)}
    ends = {j.id: jobs.metrics(j.id)[-1]["time"] for j in (first, ida, ana, ben)}
    assert ends[first.id] < starts[ida.id] and ends[first.id] < starts[ana.id]  # one slot then
    assert min(ends[ida.id], ends[ana.id]) < starts[ben.id]  # ben waited for a free slot

    # each model and ledger record belongs to the job's owner
    store = ModelStore(home)
    owners = {store.get(f"lane-{who}").manifest.extra["owner"] for who in ("ana", "ben", "ida")}
    assert owners == {"ana", "ben", "ida"}
    assert store.get("lane-first").manifest.extra["owner"] == "local"
    users = {json.loads(r["spec"])["out"]: r["user"] for r in Ledger(home)._rows()}
    assert users == {
        "lane-first": "local", "lane-ida": "ida", "lane-ana": "ana", "lane-ben": "ben",
    }  # fmt: skip
    assert jobs.set_max_jobs(None) == 1  # back to WORKBENCH_MAX_JOBS / the default


# --- the Fine-tune page -------------------------------------------------------------------

HOLDER = """
    import sys, time
    from engine.finetune import JobStore
    JobStore(sys.argv[1]).attach(sys.argv[2])  # a worker started by hand holds the slot
    print("holding", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lane_held(home, job_id: str):
    """A process attached to job ``job_id`` holds its fine-tuning slot until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(home), job_id],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.kill()
        holder.wait(10)


def test_page_shows_a_user_their_jobs_their_place_in_line_and_only_their_buttons(
    home, tiny_models, clf_data, monkeypatch
):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from engine.auth import UserStore
    from tests.test_auth_page import PASSWORD, _log_in

    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_AUTH", "required")
    jobs = JobStore(home)
    with acting_as(ADMIN):
        users = UserStore(home)
        users.add("ana", "student", PASSWORD)
        users.add("ida", "instructor", PASSWORD)
        held = jobs.submit(
            clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="held"), False
        )
    try:
        with lane_held(home, held.id):
            with acting_as(ANA):
                mine = jobs.submit(
                    clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="page-ana")
                )
            with acting_as(BEN):
                theirs = jobs.submit(
                    clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="page-ben")
                )
            assert (mine.position, theirs.position) == (1, 2)

            st.cache_resource.clear()
            at = AppTest.from_file("../workbench/app.py", default_timeout=120).run()
            _log_in(at, "ana", PASSWORD)
            at.switch_page("../pages/finetune.py").run()
            assert not at.exception, at.exception
            assert at.selectbox(key="ft_job").options == [
                f"{mine.id} · page-ana · queued: 1st in line"
            ]
            assert any("**queued: 1st in line**" in m.value for m in at.markdown)
            keys = {b.key for b in at.button}
            assert f"cancel_{mine.id}" in keys and f"cancel_{theirs.id}" not in keys
            at.button(key=f"cancel_{mine.id}").click().run()  # leaves the line
            assert not at.exception, at.exception
            assert any("**cancelled**" in m.value for m in at.markdown)
            assert f"resume_{mine.id}" in {b.key for b in at.button}

            st.cache_resource.clear()
            at = AppTest.from_file("../workbench/app.py", default_timeout=120).run()
            _log_in(at, "ida", PASSWORD)
            at.switch_page("../pages/finetune.py").run()
            assert not at.exception, at.exception
            options = at.selectbox(key="ft_job").options
            assert options[0] == f"{theirs.id} · page-ben · queued: 1st in line"  # ben moved up
            assert {o.split(" · ")[0] for o in options} == {held.id, mine.id, theirs.id}
            assert any("by ben" in m.value for m in at.markdown)
            keys = {b.key for b in at.button}  # instructors read every job, control none of these
            assert not {k for k in keys if k and k.startswith(("cancel_", "resume_"))}, keys
    finally:
        with acting_as(ADMIN):
            jobs.cancel(theirs.id)  # nothing left to start once the slot frees
        st.cache_resource.clear()


def test_cli_status_shows_the_place_in_line_and_max_jobs_opens_slots(
    home, tiny_models, clf_data, monkeypatch, capsys
):
    from workbench.cli import main as cli

    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    jobs = JobStore(home)
    held = jobs.submit(
        clf_spec(stored_base(home, tiny_models["classifier"]), clf_data, out="held"), False
    )
    with lane_held(home, held.id):
        args = ["finetune", "--base", str(tiny_models["classifier"]), "--task", "classification",
                "--data", str(clf_data), "--out", "cli-queued", "--no-wait", "--json"]  # fmt: skip
        assert cli(args) == 0
        captured = capsys.readouterr()
        queued = json.loads(captured.out)
        assert (queued["status"], queued["position"]) == ("queued", 1)
        assert f"job {queued['id']} queued: 1st in line" in captured.err
        assert cli(["finetune", "--status", queued["id"]]) == 1  # not completed (yet)
        assert f"job {queued['id']} queued: 1st in line:" in capsys.readouterr().err
        assert cli(["finetune", "--status", held.id, "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["status"] == "running"

        with acting_as(ANA):  # a student may not change the lane
            assert cli(["finetune", "--max-jobs", "2"]) == 2
        assert "Students may not" in capsys.readouterr().err
        assert cli(["finetune", "--max-jobs", "2"]) == 0  # the local admin
        assert "up to 2 fine-tuning job(s)" in capsys.readouterr().err
        started = jobs.get(queued["id"])
        assert started.position is None and started.active  # took the new slot at once
        jobs.cancel(queued["id"])
        assert jobs.wait(queued["id"], timeout_s=60).status == "cancelled"
    assert cli(["finetune", "--max-jobs", "0"]) == 0 and jobs.max_jobs() == 1
