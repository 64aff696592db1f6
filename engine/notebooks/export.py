"""Export a notebook: a JSON bundle (spec + results, imports elsewhere), a Jupyter notebook
that reproduces every cell through the public Python API and checks the recorded numbers, and
a self-contained HTML audit report (no script, readable offline, printable).

Each operation contributes its code (``CODE``) and its report section (``SECTIONS``); a
capability registers its own with ``code_for`` / ``section_for``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Callable
from typing import Any

from engine.errors import EngineError
from engine.ledger import Ledger, RunRecord
from engine.notebooks.book import Notebook

BUNDLE = "llmos-notebook-bundle"
# operation -> code(spec) -> Python source that leaves the result in ``result``
CODE: dict[str, Callable[[dict], str]] = {}
# operation -> section(result, record) -> HTML (escaped) for the audit report
SECTIONS: dict[str, Callable[[Any, RunRecord], str]] = {}


def code_for(operation: str):
    def register(fn):
        CODE[operation] = fn
        return fn

    return register


def section_for(operation: str):
    def register(fn):
        SECTIONS[operation] = fn
        return fn

    return register


def _lit(value: Any) -> str:
    """A Python literal for plain JSON data (true/false/null become True/False/None)."""
    return repr(json.loads(json.dumps(value)))


def _settings_code(spec: dict) -> str:
    settings = json.loads(json.dumps(spec.get("settings") or {}))
    if "stop_sequences" in settings:
        settings["stop_sequences"] = tuple(settings["stop_sequences"] or ())
    return f"GenerationSettings(**{settings!r})"


@code_for("generate")
def _generate_code(spec: dict) -> str:
    model = _lit(spec.get("model"))
    if spec.get("messages"):
        messages = ", ".join(
            f"ChatMessage({_lit(m['role'])}, {_lit(m['content'])})" for m in spec["messages"]
        )
        return f"result = wb.load({model}).chat([{messages}], {_settings_code(spec)})"
    return f"result = wb.load({model}).generate({_lit(spec.get('prompt', ''))}, {_settings_code(spec)})"


@code_for("perplexity")
def _perplexity_code(spec: dict) -> str:
    return f"result = wb.load({_lit(spec.get('model'))}).perplexity({_lit(spec.get('text', ''))})"


@code_for("classify")
def _classify_code(spec: dict) -> str:
    return f"result = wb.load({_lit(spec.get('model'))}).classify({_lit(spec.get('text', ''))})"


@code_for("compare")
def _compare_code(spec: dict) -> str:
    return (
        f"result = wb.compare({_lit(spec.get('models'))}, {_lit(spec.get('prompt', ''))}, "
        f"{_settings_code(spec)})"
    )


@code_for("score")
def _score_code(spec: dict) -> str:
    return (
        "from engine.generation.evaluation import overlap_scores\n"
        f"result = overlap_scores({_lit(spec.get('hypothesis', ''))}, "
        f"{_lit(spec.get('reference', ''))})"
    )


@code_for("attention")
def _attention_code(spec: dict) -> str:
    (label, model, text), *others = spec.get("sides") or [["", spec.get("model"), ""]]
    if others:
        sides = ", ".join(
            f"({_lit(lab)}, wb.load({_lit(m)}).loaded, {_lit(t)})" for lab, m, t in spec["sides"]
        )
        return (
            "from engine.attention import AttentionSettings, start_attention\n"
            f"result = start_attention([{sides}], AttentionSettings(**{_lit(spec.get('settings') or {})})).wait()"
        )
    return (
        "from engine.attention import AttentionSettings\n"
        f"result = wb.load({_lit(model)}).start_attention({_lit(text)}, "
        f"AttentionSettings(**{_lit(spec.get('settings') or {})})).wait()"
    )


@code_for("explain")
def _explain_code(spec: dict) -> str:
    target = {k: v for k, v in (spec.get("target") or {}).items() if v is not None}
    methods = ", ".join(
        f"MethodRun({_lit(m['method'])}, {_lit(dict(m.get('options') or []))})"
        for m in spec.get("methods") or []
    )
    return (
        "from engine.attribution import ExplanationSpec, MethodRun, TargetSpec\n"
        f"result = wb.load({_lit(spec.get('model'))}).start_explanation(ExplanationSpec(\n"
        f"    {_lit(spec.get('text', ''))},\n    TargetSpec(**{_lit(target)}),\n"
        f"    ({methods},),\n    per_token={bool(spec.get('per_token'))!r}, "
        f"faithfulness={bool(spec.get('faithfulness', True))!r}, seed={int(spec.get('seed', 0))},\n"
        ")).wait()"
    )


# --- JSON bundle ------------------------------------------------------------------------------


def _records(book: Notebook, ledger: Ledger) -> dict[str, RunRecord]:
    found = {}
    for cell in book.cells:
        if cell.run_id:
            try:
                found[cell.id] = ledger.get(cell.run_id, readable_as_owner=book.owner)
            except EngineError:
                continue
    return found


def bundle(book: Notebook, ledger: Ledger) -> dict:
    """The notebook with every cell's record and result, as one JSON-able object."""
    runs = {}
    for cell_id, record in _records(book, ledger).items():
        path = ledger.result_file(record)
        entry: dict = {"record": record.to_dict(), "result": None, "result_npz": None}
        if path is not None and path.is_file():
            if path.suffix == ".json":
                entry["result"] = json.loads(path.read_text())
            else:
                entry["result_npz"] = base64.b64encode(path.read_bytes()).decode()
        runs[cell_id] = entry
    return {"format": BUNDLE, "version": 1, "notebook": book.to_dict(), "runs": runs}


# --- Jupyter ----------------------------------------------------------------------------------

SETUP = '''# Reproduces the notebook {name!r} through the LLMOS Workbench Python API.
# Each cell re-runs one recorded run and checks it against the recorded result.
import json
import os
from engine import Workbench
from engine.generation import ChatMessage, GenerationSettings
from engine.reproduce import compare_results

wb = Workbench()


def check(operation, recorded, result):
    """Compare a re-run with the recorded result: exact / within tolerance / mismatch."""
    if recorded is None:
        print("(no recorded result to compare with)")
        return None
    if "file" in recorded and not os.path.exists(recorded["file"]):
        print("(the recorded tensors are not on this machine: nothing to compare with)")
        return None
    verdict, differences = compare_results(operation, recorded, result)
    print(f"verdict: {{verdict}}", *differences, sep="\\n  ")
    assert verdict in ("exact", "within tolerance"), differences
    return verdict


def summary(result):
    """A short text view of a result (the figures are shown below the recorded output)."""
    if isinstance(getattr(result, "text", None), str):
        return result.text
    if hasattr(result, "sides"):
        return "; ".join(f"{{s.label}}: {{s.result.n_tokens}} tokens" for s in result.sides)
    return type(result).__name__
'''


def _summary(result: Any) -> str:
    text = getattr(result, "text", None)
    if isinstance(text, str):
        return text
    if hasattr(result, "sides"):
        return "; ".join(f"{s.label}: {s.result.n_tokens} tokens" for s in result.sides)
    for name in ("perplexity", "label", "bleu"):
        if hasattr(result, name):
            return f"{name}: {getattr(result, name)}"
    return type(result).__name__


def to_ipynb(book: Notebook, ledger: Ledger) -> str:
    """A .ipynb (nbformat 4) whose code cells reproduce each recorded run, with its outputs."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    records = _records(book, ledger)
    cells = [new_markdown_cell(f"# {book.name}"), new_code_cell(SETUP.format(name=book.name))]
    for position, cell in enumerate(book.cells, 1):
        if cell.kind == "markdown":
            cells.append(new_markdown_cell(str(cell.spec.get("text", ""))))
            continue
        record = records.get(cell.id)
        if record is None:
            cells.append(new_markdown_cell(f"*Cell {position} ({cell.kind}) was never run.*"))
            continue
        coder = CODE.get(record.operation)
        if coder is None:
            cells.append(
                new_markdown_cell(f"*Cell {position}: {record.operation} runs are not exported.*")
            )
            continue
        stored = ledger.result_file(record)
        recorded = None
        if stored is not None and stored.suffix == ".json" and stored.stat().st_size < 2_000_000:
            recorded = json.loads(stored.read_text())
        elif stored is not None and stored.suffix == ".npz":
            recorded = {"file": str(stored)}  # the ledger's tensors on this machine
        source = (
            f"# Cell {position}: {record.operation} on {record.model} (run {record.id})\n"
            f"{coder(record.spec)}\n"
            f"recorded = json.loads({json.dumps(json.dumps(recorded))})\n"
            f"check({record.operation!r}, recorded, result)\n"
            "print(summary(result))"
        )
        code = new_code_cell(source)
        try:
            result = ledger.load_result(record)
            shown = _summary(result)
        except (EngineError, OSError, ValueError):
            result, shown = None, "(result unavailable)"
        code.outputs = [new_output("stream", name="stdout", text=f"{shown}\n")]
        for chart in figures(record.operation, result):
            png = _png_bytes(chart)
            if png is not None:
                code.outputs.append(
                    new_output("display_data", data={"image/png": base64.b64encode(png).decode()})
                )
        cells.append(code)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nbformat.writes(notebook)


# --- HTML audit report ------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
color:#1f2430;line-height:1.45}
h1{color:#2f6fde}h2{border-bottom:2px solid #2f6fde;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #d5dae3;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef3fd}.mono{font-family:ui-monospace,Menlo,monospace;word-break:break-all}
.note{color:#5a6272;font-size:.9em}.stale{color:#b35c00;font-weight:600}
.verdict-ok{color:#17803d;font-weight:600}.verdict-bad{color:#b3261e;font-weight:600}
pre{white-space:pre-wrap;background:#f6f8fb;padding:.6em;border-radius:4px}
@media print{h2{page-break-before:auto}section{page-break-inside:avoid}}
"""


def _when(seconds: float | None) -> str:
    if not seconds:
        return "–"
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td class='mono'>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    return f"<table>{body}</table>"


def provenance_table(record: RunRecord) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in sorted(record.versions.items()))
    return _table(
        [
            ("run id", record.id),
            ("operation", record.operation),
            ("status", record.status),
            ("created", _when(record.created)),
            ("duration", f"{record.seconds:.2f} s" if record.seconds else "–"),
            ("user", record.user),
            ("model", record.model),
            ("weights fingerprint", record.fingerprint),
            ("tokenizer / chat template", record.tokenizer_hash),
            ("dtype · device", f"{record.dtype} · {record.device}"),
            ("seed", record.seed if record.seed is not None else "none (deterministic)"),
            ("library versions", versions),
            ("result file sha256", record.result_sha256),
            ("ledger record hash", record.hash),
        ]
    )


def _model_card(workbench, name: str | None) -> str:
    if not name or workbench is None:
        return ""
    try:
        manifest = workbench.store.get(name).manifest
    except EngineError:
        return ""
    rows = [("source", manifest.source), ("licence", manifest.licence)]
    if manifest.base_model:
        rows.append(("base model", f"{manifest.base_model} ({manifest.base_fingerprint})"))
    extra = manifest.extra or {}
    for key in ("data_hash", "hyperparameters", "metrics", "job_id"):
        if key in extra:
            rows.append((key.replace("_", " "), json.dumps(extra[key], ensure_ascii=False)))
    return "<h4>Model card (store manifest)</h4>" + _table(rows)


@section_for("generate")
def _generate_section(result, _record) -> str:
    from engine.generation.views import token_html

    prompt = html.escape(result.model_input or result.prompt)
    return (
        f"<p><b>Input</b></p><pre>{prompt}</pre><p><b>Output</b> ({len(result.tokens)} tokens, "
        f"{html.escape(result.finish_reason)})</p>{token_html(result.tokens)}"
    )


@section_for("perplexity")
def _perplexity_section(result, _record) -> str:
    return (
        f"<pre>{html.escape(result.text)}</pre><p>Perplexity <b>{result.perplexity:.3f}</b> over "
        f"{len(result.token_logprobs)} tokens (mean NLL {result.mean_nll:.4f} nats).</p>"
    )


@section_for("classify")
def _classify_section(result, _record) -> str:
    scores = ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in result.scores.items())
    return f"<pre>{html.escape(result.text)}</pre><p>Label <b>{html.escape(result.label)}</b> ({scores})</p>"


def _png_bytes(chart) -> bytes | None:
    """An altair chart as PNG bytes; None when it cannot be rendered here."""
    try:
        from engine.attention.views import chart_png

        return chart_png(chart, scale=1.5)
    except Exception:  # noqa: BLE001 - a figure that cannot render must not lose the export
        return None


def _png(chart) -> str:
    """An altair chart as an inline PNG (no script needed to read the report)."""
    png = _png_bytes(chart)
    if png is None:
        return "<p class='note'>(figure unavailable)</p>"
    data = base64.b64encode(png).decode()
    return f"<img alt='figure' style='max-width:100%' src='data:image/png;base64,{data}'>"


def figures(operation: str, result: Any) -> list:
    """The altair charts that show a recorded result (attention heatmaps, attribution bars)."""
    if result is None:
        return []
    if operation == "attention":
        from engine.attention import AggregationSettings, aggregate
        from engine.attention.views import heatmap_chart

        charts = []
        for side in result.sides:
            r = side.result
            view = aggregate(r, AggregationSettings(merge_words=r.n_tokens > 48, max_side=48))
            charts.append(heatmap_chart(view, f"{side.label}: {view.description}", size=420))
        return charts
    if operation == "explain":
        return [a.bar_chart("token") for a in result.attributions]
    return []


@section_for("attention")
def _attention_section(result, _record) -> str:
    parts = []
    for side, chart in zip(result.sides, figures("attention", result), strict=True):
        r = side.result
        stats = side.stats.to_frame()
        sink = stats.sort_values("first_token", ascending=False).head(3)
        prev = stats.sort_values("previous_token", ascending=False).head(3)
        heads = lambda rows: ", ".join(  # noqa: E731
            f"L{int(a)}H{int(b)}" for a, b in zip(rows["layer"], rows["head"], strict=True)
        )
        parts.append(
            f"<p><b>{html.escape(side.label)}</b>: {r.n_tokens} tokens, {r.n_layers} layers × "
            f"{r.n_heads} heads</p><pre>{html.escape(r.text)}</pre>"
            f"{_png(chart)}"
            f"<p class='note'>Heads that attend most to the first token: {heads(sink)}; "
            f"to the previous token: {heads(prev)}.</p>"
        )
    return "".join(parts)


@section_for("explain")
def _explain_section(result, _record) -> str:
    parts = [f"<pre>{html.escape(result.text)}</pre>"]
    for a in result.attributions:
        parts.append(f"<h4>{html.escape(a.method_title)}</h4>")
        parts.append(f"<p>Target: {html.escape(a.target_description)}</p>")
        statement = a.delta_statement()
        if statement:
            cls = "verdict-ok" if a.delta_ok else "verdict-bad"
            parts.append(f"<p class='{cls}'>Completeness: {html.escape(statement)}</p>")
        parts.append(a.html())
        faith = a.faithfulness
        if faith is not None:
            from engine.attribution.report import faithfulness_verdict

            kind, sentence = faithfulness_verdict(faith)
            cls = "verdict-ok" if kind == "clear" else "verdict-bad"
            parts.append(
                "<p>Faithfulness: comprehensiveness (AOPC, higher is better: removing the "
                f"top-ranked tokens first lowers the score more) <b>{faith.comprehensiveness:.4f}"
                f"</b> against <b>{faith.random_comprehensiveness:.4f}</b> for a random order; "
                "sufficiency (lower is better: keeping only the top tokens keeps the score) "
                f"<b>{faith.sufficiency:.4f}</b>. <span class='{cls}'>{html.escape(sentence)}"
                "</span></p>"
            )
    if result.agreement is not None:
        frame = result.agreement_frame()
        rows = [
            (f"{r['method_a']} vs {r['method_b']}", f"Spearman {r['spearman']:.3f}")
            for r in frame.to_dict("records")
        ]
        parts.append("<h4>Method agreement</h4>" + _table(rows))
    return "".join(parts)


@section_for("compare")
def _compare_section(result, _record) -> str:
    rows = []
    for outcome in result.outcomes:
        text = outcome.result.text if outcome.result else f"error: {outcome.error}"
        rows.append((outcome.model, text))
    return f"<pre>{html.escape(result.prompt)}</pre>" + _table(rows)


def to_html(book: Notebook, ledger: Ledger, workbench=None, verdicts: dict | None = None) -> str:
    """The audit report: per cell its input, result, full provenance, model card excerpt and
    (when given, ``cell id -> Verdict``) the reproduce verdict. No script, no external file."""
    records = _records(book, ledger)
    parts = [
        f"<h1>{html.escape(book.name)}</h1>",
        f"<p class='note'>Audit report · notebook {book.id} · {len(book.cells)} cells · "
        f"exported {_when(dt.datetime.now(tz=dt.UTC).timestamp())}. Every figure below is "
        "the recorded result of the run named in its provenance table.</p>",
    ]
    for position, cell in enumerate(book.cells, 1):
        if cell.kind == "markdown":
            parts.append(
                f"<section><pre>{html.escape(str(cell.spec.get('text', '')))}</pre></section>"
            )
            continue
        head = f"<h2>Cell {position} · {html.escape(cell.kind)}</h2>"
        record = records.get(cell.id)
        if record is None:
            parts.append(f"<section>{head}<p class='note'>Never run.</p></section>")
            continue
        body = [head]
        if cell.stale:
            body.append("<p class='stale'>Stale: an upstream cell changed after this run.</p>")
        try:
            result = ledger.load_result(record)
            section = SECTIONS.get(record.operation)
            if result is not None and section is not None:
                body.append(section(result, record))
            elif record.error:
                body.append(f"<p class='verdict-bad'>Failed: {html.escape(record.error)}</p>")
        except (EngineError, OSError, ValueError) as exc:
            body.append(f"<p class='verdict-bad'>Result unavailable: {html.escape(str(exc))}</p>")
        verdict = (verdicts or {}).get(cell.id)
        if verdict is not None:
            cls = "verdict-ok" if verdict.match else "verdict-bad"
            diffs = "; ".join(verdict.differences)
            body.append(
                f"<p>Reproduce verdict: <span class='{cls}'>{html.escape(verdict.verdict)}</span>"
                f" <span class='note'>({html.escape(verdict.tolerance)}) {html.escape(diffs)}</span></p>"
            )
        body.append("<h4>Provenance</h4>" + provenance_table(record))
        body.append(_model_card(workbench, record.model))
        parts.append(f"<section>{''.join(body)}</section>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(book.name)} · audit report</title><style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )
