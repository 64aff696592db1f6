"""Provenance: what produced a result, so an auditor can reproduce it."""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata

_LIBRARIES = ("llmos-workbench", "torch", "transformers", "captum", "bertviz", "peft")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape results (a fresh dict each call)."""
    return dict(_read_versions())


@functools.cache
def _read_versions() -> tuple[tuple[str, str], ...]:
    # Read once per process: importlib.metadata takes about 4 ms a call.
    versions = [("python", platform.python_version())]
    for name in _LIBRARIES:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions)


@dataclass(frozen=True)
class Provenance:
    """Model identity, numeric setting and software behind one result."""

    model: str
    fingerprint: str
    dtype: str
    device: str
    seed: int | None = None
    # how a generation computed its tokens (``engine.generation.paths``); None elsewhere
    decode_path: str | None = None
    created: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=library_versions)

    @classmethod
    def of(cls, loaded, seed: int | None = None, decode_path: str | None = None) -> Provenance:
        """Provenance of a run on a ``LoadedModel``. Cheap: reads no more than one parameter
        (``loaded.info()`` would count them all, on every call)."""
        dtype = next(loaded.model.parameters()).dtype
        return cls(
            model=loaded.name,
            fingerprint=loaded.fingerprint,
            dtype=str(dtype).removeprefix("torch."),
            device=str(loaded.device),
            seed=seed,
            decode_path=decode_path,
        )
