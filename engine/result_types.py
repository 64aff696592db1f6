"""Stored results back to their typed objects, by the ``type`` each ``Result`` writes.

Lives above the capabilities (it imports them on demand), so the ledger and notebooks can
show any stored result without importing every capability up front.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

# result type name (``Result.to_dict()["type"]``) -> (module, class)
RESULT_TYPES: dict[str, tuple[str, str]] = {
    "GenerationResult": ("engine.generation", "GenerationResult"),
    "PerplexityResult": ("engine.generation.evaluation", "PerplexityResult"),
    "OverlapScores": ("engine.generation.evaluation", "OverlapScores"),
    "Comparison": ("engine.generation.comparison", "Comparison"),
    "ClassificationResult": ("engine.classification", "ClassificationResult"),
    "AttentionResult": ("engine.attention", "AttentionResult"),
    "Attribution": ("engine.attribution", "Attribution"),
    "ExplanationSet": ("engine.attribution", "ExplanationSet"),
    "FinetuneResult": ("engine.finetune.result", "FinetuneResult"),
    "CollectedData": ("engine.notebooks.collect", "CollectedData"),
}


def result_class(name: str | None):
    """The result class for a type name, imported on demand (None when unknown)."""
    target = RESULT_TYPES.get(name or "")
    if target is None:
        return None
    module, attr = target
    return getattr(importlib.import_module(module), attr)


def load_result_file(path: Path) -> Any:
    """A stored result file as its typed object (npz: ``AttentionResult``; JSON: by its
    ``type``), or the plain data when the type is unknown."""
    if path.suffix == ".npz":
        import numpy as np

        from engine.attention import AttentionResult
        from engine.attention.run import AttentionComparison

        with np.load(path, allow_pickle=False) as data:
            several = "labels" in data.files
        return (AttentionComparison if several else AttentionResult).load_npz(path)
    data = json.loads(path.read_text())
    cls = result_class(data.get("type") if isinstance(data, dict) else None)
    return cls.from_dict(data) if cls is not None else data
