"""Task presets: editable prompt templates (continue, chat, summarize, translate, ...).

A template holds ``{input}`` where the user's text goes. Built-in presets are shared and
read-only (a user may override one with a preset of the same name); saved presets belong to
the acting user (``engine.access``): JSON in ``$WORKBENCH_HOME/presets.json`` for the local
user, ``$WORKBENCH_HOME/presets/<user>-<hash>.json`` for each logged-in user.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import access
from engine.errors import InputError, StoreError
from engine.files import atomic_write_json, disk_error
from engine.locks import PathLock, path_lock

PLACEHOLDER = "{input}"
FILE_NAME = "presets.json"
_NAME = re.compile(r"[\w][\w .()-]{0,47}")


@dataclass(frozen=True)
class Preset:
    """A named prompt template. ``mode`` is "text" (continue the prompt) or "chat"."""

    name: str
    template: str
    mode: str = "text"
    max_new_tokens: int = 64
    stop_sequences: tuple[str, ...] = ()
    builtin: bool = False

    def validated(self) -> Preset:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InputError(
                f"Preset name {self.name!r} is not valid: use 1-48 letters, digits, spaces, "
                "dots, dashes or brackets."
            )
        if PLACEHOLDER not in self.template:
            raise InputError(f"The template must contain {PLACEHOLDER} where your text goes.")
        if self.mode not in ("text", "chat"):
            raise InputError(f"Preset mode must be 'text' or 'chat' (got {self.mode!r}).")
        if not 1 <= int(self.max_new_tokens) <= 8192:
            raise InputError("A preset's max_new_tokens must be between 1 and 8192.")
        return self

    def render(self, text: str) -> str:
        """The template with ``{input}`` replaced by ``text``."""
        if not text.strip():
            raise InputError("The prompt is empty: type some text for this preset.")
        return self.template.replace(PLACEHOLDER, text)


BUILTIN: tuple[Preset, ...] = (
    Preset("Continue text", "{input}", "text", 64, (), True),
    Preset("Chat", "{input}", "chat", 128, (), True),
    Preset(
        "Summarize",
        "Summarize the following text in two sentences.\n\n{input}",
        "chat",
        96,
        (),
        True,
    ),
    Preset("Translate to French", "Translate into French:\n\n{input}", "chat", 96, (), True),
    Preset(
        "Answer a question",
        "Answer briefly and precisely.\n\nQuestion: {input}",
        "chat",
        96,
        (),
        True,
    ),
    Preset(
        "Write code",
        "Write a Python function for this task. Reply with code only.\n\n{input}",
        "chat",
        192,
        (),
        True,
    ),
)


def _path(home: Path) -> Path:
    """The acting user's presets file: ``HOME/presets.json`` for the local user (the file of
    a single-user workbench), ``HOME/presets/<user>-<hash>.json`` for everyone else."""
    user = access.current_user()
    if user.name == access.LOCAL.name:
        return Path(home) / FILE_NAME
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", user.name)[:40]
    digest = hashlib.sha256(user.name.encode()).hexdigest()[:12]
    return Path(home) / "presets" / f"{safe}-{digest}.json"


def _read_user(home: Path) -> list[Preset]:
    path = _path(home)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [
            Preset(
                name=d["name"],
                template=d["template"],
                mode=d.get("mode", "text"),
                max_new_tokens=int(d.get("max_new_tokens", 64)),
                stop_sequences=tuple(d.get("stop_sequences", ())),
            )
            for d in data.get("presets", [])
        ]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise StoreError(f"{path} is not a valid presets file ({exc}): fix or delete it.") from exc


def _write_user(home: Path, presets: list[Preset]) -> None:
    """Replace the presets file atomically (readers never see half a file)."""
    data = {"presets": [{k: v for k, v in asdict(p).items() if k != "builtin"} for p in presets]}
    atomic_write_json(_path(home), data, "the presets file")


def _locked(home: Path) -> PathLock:
    """The lock every read-modify-write of the presets file holds (threads and processes)."""
    path = _path(home)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, "the presets file") from exc
    return path_lock(path.parent / f".{path.name}.lock")


def list_presets(home: Path) -> list[Preset]:
    """Built-in presets (unless overridden by a saved one of the same name), then saved ones."""
    user = _read_user(home)
    names = {p.name for p in user}
    return [p for p in BUILTIN if p.name not in names] + user


def get_preset(home: Path, name: str) -> Preset:
    for preset in list_presets(home):
        if preset.name == name:
            return preset
    available = ", ".join(p.name for p in list_presets(home))
    raise InputError(f"No preset named {name!r}: choose one of {available}.")


def save_preset(home: Path, preset: Preset) -> Preset:
    """Save (or replace) a user preset; returns it. Safe from several threads and processes:
    the read-modify-write of the file holds its lock, so concurrent saves lose nothing."""
    try:
        preset = Preset(
            preset.name.strip() if isinstance(preset.name, str) else preset.name,
            preset.template if isinstance(preset.template, str) else "",
            preset.mode,
            int(preset.max_new_tokens),
            tuple(preset.stop_sequences),
        ).validated()
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"Preset settings are not valid ({exc}).") from exc
    with _locked(home):
        user = [p for p in _read_user(home) if p.name != preset.name]
        _write_user(home, [*user, preset])
    return preset


def delete_preset(home: Path, name: str) -> None:
    """Delete a saved preset (a built-in one it overrode comes back)."""
    with _locked(home):
        user = _read_user(home)
        if name not in {p.name for p in user}:
            raise InputError(
                f"{name!r} is not a saved preset (built-in presets cannot be deleted)."
            )
        _write_user(home, [p for p in user if p.name != name])
