"""Atomic file writes, in one place.

Every file the engine writes for keeps (presets, manifests, job state, checkpoints, results)
goes through ``atomic_write``: the content goes to a temporary file in the same folder, is
flushed to disk, and replaces the target with one ``os.replace``. Readers see the old file or
the new one, never half of one; a failed write (disk full, permissions) leaves no temporary
file behind and raises a one-line ``EngineError``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import EngineError, InputError


class DiskError(EngineError):
    """A write failed on the file system (disk full, read-only, permission denied)."""


def disk_error(exc: OSError, what: str) -> DiskError:
    """A one-line message for an ``OSError`` met while writing ``what``."""
    if exc.errno == errno.ENOSPC:
        return DiskError(f"No space left on the device while writing {what}: free some disk space.")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(
            f"Cannot write {what}: {exc.strerror or exc}. Check the folder's permissions."
        )
    return DiskError(f"Cannot write {what}: {exc.strerror or exc}.")


def temp_path_for(path: Path) -> Path:
    """A unique hidden temporary name next to ``path`` (same file system, so rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any], what: str | None = None) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file, which then replaces it.

    Raises ``DiskError`` (one line) when the file system refuses; no temporary file is left.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise disk_error(exc, what or str(path)) from exc
    except RuntimeError as exc:
        # torch.save reports a full disk as RuntimeError ("basic_ios::clear", "file write failed").
        if "write" in str(exc) or "basic_ios" in str(exc):
            raise DiskError(f"Cannot write {what or path}: the disk may be full ({exc}).") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, what: str | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), what)


def atomic_write_text(path: str | Path, text: str, what: str | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def atomic_write_json(path: str | Path, value: Any, what: str | None = None) -> Path:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return atomic_write_text(path, text, what)


def check_writable(path: str | Path, what: str) -> Path:
    """``path`` as a Path once its folder is shown to accept a new file; else a one-line
    ``InputError`` naming ``what`` ("the HTML report", "--out"). Callers check output paths
    before computing, so a typo never wastes a long run.

    A probe file is created and removed next to it: permission bits alone do not tell (root
    passes ``os.access`` on /proc, where no file can be created).
    """
    target = Path(path).expanduser()
    folder = target.parent
    if target.is_dir():
        raise InputError(f"Cannot write {what} to {path}: it is a folder; give a file name.")
    if not folder.is_dir():
        raise InputError(
            f"Cannot write {what} to {path}: the folder {folder} does not exist; create it "
            "or choose another path."
        )
    probe = folder / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.probe"
    try:
        with open(probe, "x"):
            pass
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(
            f"Cannot write {what} to {path}: {reason} in {folder}; choose a writable folder."
        ) from exc
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"Cannot write {what} to {path}: the file is read-only; choose another.")
    return target


def read_json_file(path: str | Path, what: str) -> Any:
    """The JSON in a file a user gave; a one-line ``InputError`` naming ``what`` when the file
    is missing, unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"No file {path}: give {what}.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a JSON file written by the workbench ({exc}).") from exc
