"""Explain: which input tokens made the model say this (captum attribution methods)."""

import json

import altair as alt
import pandas as pd
import streamlit as st

from engine.attribution import (
    ExplainJob,
    MethodRun,
    TargetSpec,
    agreement,
    available_methods,
    estimate,
    html_report,
    label_names,
)
from engine.attribution.report import coloured_text
from engine.errors import MemoryBudgetError
from workbench import ui

JOB_KEY = "explain_job"
RESULTS_KEY = "explain_results"
ERROR_KEY = "explain_error"

KINDS = ("classifier", "causal-lm")


def _switch_model() -> None:
    # A callback runs before the script, so it may set the sidebar picker's key.
    chosen = st.session_state.get("explain_model")
    if chosen:
        st.session_state[ui.MODEL_KEY] = chosen


def model_selector(current) -> None:
    """Models this page can explain: causal LMs and classifiers (fine-tuned ones included)."""
    catalog = ui.engine().catalog()
    kinds = {e.name: e.kind for e in catalog if e.kind in KINDS and e.installed}
    stored = {e.name for e in catalog if e.source == "store"}
    if current.kind in KINDS:
        kinds.setdefault(current.name, current.kind)  # a local folder or hub id
    # Mirror the sidebar's choice (set before the widget exists, so no index is passed).
    st.session_state["explain_model"] = current.name if current.name in kinds else None

    def describe(name: str) -> str:
        what = "fine-tuned classifier" if kinds[name] == "classifier" else kinds[name]
        return f"{name} · {what}" + (" (store)" if name in stored else "")

    st.selectbox(
        "Model to explain",
        list(kinds),
        format_func=describe,
        key="explain_model",
        placeholder="Choose a causal LM or a classifier",
        on_change=_switch_model,
        help="Causal LMs and sequence classifiers, including classifiers fine-tuned on the "
        "Fine-tune page (kept in the store). The same choice as the sidebar's model.",
    )


def option_controls(name: str, method) -> dict:
    """Controls built from the method's option specs; returns {option: value}."""
    values = {}
    for spec in method.option_specs():
        key = f"explain_opt_{name}_{spec.name}"
        if spec.type == "choice":
            values[spec.name] = st.selectbox(
                spec.label,
                spec.choices,
                index=spec.choices.index(spec.default),
                key=key,
                help=spec.help,
            )
        elif spec.type == "int":
            values[spec.name] = int(
                st.number_input(
                    spec.label,
                    int(spec.min if spec.min is not None else 0),
                    int(spec.max if spec.max is not None else 10**6),
                    int(spec.default),
                    key=key,
                    help=spec.help,
                )
            )
        elif spec.type == "float":
            values[spec.name] = float(
                st.number_input(
                    spec.label,
                    float(spec.min if spec.min is not None else 0.0),
                    float(spec.max if spec.max is not None else 1e6),
                    float(spec.default),
                    key=key,
                    help=spec.help,
                )
            )
        elif spec.type == "bool":
            values[spec.name] = st.checkbox(spec.label, spec.default, key=key, help=spec.help)
    return values


st.title("Explain")
st.caption(
    "Attribute a classifier's label or a language model's continuation to the input tokens, "
    "check how faithful the explanation is, and compare methods."
)
model = ui.current_model()
model_selector(model)
if model.kind not in KINDS:
    st.warning(
        f"{model.name} is a {model.kind} model: attribution needs a sequence classifier or a "
        "causal LM. Choose one above (or fine-tune a classifier head on the Fine-tune page)."
    )
    st.stop()

is_lm = model.kind == "causal-lm"
default_text = "The capital of France is" if is_lm else "This movie was really good ."
text = st.text_area("Input text", default_text, key="explain_text", height=90)

col_target, col_contrast = st.columns(2)
if is_lm:
    target = col_target.text_input(
        "Target continuation",
        " Paris" if "France" in text else "",
        key="explain_target",
        help="Teacher-forced continuation to explain. Blank = the model's own next token.",
    )
    contrast = col_contrast.text_input(
        "…rather than (optional)",
        "",
        key="explain_contrast",
        help="Contrastive: explain log p(target) - log p(this alternative).",
    )
    label = None
else:
    labels = label_names(model.loaded)
    choice = col_target.selectbox(
        "Label", ["(predicted)", *labels], key="explain_label", help="The label to explain."
    )
    label = None if choice == "(predicted)" else choice
    other = col_contrast.selectbox(
        "…rather than (optional)", ["(none)", *labels], key="explain_contrast_label"
    )
    contrast = None if other == "(none)" else other
    target = ""
contrast = contrast or None

methods = {m.name: m for m in available_methods(model.loaded)}
picked = st.multiselect(
    "Methods",
    list(methods),
    default=["integrated_gradients"],
    format_func=lambda name: methods[name].title,
    key="explain_methods",
    help="Only methods compatible with this model are listed.",
)

runs: list[MethodRun] = []
for name in picked:
    method = methods[name]
    with st.expander(f"{method.title} options", expanded=len(picked) == 1):
        st.caption(method.summary)
        runs.append(MethodRun(name, option_controls(name, method)))

col_a, col_b, col_c = st.columns(3)
per_token = col_a.checkbox(
    "Per-output-token matrix",
    False,
    key="explain_per_token",
    disabled=not is_lm,
    help="Attribute each target token separately (one run per target token).",
)
with_faith = col_b.checkbox(
    "Faithfulness curves",
    True,
    key="explain_faith",
    help="Re-score the target with the top tokens removed (deletion) or kept (insertion).",
)
seed = int(col_c.number_input("Seed", 0, 2**31 - 1, 0, key="explain_seed"))

job: ExplainJob | None = st.session_state.get(JOB_KEY)
running = job is not None and not job.done

# --- pre-flight estimate (skipped while a run holds the model) ------------------------------
if picked and not running:
    spec = TargetSpec(text=target, label=label, contrast=contrast)
    rows = []
    with ui.guard():
        plans = [
            estimate(
                model.loaded,
                text,
                spec,
                run.method,
                run.options,
                per_token=per_token,
                faithfulness=with_faith,
            )
            for run in runs
        ]
    for run, e in zip(runs, plans, strict=True):
        rows.append(
            {
                "method": methods[run.method].title,
                "forward rows": e.rows,
                "+ faithfulness rows": e.extra_rows,
                "tokens": e.tokens,
                "batch": e.batch_size,
                "estimated time": f"{e.seconds:.1f} s",
                "memory": ui.human_bytes(e.peak_bytes),
                "fits": "yes" if e.fits else "NO",
                "worst case (step refinement)": (
                    f"{e.worst_seconds:.1f} s, {e.worst_rows} rows ({e.attempts} runs)"
                    if e.attempts > 1
                    else "-"
                ),
            }
        )
    st.caption(
        "Pre-flight estimate: forward rows × tokens; the batch (rows per forward pass) is "
        "chosen to fit memory."
    )
    refining = [e for e in plans if e.attempts > 1]
    if refining:
        worst = max(e.worst_rows / max(e.rows, 1) for e in refining)
        st.caption(
            "Integrated Gradients' step refinement re-runs with doubled steps while the "
            f"completeness error is above 1%: up to {worst:.1f}× the forward rows and time "
            "(worst case column) when it never converges."
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    with ui.guard():
        for e in plans:
            if not e.fits:
                raise MemoryBudgetError(
                    f"{methods[e.method].title} would need about {ui.human_bytes(e.peak_bytes)} "
                    f"per row but only {ui.human_bytes(e.available_bytes)} is free: shorten the "
                    "text."
                )

start = st.button("Run", type="primary", disabled=running or not picked, key="explain_run")
if start:
    job = ExplainJob(
        model=model,
        text=text,
        target=target,
        label=label,
        contrast=contrast,
        runs=runs,
        per_token=per_token,
        faithfulness=with_faith,
        seed=seed,
    ).start()
    st.session_state[JOB_KEY] = job
    st.session_state.pop(ERROR_KEY, None)
    running = True


def _collect(finished: ExplainJob) -> None:
    st.session_state.pop(JOB_KEY, None)
    if finished.error:
        st.session_state[ERROR_KEY] = finished.error
    else:
        st.session_state[RESULTS_KEY] = finished.results
        st.session_state.pop(ERROR_KEY, None)


@st.fragment(run_every=0.5)
def job_progress() -> None:
    current: ExplainJob | None = st.session_state.get(JOB_KEY)
    if current is None:
        return
    if current.done:
        _collect(current)
        st.rerun(scope="app")
    st.progress(min(current.fraction, 1.0), text=f"{current.message} · {current.elapsed:.0f} s")
    if st.button("Cancel", key="explain_cancel"):
        current.cancel()
        st.info("Cancelling at the next forward pass…")


if job is not None and job.done:  # finished between polls (or under AppTest)
    _collect(job)
elif running:
    job_progress()

if st.session_state.get(ERROR_KEY):
    st.warning(st.session_state[ERROR_KEY], icon="⚠️")

results = [r for r in st.session_state.get(RESULTS_KEY) or [] if r.model == model.name]
if not results:
    st.stop()

# --- views ---------------------------------------------------------------------------------
st.divider()
st.subheader("Results")
level = st.radio(
    "Group by",
    ["token", "word", "sentence"],
    horizontal=True,
    key="explain_level",
    help="Sub-word scores are summed into words or sentences.",
)
tabs = st.tabs([r.method_title for r in results])
for tab, result in zip(tabs, results, strict=True):
    with tab:
        cols = st.columns(3)
        cols[0].metric("Target score f(input)", f"{result.target_score:.4f} nats")
        cols[1].metric("Time", f"{result.seconds:.2f} s")
        cols[2].metric("Forward rows", result.forward_rows)
        st.markdown(f"**Target:** {result.target_description}")
        if result.target.get("anchor_first"):
            st.caption(
                "The first token is held fixed (score 0): the tokenizer adds no BOS token, and "
                "moving the first position (the model's attention sink) breaks Integrated "
                "Gradients' convergence."
            )
        statement = result.delta_statement()
        if statement:
            (st.success if result.delta_ok else st.warning)(statement)
        st.html(f'<div style="line-height:2;font-size:1.1em">{coloured_text(result)}</div>')
        labels, values = result.groups(level)
        frame = pd.DataFrame({level: labels, "score": values, "order": range(len(labels))})
        top = frame.reindex(frame["score"].abs().sort_values(ascending=False).index).head(15)
        chart = (
            alt.Chart(top)
            .mark_bar()
            .encode(
                x=alt.X("score:Q", title="attribution"),
                y=alt.Y(f"{level}:N", sort=alt.SortField("score", order="descending"), title=None),
                color=alt.condition("datum.score >= 0", alt.value("#16a34a"), alt.value("#dc2626")),
                tooltip=[level, "score"],
            )
        )
        st.altair_chart(chart, width="stretch")
        if result.token_matrix is not None:
            st.markdown("**Per-output-token attribution** (rows: target tokens)")
            keep = [i for i, f in enumerate(result.free) if f]
            matrix = pd.DataFrame(
                [
                    {
                        "output": f"{j}:{out}",
                        "input": f"{i}:{result.tokens[i]}",
                        "score": float(result.token_matrix[j][i]),
                    }
                    for j, out in enumerate(result.output_tokens)
                    for i in keep
                ]
            )
            heat = (
                alt.Chart(matrix)
                .mark_rect()
                .encode(
                    x=alt.X("input:N", sort=None),
                    y=alt.Y("output:N", sort=None),
                    color=alt.Color(
                        "score:Q", scale=alt.Scale(scheme="redyellowgreen", domainMid=0)
                    ),
                    tooltip=["input", "output", "score"],
                )
            )
            st.altair_chart(heat, width="stretch")
        faith = result.faithfulness
        if faith is not None:
            st.markdown("**Faithfulness** (deletion / insertion of the top-ranked tokens)")
            m = st.columns(3)
            m[0].metric("Comprehensiveness (AOPC)", f"{faith.comprehensiveness:.4f}")
            m[1].metric("Random-order AOPC", f"{faith.random_comprehensiveness:.4f}")
            m[2].metric("Sufficiency", f"{faith.sufficiency:.4f}")
            curves = pd.DataFrame(
                {
                    "fraction": list(faith.fractions) * 3,
                    "score": [*faith.deletion, *faith.insertion, *faith.random_deletion],
                    "curve": ["deletion"] * len(faith.fractions)
                    + ["insertion"] * len(faith.fractions)
                    + ["random deletion"] * len(faith.fractions),
                }
            )
            st.altair_chart(
                alt.Chart(curves)
                .mark_line(point=True)
                .encode(
                    x=alt.X("fraction:Q", title="share of tokens removed / inserted"),
                    y=alt.Y("score:Q", title="target score (nats)"),
                    color="curve:N",
                ),
                width="stretch",
            )

if len(results) > 1:
    st.subheader("Method agreement")
    with ui.guard():
        table = agreement(results)
    st.dataframe(table.to_frame(), hide_index=True, width="stretch")

st.subheader("Export")
export = {
    "results": [r.to_dict() for r in results],
    "agreement": agreement(results).to_dict() if len(results) > 1 else None,
}
col_json, col_html = st.columns(2)
col_json.download_button(
    "Download JSON",
    json.dumps(export, indent=2),
    file_name="attribution.json",
    mime="application/json",
    key="explain_dl_json",
)
col_html.download_button(
    "Download HTML report",
    html_report(list(results)),
    file_name="attribution.html",
    mime="text/html",
    key="explain_dl_html",
)
