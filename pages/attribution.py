"""Explain: which input tokens made the model say this (captum attribution methods).

The page only builds an ``ExplanationSpec``, starts it as an engine run and draws the run's
snapshots and its ``ExplanationSet``; the result objects draw their own charts and reports.
"""

import dataclasses

import streamlit as st

from engine.attribution import (
    ExplanationSpec,
    MethodRun,
    TargetSpec,
    available_methods,
    estimate,
    estimate_frame,
    get_method,
    label_names,
)
from engine.errors import EngineError, MemoryBudgetError
from workbench import renderers, ui

RUN_KEY = "explain_active_run"  # the engine Run in progress
RESULT_KEY = "explain_result"  # the last ExplanationSet
ERROR_KEY = "explain_error"  # the last run's one-line error: stays until a run replaces it
ESTIMATES_KEY = "explain_estimates"  # pre-flight estimates per (model, spec)
IDLE_TIMEOUT_S = 120.0  # a run nobody polls (a closed tab, another page) cancels itself
POLL_S = 1.0

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
ui.page_needs("run")
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

method_runs: list[MethodRun] = []
for name in picked:
    method = methods[name]
    with st.expander(f"{method.title} options", expanded=len(picked) == 1):
        st.caption(method.summary)
        method_runs.append(MethodRun(name, option_controls(name, method)))

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

spec = ExplanationSpec(
    text=text,
    target=TargetSpec(text=target, label=label, contrast=contrast),
    methods=tuple(method_runs),
    per_token=per_token,
    faithfulness=with_faith,
    seed=seed,
)
run = st.session_state.get(RUN_KEY)
running = run is not None and not run.done


def preflight(model, spec: ExplanationSpec) -> list:
    """Estimates of every method, cached per model and spec (the seed aside): a rerun (a slider
    moved) computes nothing. Tokenization only, never the model's lock: the one-off timing
    benchmark runs in the background, and until it is done the rough estimate is shown and
    not cached, so a later rerun picks up the measured one."""
    cache: dict = st.session_state.setdefault(ESTIMATES_KEY, {})
    key = (model.name, model.loaded.fingerprint, dataclasses.replace(spec, seed=0))
    if key in cache:
        return cache[key]
    plans = [
        estimate(
            model.loaded,
            spec.text,
            spec.target,
            r.method,
            r.options_dict(),
            per_token=spec.per_token,
            faithfulness=spec.faithfulness,
            wait=False,
        )
        for r in spec.methods
    ]
    if all(p.calibrated for p in plans):
        if len(cache) >= 16:
            cache.pop(next(iter(cache)))
        cache[key] = plans
    return plans


# --- pre-flight estimate ----------------------------------------------------------------------
if picked:
    with ui.guard():
        plans = preflight(model, spec)
    st.caption(
        "Pre-flight estimate: forward rows × tokens at this model's measured speed on this "
        "machine (a range: the machine is shared); the batch (rows per forward pass) is chosen "
        "to fit memory."
        + (
            ""
            if all(e.calibrated for e in plans)
            else " ~: a rough guess while this model's speed is measured in the background."
        )
    )
    refining = [e for e in plans if e.attempts > 1]
    if refining:
        worst = max(e.worst_rows / max(e.rows, 1) for e in refining)
        st.caption(
            "Integrated Gradients' step refinement re-runs with doubled steps while the "
            f"completeness error is above 1%: up to {worst:.1f}× the forward rows and time "
            "(worst case column) when it never converges."
        )
    st.dataframe(
        estimate_frame(plans, [methods[r.method].title for r in spec.methods]),
        hide_index=True,
        width="stretch",
    )
    with ui.guard():
        for e in plans:
            if not e.fits:
                raise MemoryBudgetError(
                    f"{methods[e.method].title} would need about {ui.human_bytes(e.peak_bytes)} "
                    f"per row but only {ui.human_bytes(e.available_bytes)} is free: shorten the "
                    "text."
                )

if st.button("Run", type="primary", disabled=running or not picked, key="explain_run"):
    with ui.guard():
        run = model.start_explanation(spec, idle_timeout_s=IDLE_TIMEOUT_S)  # recorded
    st.session_state[RUN_KEY] = run
    running = True


def collect(snapshot) -> None:
    """A finished run replaces the last result (done) or the last error (failed, cancelled)."""
    st.session_state.pop(RUN_KEY, None)
    if snapshot.state == "done":
        st.session_state[RESULT_KEY] = snapshot.result
        st.session_state["explain_run_id"] = snapshot.id  # its ledger record
        st.session_state.pop(ERROR_KEY, None)
    else:
        st.session_state[ERROR_KEY] = snapshot.error or "The explanation stopped."


@st.fragment(run_every=POLL_S)
def run_progress() -> None:
    current = st.session_state.get(RUN_KEY)
    if current is None:
        return
    snapshot = current.snapshot()
    if snapshot.finished:
        collect(snapshot)
        st.rerun(scope="app")
    if snapshot.waiting:
        st.info(snapshot.message, icon="⏳")
    st.progress(snapshot.fraction, text=f"{snapshot.message} · {snapshot.seconds:.0f} s")
    if st.button("Cancel", key="explain_cancel"):
        current.cancel()
        st.info("Cancelling at the next forward pass…")


if run is not None and run.done:  # finished between polls (or under AppTest)
    collect(run.snapshot())
elif running:
    run_progress()

if st.session_state.get(ERROR_KEY):
    st.warning(st.session_state[ERROR_KEY], icon="⚠️")

result = st.session_state.get(RESULT_KEY)
if result is None or result.model != model.name or not result.attributions:
    st.stop()


def same_input(asked: ExplanationSpec | None, now: ExplanationSpec) -> bool:
    """Whether the result was computed for the inputs now on the page."""
    if asked is None:
        return False
    try:
        names = [get_method(r.method).name for r in now.methods]
    except EngineError:
        return False
    return (asked.text, asked.target, [r.method for r in asked.methods]) == (
        now.text,
        now.target,
        names,
    )


# --- views ---------------------------------------------------------------------------------
st.divider()
st.subheader("Results")
if not same_input(result.spec, spec):
    st.info(
        "These results are for an earlier input (shown below), not the one above: press Run "
        "to explain the current input.",
        icon="ℹ️",
    )
level = st.radio(
    "Group by",
    ["token", "word", "sentence"],
    horizontal=True,
    key="explain_level",
    help="Sub-word scores are summed into words or sentences.",
)
renderers.explanation_set(result, "explain", level)
ui.add_to_notebook(st.session_state.get("explain_run_id"), "explain_add_to_notebook")

st.subheader("Export")
col_json, col_html = st.columns(2)
col_json.download_button(
    "Download JSON",
    result.to_json(),
    file_name="attribution.json",
    mime="application/json",
    key="explain_dl_json",
)
col_html.download_button(
    "Download HTML report",
    result.html_report(),
    file_name="attribution.html",
    mime="text/html",
    key="explain_dl_html",
)
