"""Per-user isolation and roles, checked in the engine (not only in the pages).

Two students, an instructor, an auditor and an admin share one ``Workbench`` (one process, one
cached model): nobody sees another's runs or notebooks unless a role or a share allows it, and
a role that may not do something is refused by the engine itself.
"""

from __future__ import annotations

import pytest

from engine import access, runs
from engine.access import AccessError, User, acting_as
from engine.errors import InputError
from engine.generation import GenerationSettings
from engine.notebooks import cell_readable, cell_result

ANA = User("ana", "student")
BEN = User("ben", "student")
TEA = User("tea", "instructor")
AUD = User("aud", "auditor")
ADMIN = User("root", "admin")
GREEDY = GenerationSettings(max_new_tokens=3, greedy=True)


@pytest.fixture
def wb(workbench, tiny_models):
    # The tiny model is a folder: loading it is an admin's act; afterwards every user runs it
    # through the shared handle (as pages do with the model picked in the sidebar).
    with acting_as(ADMIN):
        workbench.tiny = workbench.load(str(tiny_models["llama"]))
    return workbench


def generate(wb, user: User, prompt: str):
    with acting_as(user):
        run = wb.tiny.start_generation(prompt, GREEDY)
    result = run.wait(60)
    return run, result


def ids(records) -> set[str]:
    return {r.id for r in records}


def test_runs_belong_to_their_user_and_others_cannot_read_them(wb):
    run_a, _ = generate(wb, ANA, "ana's secret prompt")
    run_b, _ = generate(wb, BEN, "ben's prompt")
    with acting_as(ANA):
        assert ids(wb.ledger.records()) == {run_a.id}
        assert wb.ledger.get(run_a.id).user == "ana"
        with pytest.raises(InputError, match="No run"):
            wb.ledger.get(run_b.id)
        assert wb.ledger.records(text="ben") == []
    with acting_as(BEN):
        assert ids(wb.ledger.records()) == {run_b.id}
        with pytest.raises(InputError, match="No run"):
            wb.ledger.get(run_a.id)
    for reader in (TEA, AUD, ADMIN):  # roles that read the whole class's runs
        with acting_as(reader):
            assert ids(wb.ledger.records()) == {run_a.id, run_b.id}
            assert {r.user for r in wb.ledger.records()} == {"ana", "ben"}
            assert ids(wb.ledger.records(user="ben")) == {run_b.id}


def test_the_engine_refuses_what_a_role_may_not_do(wb, tiny_models, monkeypatch):
    with acting_as(AUD), pytest.raises(AccessError, match="Auditors may not run models"):
        wb.tiny.start_generation("hello", GREEDY)
    with acting_as(ANA):
        with pytest.raises(AccessError, match="loading from a folder or the hub needs an admin"):
            wb.load(str(tiny_models["bert"]))
        with pytest.raises(AccessError, match="may not"):
            wb.unload(wb.tiny.name)
        with pytest.raises(AccessError, match="may not"):
            wb.notebooks.share(wb.notebooks.create("mine").id)
    with acting_as(AUD), pytest.raises(AccessError, match="may not create or change notebooks"):
        wb.notebooks.create("audit notes")
    # With login required, nobody logged in can start anything.
    monkeypatch.setenv("WORKBENCH_AUTH", "required")
    with pytest.raises(AccessError, match="Log in"):
        wb.tiny.start_generation("hello", GREEDY)
    with pytest.raises(AccessError, match="Log in"):
        runs.start("generate", lambda ctx: None)
    with acting_as(ANA):  # a logged-in student still can
        assert wb.tiny.start_generation("hello", GREEDY).wait(60).tokens


def test_an_auditor_reproduces_a_students_run_but_cannot_run_new_work(wb):
    from engine.reproduce import reproduce

    run_a, _ = generate(wb, ANA, "The capital of France is")
    with acting_as(AUD):
        verdict = reproduce(wb, run_a.id)
        assert verdict.match, verdict.differences
        rerun = wb.ledger.get(verdict.new_run_id)
        assert rerun.user == "aud"  # the re-run is the auditor's own record
    with acting_as(BEN), pytest.raises(InputError, match="No run"):
        reproduce(wb, run_a.id)  # a student cannot re-run (and so read) another's run


def test_notebooks_are_private_until_an_instructor_pushes_one(wb):
    store = wb.notebooks
    with acting_as(ANA):
        private = store.create("ana's notebook")
    with acting_as(BEN):
        assert private.id not in {i.id for i in store.list()}
        with pytest.raises(InputError, match="No notebook"):
            store.get(private.id)
        with pytest.raises(InputError, match="No notebook"):
            store.rename(private.id, "mine now")
        with pytest.raises(InputError, match="No notebook"):
            store.delete(private.id)
    with acting_as(ANA):
        assert store.get(private.id).name == "ana's notebook"  # untouched

    # The instructor runs an example and pushes it to the class.
    run_t, result_t = generate(wb, TEA, "Once upon a time")
    with acting_as(TEA):
        from engine.notebooks import cells_from_runs

        lesson = store.create("Lesson 1")
        cells_from_runs(wb, lesson.id, [run_t.id])
        store.share(lesson.id)
    with acting_as(BEN):
        infos = {i.id: i for i in store.list()}
        assert infos[lesson.id].shared and infos[lesson.id].owner == "tea"
        book = store.get(lesson.id)
        cell = book.cells[0]
        assert cell_readable(wb, cell, book.owner)
        assert cell_result(wb, cell, book.owner).text == result_t.text
        with pytest.raises(InputError, match="No run"):
            wb.ledger.get(run_t.id)  # the run itself stays private outside the notebook
        with pytest.raises(AccessError, match="belongs to tea: make a copy"):
            store.rename(lesson.id, "hijacked")
        with pytest.raises(AccessError, match="belongs to tea"):
            store.delete_cell(lesson.id, cell.id)
        copy = store.duplicate(lesson.id)
        assert copy.owner == "ben" and not copy.shared
        store.rename(copy.id, "ben's copy")  # the copy is ben's to change
    with acting_as(TEA):
        assert store.get(lesson.id).name == "Lesson 1"
        assert store.get(copy.id).name == "ben's copy"  # instructors read the class's work


def test_a_cell_cannot_reveal_a_third_users_run(wb):
    """A notebook shows its owner's runs to its readers, never someone else's: a student who
    imports a notebook whose cell points at another student's run id sees nothing."""
    run_a, _ = generate(wb, ANA, "ana's private text")
    with acting_as(BEN):
        book = wb.notebooks.create("probe")
        data = book.to_dict()
        data["cells"] = [{"id": "aaaaaaaaaaaa", "kind": "generate", "spec": {}, "run_id": run_a.id}]
        forged = wb.notebooks.import_dict({"notebook": data, "runs": {}})
        cell = wb.notebooks.get(forged.id).cells[0]
        assert forged.owner == "ben"
        assert not cell_readable(wb, cell, forged.owner)
        assert cell_result(wb, cell, forged.owner) is None


def test_a_run_acts_as_its_starter_on_its_worker_thread(wb):
    seen = {}

    def work(ctx):
        seen["user"] = access.current_user()
        return 1

    with acting_as(BEN):
        run = runs.start("score", work)
    run.wait(10)
    assert seen["user"] == BEN and run.user == BEN
    assert access.acting_user_or_none() is None  # nothing leaked into this thread


def test_a_collect_link_opens_only_its_cell_for_a_student(wb):
    with acting_as(TEA):
        book = wb.notebooks.create("Class data")
        note = wb.notebooks.add_cell(book.id, "markdown", {"text": "teacher's private note"})
        collect = wb.notebooks.add_cell(book.id, "collect", {"labels": ["pos", "neg"]})
    with acting_as(BEN):
        assert wb.notebooks.collect_cell(book.id, collect.id).spec["labels"] == ["pos", "neg"]
        with pytest.raises(InputError, match="not a data collection"):
            wb.notebooks.collect_cell(book.id, note.id)
        with pytest.raises(InputError, match="No notebook"):
            wb.notebooks.get(book.id)
