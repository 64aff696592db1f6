"""Notebook: every run is a saved, re-runnable cell.

Pick or create a notebook; add cells (a note, a generation, an evaluation, a comparison,
attention, an explanation, a classification); run one cell or all of them in the background;
every result is kept in the run ledger and shown again after a restart without recomputing.
``?notebook=ID`` opens a read-only snapshot that can be forked.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import streamlit as st

from engine.html import text_html
from workbench import renderers, ui

RUN = "nb_run"  # the cell run or Run all going on (one at a time per session)
RUN_ERROR = "nb_run_error"
VERDICTS = "nb_verdicts"  # (notebook id, {cell id: Verdict}) from the last "Reproduce all"
ACTIVE = "nb_active"
EDITING = "nb_editing"  # id of the cell whose editor is open
KIND_LABELS = {
    "markdown": "Note",
    "generate": "Generate",
    "evaluate": "Evaluate",
    "compare": "Compare models",
    "attention": "Attention",
    "explain": "Explain",
    "classify": "Classify",
    "collect": "Collect class data",
    "finetune": "Fine-tune",
}


def activate(notebook_id: str) -> None:
    """Make ``notebook_id`` the open notebook (the picker would keep its old choice)."""
    st.session_state[ACTIVE] = notebook_id
    st.session_state.pop("nb_pick", None)


st.title("Notebook")
wb = ui.engine()

from engine.notebooks import (  # noqa: E402  (after the engine spinner)
    OUTPUTS,
    Ref,
    cell_readable,
    cell_result,
    start_all,
    start_cell,
)

store = wb.notebooks


def student_form(target: str) -> None:
    """What a student sees from a collect link: the prompt, a sentence, a label, Send."""
    from engine.notebooks.collect import Collection, labels_of

    notebook_id, _, cell_id = target.partition(":")
    with ui.guard():
        cell = store.collect_cell(notebook_id, cell_id)
        labels = labels_of(cell.spec)
    st.subheader(cell.spec.get("prompt") or "Write a sentence and pick its label")
    with st.form("collect_form", clear_on_submit=True):
        text = st.text_area("Your sentence", max_chars=500, key="collect_text")
        label = st.radio("Label", labels, horizontal=True, key="collect_label")
        sent = st.form_submit_button("Send", type="primary")
    if sent:
        with ui.guard():
            Collection(wb.home, cell.id).add(text, label, labels)
        st.success("Thank you! Your sentence was added. Send another one if you like.")


if st.query_params.get("collect"):
    student_form(st.query_params["collect"])
    st.stop()

shared_id = st.query_params.get("notebook")
readonly = bool(shared_id)


# --- which notebook -------------------------------------------------------------------------
def _lessons(narrow: bool = False) -> None:
    """The ready lessons, each with an "Open" button that makes a fresh copy to run and edit
    (``narrow``: the button under the text, for the sidebar)."""
    from engine.notebooks import LESSONS, open_lesson

    for number, item in enumerate(LESSONS, 1):
        text, button = (st, st) if narrow else st.columns([5, 1], vertical_alignment="center")
        text.markdown(f"**{number}. {item.title}**  \n{item.summary}")
        if button.button("Open", key=f"nb_lesson_{item.id}", help="Open a fresh copy"):
            with ui.guard():
                activate(open_lesson(store, item.id).id)
            st.rerun()


def _pick_notebook() -> str | None:
    infos = [i for i in store.list() if not i.damaged]
    for bad in (i for i in store.list() if i.damaged):
        st.warning(f"Notebook file {bad.id}.json cannot be opened: {bad.damaged}", icon="⚠️")
    writer = ui.can("notebooks.write")
    if writer:
        with st.sidebar.expander("Notebooks", expanded=not infos):
            name = st.text_input("New notebook", key="nb_new_name", placeholder="Name")
            if st.button("Create", key="nb_create") and name.strip():
                with ui.guard():
                    activate(store.create(name).id)
                st.rerun()
    if not infos and not writer:
        st.info("No notebook has been shared with you yet.", icon="📓")
        return None
    if not infos:
        st.info(
            "No notebook yet. Start from an example (a generation, the attention on it and an "
            "explanation of its answer) or create an empty one in the sidebar.",
            icon="📓",
        )
        if st.button("Open the example notebook", key="nb_example", type="primary"):
            from engine.notebooks import example

            with ui.guard():
                activate(example(store).id)
            st.rerun()
        st.subheader("Lessons")
        st.caption("Ready lessons for a class: each opens as your own copy, to run and edit.")
        _lessons()
        return None
    if writer:
        with st.sidebar.expander("Lessons"):
            _lessons(narrow=True)
    ids = [i.id for i in infos]
    me = ui.user_name()
    labels = {
        i.id: f"{i.name} · {i.cells} cells"
        + ("" if i.owner == me else f" · by {i.owner}")
        + (" · shared with the class" if i.shared else "")
        for i in infos
    }
    current = st.session_state.get(ACTIVE)
    index = ids.index(current) if current in ids else 0
    chosen = st.selectbox("Notebook", ids, index=index, format_func=labels.get, key="nb_pick")
    st.session_state[ACTIVE] = chosen
    return chosen


if readonly:
    with ui.guard():
        book = store.get(shared_id)
    st.info("Read-only snapshot. Fork it to edit and re-run.", icon="🔒")
    if st.button("Fork (editable copy)", key="nb_fork"):
        with ui.guard():
            copy = store.duplicate(book.id, f"{book.name} (fork)")
        activate(copy.id)
        st.query_params.clear()
        st.rerun()
else:
    notebook_id = _pick_notebook()
    if notebook_id is None:
        st.stop()
    with ui.guard():
        book = store.get(notebook_id)
    if not ui.may_change(book.owner):  # a pushed lesson, or a student's work seen by a teacher
        readonly = True
        shared_by = " (shared with the class)" if book.shared else ""
        st.info(f"{book.name!r} belongs to {book.owner}{shared_by}: read-only here.", icon="🔒")
        if ui.can("notebooks.write") and st.button("Make my own copy", key="nb_copy_own"):
            with ui.guard():
                activate(store.duplicate(book.id).id)
            st.rerun()

# --- notebook actions -----------------------------------------------------------------------
run = st.session_state.get(RUN)
if run is not None and run.done:
    st.session_state.pop(RUN)
    snap = run.snapshot()
    if snap.error and not snap.cancelled:
        st.session_state[RUN_ERROR] = snap.error
    if snap.operation == "reproduce-notebook" and snap.result is not None:
        st.session_state[VERDICTS] = (book.id, snap.result)
    run = None
    book = store.get(book.id)
held = st.session_state.get(VERDICTS)
verdicts = held[1] if held and held[0] == book.id else {}
present = st.toggle(
    "Presenter view",
    key="nb_present",
    help="For a projector: large type, one cell at a time, only Run.",
)

if not readonly and not present:
    with st.expander("Notebook: rename, duplicate, share, delete"):
        c1, c2, c3 = st.columns(3)
        new_name = c1.text_input("Name", value=book.name, key=f"nb_rename::{book.id}")
        if c1.button("Rename", key="nb_rename_go") and new_name != book.name:
            with ui.guard():
                store.rename(book.id, new_name)
            st.rerun()
        if c2.button("Duplicate", key="nb_duplicate"):
            with ui.guard():
                activate(store.duplicate(book.id).id)
            st.rerun()
        c2.caption(f"Share (read-only): `?notebook={book.id}`")
        if ui.can("notebooks.push"):
            pushed = c2.toggle(
                "Shared with the class",
                value=book.shared,
                key=f"nb_push::{book.id}",
                help="Every user sees it read-only and can make their own copy.",
            )
            if pushed != book.shared:
                with ui.guard():
                    store.share(book.id, pushed)
                st.rerun()
        if c3.button("Delete this notebook", key="nb_delete", type="secondary"):
            store.delete(book.id)
            st.session_state.pop(ACTIVE, None)
            st.rerun()
left, middle, right, _ = st.columns([1, 1.4, 1, 3]) if not present else [st.empty()] * 4
if (
    not readonly
    and not present
    and left.button("Run all", key="nb_run_all", type="primary", disabled=run is not None)
):
    st.session_state.pop(RUN_ERROR, None)
    with ui.guard():
        st.session_state[RUN] = start_all(wb, book.id)
    st.rerun()
if not present and middle.button(
    "Reproduce all",
    key="nb_reproduce_all",
    disabled=run is not None,
    help="Re-run every recorded cell and compare with its recorded numbers (for an audit).",
):
    from engine.notebooks import start_reproduce_all

    st.session_state.pop(RUN_ERROR, None)
    with ui.guard():
        st.session_state[RUN] = start_reproduce_all(wb, book.id)
    st.rerun()
if run is not None and right.button("Stop", key="nb_stop"):
    run.cancel()


def running_view(current) -> None:
    """Progress, and a fine-tune's live curves while its cell runs."""
    ui.run_progress(current, key="nb_progress_stop")
    partial = current.snapshot().partial
    records = list(getattr(partial, "records", None) or ())
    if records:
        classifier = any("accuracy" in r for r in records)
        renderers.training_curves(records, "classification" if classifier else "causal-lm")


ui.poll_run(RUN, running_view, every=1.0)
if st.session_state.get(RUN_ERROR):
    ui.show_error(st.session_state[RUN_ERROR])


# --- cells ----------------------------------------------------------------------------------
def _models(kinds: tuple[str, ...]) -> list[str]:
    names = [e.name for e in wb.catalog() if e.kind in kinds]
    current = ui.selected_model_name()
    return names if current in names else [current, *names]


def _ref_picker(
    label: str, cells_above, key: str, kinds=("generate",), current: Ref | None = None
) -> Ref | None:
    """ "Use the output of cell N" for a field, or None to type it."""
    options = [None] + [
        (c.id, out) for c in cells_above if c.kind in kinds for out in OUTPUTS.get(c.kind, {})
    ]
    position = {c.id: i + 1 for i, c in enumerate(book.cells)}
    kind_of = {c.id: c.kind for c in book.cells}

    def fmt(option) -> str:
        if option is None:
            return "type it here"
        cell_id, out = option
        return f"cell {position[cell_id]}: {OUTPUTS[kind_of[cell_id]][out]}"

    now = (current.cell, current.output) if current else None
    index = options.index(now) if now in options else 0
    chosen = st.selectbox(label, options, index=index, format_func=fmt, key=key)
    return Ref(*chosen) if chosen else None


def editor(kind: str, spec: dict, refs: dict, cells_above, key: str) -> tuple[dict, dict] | None:
    """Widgets for a cell's spec; returns (spec, refs) when the form is submitted."""
    spec, refs = dict(spec), dict(refs)
    with st.container(key=f"{key}_editor"):
        if kind == "markdown":
            spec["text"] = st.text_area("Note (Markdown)", spec.get("text", ""), key=f"{key}_md")
        if kind in ("generate", "evaluate", "attention", "explain", "classify"):
            wanted = ("classifier",) if kind == "classify" else ("causal-lm", "seq2seq", "encoder")
            names = _models(wanted)
            model_ref = (
                _ref_picker(
                    "Model from",
                    cells_above,
                    f"{key}_mref",
                    kinds=("finetune",),
                    current=refs.get("model"),
                )
                if any(c.kind == "finetune" for c in cells_above)
                else None
            )
            if model_ref is None:
                refs.pop("model", None)
                model = spec.get("model") or names[0]
                names = names if model in names else [model, *names]
                spec["model"] = st.selectbox(
                    "Model", names, index=names.index(model), key=f"{key}_m"
                )
            else:
                refs["model"] = model_ref
        if kind == "compare":
            names = _models(("causal-lm", "seq2seq"))
            spec["models"] = st.multiselect(
                "Models",
                names,
                default=[m for m in spec.get("models", []) if m in names],
                key=f"{key}_ms",
            )
        field = {"generate": "prompt", "compare": "prompt"}.get(kind, "text")
        if kind not in ("markdown", "finetune"):
            ref = _ref_picker(
                f"{field.capitalize()} from", cells_above, f"{key}_ref", current=refs.get(field)
            )
            if ref is None:
                refs.pop(field, None)
                spec[field] = st.text_area(field.capitalize(), spec.get(field, ""), key=f"{key}_t")
            else:
                refs[field] = ref
        if kind == "explain":
            target_ref = _ref_picker(
                "Target from", cells_above, f"{key}_tref", current=refs.get("target")
            )
            if target_ref is None:
                refs.pop("target", None)
                spec["target"] = st.text_input(
                    "Target continuation (empty = the model's next token)",
                    spec.get("target", ""),
                    key=f"{key}_target",
                )
            else:
                refs["target"] = target_ref
            from engine.attribution import all_methods

            names = [m.name for m in all_methods()]
            chosen = [m for m in spec.get("methods") or ["integrated_gradients"] if m in names]
            spec["methods"] = st.multiselect("Methods", names, default=chosen, key=f"{key}_methods")
            spec.pop("method", None)
        if kind == "attention":
            spec["max_tokens"] = int(
                st.number_input(
                    "Max tokens", 2, 4096, int(spec.get("max_tokens", 1024)), key=f"{key}_mt"
                )
            )
            spec["truncate"] = st.checkbox(
                "Truncate to the model's context", bool(spec.get("truncate")), key=f"{key}_tr"
            )
        if kind == "collect":
            raw = st.text_input(
                "Labels (comma-separated)",
                ", ".join(spec.get("labels") or ["positive", "negative"]),
                key=f"{key}_labels",
            )
            spec["labels"] = [x.strip() for x in raw.split(",") if x.strip()]
            spec["prompt"] = st.text_input(
                "What students are asked",
                spec.get("prompt", "Write a short sentence and pick its label."),
                key=f"{key}_prompt",
            )
        if kind == "finetune":
            from engine.finetune import samples

            spec["base"] = st.text_input(
                "Base model", spec.get("base", "minilm-l6"), key=f"{key}_b"
            )
            spec["task"] = st.selectbox(
                "Task",
                ["classification", "causal-lm"],
                key=f"{key}_task",
                index=["classification", "causal-lm"].index(spec.get("task", "classification")),
            )
            spec["data"] = st.text_input(
                f"Data: a shipped sample ({', '.join(samples())}) or a file path",
                spec.get("data", "sentiment"),
                key=f"{key}_data",
            )
            spec["out"] = st.text_input(
                "Name of the tuned model", spec.get("out", ""), key=f"{key}_out"
            )
            train = dict(spec.get("train") or {})
            train["epochs"] = int(
                st.number_input("Epochs", 1, 100, int(train.get("epochs", 1)), key=f"{key}_ep")
            )
            spec["train"] = train
        if kind == "evaluate":
            metrics = ["perplexity", "overlap"]
            spec["metric"] = st.radio(
                "Metric",
                metrics,
                index=metrics.index(spec.get("metric", "perplexity")),
                format_func={"perplexity": "Perplexity of the text", "overlap": "BLEU / chrF"}.get,
                horizontal=True,
                key=f"{key}_metric",
            )
            if spec["metric"] == "overlap":  # hypothesis = the text above; a reference to type
                spec["hypothesis"] = spec.pop("text", spec.get("hypothesis", ""))
                if "text" in refs:
                    refs["hypothesis"] = refs.pop("text")
                spec["reference"] = st.text_area(
                    "Reference", spec.get("reference", ""), key=f"{key}_reference"
                )
        if kind == "generate":
            chat = st.toggle(
                "Chat (through the model's chat template)",
                bool(spec.get("messages")),
                key=f"{key}_chat",
            )
            spec["chat"] = chat
            spec.pop("messages", None)  # the chat is built from the (resolved) prompt when run
            if chat:
                spec["system"] = st.text_input(
                    "System message (optional)", spec.get("system", ""), key=f"{key}_sys"
                )
        if kind in ("generate", "compare"):
            settings = dict(spec.get("settings") or {"max_new_tokens": 32, "greedy": True})
            c1, c2, c3 = st.columns(3)
            settings["max_new_tokens"] = int(
                c1.number_input(
                    "Max new tokens",
                    1,
                    4096,
                    int(settings.get("max_new_tokens", 32)),
                    key=f"{key}_n",
                )
            )
            settings["greedy"] = c2.toggle(
                "Greedy", bool(settings.get("greedy", True)), key=f"{key}_g"
            )
            seed = c3.text_input(
                "Seed (empty = random)", str(settings.get("seed") or ""), key=f"{key}_seed"
            )
            settings["seed"] = int(seed) if seed.strip().isdigit() else None
            spec["settings"] = settings
        if st.button("Save cell", type="primary", key=f"{key}_save"):
            return spec, refs
    return None


def cell_header(position: int, cell) -> None:
    badges = []
    if cell.stale:
        badges.append(":orange-badge[stale: an upstream cell changed]")
    if cell.status == "failed":
        badges.append(":red-badge[failed]")
    elif cell.status == "done" and cell.kind != "markdown":
        badges.append(":green-badge[done]")
    elif cell.kind != "markdown":
        badges.append(":gray-badge[not run]")
    refs = ", ".join(
        f"{key} ← cell {book.index(ref.cell) + 1} ({ref.output})" for key, ref in cell.refs.items()
    )
    st.markdown(
        f"**{position}. {KIND_LABELS.get(cell.kind, cell.kind)}** "
        + " ".join(badges)
        + (f"  \n<small>uses {text_html(refs)}</small>" if refs else ""),
        unsafe_allow_html=True,
    )


def cell_actions(cell) -> None:
    cols = st.columns(7)
    busy = run is not None
    if cell.kind != "markdown" and cols[0].button("Run", key=f"run_{cell.id}", disabled=busy):
        st.session_state.pop(RUN_ERROR, None)
        with ui.guard():
            st.session_state[RUN] = start_cell(wb, book.id, cell.id)
        st.rerun()
    if cols[1].button("Edit", key=f"edit_{cell.id}"):
        st.session_state[EDITING] = None if st.session_state.get(EDITING) == cell.id else cell.id
        st.rerun()
    for col, label, step in ((cols[2], "↑", -1), (cols[3], "↓", 1)):
        if col.button(label, key=f"mv{step}_{cell.id}", disabled=busy):
            with ui.guard():
                store.move_cell(book.id, cell.id, step)
            st.rerun()
    if cols[4].button("Duplicate", key=f"dup_{cell.id}", disabled=busy):
        with ui.guard():
            store.duplicate_cell(book.id, cell.id)
        st.rerun()
    if cols[5].button("Delete", key=f"del_{cell.id}", disabled=busy):
        with ui.guard():
            store.delete_cell(book.id, cell.id)
        st.rerun()


@st.cache_resource(show_spinner=False, max_entries=64)
def _stored_result(home: str, run_id: str, owner: str, _cell):
    """A cell's stored result, read once per run id (a recorded result never changes).
    Shared by every session: call only after ``cell_readable`` said this user may see it."""
    return cell_result(wb, _cell, owner)


def collected_view(cell) -> None:
    """The instructor's live view of a collect cell: the link, the growing table, Remove."""
    from engine.notebooks.collect import Collection

    st.markdown(
        f"Students open **`?collect={book.id}:{cell.id}`** on this server "
        "(the workbench's address followed by this) and send sentences."
    )
    box = Collection(wb.home, cell.id)

    def table() -> None:
        rows = box.rows()
        counts = ", ".join(
            f"{label}: {sum(r.label == label for r in rows)}" for label in cell.spec["labels"]
        )
        st.caption(f"{len(rows)} sentences · {counts}")
        if not rows:
            return
        frame = pd.DataFrame(
            [{"remove": False, "text": r.text, "label": r.label, "id": r.id} for r in rows]
        )
        edited = st.data_editor(
            frame,
            disabled=["text", "label", "id"],
            hide_index=True,
            key=f"collect_table_{cell.id}",
        )
        picked = list(edited.loc[edited["remove"], "id"])
        if (
            picked
            and not readonly
            and st.button(f"Remove {len(picked)} row(s)", key=f"collect_remove_{cell.id}")
        ):
            box.remove(picked)
            st.rerun(scope="fragment")

    st.fragment(table, run_every=3.0)()


def cell_result_view(cell) -> None:
    """A cell's note, or its error, stored result and reproduce verdict."""
    if cell.kind == "markdown":
        # A note may come from a pushed or imported notebook: no remote images load from it.
        st.markdown(re.sub(r"!(?=\[)", r"\\!", cell.spec.get("text", "")))
        return
    if cell.kind == "collect":
        collected_view(cell)
    if cell.error and cell.status != "done":
        ui.show_error(cell.error)
    if cell.run_id:
        readable = cell_readable(wb, cell, book.owner)
        result = _stored_result(str(wb.home), cell.run_id, book.owner, cell) if readable else None
        if result is None:
            st.caption("The stored result of this cell's run is missing from the ledger.")
        else:
            renderers.render(result, f"nb_{cell.id}")
            st.caption(f"Run `{cell.run_id}` · `workbench rerun {cell.run_id}` reproduces it")
        verdict = verdicts.get(cell.id)
        if verdict is not None:
            (st.success if verdict.match else st.error)(
                f"Reproduce verdict: **{verdict.verdict}** ({verdict.tolerance})"
                + "".join(f"\n- {d}" for d in verdict.differences)
            )


PRESENTER_CSS = """<style>
section[data-testid="stSidebar"], header[data-testid="stHeader"] {display: none;}
.stMainBlockContainer {max-width: 100%; padding-top: 1rem;}
.stMainBlockContainer p, .stMainBlockContainer li, .stMainBlockContainer pre {font-size: 1.6rem;}
.stMainBlockContainer h1, .stMainBlockContainer h2, .stMainBlockContainer h3 {font-size: 2.4rem;}
.gen-tokens {font-size: 1.6rem;}
</style>"""


def presenter() -> None:
    """One cell at a time in large type, with Previous / Next and Run (for a projector)."""
    st.markdown(PRESENTER_CSS, unsafe_allow_html=True)
    cells = book.cells
    if not cells:
        st.info("This notebook has no cells yet.")
        return
    index = min(max(int(st.session_state.get("nb_slide", 0)), 0), len(cells) - 1)
    cell = cells[index]
    prev, where, go, nxt = st.columns([1, 2, 1, 1])
    if prev.button("◀ Previous", key="nb_prev", disabled=index == 0):
        st.session_state["nb_slide"] = index - 1
        st.rerun()
    where.markdown(f"**Cell {index + 1} of {len(cells)}** · {KIND_LABELS.get(cell.kind)}")
    runnable = cell.kind != "markdown" and not readonly
    if runnable and go.button(
        "Run", key="nb_present_run", type="primary", disabled=run is not None
    ):
        with ui.guard():
            st.session_state[RUN] = start_cell(wb, book.id, cell.id)
        st.rerun()
    if nxt.button("Next ▶", key="nb_next", disabled=index == len(cells) - 1):
        st.session_state["nb_slide"] = index + 1
        st.rerun()
    with st.container(key="nb_slide_body"):
        cell_result_view(cell)


if present:
    presenter()
    st.stop()

for position, cell in enumerate(book.cells, 1):
    with st.container(border=True, key=f"cell_{cell.id}"):
        cell_header(position, cell)
        if not readonly:
            cell_actions(cell)
            if st.session_state.get(EDITING) == cell.id:
                saved = editor(cell.kind, cell.spec, cell.refs, book.cells[: position - 1], cell.id)
                if saved is not None:
                    with ui.guard():
                        store.edit_cell(book.id, cell.id, *saved)
                    st.session_state[EDITING] = None
                    st.rerun()
        cell_result_view(cell)

# --- add a cell -----------------------------------------------------------------------------
if not readonly:
    st.divider()
    kind = st.selectbox(
        "Add a cell", list(KIND_LABELS), format_func=KIND_LABELS.get, key="nb_add_kind"
    )
    added = editor(kind, {}, {}, book.cells, f"new_{kind}")
    if added is not None:
        with ui.guard():
            store.add_cell(book.id, kind, added[0], added[1])
        st.rerun()

with st.expander("Export"):
    from engine.notebooks import export as exporter

    # built only when clicked (callables), never on every rerun: the HTML renders figures
    st.caption("The HTML report includes the verdicts of the last *Reproduce all*.")
    e1, e2, e3 = st.columns(3)
    e1.download_button(
        "JSON bundle",
        lambda: json.dumps(exporter.bundle(book, wb.ledger), ensure_ascii=False),
        f"{book.name}.json",
        "application/json",
        key="nb_export_json",
    )
    e2.download_button(
        "Jupyter (.ipynb)",
        lambda: exporter.to_ipynb(book, wb.ledger),
        f"{book.name}.ipynb",
        "application/x-ipynb+json",
        key="nb_export_ipynb",
    )
    e3.download_button(
        "HTML audit report",
        lambda: exporter.to_html(book, wb.ledger, wb, verdicts),
        f"{book.name}.html",
        "text/html",
        key="nb_export_html",
    )
