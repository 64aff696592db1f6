"""LLMOS Workbench engine: UI-free core. Never imports streamlit.

Public API: ``Workbench``, ``Model`` and the result and error types. Attributes are imported
lazily, so ``import engine.errors`` stays cheap (no torch) for the app shell.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Workbench": "engine.api",
    "Model": "engine.api",
    "CatalogEntry": "engine.api",
    "EngineError": "engine.errors",
    "InputError": "engine.errors",
    "GenerationResult": "engine.generation",
    "GenerationSettings": "engine.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
