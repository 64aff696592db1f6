"""Results are data: frozen dataclasses that save to JSON and load back.

``Result`` gives every result ``to_dict``/``to_json``/``save`` and ``from_dict``/``load``.
numpy arrays are written as nested lists and rebuilt from the field's type hint.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Self

import numpy as np

from engine.files import atomic_write_text


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _from_plain(inner[0], value) if len(inner) == 1 else value
    if hint is np.ndarray:
        return np.asarray(value)
    if dataclasses.is_dataclass(hint):
        return hint.from_dict(value) if issubclass(hint, Result) else _build(hint, value)
    if origin in (list, tuple) and args:
        items = [_from_plain(args[0], v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict and len(args) == 2:
        return {k: _from_plain(args[1], v) for k, v in value.items()}
    return value


def _build(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _from_plain(hints[k], v) for k, v in data.items() if k in known})


class Result:
    """Mixin for result dataclasses: JSON round trip with provenance kept."""

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **_to_plain(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (old file or new one, never half); ``DiskError`` if the
        file system refuses."""
        path = Path(path)
        return atomic_write_text(path, self.to_json(), f"the result {path.name}")

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        return _build(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text()))
