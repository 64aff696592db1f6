"""Running notebook cells: each cell's spec becomes an engine run (recorded in the ledger), and
its end is written back into the notebook (ledger id, outputs, staleness of dependents).

    run = start_cell(workbench, notebook_id, cell_id)   # a Run: progress, cancel, snapshot
    run = start_all(workbench, notebook_id)             # every cell in order; cancel stops
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from engine import runs
from engine.errors import CancelledError, EngineError, InputError
from engine.notebooks.book import Cell, Notebook, NotebookStore, iter_runnable, resolve_spec

# kind -> starter(workbench, spec) -> Run
STARTERS: dict[str, Callable[[Any, dict], runs.Run]] = {}


def starter(kind: str):
    def register(fn):
        STARTERS[kind] = fn
        return fn

    return register


def _settings(spec: dict):
    from engine.generation import GenerationSettings

    raw = dict(spec.get("settings") or {})
    if "stop_sequences" in raw:
        raw["stop_sequences"] = tuple(raw["stop_sequences"] or ())
    known = GenerationSettings.__dataclass_fields__
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"Unknown generation setting(s): {', '.join(unknown)}.")
    return GenerationSettings(**raw)


def _model_name(spec: dict) -> str:
    name = spec.get("model")
    if not isinstance(name, str) or not name.strip():
        raise InputError("Pick a model for this cell.")
    return name


@starter("generate")
def _generate(workbench, spec: dict) -> runs.Run:
    """A prompt, or a chat turn: ``messages`` as recorded, or ``chat`` (+ ``system``) to send
    the prompt as a user message through the model's chat template."""
    from engine.generation import ChatMessage, conversation

    messages = [ChatMessage(m["role"], m["content"]) for m in spec.get("messages") or []]
    if not messages and spec.get("chat"):
        messages = conversation([], spec.get("prompt", ""), spec.get("system", ""))
    model = workbench.load(_model_name(spec))
    return model.start_generation(spec.get("prompt", ""), _settings(spec), messages or None)


@starter("evaluate")
def _evaluate(workbench, spec: dict) -> runs.Run:
    if spec.get("metric", "perplexity") == "perplexity":
        return workbench.load(_model_name(spec)).start_perplexity(spec.get("text", ""))
    from engine.generation.evaluation import overlap_scores

    hypothesis, reference = spec.get("hypothesis", ""), spec.get("reference", "")
    overlap_scores(hypothesis, reference)  # bad input raises here, before the run
    with runs.recording(workbench.record):
        return runs.start(
            "score", lambda _ctx: overlap_scores(hypothesis, reference), spec=dict(spec)
        )


@starter("compare")
def _compare(workbench, spec: dict) -> runs.Run:
    return workbench.start_comparison(
        spec.get("variants") or spec.get("models") or [], spec.get("prompt", ""), _settings(spec)
    )


@starter("classify")
def _classify(workbench, spec: dict) -> runs.Run:
    return workbench.load(_model_name(spec)).start_classification(spec.get("text", ""))


@starter("attention")
def _attention(workbench, spec: dict) -> runs.Run:
    from engine.attention import AttentionSettings

    settings = AttentionSettings(
        max_tokens=int(spec.get("max_tokens", 1024)), truncate=bool(spec.get("truncate", False))
    )
    return workbench.load(_model_name(spec)).start_attention(spec.get("text", ""), settings)


def explanation_spec(spec: dict):
    """An ``ExplanationSpec`` from a cell's plain spec: text, target / label / contrast,
    ``method`` (or ``methods``), ``options``, per_token, faithfulness, seed."""
    from engine.attribution import ExplanationSpec, MethodRun, TargetSpec

    names = spec.get("methods") or [spec.get("method") or "integrated_gradients"]
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise InputError('The method options must be an object, e.g. {"steps": 50}.')
    return ExplanationSpec(
        spec.get("text", ""),
        TargetSpec(
            text=spec.get("target") or "",
            label=spec.get("label") or None,
            contrast=spec.get("contrast") or None,
        ),
        tuple(MethodRun(str(name), options) for name in names),
        per_token=bool(spec.get("per_token", False)),
        faithfulness=bool(spec.get("faithfulness", True)),
        seed=int(spec.get("seed", 0)),
    )


@starter("explain")
def _explain(workbench, spec: dict) -> runs.Run:
    return workbench.load(_model_name(spec)).start_explanation(explanation_spec(spec))


@starter("collect")
def _collect(workbench, spec: dict) -> runs.Run:
    """Freeze the sentences collected so far into a training file (for a fine-tune cell)."""
    from engine.notebooks.collect import Collection, labels_of

    labels = labels_of(spec)
    collection = Collection(workbench.home, spec["cell"])
    collection.snapshot(labels)  # too few rows: say so now
    with runs.recording(workbench.record):
        return runs.start("collect", lambda _ctx: collection.snapshot(labels), spec=dict(spec))


@starter("finetune")
def _finetune(workbench, spec: dict):
    """A fine-tune job (its own process); the cell follows it through its ``JobRun``."""
    from engine.finetune import JobSpec, JobStore
    from engine.finetune.data import sample_path, samples

    raw = {k: v for k, v in spec.items() if k not in ("job_id", "model")}  # record-only keys
    if raw.get("data") in samples():  # a shipped sample by name
        raw["data"] = str(sample_path(raw["data"]))
    jobs = JobStore(workbench.home)
    info = jobs.submit(JobSpec.from_dict(raw))
    return jobs.run(info.id)


def cells_from_runs(workbench, notebook_id: str, run_ids: list[str]) -> Notebook:
    """Append one cell per recorded run (in the given order), showing its recorded result."""
    from engine.notebooks.book import KIND_OF_OPERATION

    store = workbench.notebooks
    for run_id in run_ids:
        record = workbench.ledger.get(run_id)
        kind = KIND_OF_OPERATION.get(record.operation)
        if kind is None:
            raise InputError(f"Run {run_id} ({record.operation}) cannot become a notebook cell.")
        spec = dict(record.spec)
        if record.operation == "perplexity":
            spec["metric"] = "perplexity"
        elif record.operation == "score":
            spec["metric"] = "overlap"
        if record.status != "done":
            store.add_cell(notebook_id, kind, spec, status="new")
            continue
        probe = Cell("000000000000", kind, spec)
        outputs = outputs_of(probe, workbench.ledger.load_result(record))
        store.add_cell(notebook_id, kind, spec, run_id=record.id, outputs=outputs, status="done")
    return store.get(notebook_id)


def cell_result(workbench, cell: Cell, owner: str | None = None) -> Any:
    """The typed result of a cell's last run, from the ledger (or an imported bundle);
    None when it never ran. Nothing is recomputed. ``owner``: the owner of the notebook
    (as opened by the acting user), whose runs a reader of the notebook may see (only theirs:
    a cell cannot reveal a third user's run)."""
    if not cell.run_id:
        return None
    ledger = workbench.ledger
    try:
        return ledger.load_result(ledger.get(cell.run_id, readable_as_owner=owner))
    except InputError:
        path = workbench.notebooks.imported_result(cell.run_id, owner or "local")
    if path is None:
        return None
    from engine.result_types import load_result_file

    return load_result_file(path)


def cell_readable(workbench, cell: Cell, owner: str) -> bool:
    """Whether the acting user may see the result of ``cell`` in ``owner``'s notebook (the
    check ``cell_result`` makes, without loading the result)."""
    if not cell.run_id:
        return False
    try:
        workbench.ledger.get(cell.run_id, readable_as_owner=owner)
        return True
    except InputError:
        return workbench.notebooks.imported_result(cell.run_id, owner) is not None


def outputs_of(cell: Cell, result: Any) -> dict:
    """What other cells may use from this cell's result (see ``book.OUTPUTS``)."""
    if cell.kind == "generate" and result is not None:
        prompt = result.model_input or result.prompt
        return {"text": result.text, "prompt": prompt, "full_text": prompt + result.text}
    if cell.kind == "collect" and result is not None:
        return {"data": result.path}
    if cell.kind == "finetune" and result is not None:
        return {"model": getattr(result, "model", None) or cell.spec.get("out")}
    return {}


def _run_one(
    workbench, store: NotebookStore, book: Notebook, cell: Cell, ctx, part: tuple[int, int]
) -> Any:
    """Run one cell inside an outer run's worker: forward progress (as part ``i`` of ``n``)
    and cancel, then record the end in the notebook."""
    i, n = part
    try:
        spec = resolve_spec(book, cell)
        if cell.kind == "collect":
            spec["cell"] = cell.id
        start = STARTERS.get(cell.kind)
        if start is None:
            raise InputError(f"{cell.kind} cells cannot run here yet.")
        inner = start(workbench, spec)
    except EngineError as exc:
        store.record_run(book.id, cell.id, None, "failed", str(exc))
        raise
    while not inner.join(0.1):
        snap = inner.snapshot()
        ctx.progress((i + snap.fraction) / n, snap.message)
        ctx.partial(snap.partial)  # e.g. a fine-tune's metrics so far, for a live view
        if ctx.cancelled:
            inner.cancel()
    snap = inner.snapshot()
    status = snap.state if snap.state in ("done", "failed", "cancelled") else "failed"
    run_id = inner.id
    if not isinstance(inner, runs.Run):  # a fine-tune job: its worker records a success
        from engine.finetune.result import ledger_id

        run_id = ledger_id(inner.id)
        if status != "done":  # a failure or a cancel is recorded here
            workbench.ledger.append(
                run_id=run_id,
                operation="finetune",
                spec={**spec, "model": spec.get("base"), "job_id": inner.id},
                status=status,
                seconds=snap.seconds,
                error=snap.error,
            )
    store.record_run(
        book.id,
        cell.id,
        run_id,
        status,
        snap.error,
        outputs_of(cell, snap.result),
        spec=cell.spec,
    )
    if status != "done":
        if status == "cancelled":
            raise CancelledError(snap.error or "Cancelled.")
        raise EngineError(snap.error or "The cell failed.")
    return snap.result


def start_cell(workbench, notebook_id: str, cell_id: str) -> runs.Run:
    """Run one cell in the background; the notebook is updated when it ends."""
    store = workbench.notebooks
    book = store.get(notebook_id)
    cell = book.cell(cell_id)
    resolve_spec(book, cell)  # an upstream cell that has not run: say so now

    def work(ctx):
        return _run_one(workbench, store, store.get(notebook_id), cell, ctx, (0, 1))

    return runs.start("notebook-cell", work, spec={"notebook": notebook_id, "cell": cell_id})


def start_all(workbench, notebook_id: str) -> runs.Run:
    """Run every cell top to bottom; stops at the first failure or on cancel.

    The result is a list of (cell id, ledger run id) for the cells that ran.
    """
    store = workbench.notebooks

    def work(ctx):
        done = []
        cells = list(iter_runnable(store.get(notebook_id)))
        for i, cell in enumerate(cells):
            ctx.check()
            book = store.get(notebook_id)  # re-read: outputs of the cells above are in it now
            ctx.progress(i / len(cells), f"Cell {book.index(cell.id) + 1}: {cell.kind}")
            _run_one(workbench, store, book, book.cell(cell.id), ctx, (i, len(cells)))
            done.append((cell.id, store.get(notebook_id).cell(cell.id).run_id))
        return done

    return runs.start("notebook-run-all", work, spec={"notebook": notebook_id})


def start_reproduce_all(workbench, notebook_id: str) -> runs.Run:
    """Re-run every cell that has a recorded run and give its verdict (an auditor's check).

    The result is ``{cell id: Verdict}``; the re-runs are recorded in the ledger as usual.
    """
    from engine.reproduce import reproduce

    def work(ctx) -> dict:
        book = workbench.notebooks.get(notebook_id)
        cells = [c for c in book.cells if c.run_id]
        verdicts = {}
        for i, cell in enumerate(cells):
            ctx.check()
            ctx.progress(
                i / len(cells), f"Reproducing cell {book.index(cell.id) + 1} ({cell.kind})"
            )
            verdicts[cell.id] = reproduce(workbench, cell.run_id)
        return verdicts

    return runs.start("reproduce-notebook", work, spec={"notebook": notebook_id})


def wait_all(workbench, notebook_id: str, timeout: float | None = None) -> list:
    """Run all and wait (CLI, Python API)."""
    run = start_all(workbench, notebook_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not run.join(0.2):
        if deadline is not None and time.monotonic() > deadline:
            run.cancel()
    return run.wait()
