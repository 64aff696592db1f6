"""The model store: saved models under ``$WORKBENCH_HOME/models/<name>/``.

Each entry is a Hugging Face folder (config, safetensors weights, tokenizer) plus
``manifest.json`` with the weights' sha256 fingerprint, source and licence.

Safety rules (several threads and processes share one store):
- Writes go to a temporary folder ``.tmp-<name>-<pid>-<start>-<token>`` that records its owner
  process; only when complete is it renamed into place, under the entry's lock.
- ``clean_leftovers`` removes only temporary folders whose owner process is gone.
- Every name goes through ``engine.names.validate_name``; manifests are validated on read (a
  bad one makes the entry *damaged*, listed with its reason, never a crash); files that point
  outside the store are refused.
- ``checked_fingerprint`` hashes the weights (cached by file identity) so nothing reports a
  fingerprint that was not checked.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import EngineError, InputError, StoreError
from engine.files import DiskError, atomic_write_json, disk_error
from engine.locks import PathLock, host_tag, owner_alive, owner_tag, path_lock
from engine.names import name_problem, validate_name

__all__ = [
    "MANIFEST",
    "DamagedEntry",
    "Manifest",
    "ModelStore",
    "StoreEntry",
    "fingerprint",
    "parse_manifest",
    "validate_name",
    "weight_files",
    "workbench_home",
]

MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
VERIFY_CACHE = ".verified.json"
MAX_MANIFEST_BYTES = 1 << 20
# Leftovers whose owner cannot be checked (written by older versions, or by another host
# sharing this folder) are removed only when nobody has touched them for this long.
LEGACY_LEFTOVER_AGE_S = 3600.0
_LEFTOVER = re.compile(
    r"\.(?P<kind>tmp|trash)-(?P<name>.+)-(?P<pid>\d+)-(?P<started>\d+)-(?P<host>[0-9a-f]{6})"
    r"-(?P<token>[0-9a-f]{8})"
)
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


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


_REQUIRED = ("name", "kind", "source", "licence", "fingerprint", "weight_sizes")
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "kind": (str,),
    "source": (str,),
    "licence": (str,),
    "fingerprint": (str,),
    "weight_sizes": (dict,),
    "created": (int, float),
    "base_model": (str, type(None)),
    "base_fingerprint": (str, type(None)),
    "extra": (dict,),
}


def parse_manifest(raw: object, folder_name: str) -> Manifest:
    """A ``Manifest`` from decoded JSON, or ``ValueError`` saying what is wrong (one line)."""
    if not isinstance(raw, dict):
        raise ValueError(f"the manifest is a JSON {type(raw).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"the manifest lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in raw if k not in _TYPES)
    if unknown:
        raise ValueError(f"the manifest has unknown keys {', '.join(unknown)[:80]}")
    for key, types in _TYPES.items():
        if key in raw and (not isinstance(raw[key], types) or isinstance(raw[key], bool)):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(
                f"manifest field {key!r} must be {wanted}, not {type(raw[key]).__name__}"
            )
    if raw["name"] != folder_name:
        raise ValueError(f"the manifest names {raw['name'][:70]!r}, not its folder {folder_name!r}")
    if not _FINGERPRINT.fullmatch(raw["fingerprint"]):
        raise ValueError("the manifest fingerprint is not 'sha256:' and 64 hex digits")
    sizes = raw["weight_sizes"]
    if not sizes:
        raise ValueError("the manifest lists no weight files")
    for file, size in sizes.items():
        if (
            "/" in file
            or "\\" in file
            or "\x00" in file
            or file.startswith(".")
            or Path(file).suffix not in WEIGHT_SUFFIXES
        ):
            raise ValueError(f"the manifest lists {file[:70]!r}, which is not a weight file name")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"the manifest's size of {file!r} is not a byte count")
    return Manifest(**raw)


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


@dataclass(frozen=True)
class DamagedEntry:
    """A store folder that cannot be used, and why (one line that says what to do)."""

    name: str
    path: Path
    reason: str


def _fix(name: str) -> str:
    return f"remove it with `workbench models remove {name}` and create it again"


def _discard(path: Path) -> bool:
    """Delete a folder, or just the link if ``path`` is a symlink; True when it is gone."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
    return not (path.exists() or path.is_symlink())


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False when this system or file system does not support it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError, TypeError):  # not Linux / old glibc
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if call(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


_DISK_ERRNOS = {
    getattr(errno, code) for code in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, code)
}
_DISK_FULL_TEXT = ("No space left", "Errno 28", "basic_ios::clear", "file write failed")


def _disk_full_error(exc: BaseException, what: str) -> DiskError | None:
    """A one-line ``DiskError`` when ``exc`` is a full or read-only disk, else None."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return disk_error(exc, what)
    if any(text in str(exc) for text in _DISK_FULL_TEXT):  # safetensors, torch.save
        return DiskError(f"No space left on the device while writing {what}: free some disk space.")
    return None


def _untouched_for(path: Path) -> float:
    """Seconds since ``path`` or anything directly in it last changed (0 if unreadable)."""
    try:
        latest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                latest = max(latest, child.lstat().st_mtime)
    except OSError:
        return 0.0
    return time.time() - latest


def _file_ids(paths: list[Path]) -> dict[str, list[int]]:
    """Identity of each file: (size, mtime_ns, inode, ctime_ns); any change means re-hash."""
    ids = {}
    for path in paths:
        st = path.stat()
        ids[path.name] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    return ids


class ModelStore:
    """Saved models on disk. Safe to use from several threads and processes."""

    def __init__(self, home: Path | None = None) -> None:
        self.root = (home or workbench_home()) / "models"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, f"the model store {self.root}") from exc
        self._real_root = self.root.resolve()

    # ---- reading -------------------------------------------------------------------------

    def names(self) -> set[str]:
        """Names of the entry folders (valid names only; damaged entries included)."""
        found = set()
        for p in self.root.iterdir():
            if not p.name.startswith(".") and name_problem(p.name) is None and p.is_dir():
                found.add(p.name)
        return found

    def scan(self) -> tuple[list[StoreEntry], list[DamagedEntry]]:
        """Readable entries and damaged ones, each sorted by name. Never raises for one entry."""
        good: list[StoreEntry] = []
        bad: list[DamagedEntry] = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not (p.is_dir() or p.is_symlink()):
                continue
            problem = name_problem(p.name)
            if problem is not None:
                reason = f"Folder {p.name!r} is not a valid entry ({problem}): delete {str(p)!r}."
                bad.append(DamagedEntry(p.name, p, reason))
                continue
            try:
                good.append(self.get(p.name))
            except StoreError as exc:
                bad.append(DamagedEntry(p.name, p, str(exc)))
            except OSError as exc:
                reason = f"Store entry {p.name!r} is unreadable ({exc.strerror}): {_fix(p.name)}."
                bad.append(DamagedEntry(p.name, p, reason))
        return good, bad

    def entries(self) -> list[StoreEntry]:
        """Readable entries, sorted by name; damaged ones are left out (see ``damaged``)."""
        return self.scan()[0]

    def damaged(self) -> list[DamagedEntry]:
        """Entries that cannot be used, each with a one-line reason."""
        return self.scan()[1]

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self._real_root)

    def get(self, name: str) -> StoreEntry:
        """The entry, checked cheaply (manifest valid, weight files present inside the store,
        sizes match). Raises ``StoreError`` (one line) for a damaged entry.

        If the entry was replaced while it was being checked (the folder's identity changed),
        the check runs again, so a reader never mixes the old manifest with the new weights.
        """
        validate_name(name)
        for _attempt in range(4):
            before = self._identity(name)
            try:
                return self._get_once(name)
            except StoreError:
                if before is None or self._identity(name) == before:
                    raise
        return self._get_once(name)

    def _identity(self, name: str) -> tuple[int, int] | None:
        try:
            st = (self.root / name).stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _get_once(self, name: str) -> StoreEntry:
        folder = self.root / name
        fix = _fix(name)
        if not (folder.is_dir() or folder.is_symlink()):
            raise StoreError(f"No model named {name!r} in the store: see `workbench models list`.")
        manifest_path = folder / MANIFEST
        if not (manifest_path.exists() or manifest_path.is_symlink()):
            raise StoreError(f"Store entry {name!r} has no manifest: {fix}.")
        if not self._inside(manifest_path):
            raise StoreError(f"Store entry {name!r} has a manifest outside the store: {fix}.")
        if not manifest_path.is_file():
            raise StoreError(f"Store entry {name!r} has an unreadable manifest: {fix}.")
        try:
            with manifest_path.open("rb") as fh:
                data = fh.read(MAX_MANIFEST_BYTES + 1)
            if len(data) > MAX_MANIFEST_BYTES:
                raise ValueError("the manifest is larger than 1 MiB")
            manifest = parse_manifest(json.loads(data), name)
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError | RecursionError):
                raise StoreError(
                    f"Store entry {name!r} has an unreadable manifest: {fix}."
                ) from exc
            raise StoreError(
                f"Store entry {name!r} has an invalid manifest ({exc}): {fix}."
            ) from exc
        on_disk = {p.name for p in weight_files(folder)}
        for file in sorted(on_disk - set(manifest.weight_sizes)):
            raise StoreError(
                f"Store entry {name!r} has a weight file {file} not in its manifest: {fix}."
            )
        for file, size in manifest.weight_sizes.items():
            path = folder / file
            if (path.exists() or path.is_symlink()) and not self._inside(path):
                raise StoreError(
                    f"Store entry {name!r} is refused: {file} points outside the store ({fix})."
                )
            if not path.is_file() or path.stat().st_size != size:
                raise StoreError(
                    f"Store entry {name!r} is corrupt ({file} missing or truncated): {fix}."
                )
        return StoreEntry(folder, manifest)

    def verify(self, name: str) -> bool:
        """Recompute the fingerprint (reads every weight byte) and compare with the manifest."""
        entry = self.get(name)
        ids = _file_ids(weight_files(entry.path))
        ok = fingerprint(entry.path) == entry.manifest.fingerprint
        if ok:
            self._remember(name, entry.manifest.fingerprint, ids, entry.path)
        return ok

    def checked_fingerprint(self, name: str) -> str:
        """The entry's fingerprint, checked against the real weight bytes.

        The check is cached in ``models/.verified.json`` by each weight file's (size, mtime_ns,
        inode, ctime_ns): a warm load costs a few ``stat`` calls, and any change to a file
        (even same-size tampering) makes the next call hash it again. Raises ``StoreError`` when
        the weights do not match the manifest.
        """
        entry = self.get(name)
        files = weight_files(entry.path)
        before = _file_ids(files)
        expected = entry.manifest.fingerprint
        cached = self._read_cache().get(name)
        if cached == {"fingerprint": expected, "files": before}:
            return expected
        actual = fingerprint(entry.path)
        if actual != expected:
            raise StoreError(
                f"Store entry {name!r} failed its fingerprint check (its weights changed after "
                f"they were stored; got {actual[:19]}…, manifest says {expected[:19]}…): "
                f"{_fix(name)}."
            )
        if _file_ids(files) != before:
            raise StoreError(f"Store entry {name!r} changed while it was being checked: try again.")
        self._remember(name, expected, before, entry.path)
        return expected

    # ---- the verification cache ----------------------------------------------------------

    def _read_cache(self) -> dict:
        try:
            data = json.loads((self.root / VERIFY_CACHE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def _remember(self, name: str, fp: str | None, ids: dict | None, folder: Path) -> None:
        """Record (or with ``fp=None`` forget) a checked fingerprint; a failed write is only a
        lost cache entry, never an error."""
        if fp is not None and _file_ids(weight_files(folder)) != ids:
            return
        try:
            with path_lock(self.root / ".verified.lock"):
                cache = self._read_cache()
                if fp is None:
                    if cache.pop(name, None) is None:
                        return
                else:
                    cache[name] = {"fingerprint": fp, "files": ids}
                atomic_write_json(self.root / VERIFY_CACHE, cache, "the store's check cache")
        except (OSError, DiskError):
            return

    # ---- writing -------------------------------------------------------------------------

    def lock(self, name: str) -> PathLock:
        """The entry's cross-process, cross-thread lock (re-entrant in one thread)."""
        return path_lock(self.root / f".{validate_name(name)}.lock")

    def _owned_folder(self, kind: str, name: str) -> Path:
        """A new empty ``.<kind>-<name>-<pid>-<start>-<token>`` folder owned by this process."""
        path = self.root / f".{kind}-{name}-{owner_tag()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except OSError as exc:
            raise disk_error(exc, f"model {name!r}") from exc
        return path

    def _owned_name(self, kind: str, name: str) -> Path:
        return self.root / f".{kind}-{name}-{owner_tag()}-{secrets.token_hex(4)}"

    def _exists(self, name: str) -> bool:
        target = self.root / name
        return target.exists() or target.is_symlink()

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

        Refuses pickled weights: ``save`` must write safetensors. A full disk ends in a one-line
        ``DiskError`` and leaves no temporary folder.
        """
        validate_name(name)
        if self._exists(name) and not overwrite:
            raise InputError(
                f"A model named {name!r} is already in the store: choose another name."
            )
        if extra is not None and not isinstance(extra, dict):
            raise InputError(f"extra must be a dict, not {type(extra).__name__}.")
        what = f"model {name!r} into the store"
        tmp = self._owned_folder("tmp", name)
        try:
            try:
                save(tmp)
            except EngineError:
                raise
            except Exception as exc:
                disk = _disk_full_error(exc, what)
                if disk is not None:
                    raise disk from exc
                raise
            try:
                self._finish(
                    tmp,
                    overwrite,
                    name=name,
                    kind=kind,
                    source=source,
                    licence=licence,
                    base_model=base_model,
                    base_fingerprint=base_fingerprint,
                    extra=extra or {},
                )
            except OSError as exc:
                raise _disk_full_error(exc, what) or disk_error(exc, what) from exc
        finally:
            if tmp.exists() or tmp.is_symlink():
                _discard(tmp)
        return self.get(name)

    def _finish(self, tmp: Path, overwrite: bool, **fields: object) -> None:
        """Check what ``save`` wrote, add the manifest and put the folder in place."""
        name = str(fields["name"])
        weights = weight_files(tmp)
        if not weights or any(p.suffix != ".safetensors" for p in weights):
            raise StoreError(f"Saving {name!r} produced no safetensors weights; nothing stored.")
        ids = _file_ids(weights)
        manifest = Manifest(
            **fields,
            fingerprint=fingerprint(tmp),
            weight_sizes={p.name: p.stat().st_size for p in weights},
        )
        atomic_write_json(tmp / MANIFEST, asdict(manifest), f"the manifest of {name!r}")
        with self.lock(name):
            if self._exists(name) and not overwrite:
                raise InputError(
                    f"A model named {name!r} was stored by someone else meanwhile: "
                    "choose another name."
                )
            self._commit(tmp, name)
        self._remember(name, manifest.fingerprint, ids, self.root / name)

    def _commit(self, tmp: Path, name: str) -> None:
        """Put the complete folder ``tmp`` in place as entry ``name`` (caller holds the lock).

        Guarantee: on Linux (``renameat2``) a reader never sees a moment with no entry: a new
        entry appears with one no-replace rename, and a replaced one is swapped with
        ``RENAME_EXCHANGE`` (the old folder lands at ``tmp`` and is deleted after). Readers
        that already opened the old files keep reading them. Where ``renameat2`` is missing,
        the old folder is renamed away first: there is a gap of one rename during which the
        entry is absent (never half-written).
        """
        target = self.root / name
        if not (target.exists() or target.is_symlink()):
            if not _rename2(tmp, target, _RENAME_NOREPLACE):
                tmp.rename(target)
            return
        self._remember(name, None, None, target)
        if _rename2(tmp, target, _RENAME_EXCHANGE):
            _discard(tmp)  # now holds the old entry
            return
        trash = self._owned_name("trash", name)
        target.rename(trash)
        tmp.rename(target)
        _discard(trash)

    def remove(self, name: str) -> None:
        """Delete an entry (renamed away first, so readers never see half a folder)."""
        validate_name(name)
        with self.lock(name):
            if not self._exists(name):
                raise InputError(f"No model named {name!r} in the store.")
            trash = self._owned_name("trash", name)
            try:
                (self.root / name).rename(trash)
            except OSError as exc:
                raise disk_error(exc, f"the store entry {name!r}") from exc
        self._remember(name, None, None, trash)
        _discard(trash)

    def clean_leftovers(self) -> int:
        """Remove temporary folders left by writers that died; returns how many.

        A folder whose owner process still runs is never touched, nor one whose entry lock is
        held; one whose owner cannot be checked (older versions, another host) only after an
        hour untouched.
        """
        removed = 0
        for path in list(self.root.iterdir()):
            if not path.name.startswith((".tmp-", ".trash-")):
                continue
            match = _LEFTOVER.fullmatch(path.name)
            if match is None or match["host"] != host_tag():
                if _untouched_for(path) < LEGACY_LEFTOVER_AGE_S:
                    continue
            elif owner_alive(int(match["pid"]), int(match["started"])):
                continue
            name = match["name"] if match is not None else None
            lock = self.lock(name) if name is not None and name_problem(name) is None else None
            if lock is not None and not lock.acquire(timeout=0):
                continue  # someone is writing or removing this entry right now
            try:
                if _discard(path):
                    removed += 1
            finally:
                if lock is not None:
                    lock.release()
        return removed
