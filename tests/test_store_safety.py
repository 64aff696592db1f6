"""The model store and the files it writes under concurrency, hostile input and faults."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.catalog import resolve
from engine.errors import InputError, ModelNotFoundError, StoreError
from engine.files import DiskError
from engine.locks import host_tag
from engine.store import ModelStore

REPO = Path(__file__).resolve().parents[1]


def fake_model(folder: Path, payload: bytes = b"weights") -> None:
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(payload)


def sha256_of_weights(folder: Path) -> str:
    """An independent fingerprint: sha256 over each weight file's name and bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


def python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, **kw)


def leftovers(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def stray_temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ---- cleanup never breaks a write in progress ---------------------------------------------


def test_cleanup_in_another_process_during_a_write_does_not_break_it(tmp_path):
    """The reported failure: `FileNotFoundError: ... models/.tmp-...` when another process
    (any `Workbench()`) ran `clean_leftovers()` while a model was being written."""
    store = ModelStore(tmp_path)
    cleaned = []

    def save(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        code = (
            "from engine.store import ModelStore; from pathlib import Path; "
            f"print(ModelStore(Path({str(tmp_path)!r})).clean_leftovers())"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
        )
        cleaned.append(int(out.stdout))
        (folder / "model.safetensors").write_bytes(b"weights")

    entry = store.write("demo", save, kind="x", source="t", licence="MIT")
    assert cleaned == [0]
    assert entry.manifest.fingerprint == sha256_of_weights(entry.path)
    assert store.verify("demo")
    assert leftovers(store) == []


WRITER = """
import sys, time
from pathlib import Path
from engine.store import ModelStore
def save(folder):
    (folder / "model.safetensors").write_bytes(b"x" * 4096)
    print("writing", flush=True)
    time.sleep(float(sys.argv[2]))
    (folder / "config.json").write_text("{}")
ModelStore(Path(sys.argv[1])).write("slow", save, kind="x", source="t", licence="MIT")
print("stored", flush=True)
"""


def start_writer(home: Path, sleep_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(home), str(sleep_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_live_writers_folder_is_kept_and_a_killed_ones_is_removed(tmp_path):
    store = ModelStore(tmp_path)
    live = start_writer(tmp_path, 2.0)
    killed = start_writer(tmp_path, 60.0)
    try:
        assert len(leftovers(store)) == 2
        assert store.clean_leftovers() == 0  # both owners alive: nothing touched
        assert len(leftovers(store)) == 2
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert store.clean_leftovers() == 1  # the killed writer's folder goes
        assert len(leftovers(store)) == 1
        assert live.stdout.readline().strip() == "stored"  # the live one finishes its write
        assert live.wait(30) == 0
    finally:
        for proc in (live, killed):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert store.names() == {"slow"} and store.verify("slow")
    assert leftovers(store) == []


def test_cleanup_skips_a_leftover_whose_entry_lock_is_held(tmp_path):
    store = ModelStore(tmp_path)
    dead = python("pass")
    dead.wait()
    stale = store.root / f".trash-demo-{dead.pid}-1-{host_tag()}-0123abcd"
    stale.mkdir()
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.lock("demo"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        assert store.clean_leftovers() == 0 and stale.exists()
    finally:
        release.set()
        thread.join(10)
    assert store.clean_leftovers() == 1 and not stale.exists()


def test_replacing_an_entry_never_leaves_a_moment_without_it(tmp_path):
    store = ModelStore(tmp_path)
    store.write(
        "demo", lambda f: fake_model(f, b"v0" * 50_000), kind="x", source="t", licence="MIT"
    )
    stop = threading.Event()
    failures: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                store.get("demo")  # checks the manifest's sizes against the files
            except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                failures.append(f"{type(exc).__name__}: {exc}")
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 21):
            payload = b"v" * (100_000 + i)  # each version has its own size
            store.write(
                "demo",
                lambda f, p=payload: fake_model(f, p),
                kind="x",
                source="t",
                licence="MIT",
                overwrite=True,
            )
    finally:
        stop.set()
        thread.join(10)
    assert failures == []
    assert reads[0] > 20
    assert (store.root / "demo" / "model.safetensors").read_bytes() == b"v" * 100_020
    assert store.verify("demo") and leftovers(store) == []


def test_removing_a_symlinked_entry_leaves_no_dangling_trash(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    fake_model(outside)
    store = ModelStore(tmp_path / "home")
    (store.root / "linked").symlink_to(outside, target_is_directory=True)
    store.remove("linked")
    assert leftovers(store) == [] and "linked" not in store.names()
    assert (outside / "model.safetensors").read_bytes() == b"weights"  # target untouched

    dead = python("pass")
    dead.wait()
    dangling = store.root / f".trash-linked-{dead.pid}-1-{host_tag()}-0123abcd"
    dangling.symlink_to(tmp_path / "gone")
    assert store.clean_leftovers() == 1
    assert not dangling.is_symlink()
    assert store.clean_leftovers() == 0  # really removed, not "removed" on every call


# ---- one name validator -------------------------------------------------------------------

HOSTILE_NAMES = [
    "../x",
    "/etc",
    "..",
    ".",
    "a/b",
    "a\\b",
    "nl\n",
    "x\x00y",
    "a" * 65,
    "a" * 300,
    "",
    ".hidden",
    "UPPER",
    "~root",
    " x",
    "a..b",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_every_store_entry_point_refuses_a_hostile_name(tmp_path, name):
    store = ModelStore(tmp_path / "home")
    calls = {
        "write": lambda: store.write(name, fake_model, kind="x", source="t", licence="MIT"),
        "get": lambda: store.get(name),
        "remove": lambda: store.remove(name),
        "verify": lambda: store.verify(name),
        "checked_fingerprint": lambda: store.checked_fingerprint(name),
        "lock": lambda: store.lock(name),
    }
    for what, call in calls.items():
        with pytest.raises(InputError, match="Invalid model name") as info:
            call()
        message = str(info.value)
        assert "\n" not in message and len(message) < 300, what
    assert list(store.root.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.parametrize("name", ["UPPER", "a" * 300, "x\x00y", ".hidden", "a..b"])
def test_catalog_never_resolves_a_hostile_name_to_the_store(name):
    with pytest.raises(ModelNotFoundError) as info:
        resolve(name, {name})
    assert "\n" not in str(info.value)


def test_cli_verify_and_remove_never_read_outside_the_store(tmp_path):
    from tests.conftest import run_cli

    home = tmp_path / "home"
    ModelStore(home)
    # A complete entry next to the store: `../x` would reach it from models/.
    bait = ModelStore(tmp_path / "bait")
    bait.write("x", fake_model, kind="x", source="t", licence="MIT")
    shutil.move(str(bait.root / "x"), str(home / "x"))
    for args in (("verify", "../x"), ("verify", "/etc"), ("remove", "../x")):
        out = run_cli("models", *args, home=home)
        assert out.returncode == 2, out.stdout
        assert "Invalid model name" in out.stderr and "Traceback" not in out.stderr
        assert out.stderr.strip().count("\n") == 0
    assert (home / "x" / "manifest.json").is_file()


# ---- manifests are validated on read ------------------------------------------------------


def _edit_manifest(edit):
    def damage(folder: Path) -> None:
        path = folder / "manifest.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return damage


def _raw_manifest(text: str):
    def damage(folder: Path) -> None:
        (folder / "manifest.json").write_text(text)

    return damage


DAMAGE = {
    "weight_sizes is a list": (_edit_manifest(lambda d: d.update(weight_sizes=[])), "weight_sizes"),
    "extra is a string": (_edit_manifest(lambda d: d.update(extra="oops")), "extra"),
    "unknown key": (_edit_manifest(lambda d: d.update(surprise=1)), "unknown keys surprise"),
    "missing key": (_edit_manifest(lambda d: d.pop("fingerprint")), "lacks fingerprint"),
    "other name": (_edit_manifest(lambda d: d.update(name="other")), "names 'other'"),
    "size is text": (
        _edit_manifest(lambda d: d.update(weight_sizes={"model.safetensors": "7"})),
        "byte count",
    ),
    "path in weight_sizes": (
        _edit_manifest(lambda d: d.update(weight_sizes={"../../x.safetensors": 7})),
        "not a weight file name",
    ),
    "fingerprint shape": (_edit_manifest(lambda d: d.update(fingerprint="md5:1")), "sha256"),
    "a JSON list": (_raw_manifest("[1, 2]"), "not an object"),
    "deep nesting": (_raw_manifest("[" * 100_000), "unreadable"),
}


def _not_utf8(folder: Path) -> None:
    (folder / "manifest.json").write_bytes(b'{"name": "\xff"}')


DAMAGE["not UTF-8"] = (_not_utf8, "unreadable")


def _manifest_outside(folder: Path) -> None:
    outside = folder.parent.parent / "outside.json"
    shutil.copy(folder / "manifest.json", outside)  # a valid manifest, but not in the store
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to(outside)


def _manifest_is_a_folder(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()


DAMAGE["manifest outside the store"] = (_manifest_outside, "outside the store")
DAMAGE["manifest is a folder"] = (_manifest_is_a_folder, "unreadable")


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_bad_manifest_is_listed_as_damaged_and_never_hides_the_rest(tmp_path, case):
    damage, reason = DAMAGE[case]
    store = ModelStore(tmp_path)
    store.write("good", fake_model, kind="x", source="t", licence="MIT")
    bad = store.write("bad", fake_model, kind="x", source="t", licence="MIT")
    damage(bad.path)
    assert [e.name for e in store.entries()] == ["good"]
    damaged = store.damaged()
    assert [d.name for d in damaged] == ["bad"]
    assert reason in damaged[0].reason and "\n" not in damaged[0].reason
    assert "workbench models remove bad" in damaged[0].reason
    with pytest.raises(StoreError, match="bad"):
        store.get("bad")


def test_a_folder_with_an_invalid_name_is_listed_as_damaged_on_one_line(tmp_path):
    store = ModelStore(tmp_path)
    store.write("good", fake_model, kind="x", source="t", licence="MIT")
    (store.root / "nl\n").mkdir()  # made by an older version whose name check used `$`
    (store.root / "UPPER").mkdir()
    assert store.names() == {"good"}
    assert [e.name for e in store.entries()] == ["good"]
    damaged = {d.name: d.reason for d in store.damaged()}
    assert set(damaged) == {"nl\n", "UPPER"}
    assert all("\n" not in reason and "not a valid entry" in reason for reason in damaged.values())


def test_workbench_catalog_and_models_list_survive_a_damaged_entry(tmp_path):
    from engine import Workbench
    from tests.conftest import run_cli

    home = tmp_path / "home"
    store = ModelStore(home)
    store.write("good", fake_model, kind="x", source="t", licence="MIT")
    bad = store.write("bad", fake_model, kind="x", source="t", licence="MIT")
    _edit_manifest(lambda d: d.update(weight_sizes=[]))(bad.path)
    names = {e.name for e in Workbench(home=home, device="cpu").catalog()}
    assert "good" in names and "bad" not in names
    out = run_cli("models", "list", "--json", home=home)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["good"]["damaged"] is None
    assert "weight_sizes" in rows["bad"]["damaged"]
    assert rows["smollm2-135m"]["kind"] == "causal-lm"


def test_a_weight_file_symlinked_outside_the_store_is_refused(tmp_path):
    store = ModelStore(tmp_path / "home")
    entry = store.write("demo", fake_model, kind="x", source="t", licence="MIT")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"weights")  # same bytes: only the symlink check can refuse it
    (entry.path / "model.safetensors").unlink()
    (entry.path / "model.safetensors").symlink_to(outside)
    with pytest.raises(StoreError, match="outside the store"):
        store.get("demo")
    assert [d.name for d in store.damaged()] == ["demo"]


def test_a_weight_file_missing_from_the_manifest_is_refused(tmp_path):
    store = ModelStore(tmp_path)
    entry = store.write("demo", fake_model, kind="x", source="t", licence="MIT")
    (entry.path / "extra.bin").write_bytes(b"pickle")
    with pytest.raises(StoreError, match="extra.bin not in its manifest"):
        store.get("demo")


# ---- fingerprints are checked, and the check is cached --------------------------------------


def test_checked_fingerprint_hashes_once_then_notices_any_change(tmp_path, monkeypatch):
    import engine.store as store_module

    calls = []
    real = store_module.fingerprint
    monkeypatch.setattr(store_module, "fingerprint", lambda f: calls.append(f) or real(f))
    store = ModelStore(tmp_path)
    store.write("demo", fake_model, kind="x", source="t", licence="MIT")
    calls.clear()
    assert store.checked_fingerprint("demo") == sha256_of_weights(store.root / "demo")
    assert calls == []  # the write seeded the cache: the first load does not hash again
    (store.root / ".verified.json").unlink()
    expected = sha256_of_weights(store.root / "demo")
    assert store.checked_fingerprint("demo") == expected
    assert store.checked_fingerprint("demo") == expected
    assert len(calls) == 1  # the second call used the cache
    weights = store.root / "demo" / "model.safetensors"
    before = weights.stat()
    weights.write_bytes(b"WEIGHTS")  # same size; then put the old mtime back
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(StoreError, match="failed its fingerprint check") as info:
        store.checked_fingerprint("demo")
    assert "\n" not in str(info.value)
    assert len(calls) == 2


def test_tampered_same_size_weights_fail_to_load(tmp_path, tiny_models):
    from engine import Workbench

    home = tmp_path / "home"
    store = ModelStore(home)
    entry = store.write(
        "tiny",
        lambda f: [shutil.copy(p, f) for p in tiny_models["llama"].iterdir()],
        kind="causal-lm",
        source="test",
        licence="MIT",
    )
    model = Workbench(home=home, device="cpu").load("tiny")
    assert model.info().fingerprint == sha256_of_weights(entry.path)
    weights = entry.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8) if data[-8:] != bytes(8) else b"\x01" * 8  # last tensor bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="failed its fingerprint check"):
        Workbench(home=home, device="cpu").load("tiny")


# ---- a full disk ends in one line and leaves nothing behind --------------------------------


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_saving_weights_is_a_disk_error(tmp_path):
    store = ModelStore(tmp_path)

    def save(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        enospc()

    with pytest.raises(DiskError, match="No space left") as info:
        store.write("demo", save, kind="x", source="t", licence="MIT")
    assert "\n" not in str(info.value)
    assert leftovers(store) == [] and store.names() == set()


def test_full_disk_while_writing_the_manifest_is_a_disk_error(tmp_path, monkeypatch):
    import engine.files

    store = ModelStore(tmp_path)
    monkeypatch.setattr(engine.files.os, "replace", enospc)
    with pytest.raises(DiskError, match="No space left"):
        store.write("demo", fake_model, kind="x", source="t", licence="MIT")
    monkeypatch.undo()
    assert leftovers(store) == [] and store.names() == set()
    assert stray_temp_files(tmp_path) == []


@pytest.mark.slow
def test_full_disk_during_a_conversion_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from engine.loading import materialize_embedded

    def full(*_a, **_k):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    store = ModelStore(tmp_path)
    with pytest.raises(DiskError, match="No space left") as info:
        materialize_embedded("minilm-l6", store)
    assert "\n" not in str(info.value)
    assert leftovers(store) == [] and store.names() == set()


def test_full_disk_while_saving_a_preset_keeps_the_old_file(tmp_path, monkeypatch):
    import engine.files
    from engine.generation.presets import Preset, list_presets, save_preset

    save_preset(tmp_path, Preset("Mine", "Say {input}"))
    before = (tmp_path / "presets.json").read_bytes()
    monkeypatch.setattr(engine.files.os, "replace", enospc)
    with pytest.raises(DiskError, match="No space left") as info:
        save_preset(tmp_path, Preset("Other", "Do {input}"))
    monkeypatch.undo()
    assert "\n" not in str(info.value)
    assert (tmp_path / "presets.json").read_bytes() == before
    assert stray_temp_files(tmp_path) == []
    assert [p.name for p in list_presets(tmp_path) if not p.builtin] == ["Mine"]


def test_result_save_is_atomic_and_full_disk_is_a_disk_error(tmp_path, monkeypatch):
    from dataclasses import dataclass

    import engine.files
    from engine.results import Result

    @dataclass(frozen=True)
    class Tiny(Result):
        value: int

    path = Tiny(1).save(tmp_path / "r.json")
    assert Tiny.load(path) == Tiny(1)
    monkeypatch.setattr(engine.files.os, "replace", enospc)
    with pytest.raises(DiskError, match="No space left") as info:
        Tiny(2).save(tmp_path / "r.json")
    monkeypatch.undo()
    assert "\n" not in str(info.value)
    assert Tiny.load(path) == Tiny(1)  # the old result is intact
    assert stray_temp_files(tmp_path) == []


# ---- presets: concurrent saves lose nothing -------------------------------------------------


def test_eight_threads_saving_presets_lose_none(tmp_path):
    from engine.generation.presets import Preset, list_presets, save_preset

    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            start.wait(10)
            for i in range(5):
                save_preset(tmp_path, Preset(f"t{t} p{i}", f"{t}-{i} {{input}}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    saved = {p.name: p.template for p in list_presets(tmp_path) if not p.builtin}
    assert saved == {f"t{t} p{i}": f"{t}-{i} {{input}}" for t in range(8) for i in range(5)}
    assert stray_temp_files(tmp_path) == []
