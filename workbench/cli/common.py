"""Helpers shared by CLI commands."""

from __future__ import annotations

import json
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
    """``path`` if a file can be written there; else a one-line ``InputError`` (checked before
    any computation)."""
    from engine.files import check_writable

    return check_writable(path, "the output")
