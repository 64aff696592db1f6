"""The Python API: ``Workbench`` (models, memory, store) and ``Model`` (one loaded model).

    wb = Workbench()
    model = wb.load("smollm2-135m")
    print(model.generate("The capital of France is", max_new_tokens=8, greedy=True).text)

The same objects serve the Streamlit pages and the CLI.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine import access, runs
from engine.catalog import EMBEDDED, require_listed_or_manage, resolve
from engine.devices import MemorySnapshot, choose_placement, default_memory_budget, memory_snapshot
from engine.errors import MissingPackageError
from engine.generation import GenerationResult, GenerationSettings
from engine.ledger import Ledger, RunRecord, plain
from engine.loading import LoadOptions, Progress, _quiet
from engine.manager import LoadedModel, ModelInfo, ModelManager
from engine.runs import Run
from engine.store import ModelStore, workbench_home

if TYPE_CHECKING:
    from engine.attention import AttentionResult, AttentionSettings


@dataclass(frozen=True)
class CatalogEntry:
    """A model a user can load: embedded or in the store."""

    name: str
    source: str
    kind: str
    description: str
    installed: bool
    in_store: bool
    loaded: bool


def _recorded(method: Callable[..., Run]) -> Callable[..., Run]:
    """A ``Model.start_*`` method whose runs are recorded in the workbench's ledger."""

    @functools.wraps(method)
    def wrapper(self: Model, *args, **kwargs) -> Run:
        if self._workbench is None:
            return method(self, *args, **kwargs)
        with runs.recording(self._record):
            return method(self, *args, **kwargs)

    return wrapper


class Model:
    """A handle on one shared loaded model. Every method is input -> typed result.

    ``start_*`` methods return a ``Run`` at once (progress, cancel, snapshot); the plain
    methods wait for its result. Every run is recorded in the workbench's ledger.
    """

    def __init__(self, loaded: LoadedModel, workbench: Workbench | None = None) -> None:
        self._loaded = loaded
        self._workbench = workbench

    def _record(self, run: Run) -> None:
        self._workbench.record(run, self._loaded)

    @property
    def name(self) -> str:
        return self._loaded.name

    @property
    def kind(self) -> str:
        return self._loaded.kind

    @property
    def loaded(self) -> LoadedModel:
        """The underlying shared model (``with model.loaded.use(): ...`` takes a turn in its
        fair queue)."""
        return self._loaded

    def info(self) -> ModelInfo:
        return self._loaded.info()

    def _settings(self, settings: GenerationSettings | None, overrides: dict) -> GenerationSettings:
        settings = settings or GenerationSettings()
        if overrides:
            settings = GenerationSettings(**{**settings.__dict__, **overrides})
        return settings

    @_recorded
    def start_generation(
        self,
        prompt: str,
        settings: GenerationSettings | None = None,
        messages=None,
        idle_timeout_s: float | None = None,
    ) -> Run[GenerationResult]:
        """Generate as a run: ``snapshot().partial`` streams the text, ``cancel()`` stops it.

        Bad input raises ``InputError`` here, before the run starts.
        """
        from engine.generation.streaming import start_generation

        return start_generation(
            self._loaded, prompt, settings or GenerationSettings(), messages, idle_timeout_s
        )

    def stream(self, prompt: str, settings: GenerationSettings | None = None, messages=None):
        """Alias of ``start_generation`` (kept for existing callers)."""
        return self.start_generation(prompt, settings, messages)

    def generate(
        self, prompt: str, settings: GenerationSettings | None = None, **overrides
    ) -> GenerationResult:
        """Continue ``prompt``. Keyword overrides are ``GenerationSettings`` fields."""
        return self.start_generation(prompt, self._settings(settings, overrides)).wait()

    def chat(self, messages, settings: GenerationSettings | None = None, **overrides):
        """Reply to a conversation (``ChatMessage`` list) via the model's chat template."""
        return self.start_generation("", self._settings(settings, overrides), messages).wait()

    @_recorded
    def start_perplexity(self, text: str) -> Run:
        """Perplexity of ``text`` as a run (result: ``PerplexityResult``)."""
        from engine.generation.evaluation import start_perplexity

        return start_perplexity(self._loaded, text)

    def perplexity(self, text: str):
        """Perplexity of ``text`` under this (causal) model: ``PerplexityResult``."""
        return self.start_perplexity(text).wait()

    @_recorded
    def start_classification(self, text: str, max_length: int = 512) -> Run:
        """``classify`` as a run (result: ``ClassificationResult``)."""
        from engine.classification import start_classification

        return start_classification(self._loaded, text, max_length)

    def classify(self, text: str, max_length: int = 512):
        """Label and class probabilities of ``text`` (classifier models, e.g. a fine-tuned
        MiniLM). Returns ``engine.classification.ClassificationResult``."""
        return self.start_classification(text, max_length).wait()

    @_recorded
    def start_attention(
        self, text: str, settings: AttentionSettings | None = None, idle_timeout_s=None
    ) -> Run:
        """Attention on ``text`` as a run (result: ``AttentionComparison`` with one side).

        Bad input and a result that would not fit the result budget raise here."""
        from engine.attention import start_attention

        return start_attention(
            [(self.name, self._loaded, text)], settings, idle_timeout_s=idle_timeout_s
        )

    def attention(self, text: str, settings: AttentionSettings | None = None) -> AttentionResult:
        """Every layer's and head's attention on ``text``: ``.attentions`` is a float32 array
        shaped (layer, head, query, key). See ``engine.attention``."""
        return self.start_attention(text, settings).wait().sides[0].result

    @_recorded
    def start_explanation(self, spec, idle_timeout_s: float | None = None) -> Run:
        """An ``engine.attribution.ExplanationSpec`` (one or more methods) as a run; its
        result is an ``ExplanationSet`` (attributions, agreement table, provenance)."""
        from engine.attribution import start_explanation

        return start_explanation(self._loaded, spec, idle_timeout_s=idle_timeout_s)

    def explain(
        self,
        text: str,
        target: str = "",
        *,
        label: str | None = None,
        contrast: str | None = None,
        method: str = "integrated_gradients",
        options: dict | None = None,
        per_token: bool = False,
        faithfulness: bool = True,
        seed: int = 0,
        progress=None,
        cancel=None,
    ):
        """Attribute a target to the input tokens of ``text`` (see ``engine.attribution``).

        target: causal-LM continuation ("" = the model's next token); label: classifier label
        ("" = predicted); contrast: the alternative continuation/label ("why A rather than B");
        options: the method's options (e.g. ``{"steps": 50}``). Returns an ``Attribution``.
        """
        from engine.attribution import ExplanationSpec, MethodRun, TargetSpec

        spec = ExplanationSpec(
            text,
            TargetSpec(text=target, label=label, contrast=contrast),
            (MethodRun(method, dict(options or {})),),
            per_token=per_token,
            faithfulness=faithfulness,
            seed=seed,
        )
        run = self.start_explanation(spec)
        while not run.join(0.1):
            snap = run.snapshot()
            if progress is not None:
                progress(snap.fraction, snap.message)
            if cancel is not None and cancel.is_set():
                run.cancel()
        return run.wait().attributions[0]

    def __repr__(self) -> str:
        return f"Model({self.name!r}, kind={self.kind!r})"


class Workbench:
    """Models, memory and the store, for one process. Thread-safe; share one instance."""

    def __init__(
        self,
        home: str | Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        memory_budget_bytes: int | None = None,
        options: LoadOptions | None = None,
    ) -> None:
        self.home = Path(home).expanduser() if home else workbench_home()
        self.store = ModelStore(self.home)
        self.store.clean_leftovers()
        self.placement = choose_placement(device, dtype)
        budget = memory_budget_bytes or default_memory_budget(self.placement.device)
        self.manager = ModelManager(
            self.store, self.placement, budget, options or LoadOptions.from_env()
        )

    def load(self, name: str, progress: Progress = _quiet) -> Model:
        """Load (once) and return a shared model. Embedded models are converted on first use.

        Any logged-in user may load an embedded or stored model; a local folder or a hub id
        needs the "models.manage" permission (admins), checked before the name is looked at
        (inside ``access.reproducing()``, one an admin has already loaded may be used).
        """
        access.current_user()  # nobody logged in (when login is required): AccessError
        # A re-run may use a folder model an admin has loaded (an auditor re-running a run).
        if not (access.in_reproduction() and self.manager.get(name) is not None):
            require_listed_or_manage(name, self.store.names())  # also for a cached model
        return Model(self.manager.load(name, progress), self)

    def model(self, loaded: LoadedModel) -> Model:
        """A ``Model`` handle (recording into this workbench's ledger) on a loaded model."""
        return Model(loaded, self)

    @functools.cached_property
    def notebooks(self):
        """The notebooks under ``home`` (``engine.notebooks.NotebookStore``)."""
        from engine.notebooks import NotebookStore

        return NotebookStore(self.home)

    def notebook(self, name_or_id: str):
        """A handle on a notebook (``engine.notebooks.NotebookHandle``): opened by id or name,
        created when no notebook has that name."""
        from engine.errors import InputError
        from engine.notebooks import NotebookHandle

        try:
            book = self.notebooks.find(name_or_id)
        except InputError as exc:
            if not str(exc).startswith("No notebook"):
                raise
            book = self.notebooks.create(name_or_id)
        return NotebookHandle(self, book.id)

    @functools.cached_property
    def ledger(self) -> Ledger:
        """The run ledger under ``home`` (every run of this workbench is recorded there)."""
        return Ledger(self.home)

    def recording(self):
        """Runs started in this block (on this thread) are recorded in this ledger: for
        callers that start a capability's run directly (pages, the CLI)."""
        return runs.recording(self.record)

    def record(self, run: Run, loaded: LoadedModel | None = None) -> RunRecord:
        """Append a finished run to the ledger (called on the run's worker thread)."""
        snap = run.outcome()
        identity = {}
        provenance = getattr(snap.result, "provenance", None)
        if isinstance(provenance, tuple) and provenance:  # one per side (attention)
            first = provenance[0]
            identity = {k: getattr(first, k) for k in ("model", "fingerprint", "dtype", "device")}
            identity["versions"] = first.versions
        if loaded is not None:
            identity = {
                "model": loaded.name,
                "fingerprint": loaded.fingerprint,
                "tokenizer_hash": loaded.tokenizer_hash,
                "dtype": loaded.placement.dtype_name,
                "device": str(loaded.device),
            }
        spec = run.spec if isinstance(run.spec, dict) else plain(run.spec)
        if not isinstance(spec, dict):
            spec = {"spec": spec}
        if loaded is not None:
            spec = {"model": loaded.name, "fingerprint": loaded.fingerprint, **spec}
        return self.ledger.append(
            run_id=run.id,
            operation=run.operation,
            spec=spec,
            status=snap.state,
            result=snap.result,
            seconds=run.seconds,
            error=snap.error,
            identity=identity,
            created=run.started,
            user=run.user.name,
        )

    def unload(self, name: str, wait_s: float = 0.0) -> None:
        """Free a loaded model's memory (admins). While runs hold or wait for it: EngineError
        "NAME is in use by N runs; try again when they finish" (after waiting up to
        ``wait_s`` seconds)."""
        access.require("models.manage")
        self.manager.unload(name, wait_s)

    def loaded(self) -> list[ModelInfo]:
        return [m.info() for m in self.manager.loaded()]

    def decode_path(self, name: str) -> str | None:
        """The decode path generations on model ``name`` take now ("reference", "lean" or
        "int8"; ``engine.generation.paths``), None when it is not loaded."""
        from engine.generation.paths import choose_decode_path

        loaded = self.manager.get(name)
        return None if loaded is None else choose_decode_path(loaded.model, loaded.kind)

    def catalog(self) -> list[CatalogEntry]:
        """Embedded models and store entries, with whether each is installed and loaded."""
        loaded = {m.name for m in self.manager.loaded()}
        in_store = {e.name: e for e in self.store.entries()}
        entries = []
        for alias, spec in EMBEDDED.items():
            try:
                spec.folder()
                installed = True
            except MissingPackageError:
                installed = False
            entries.append(
                CatalogEntry(
                    alias,
                    "embedded",
                    spec.kind,
                    spec.description,
                    installed,
                    alias in in_store,
                    alias in loaded,
                )
            )
        for name, entry in in_store.items():
            if name in EMBEDDED:
                continue
            m = entry.manifest
            description = m.extra.get("description") or f"from {m.base_model or m.source}"
            entries.append(
                CatalogEntry(name, "store", m.kind, description, True, True, name in loaded)
            )
        return entries

    def start_comparison(
        self, names, prompt: str, settings: GenerationSettings | None = None, messages=None
    ) -> Run:
        """The same prompt on 2-4 models, one after another, as a run (result: ``Comparison``)."""
        from engine.generation.comparison import start_comparison

        with runs.recording(self.record):
            return start_comparison(self, names, prompt, settings or GenerationSettings(), messages)

    def compare(
        self, names, prompt: str, settings: GenerationSettings | None = None, messages=None
    ):
        """``start_comparison(...).wait()``: a ``Comparison`` with every model's outcome."""
        return self.start_comparison(names, prompt, settings, messages).wait()

    def resolve(self, name: str):
        return resolve(name, self.store.names())

    def memory(self) -> MemorySnapshot:
        return memory_snapshot()
