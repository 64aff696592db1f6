"""Helpers shared by CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any


def progress_printer(fraction: float, message: str) -> None:
    """Model-loading progress on stderr, so stdout stays clean for --json."""
    print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def open_workbench():
    from engine.api import Workbench

    return Workbench()
