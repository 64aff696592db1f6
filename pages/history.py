"""History: every recorded run (pages, notebooks, CLI, Python API), searchable; open one,
reproduce it, add it to a notebook, or compare two side by side."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import streamlit as st

from workbench import renderers, ui

REPRODUCE = "hist_reproduce_run"
VERDICT = "hist_verdict"

st.title("History")
st.caption(
    "Every run is recorded in the run ledger with its model fingerprint, settings, seed, "
    "library versions and result. The ledger is a hash chain: `workbench history verify` "
    "checks that nothing was changed."
)
wb = ui.engine()
ledger = wb.ledger

c1, c2, c3, c4 = st.columns([1, 1, 2, 2])
kinds = sorted({r.operation for r in ledger.records(limit=2000)})
kind = c1.selectbox("Kind", ["all", *kinds], key="hist_kind")
models = sorted({r.model for r in ledger.records(limit=2000) if r.model})
model = c2.selectbox("Model", ["all", *models], key="hist_model")
text = c3.text_input("Input contains", key="hist_text")
today = dt.date.today()
dates = c4.date_input("Dates", (today - dt.timedelta(days=30), today), key="hist_dates")
since = until = None
if isinstance(dates, tuple | list) and len(dates) == 2:
    since = dt.datetime.combine(dates[0], dt.time.min).timestamp()
    until = dt.datetime.combine(dates[1], dt.time.max).timestamp()

with ui.guard():
    records = ledger.records(
        kind=None if kind == "all" else kind,
        model=None if model == "all" else model,
        text=text or None,
        since=since,
        until=until,
        limit=500,
    )[::-1]  # newest first

if not records:
    st.info("No recorded run matches. Runs appear here as soon as they finish.")
    st.stop()

frame = pd.DataFrame(
    [
        {
            "when": dt.datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M:%S"),
            "kind": r.operation,
            "status": r.status,
            "model": r.model,
            "input": " ".join((r.input_text or "").split())[:80],
            "seconds": round(r.seconds or 0.0, 2),
            "user": r.user,
            "id": r.id,
        }
        for r in records
    ]
)
picked = st.dataframe(
    frame,
    hide_index=True,
    width="stretch",
    on_select="rerun",
    selection_mode="multi-row",
    key="hist_table",
)
rows = list(picked.selection.rows) if picked and picked.selection else []
st.caption(f"{len(records)} runs shown. Select one to open it, two to compare them.")
chosen = [records[i] for i in rows[:2]]


def show(record, key: str) -> None:
    st.markdown(f"**{record.operation}** · `{record.id}` · {record.status}")
    if record.error:
        ui.show_error(record.error)
    result = ledger.load_result(record)
    if result is not None:
        renderers.render(result, key)
    with st.expander("Provenance"):
        st.dataframe(
            pd.DataFrame(
                [
                    ("model", record.model),
                    ("fingerprint", record.fingerprint),
                    ("tokenizer / chat template", record.tokenizer_hash),
                    ("dtype · device", f"{record.dtype} · {record.device}"),
                    ("seed", record.seed),
                    ("seconds", record.seconds),
                    ("versions", ", ".join(f"{k} {v}" for k, v in record.versions.items())),
                    ("result sha256", record.result_sha256),
                    ("record hash", record.hash),
                ],
                columns=["field", "value"],
            ).astype(str),
            hide_index=True,
            width="stretch",
        )
        st.json(record.spec, expanded=False)


# operation -> (page file, session key its result lives under)
OPENS_IN = {
    "generate": ("generate.py", "gen_result"),
    "perplexity": ("generate.py", "eval_ppl_result"),
    "compare": ("generate.py", "gen_comparison"),
    "explain": ("attribution.py", "explain_result"),
}


def open_in_page(record) -> None:
    """Show a recorded result on the page that made it (as if it had just run there)."""
    page, key = OPENS_IN[record.operation]
    result = ledger.load_result(record)
    st.session_state[key] = result
    st.session_state[f"{key}_run_id"] = record.id
    if record.operation == "explain":
        st.session_state["explain_run_id"] = record.id
    if record.model and record.operation != "compare":
        ui.pick_model_next_run(record.model)  # the page shows that model's results
    st.switch_page(str(Path(__file__).parent / page))


if len(chosen) == 1:
    record = chosen[0]
    with st.container(border=True):
        show(record, f"hist_{record.id}")
        a, b, c = st.columns(3)
        openable = record.operation in OPENS_IN and record.status == "done"
        if openable and c.button("Open in its page", key="hist_open"):
            open_in_page(record)
        with a:
            ui.add_to_notebook(record.id if record.status == "done" else None, "hist_add")
        reproducing = st.session_state.get(REPRODUCE)
        if b.button("Reproduce", key="hist_reproduce", disabled=reproducing is not None):
            from engine import runs
            from engine.reproduce import reproduce

            st.session_state.pop(VERDICT, None)
            st.session_state[REPRODUCE] = runs.start(
                "reproduce", lambda _ctx, r=record: reproduce(wb, r), spec={"run": record.id}
            )
            st.rerun()
        if reproducing is not None and reproducing.done:
            st.session_state.pop(REPRODUCE)
            snap = reproducing.snapshot()
            st.session_state[VERDICT] = (record.id, snap.result, snap.error)
        ui.poll_run(REPRODUCE, lambda r: ui.run_progress(r, key="hist_reproduce_stop"))
        verdict = st.session_state.get(VERDICT)
        if verdict is not None and verdict[0] == record.id:
            _, found, error = verdict
            if error:
                ui.show_error(error)
            else:
                (st.success if found.match else st.error)(
                    f"Reproduce verdict: **{found.verdict}** ({found.tolerance})"
                    + ("".join(f"\n- {d}" for d in found.differences))
                )
elif len(chosen) == 2:
    left, right = st.columns(2)
    for col, record in zip((left, right), chosen, strict=True):
        with col, st.container(border=True):
            show(record, f"hist_cmp_{record.id}")
    a, b = chosen
    differing = sorted(
        key for key in set(a.spec) | set(b.spec) if a.spec.get(key) != b.spec.get(key)
    )
    st.caption("Spec fields that differ: " + (", ".join(differing) or "none"))
