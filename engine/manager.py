"""The model manager: each model is loaded once per process and shared by every caller.

Thread-safe. Calls on one model take turns through its fair queue (``LoadedModel.use``,
``engine.scheduler``), idle models are evicted least-recently-used when a new one would overflow
the memory budget, a model in use is never unloaded, and nothing here stores per-request state.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from engine.catalog import Kind, resolve
from engine.devices import Placement
from engine.errors import EngineError, InputError, MemoryBudgetError
from engine.loading import LoadOptions, Progress, _quiet, estimate_weight_bytes, load_weights
from engine.scheduler import ModelQueue
from engine.store import ModelStore


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model as the "Models & system" page and ``models list`` show it."""

    name: str
    kind: str
    architecture: str
    parameters: int
    dtype: str
    device: str
    memory_bytes: int
    fingerprint: str
    source: str
    load_seconds: float
    busy: bool


@dataclass(eq=False)
class LoadedModel:
    """A model in memory. Use ``with loaded.use():`` around every forward pass."""

    name: str
    kind: Kind
    model: torch.nn.Module
    tokenizer: object
    placement: Placement
    fingerprint: str
    source: str
    path: str
    load_seconds: float
    last_used: float = field(default_factory=time.monotonic)
    queue: ModelQueue = field(init=False)
    tokenizer_lock: threading.RLock = field(default_factory=threading.RLock)
    # decode paths built for this model (``engine.generation.paths.decoder_for``), by name
    decoders: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.queue = ModelQueue(self.name)

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where input ids must go)."""
        return self.model.get_input_embeddings().weight.device

    @functools.cached_property
    def tokenizer_hash(self) -> str:
        """sha256 of the tokenizer's vocabulary/rules and its chat template (``sha256:<hex>``)."""
        digest = hashlib.sha256()
        with self.tokenizing() as tokenizer:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:
                digest.update(backend.to_str().encode())
            else:
                digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
            digest.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
        return "sha256:" + digest.hexdigest()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def memory_bytes(self) -> int:
        """Bytes of parameters and buffers."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def busy(self) -> bool:
        """True while a call holds the model, waits for it or is seated in a batch on it."""
        return self.queue.busy

    @contextlib.contextmanager
    def use(self, timeout_s: float = 600.0) -> Iterator[LoadedModel]:
        """Use of the model for one call, granted by its fair queue (``engine.scheduler``).

        Calls wait their turn: instructors first, then round-robin across users by cost, at
        most ``concurrent_runs`` at once per user. Re-entrant for the holding thread. Inside
        a run, a wait is reported in the run's snapshot ("Waiting for NAME: another run is
        using it; 2nd in line, about 4 s") and a cancelled run leaves the queue.
        """
        with self.queue.use(timeout_s):
            self.last_used = time.monotonic()
            try:
                yield self
            finally:
                self.last_used = time.monotonic()

    def encode(self, text: str | list[str], **kwargs):
        """``tokenizer(text, **kwargs)`` under the tokenizer's own lock.

        Fast tokenizers are not safe to share between threads (``RuntimeError: Already
        borrowed``): every engine call tokenizes through here or ``tokenizing()``.
        """
        with self.tokenizing() as tokenizer:
            return tokenizer(text, **kwargs)

    @contextlib.contextmanager
    def tokenizing(self) -> Iterator[object]:
        """Exclusive use of the tokenizer for a block (encode, decode, convert ids)."""
        with self.tokenizer_lock:
            try:
                yield self.tokenizer
            except RuntimeError as exc:
                if "borrow" not in str(exc):
                    raise
                raise EngineError(
                    f"The tokenizer of {self.name} was busy with another request: try again."
                ) from exc

    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[None]:
        """Switch to eager attention (the only one that returns weights) for the block.

        Call inside ``use()``. SDPA/flash kernels return no attention weights in transformers 5.
        """
        config = self.model.config
        before = getattr(config, "_attn_implementation", None)
        if before == "eager":
            yield
            return
        try:
            self.model.set_attn_implementation("eager")
        except (ValueError, AttributeError) as exc:
            raise EngineError(
                f"{self.name} cannot switch to eager attention, so it cannot return attention "
                f"weights ({exc})."
            ) from exc
        try:
            yield
        finally:
            self.model.set_attn_implementation(before)

    def info(self) -> ModelInfo:
        archs = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return ModelInfo(
            name=self.name,
            kind=self.kind,
            architecture=archs[0],
            parameters=self.parameters,
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            device=str(self.device),
            memory_bytes=self.memory_bytes,
            fingerprint=self.fingerprint,
            source=self.source,
            load_seconds=self.load_seconds,
            busy=self.busy,
        )


class ModelManager:
    """Loads models once, shares them, evicts idle ones least-recently-used."""

    def __init__(
        self,
        store: ModelStore,
        placement: Placement,
        budget_bytes: int,
        options: LoadOptions | None = None,
    ) -> None:
        self.store = store
        self.placement = placement
        self.budget_bytes = budget_bytes
        self.options = options or LoadOptions()
        self._models: dict[str, LoadedModel] = {}
        self._registry_lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    def loaded(self) -> list[LoadedModel]:
        with self._registry_lock:
            return list(self._models.values())

    def get(self, name: str) -> LoadedModel | None:
        with self._registry_lock:
            return self._models.get(name)

    def load(self, name: str, progress: Progress = _quiet) -> LoadedModel:
        """The shared instance of ``name``, loading it on first use (a cache hit is a dict read)."""
        name = name.strip()
        hit = self.get(name)
        if hit is not None:
            hit.last_used = time.monotonic()
            return hit
        with self._registry_lock:
            load_lock = self._load_locks.setdefault(name, threading.Lock())
        with load_lock:  # two sessions asking at once load it once
            hit = self.get(name)
            if hit is not None:
                return hit
            ref = resolve(name, self.store.names())
            started = time.perf_counter()
            weights = load_weights(ref, self.store, self.placement, self.options, progress)
            loaded = LoadedModel(
                name=name,
                kind=weights.kind,
                model=weights.model,
                tokenizer=weights.tokenizer,
                placement=self.placement,
                fingerprint=weights.fingerprint,
                source=weights.source,
                path=weights.path,
                load_seconds=time.perf_counter() - started,
            )
            self._make_room(loaded.memory_bytes, keep=name)
            with self._registry_lock:
                self._models[name] = loaded
            progress(1.0, f"{name} ready.")
            return loaded

    def estimate_bytes(self, name: str) -> int | None:
        """Expected in-memory size of a store or embedded model, None if unknown."""
        if name in self.store.names():
            return estimate_weight_bytes(self.store.get(name).path, self.placement.dtype)
        return None

    def _make_room(self, needed: int, keep: str) -> None:
        if needed > self.budget_bytes:
            raise MemoryBudgetError(
                f"{keep} needs {needed / 2**30:.1f} GiB but the memory budget is "
                f"{self.budget_bytes / 2**30:.1f} GiB: raise WORKBENCH_MEMORY_BUDGET_GB or pick a "
                "smaller model."
            )
        while True:
            with self._registry_lock:
                used = sum(m.memory_bytes for m in self._models.values())
                if used + needed <= self.budget_bytes:
                    return
                idle = sorted(
                    (m for m in self._models.values() if not m.busy and m.name != keep),
                    key=lambda m: m.last_used,
                )
            if not idle:
                raise MemoryBudgetError(
                    f"Loading {keep} would exceed the memory budget and every loaded model is busy: "
                    "wait, or unload a model on the Models & system page."
                )
            with contextlib.suppress(EngineError):  # taken into use meanwhile: next one
                self.unload(idle[0].name)

    def unload(self, name: str, wait_s: float = 0.0) -> None:
        """Drop a model from memory once nothing uses it.

        Waits up to ``wait_s`` seconds for the calls holding, seated on or queued for it to
        finish; then ``EngineError`` "NAME is in use by N runs; ..." if some still are (a model
        is never removed from under a run).
        """
        with self._registry_lock:
            loaded = self._models.get(name)
        if loaded is None:
            raise InputError(f"{name!r} is not loaded.")
        deadline = time.monotonic() + wait_s
        while loaded.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._registry_lock:
            count = loaded.queue.users_count()
            if count == 0:
                self._models.pop(name, None)
        if count:
            noun = "run" if count == 1 else "runs"
            raise EngineError(f"{name} is in use by {count} {noun}; try again when they finish.")
        del loaded
        if self.placement.device.startswith("cuda"):
            torch.cuda.empty_cache()
