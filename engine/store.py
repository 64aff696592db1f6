"""The model store: saved models under ``$WORKBENCH_HOME/models/<name>/``.

Each entry is a Hugging Face folder (config, safetensors weights, tokenizer) plus
``manifest.json`` with the weights' sha256 fingerprint, source and licence. Writes are atomic:
everything is written to a temporary folder which is renamed into place only when complete,
so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from engine.errors import InputError, StoreError

MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def workbench_home() -> Path:
    """``$WORKBENCH_HOME`` or ``~/.cache/llm-workbench``."""
    return Path(os.environ.get("WORKBENCH_HOME") or "~/.cache/llm-workbench").expanduser()


def weight_files(folder: Path) -> list[Path]:
    """Weight files of a model folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def fingerprint(folder: Path) -> str:
    """sha256 over the weight files' names and bytes, as ``sha256:<hex>``."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What the store knows about one entry."""

    name: str
    kind: str
    source: str
    licence: str
    fingerprint: str
    weight_sizes: dict[str, int]
    created: float = field(default_factory=time.time)
    base_model: str | None = None
    base_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StoreEntry:
    """A store entry: its folder and manifest."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def size_bytes(self) -> int:
        return sum(self.manifest.weight_sizes.values())


def validate_name(name: str) -> str:
    """Store names are lower-case, short and path-safe."""
    if not _NAME.match(name):
        raise InputError(
            f"Invalid model name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-'."
        )
    return name


class ModelStore:
    """Saved models on disk. Safe to use from several threads and processes."""

    def __init__(self, home: Path | None = None) -> None:
        self.root = (home or workbench_home()) / "models"
        self.root.mkdir(parents=True, exist_ok=True)

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def entries(self) -> list[StoreEntry]:
        """Readable entries, sorted by name; corrupt ones are skipped (``get`` explains them)."""
        found = []
        for name in sorted(self.names()):
            try:
                found.append(self.get(name))
            except StoreError:
                continue
        return found

    def get(self, name: str) -> StoreEntry:
        """The entry, checked cheaply (manifest readable, weight files present, sizes match)."""
        folder = self.root / name
        fix = f"remove it with `workbench models remove {name}` and create it again"
        try:
            raw = json.loads((folder / MANIFEST).read_text())
            manifest = Manifest(**raw)
        except FileNotFoundError as exc:
            raise StoreError(f"Store entry {name!r} has no manifest: {fix}.") from exc
        except (json.JSONDecodeError, TypeError) as exc:
            raise StoreError(f"Store entry {name!r} has an unreadable manifest: {fix}.") from exc
        for file, size in manifest.weight_sizes.items():
            path = folder / file
            if not path.is_file() or path.stat().st_size != size:
                raise StoreError(
                    f"Store entry {name!r} is corrupt ({file} missing or truncated): {fix}."
                )
        return StoreEntry(folder, manifest)

    def verify(self, name: str) -> bool:
        """Recompute the fingerprint (reads every weight byte) and compare with the manifest."""
        entry = self.get(name)
        return fingerprint(entry.path) == entry.manifest.fingerprint

    def lock(self, name: str) -> FileLock:
        """A cross-process lock for creating ``name`` (one conversion at a time)."""
        return FileLock(str(self.root / f".{name}.lock"))

    def write(
        self,
        name: str,
        save: Callable[[Path], None],
        *,
        kind: str,
        source: str,
        licence: str,
        base_model: str | None = None,
        base_fingerprint: str | None = None,
        extra: dict | None = None,
        overwrite: bool = False,
    ) -> StoreEntry:
        """Create an entry atomically: ``save(tmp_folder)`` writes the model, then it is renamed.

        Refuses pickled weights: ``save`` must write safetensors.
        """
        validate_name(name)
        target = self.root / name
        if target.exists() and not overwrite:
            raise InputError(
                f"A model named {name!r} is already in the store: choose another name."
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            save(tmp)
            weights = weight_files(tmp)
            if not weights or any(p.suffix != ".safetensors" for p in weights):
                raise StoreError(
                    f"Saving {name!r} produced no safetensors weights; nothing stored."
                )
            manifest = Manifest(
                name=name,
                kind=kind,
                source=source,
                licence=licence,
                fingerprint=fingerprint(tmp),
                weight_sizes={p.name: p.stat().st_size for p in weights},
                base_model=base_model,
                base_fingerprint=base_fingerprint,
                extra=extra or {},
            )
            (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
            if target.exists():
                trash = self.root / f".trash-{name}-{time.time_ns()}"
                target.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete an entry (renamed away first, so readers never see half a folder)."""
        target = self.root / validate_name(name)
        if not target.exists():
            raise InputError(f"No model named {name!r} in the store.")
        trash = self.root / f".trash-{name}-{time.time_ns()}"
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_leftovers(self) -> int:
        """Remove temporary folders left by crashed writes; returns how many."""
        stale = [p for p in self.root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)
