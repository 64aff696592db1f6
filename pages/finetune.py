"""Fine-tune: pick data and a base model, start a background job, watch it learn, use the result.

Jobs run in their own processes with their state on disk (engine.finetune.jobs); the page
draws a job's run snapshot (``JobStore.run(id).snapshot()``, the same interface as every other
run): a fragment polls it every second while the job is active.
"""

import time

import pandas as pd
import streamlit as st

from engine import access
from engine.finetune import data as ftdata
from engine.finetune.config import JobSpec, TrainConfig, choose_settings
from engine.finetune.jobs import RESUMABLE, JobStore
from engine.finetune.result import read_json
from engine.html import markdown_literal as md
from workbench import renderers, ui

st.title("Fine-tune")
st.caption(
    "Turn a base model into your own: sequence classification on an encoder (MiniLM) or causal "
    "LM tuning (SmolLM2), full or LoRA. Each job runs in its own process and keeps its state on "
    "disk: leave the page, close the browser or restart the app, and it is still there."
)
wb = ui.engine()
jobs = JobStore(wb.home)

if "ft_select" in st.session_state:  # set by Start before a rerun (the picker is not drawn yet)
    st.session_state["ft_job"] = st.session_state.pop("ft_select")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def use_model(name: str) -> None:
    """Button callback (runs before the rerun, so it may set the sidebar picker's value)."""
    st.session_state[ui.MODEL_KEY] = name


def results(job_id: str, task: str, result) -> None:
    """Before vs after on the validation set, the confusion matrix, and a quick try-out.
    ``result``: the job's ``FinetuneResult`` (None: nothing recorded)."""
    if result is None:
        return
    st.dataframe(pd.DataFrame(result.comparison()), hide_index=True)
    from engine.finetune.result import ledger_id

    ui.add_to_notebook(ledger_id(job_id), f"ft_add_to_notebook_{job_id}")
    if "confusion" in result.metrics_after:
        labels = list(result.labels)
        st.caption("Confusion matrix after training (rows: true label, columns: predicted).")
        st.dataframe(pd.DataFrame(result.metrics_after["confusion"], index=labels, columns=labels))
    name = result.model
    if not name:
        st.info("The LoRA adapter is saved in the job folder but not merged into the store.")
        may_merge = access.may_control(jobs.get(job_id).owner)  # the owner or an admin
        if may_merge and st.button("Merge the adapter and store the model", key=f"merge_{job_id}"):
            with ui.guard(), st.spinner("Merging…"):
                jobs.merge(job_id)
            st.rerun(scope="app")
        return
    st.success(f"Saved as **{name}** in the model store: pick it in the sidebar on any page.")
    if st.button(
        f"Use {name} in the sidebar", key=f"use_{job_id}", on_click=use_model, args=(name,)
    ):
        st.rerun(scope="app")  # the callback set the picker; redraw the sidebar
    text = st.text_input(
        "Try it",
        value="The service was friendly and the food was wonderful."
        if task == "classification"
        else "What is the capital of France?",
        key=f"try_{job_id}",
    )
    if st.button("Run", key=f"run_{job_id}") and text.strip():
        model = ui.load_model(name)
        with ui.guard():
            if task == "classification":
                out = model.classify(text)
                st.markdown(f"Prediction: **{md(out.label)}** ({out.confidence:.1%})")
                st.bar_chart(pd.Series(out.scores, name="probability"))
            else:
                st.text(model.generate(text, max_new_tokens=32, greedy=True).text)


def monitor(job_id: str, task: str, title: str) -> None:
    """Status, progress with ETA, curves, log tail and the actions that fit the status, all
    from one snapshot of the job's run."""
    with ui.guard():
        snap = jobs.run(job_id).snapshot()
        info = jobs.get(job_id)  # owner and place in line ("queued: 2nd in line")
    progress = snap.partial  # FinetuneProgress: the job's own status word, steps, records
    status = progress.status
    icon = {"completed": "✅", "failed": "❌", "cancelled": "⏹️", "interrupted": "⚠️"}.get(
        status, "⏳"
    )
    controls = access.may_control(info.owner)  # Cancel / Resume only for the owner or an admin
    by = "" if info.owner == ui.user_name() else f" · by {info.owner}"
    st.markdown(f"{icon} **{info.status_label}** · job `{job_id}` · {title}{by}")
    running = not snap.finished
    if progress.total_steps:
        st.progress(
            snap.fraction,
            text=f"Step {progress.step}/{progress.total_steps} · {progress.phase} · "
            f"ETA {fmt_seconds(progress.eta_s) if running else '–'}",
        )
    else:
        st.progress(0.0, text=snap.message)
    if snap.error:
        st.warning(snap.error)
    buttons = st.columns(4)
    if controls and running and buttons[0].button("Cancel", key=f"cancel_{job_id}"):
        with ui.guard():
            jobs.cancel(job_id)
        st.rerun(scope="app")
    resumable = controls and status in RESUMABLE
    if resumable and buttons[0].button("Resume", key=f"resume_{job_id}", type="primary"):
        with ui.guard():
            jobs.resume(job_id)
        st.rerun(scope="app")
    chosen = (read_json(jobs.folder(job_id) / "state.json", {}) or {}).get("settings")
    if isinstance(chosen, dict) and chosen.get("why"):
        st.caption(f"Settings: {chosen['why']}")
    renderers.training_curves(list(progress.records), task)
    with st.expander("Log", expanded=snap.state == "failed"):
        st.code(jobs.log_tail(job_id, 40) or "(empty)", language="text")
    if snap.state == "done":
        results(job_id, task, snap.result)
    if running:
        st.session_state["ft_live"] = job_id
    elif st.session_state.get("ft_live") == job_id:  # just finished: refresh the whole page
        st.session_state.pop("ft_live")
        st.rerun(scope="app")


live_monitor = st.fragment(run_every=1.0)(monitor)
still_monitor = st.fragment(monitor)

# --- jobs -------------------------------------------------------------------------------
st.subheader("Jobs")
with ui.guard():
    all_jobs = jobs.list()  # only the jobs this user may read (engine.access)
if all_jobs:
    by_id = {j.id: j for j in all_jobs}
    if st.session_state.get("ft_job") not in by_id:
        st.session_state["ft_job"] = all_jobs[0].id
    chosen = st.selectbox(
        "Job",
        list(by_id),
        key="ft_job",
        format_func=lambda i: f"{i} · {by_id[i].out} · {by_id[i].status_label}",
    )
    job = by_id[chosen]
    title = f"{job.task} on `{job.base}` → `{job.out}`"
    (live_monitor if job.active else still_monitor)(chosen, job.task, title)
    with st.expander(f"All jobs ({len(all_jobs)})"):
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "job": j.id,
                        "status": j.status_label,
                        "owner": j.owner,
                        "task": j.task,
                        "base": j.base,
                        "model": j.out,
                        "steps": f"{j.step}/{j.total_steps}",
                        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(j.created)),
                    }
                    for j in all_jobs
                ]
            ),
            hide_index=True,
            width="stretch",
        )
else:
    st.info("No fine-tuning jobs yet: set one up below.")

# --- new job -----------------------------------------------------------------------------
st.subheader("New job")
task = st.radio("Task", ["classification", "causal-lm"], horizontal=True, key="ft_task")
source = st.radio("Data", ["Sample", "Upload"], horizontal=True, key="ft_source")
if source == "Sample":
    options = ftdata.samples(task)
    sample = st.selectbox(
        "Sample data", list(options), format_func=lambda k: f"{k}: {options[k]}", key="ft_sample"
    )
    data_path = ftdata.sample_path(sample)
else:
    upload = st.file_uploader("CSV, JSONL or TXT", type=["csv", "jsonl", "txt"], key="ft_upload")
    if upload is None:
        st.stop()
    with ui.guard():  # size limit first; stored once as uploads/<user>/<sha256>-<safe name>
        ftdata.check_upload_size(upload.size, upload.name)
        stored = st.session_state.get("ft_upload_path")
        if stored is None or stored[0] != upload.file_id:
            stored = (upload.file_id, ftdata.store_upload(wb.home, upload.name, upload.getvalue()))
            st.session_state["ft_upload_path"] = stored
        data_path = stored[1]

with ui.guard():
    table = ftdata.read_table_once(data_path)  # parsed once per file, not on every rerun
guess = ftdata.guess_columns(table.columns, task)
cols = list(table.columns)


def column_choice(label: str, default: str | None, key: str) -> str:
    return st.selectbox(label, cols, index=cols.index(default) if default in cols else 0, key=key)


mapping = st.columns(2)
if task == "classification":
    with mapping[0]:
        text_col = column_choice("Text column", guess.text, f"ft_text_{data_path.name}")
    with mapping[1]:
        label_col = column_choice("Label column", guess.label, f"ft_label_{data_path.name}")
    columns = ftdata.ColumnMap(text=text_col, label=label_col)
else:
    formats = ["instruction pairs", "plain text"] if len(cols) > 1 else ["plain text"]
    fmt = st.radio(
        "Format", formats, index=0 if guess.prompt else len(formats) - 1, horizontal=True,
        key=f"ft_fmt_{data_path.name}",
    )  # fmt: skip
    if fmt == "instruction pairs":
        with mapping[0]:
            p = column_choice("Prompt column", guess.prompt, f"ft_prompt_{data_path.name}")
        with mapping[1]:
            r = column_choice("Response column", guess.response, f"ft_resp_{data_path.name}")
        columns = ftdata.ColumnMap(prompt=p, response=r)
    else:
        columns = ftdata.ColumnMap(text=column_choice("Text column", guess.text, "ft_plain"))

st.dataframe(pd.DataFrame(list(table.rows[:50])), hide_index=True, width="stretch", height=220)

with st.expander("Hyper-parameters", expanded=False):
    h = st.columns(4)
    auto = "0: chosen from the data size (the line under the table says what and why)."
    epochs = h[0].number_input("Epochs (0: auto)", 0.0, 100.0, 0.0, 0.5, key="ft_epochs", help=auto)
    max_steps = h[0].number_input("Max steps (0: use epochs)", 0, 1_000_000, 0, key="ft_max_steps")
    batch = h[1].number_input("Batch size (0: auto)", 0, 1024, 0, key="ft_batch", help=auto)
    lr = h[1].number_input(
        "Learning rate (0: auto)", 0.0, 1.0, 0.0, format="%.0e", key="ft_lr", help=auto
    )
    max_len = h[2].number_input("Max length (tokens)", 8, 32768, 128, key="ft_maxlen")
    warmup = h[2].number_input("Warm-up ratio", 0.0, 0.9, 0.1, 0.05, key="ft_warmup")
    decay = h[3].number_input("Weight decay", 0.0, 1.0, 0.01, 0.01, key="ft_decay")
    seed = h[3].number_input("Seed", 0, 2**31 - 1, 0, key="ft_seed")
    h2 = st.columns(4)
    val_fraction = h2[0].number_input("Validation fraction", 0.05, 0.5, 0.2, 0.05, key="ft_val")
    eval_every = h2[1].number_input(
        "Evaluate every N steps (0: per epoch)", 0, 100000, 0, key="ft_eval"
    )
    ckpt_every = h2[2].number_input("Checkpoint every N steps", 1, 100000, 50, key="ft_ckpt")
    processes = h2[3].number_input("Processes (torchrun DDP)", 1, 64, 1, key="ft_procs")
    lora = st.checkbox("LoRA (train small adapter matrices instead of all weights)", key="ft_lora")
    merge = st.checkbox(
        "Merge the adapter into the stored model", True, key="ft_merge", disabled=not lora
    )

with ui.guard():
    prepared = ftdata.prepare(table, task, columns, val_fraction, int(seed), name=data_path.name)
summary = f"{len(table)} rows → {len(prepared.train)} train / {len(prepared.val)} validation"
if prepared.labels:
    summary += " · classes: " + ", ".join(
        f"{md(k)} ({v})" for k, v in prepared.class_counts().items()
    )
st.caption(summary)
train = TrainConfig(
    epochs=float(epochs) or None,
    max_steps=int(max_steps),
    batch_size=int(batch) or None,
    learning_rate=float(lr) or None,
    max_length=int(max_len),
    warmup_ratio=float(warmup),
    weight_decay=float(decay),
    seed=int(seed),
    val_fraction=float(val_fraction),
    eval_every=int(eval_every),
    checkpoint_every=int(ckpt_every),
    lora=lora,
    merge_lora=merge,
)
st.info(f"**Settings:** {choose_settings(train, len(prepared.train), task, int(processes)).why}")

kinds = ("encoder", "classifier") if task == "classification" else ("causal-lm",)
bases = [e.name for e in wb.catalog() if e.kind in kinds and e.installed]
m = st.columns(2)
base = m[0].selectbox("Base model", bases, key=f"ft_base_{task}") if bases else ""
if ui.can("models.manage"):  # a folder reaches the file system: admins only
    other = m[0].text_input(
        "…or a local model folder", key="ft_base_other", placeholder="/path/to/model"
    )
    base = other.strip() or base
if "ft_out" not in st.session_state:
    st.session_state["ft_out"] = f"ft-{time.strftime('%m%d-%H%M%S')}"
out = m[1].text_input("Save as (store name)", key="ft_out")

if st.button("Start fine-tuning", type="primary", key="ft_start"):
    spec = JobSpec(
        base=base,
        task=task,
        data=str(data_path),
        out=out.strip(),
        columns=columns,
        train=train,
        processes=int(processes),
        allow_pickle=wb.manager.options.allow_pickle,  # the server's WORKBENCH_ALLOW_PICKLE
    )
    with ui.guard():
        started = jobs.submit(spec)
    st.session_state["ft_select"] = started.id
    st.session_state.pop("ft_out", None)
    st.rerun()
