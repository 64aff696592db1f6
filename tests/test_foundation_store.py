import json
import os
import subprocess
import sys
import time

import pytest

from engine.errors import InputError, StoreError
from engine.locks import host_tag, owner_tag
from engine.store import ModelStore, fingerprint


def write_fake_model(folder, payload=b"weights"):
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "config.json").write_text("{}")


def test_write_creates_entry_with_manifest(tmp_path):
    store = ModelStore(tmp_path)
    entry = store.write("demo", write_fake_model, kind="encoder", source="test", licence="MIT")
    assert entry.manifest.fingerprint == fingerprint(entry.path)
    assert entry.manifest.fingerprint.startswith("sha256:")
    assert entry.manifest.weight_sizes == {"model.safetensors": 7}
    assert store.names() == {"demo"}
    assert store.verify("demo")


def test_fingerprint_changes_with_weights(tmp_path):
    store = ModelStore(tmp_path)
    a = store.write("a", write_fake_model, kind="x", source="t", licence="MIT")
    b = store.write(
        "b", lambda f: write_fake_model(f, b"other!!"), kind="x", source="t", licence="MIT"
    )
    assert a.manifest.fingerprint != b.manifest.fingerprint


def test_crash_during_write_leaves_nothing(tmp_path):
    store = ModelStore(tmp_path)

    def crash(folder):
        write_fake_model(folder)
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        store.write("half", crash, kind="x", source="t", licence="MIT")
    assert store.names() == set()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


def test_pickled_weights_are_refused(tmp_path):
    store = ModelStore(tmp_path)

    def pickled(folder):
        (folder / "pytorch_model.bin").write_bytes(b"pickle")

    with pytest.raises(StoreError, match="safetensors"):
        store.write("pkl", pickled, kind="x", source="t", licence="MIT")
    assert store.names() == set()


def test_leftovers_from_a_dead_process_are_cleaned(tmp_path):
    store = ModelStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (store.root / f".tmp-ghost-{dead.pid}-12345-{host_tag()}-0123abcd").mkdir()
    mine = store.root / f".tmp-mine-{owner_tag()}-0123abcd"  # this process: alive
    mine.mkdir()
    legacy = store.root / ".tmp-ghost-123"  # no owner recorded: removed only when old
    legacy.mkdir()
    other_host = "000000" if host_tag() != "000000" else "111111"
    foreign = store.root / f".tmp-far-{dead.pid}-12345-{other_host}-0123abcd"
    foreign.mkdir()  # a pid on another machine says nothing here: also only when old
    assert store.clean_leftovers() == 1
    assert sorted(p.name for p in store.root.iterdir() if p.is_dir()) == sorted(
        [mine.name, legacy.name, foreign.name]
    )
    hours_ago = time.time() - 2 * 3600
    os.utime(legacy, (hours_ago, hours_ago))
    os.utime(foreign, (hours_ago, hours_ago))
    assert store.clean_leftovers() == 2
    assert not legacy.exists() and not foreign.exists() and mine.exists()
    assert store.names() == set()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "unreadable manifest"),
        (lambda p: (p / "model.safetensors").write_bytes(b"w"), "corrupt"),
        (lambda p: (p / "model.safetensors").unlink(), "corrupt"),
    ],
)
def test_corrupt_entries_give_one_line_errors(tmp_path, damage, message):
    store = ModelStore(tmp_path)
    entry = store.write("demo", write_fake_model, kind="x", source="t", licence="MIT")
    damage(entry.path)
    with pytest.raises(StoreError, match=message) as info:
        store.get("demo")
    assert "\n" not in str(info.value)
    assert "workbench models remove demo" in str(info.value)
    assert store.entries() == []


def test_verify_detects_same_size_tampering(tmp_path):
    store = ModelStore(tmp_path)
    entry = store.write("demo", write_fake_model, kind="x", source="t", licence="MIT")
    (entry.path / "model.safetensors").write_bytes(b"WEIGHTS")
    assert not store.verify("demo")


def test_names_are_validated_and_not_overwritten(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(InputError, match="Invalid model name"):
        store.write("../escape", write_fake_model, kind="x", source="t", licence="MIT")
    store.write("demo", write_fake_model, kind="x", source="t", licence="MIT")
    with pytest.raises(InputError, match="already"):
        store.write("demo", write_fake_model, kind="x", source="t", licence="MIT")
    store.write(
        "demo",
        lambda f: write_fake_model(f, b"new"),
        kind="x",
        source="t",
        licence="MIT",
        overwrite=True,
    )
    assert json.loads((store.root / "demo" / "manifest.json").read_text())["weight_sizes"] == {
        "model.safetensors": 3
    }
    store.remove("demo")
    assert store.names() == set()
