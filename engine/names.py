"""One validator for model-store names, used by every store entry point.

A store name becomes a folder under ``$WORKBENCH_HOME/models``, a lock file name and part of
temporary folder names, so it must be one short, lower-case, path-safe component: never a path,
never ``..``, never a hidden name, no NUL byte and no trailing newline (``re.fullmatch``, not
``$``, which accepts one).
"""

from __future__ import annotations

import re

from engine.errors import InputError

MAX_NAME = 64
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_RULE = (
    f"use 1-{MAX_NAME} lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
)


def _shown(name: str) -> str:
    """``repr`` of a name, shortened so an error message stays one short line."""
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid store name, or None when it is."""
    if not isinstance(name, str):
        return f"a model name must be text, not {type(name).__name__}"
    if not name:
        return "the model name is empty"
    if "\x00" in name:
        return "it contains a NUL byte"
    if "/" in name or "\\" in name or name.startswith("~"):
        return "it is a path, not a name"
    if ".." in name:
        return "it contains '..'"
    if len(name) > MAX_NAME:
        return f"it is too long ({len(name)} characters, at most {MAX_NAME})"
    if not _NAME.fullmatch(name):
        return _RULE
    return None


def is_store_name(name: object) -> bool:
    """True when ``name`` is a valid store name."""
    return name_problem(name) is None


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid store name, else raise a one-line ``InputError``."""
    problem = name_problem(name)
    if problem is not None:
        shown = _shown(name) if isinstance(name, str) else type(name).__name__
        rule = "" if problem == _RULE else f"; {_RULE}"
        raise InputError(f"Invalid model name {shown}: {problem}{rule}.")
    return name  # type: ignore[return-value]
