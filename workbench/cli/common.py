"""Helpers shared by CLI commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def progress_printer(fraction: float, message: str) -> None:
    """Model-loading progress on stderr, so stdout stays clean for --json."""
    print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def open_workbench():
    from engine.api import Workbench

    return Workbench()


def writable_output(path: str | Path) -> Path:
    """``path`` if a file can be written there; else a one-line ``InputError``.

    Checked before any computation, so a typo in ``--out`` never wastes a long run.
    """
    from engine.errors import InputError

    target = Path(path).expanduser()
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise InputError(f"{target} is a folder: give a file name for the output.")
    if not folder.is_dir():
        raise InputError(f"Cannot write {target}: the folder {folder} does not exist.")
    probe = folder / f".workbench-write-check-{os.getpid()}"
    try:  # access() says yes to root even on /proc: really create (and remove) a file
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as exc:
        raise InputError(f"Cannot write {target}: {exc.strerror or exc}.") from exc
    return target
