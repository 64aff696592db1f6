"""Hostile input at the engine: upload names, sizes and clean-up; model names and folders only
under allowed roots and only for admins; unsafe opt-ins for admins only; presets per user;
text made inert for HTML and Markdown."""

from __future__ import annotations

import html
import os
import time

import pytest

from engine import access
from engine.access import AccessError, LimitError, User, acting_as
from engine.errors import InputError, ModelNotFoundError

ANA = User("ana", "student")
BEN = User("ben", "student")
ADMIN = User("root", "admin")
CSV = b"text,label\ngood movie,pos\nbad movie,neg\n"


@pytest.fixture(autouse=True)
def default_limits():
    access.set_limits(dict(access.DEFAULT_LIMITS))
    yield
    access.set_limits(None)


# --- uploads -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("../../x.csv", "x.csv"),
        ("..\\..\\windows\\x.csv", "x.csv"),
        ("/etc/passwd", "passwd"),
        ("a b/../c;rm -rf.csv", "c_rm_-rf.csv"),
        ("..", "upload"),
        ("x" * 300 + ".CSV", "x" * 76 + ".csv"),
        ("donn\u00e9es.jsonl", "donnees.jsonl"),
    ],
)
def test_upload_names_are_never_paths(given, expected):
    from engine.finetune.data import safe_name

    assert safe_name(given) == expected


def test_upload_is_stored_under_the_users_folder(tmp_path):
    from engine.finetune.data import read_table, store_upload

    home = tmp_path / "home"
    with acting_as(ANA):
        path = store_upload(home, "../../x.csv", CSV)
    folder = (home / "uploads" / "ana").resolve()
    assert path.resolve().parent == folder and path.name.endswith("-x.csv")
    assert not (tmp_path / "x.csv").exists() and not (home / "x.csv").exists()
    assert path.read_bytes() == CSV and len(read_table(path)) == 2
    with acting_as(BEN):
        other = store_upload(home, "x.csv", CSV)
    assert other.parent.name == "ben" and other != path


def test_upload_over_the_limit_is_refused_before_reading(tmp_path):
    from engine.finetune.data import check_upload_size, store_upload

    big = 200 * 2**20  # the 200 MiB CSV of the issue: refused from its size alone
    with acting_as(ANA):
        started = time.perf_counter()
        with pytest.raises(LimitError) as caught:
            check_upload_size(big, "../big.csv")
        assert time.perf_counter() - started < 0.5
        message = str(caught.value)
        assert "big.csv is 200.0 MiB" in message and "at most 16.0 MiB" in message
        assert "student" in message and "/" not in message.split(" is ")[0]
        with pytest.raises(LimitError):  # the bytes themselves: nothing is written
            store_upload(tmp_path, "big.csv", b"x" * (16 * 2**20 + 1))
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").rglob("*.csv"))
    with acting_as(ADMIN):
        check_upload_size(big, "big.csv")  # an admin's limit is 256 MiB


def test_upload_of_another_type_is_refused(tmp_path):
    from engine.finetune.data import store_upload

    with acting_as(ANA), pytest.raises(InputError, match="unsupported file type"):
        store_upload(tmp_path, "evil.py", b"print(1)")


def test_old_uploads_are_cleaned_up(tmp_path):
    from engine.finetune.data import store_upload

    paths = []
    with acting_as(ANA):
        for i in range(6):
            paths.append(store_upload(tmp_path, f"d{i}.csv", CSV + f"x{i},y\n".encode(), keep=3))
            os.utime(paths[-1], (1_000_000 + i, 1_000_000 + i))  # distinct, increasing times
    with acting_as(BEN):
        bens = store_upload(tmp_path, "b.csv", CSV, keep=3)
    left = sorted(p.name for p in (tmp_path / "uploads" / "ana").iterdir())
    assert left == sorted(p.name for p in paths[-3:])  # the three most recent
    assert bens.is_file()  # another user's uploads are not touched


def test_a_table_is_parsed_once_per_file(tmp_path, monkeypatch):
    from engine.finetune import data

    calls = []
    real = data.read_table
    monkeypatch.setattr(data, "read_table", lambda p, d=None: calls.append(p) or real(p, d))
    path = tmp_path / "t.csv"
    path.write_bytes(CSV)
    first = data.read_table_once(path)
    assert data.read_table_once(path) is first and len(calls) == 1
    path.write_bytes(CSV + b"fun plot,pos\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert len(data.read_table_once(path)) == 3 and len(calls) == 2


# --- model names and folders ---------------------------------------------------------------


def test_students_cannot_load_other_models_and_learn_nothing(tmp_path):
    from engine.catalog import resolve

    store = {"my-secret-model"}
    messages = set()
    with acting_as(ANA):
        assert resolve("smollm2-135m", store).source == "embedded"
        assert resolve("my-secret-model", store).source == "store"
        for name in ("/etc", "/no/such/folder", str(tmp_path), "org/model", "../../etc"):
            with pytest.raises(AccessError) as caught:
                resolve(name, store)
            messages.add(str(caught.value).replace(repr(name[:80]), "NAME"))
    assert len(messages) == 1  # the same message whatever exists on disk
    assert "my-secret-model" not in messages.pop()


def test_model_folders_only_under_the_roots(tmp_path, monkeypatch):
    from engine.catalog import resolve

    root, outside = tmp_path / "models", tmp_path / "outside"
    (root / "good").mkdir(parents=True)
    (outside / "model").mkdir(parents=True)
    (root / "link").symlink_to(outside / "model")  # a symlink out of the root
    monkeypatch.setenv("WORKBENCH_MODEL_ROOTS", str(root))
    with acting_as(ADMIN):
        assert resolve(str(root / "good"), set()).source == "local"
        errors = []
        for name in (str(outside / "model"), str(root / "link"), str(root / "missing"), "/etc"):
            with pytest.raises(ModelNotFoundError) as caught:
                resolve(name, {"secret"})
            errors.append(str(caught.value).replace(repr(name[:80]), "NAME"))
    assert len(set(errors)) == 1 and "secret" not in errors[0]


def test_login_required_without_roots_allows_no_folder(tmp_path, monkeypatch):
    from engine.catalog import resolve

    monkeypatch.delenv("WORKBENCH_MODEL_ROOTS", raising=False)
    monkeypatch.setenv("WORKBENCH_AUTH", "required")
    with acting_as(ADMIN), pytest.raises(ModelNotFoundError, match="allowed model roots"):
        resolve(str(tmp_path), set())
    monkeypatch.delenv("WORKBENCH_AUTH")
    assert resolve(str(tmp_path), set()).source == "local"  # the local admin, as before


def test_unsafe_opt_ins_need_an_admin(tmp_path):
    from engine.catalog import ModelRef
    from engine.loading import LoadOptions, checked_options

    folder = ModelRef(str(tmp_path), "local", str(tmp_path))
    unsafe = LoadOptions(allow_pickle=True, trust_remote_code=True)
    with acting_as(User("ina", "instructor")), pytest.raises(AccessError):
        checked_options(folder, unsafe)
    with acting_as(ADMIN):
        assert checked_options(folder, unsafe) == unsafe
    with acting_as(ANA):  # store and embedded models load safetensors only, for everyone
        assert checked_options(ModelRef("m", "store", "m"), unsafe) == LoadOptions()


def test_a_student_cannot_load_a_folder_through_the_workbench(tmp_path, tiny_models):
    from engine import Workbench

    wb = Workbench(home=tmp_path / "home", device="cpu")
    with acting_as(ANA), pytest.raises(AccessError):
        wb.load(str(tiny_models["llama"]))
    assert wb.loaded() == []


# --- presets -------------------------------------------------------------------------------


def test_presets_belong_to_their_user(tmp_path):
    from engine.generation import presets

    teacher = presets.Preset("Teacher demo", "Explain: {input}", "text", 32)
    with acting_as(ANA):
        presets.save_preset(tmp_path, teacher)
        assert "Teacher demo" in [p.name for p in presets.list_presets(tmp_path)]
    with acting_as(BEN):
        names = [p.name for p in presets.list_presets(tmp_path)]
        assert "Teacher demo" not in names and "Chat" in names  # built-ins are shared
        with pytest.raises(InputError):
            presets.get_preset(tmp_path, "Teacher demo")
        with pytest.raises(InputError):
            presets.delete_preset(tmp_path, "Teacher demo")
    with acting_as(ANA):
        assert presets.get_preset(tmp_path, "Teacher demo").template == "Explain: {input}"
    # the local user's existing file stays where it was, readable
    assert presets.list_presets(tmp_path)[-1].name != "Teacher demo"
    presets.save_preset(tmp_path, presets.Preset("Mine", "{input}"))
    assert (tmp_path / "presets.json").is_file()


# --- text helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["![p](http://127.0.0.1:1/x.png)", "<img src=x onerror=alert(1)>", "**b** _i_ `c` [l](u)"],
)
def test_text_html_and_markdown_literal_keep_text_inert(text):
    from engine.html import markdown_literal, text_html

    shown = text_html(text)
    assert html.unescape(shown) == text
    assert not any(c in shown for c in "<>[]()!*_`")
    literal = markdown_literal(text)
    assert all(f"\\{c}" in literal for c in "[]!<>*_`" if c in text)


def test_token_view_is_inert():
    from engine.generation.decoding import TokenStep
    from engine.generation.views import token_html

    steps = [
        TokenStep(1, "![p](http://h/x.png)", -0.1, ()),
        TokenStep(2, "<img src=x onerror=alert(1)>\n\n**b**", -0.2, ()),
    ]
    page = token_html(steps)
    assert "<img" not in page and "](" not in page and "\n" not in page


def test_listed_models_pass_and_others_need_an_admin():
    from engine.catalog import require_listed_or_manage

    with acting_as(ANA):
        require_listed_or_manage("smollm2-135m", set())
        require_listed_or_manage("ft-mine", {"ft-mine"})
        with pytest.raises(AccessError):
            require_listed_or_manage("/tmp/x", {"ft-mine"})
    with acting_as(ADMIN):
        require_listed_or_manage("/tmp/x", set())


def test_an_admins_folder_model_is_not_reachable_by_a_student(tmp_path, tiny_models):
    from engine import Workbench

    wb = Workbench(home=tmp_path / "home", device="cpu")
    with acting_as(ADMIN):
        wb.load(str(tiny_models["llama"]))
    with acting_as(ANA), pytest.raises(AccessError):
        wb.load(str(tiny_models["llama"]))
