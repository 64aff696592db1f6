"""Attention: where each head looks (bertviz offline, heatmaps, head statistics, comparison).

The model runs once per click in a worker thread; its result stays in session state, and the
explorer below is a fragment, so changing the layer, head or view never runs the model again.
"""

from __future__ import annotations

import threading

import pandas as pd
import streamlit as st

from engine.errors import EngineError
from workbench import ui

RESULTS = "attention_results"  # list of (label, AttentionResult)
STATS = "attention_stats"  # list of HeadStatistics, computed once with the results
JOB = "attention_job"
LAST_GENERATION = "gen_result"  # the Generate page's GenerationResult (prompt + continuation)
DEFAULT_TEXT = "The cat sat on the mat because it was tired."
DEFAULT_PAIR = "The cat sat on the mat because it was hungry."

st.title("Attention")
st.caption(
    "Where each head of each layer looks. Works on causal LMs (SmolLM2) and encoders (MiniLM); "
    "the model switches to eager attention for the run, since SDPA returns no weights."
)

wb = ui.engine()
model_name = ui.selected_model_name()


def _last_generation() -> str | None:
    """The text the model saw plus what it generated, from the Generate page (if any)."""
    last = st.session_state.get(LAST_GENERATION)
    if last is None:
        return None
    prompt = getattr(last, "model_input", "") or getattr(last, "prompt", "")
    return (prompt + getattr(last, "text", "")) or None


# --- inputs -------------------------------------------------------------------------------
if _last_generation() and st.button("Use the last generation"):
    st.session_state["attn_text"] = _last_generation()
text = st.text_area("Text", DEFAULT_TEXT, key="attn_text", height=90)
left, right = st.columns(2)
compare = left.radio(
    "Compare side by side",
    ["Off", "Another text", "Another model"],
    horizontal=True,
    key="attn_compare",
    help="A minimal pair on one model, or one text on two models.",
)
max_tokens = right.number_input(
    "Max tokens",
    min_value=2,
    max_value=4096,
    value=1024,
    step=64,
    key="attn_max_tokens",
    help="Longer inputs are refused (nothing is truncated silently).",
)
text_b, model_b = text, model_name
if compare == "Another text":
    text_b = st.text_area("Second text", DEFAULT_PAIR, key="attn_text_b", height=90)
elif compare == "Another model":
    names = [e.name for e in wb.catalog() if e.name != model_name] or [model_name]
    model_b = st.selectbox("Second model", names, key="attn_model_b")


def _runs() -> list[tuple[str, str, str]]:
    """(label, model, text) for each side."""
    if compare == "Another text":
        return [("A", model_name, text), ("B", model_name, text_b)]
    if compare == "Another model":
        return [(model_name, model_name, text), (model_b, model_b, text)]
    return [(model_name, model_name, text)]


def _start(runs: list[tuple[str, str, str]], limit: int) -> None:
    """Load models here (progress bar), then run the forward passes in a worker thread."""
    from engine.attention import AttentionSettings, head_statistics

    settings = AttentionSettings(max_tokens=limit)
    with ui.guard():
        settings.validated()
    models = {name: ui.load_model(name) for _, name, _ in runs}
    job: dict = {"done": False, "results": None, "stats": None, "error": None}

    def work() -> None:
        try:
            results = [
                (label, models[name].attention(body, settings)) for label, name, body in runs
            ]
            job["stats"] = [head_statistics(r.attentions) for _, r in results]
            job["results"] = results
        except Exception as exc:  # reported on the page by the poller, never lost
            job["error"] = exc
        finally:
            job["done"] = True

    threading.Thread(target=work, name="attention", daemon=True).start()
    st.session_state[JOB] = job


if st.button("Show attention", type="primary", disabled=JOB in st.session_state):
    _start(_runs(), int(max_tokens))


def _poll() -> None:
    job = st.session_state.get(JOB)
    if job is None:
        return
    if not job["done"]:
        st.info("Running the model (eager attention)…", icon="⏳")
        return
    st.session_state.pop(JOB, None)
    if job["error"] is None:
        st.session_state[RESULTS] = job["results"]
        st.session_state[STATS] = job["stats"]
        st.rerun()
    with ui.guard():
        if isinstance(job["error"], EngineError):
            raise job["error"]
        raise EngineError(f"Attention failed: {type(job['error']).__name__}: {job['error']}")


if JOB in st.session_state:
    st.fragment(_poll, run_every=0.5)()


# --- explorer (a fragment: widgets here rerun only this part) -----------------------------
@st.fragment
def explorer(results: list, stats: list) -> None:
    from engine.attention import head_table_csv
    from engine.attention.aggregate import AggregationSettings, aggregate, edges_frame, top_edges
    from engine.attention.views import (
        bertviz_budget,
        bertviz_height,
        bertviz_html,
        chart_payload_bytes,
        chart_png,
        heatmap_chart,
        plan_bertviz,
    )

    n_layers = min(r.n_layers for _, r in results)
    n_heads = min(r.n_heads for _, r in results)
    longest = max(r.n_tokens for _, r in results)
    st.subheader("Heatmap")
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    layers = c1.slider("Layers (mean over the range)", 0, n_layers - 1, (0, 0), key="attn_layers")
    heads = c2.slider("Heads (mean over the range)", 0, n_heads - 1, (0, 0), key="attn_heads")
    merge = c3.toggle("Merge sub-words into words", value=longest > 64, key="attn_merge")
    side = c4.number_input(
        "Max rows",
        16,
        128,
        96,
        step=16,
        key="attn_side",
        help="Longer inputs are pooled into blocks of consecutive positions (at most 128, so "
        "the heatmap stays about 1 MB).",
    )
    agg = AggregationSettings(layers=layers, heads=heads, merge_words=merge, max_side=int(side))
    views, charts = [], []
    with ui.guard():
        for label, result in results:
            view = aggregate(result, agg)
            views.append(view)
            title = f"{label}: {view.description}" if len(results) > 1 else view.description
            charts.append(heatmap_chart(view, title=title, size=520 if len(results) > 1 else 640))
    sent = sum(chart_payload_bytes(c) for c in charts)
    for col, chart in zip(st.columns(len(charts)), charts, strict=True):
        col.altair_chart(chart, width="content")

    st.subheader("Head statistics")
    st.caption(
        "Per head, averaged over query positions: entropy (nats), weight on the first token "
        "(attention sink / [CLS]), on the previous token, on itself, and mean distance in tokens. "
        "Click a column header to sort."
    )
    frames = []
    for (label, _), s in zip(results, stats, strict=True):
        frame = s.to_frame()
        if len(stats) > 1:
            frame.insert(0, "input", label)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        height=320,
        column_config={
            c: st.column_config.NumberColumn(format="%.3f")
            for c in ("entropy", "first_token", "previous_token", "self_token", "mean_distance")
        },
    )

    st.subheader("bertviz")
    view_kind = (
        st.segmented_control(
            "View",
            ["head", "model", "neuron"],
            default="head",
            key="attn_bertviz_view",
            format_func=lambda v: {"head": "Head view", "model": "Model view"}.get(
                v, "Neuron view"
            ),
        )
        or "head"
    )
    budget = bertviz_budget(sent, len(results))
    # all layers if they fit, else the layer range chosen above, else the aggregated views
    plan = plan_bertviz([r for _, r in results], budget, layers)
    st.caption(
        "bertviz draws every selected layer and head; its page grows with layers × heads × "
        "tokens². Choose a layer range above to give it fewer layers."
    )
    if view_kind == "neuron":
        sent += _neuron_section(results, budget)
    elif plan.fits:
        if not plan.all_layers and n_layers > 1:
            st.caption(
                f"All layers would not fit the page budget: showing layers "
                f"{layers[0]}–{layers[1]} (the range chosen above)."
            )
        for col, (label, result) in zip(st.columns(len(results)), results, strict=True):
            with col, ui.guard():
                if len(results) > 1:
                    st.markdown(f"**{label}**")
                html = bertviz_html(result, view_kind, plan.selection, budget=budget)
                sent += len(html)
                st.iframe(html, height=bertviz_height(result, view_kind))
    else:
        st.info(
            f"bertviz would send about {plan.estimate / 1e6:.1f} MB to the browser "
            f"(budget {budget / 1e6:.1f} MB) for {longest} tokens: showing the aggregated views "
            "instead (heatmap above, strongest edges below). Pick a narrower layer range or a "
            "shorter text to get bertviz back.",
            icon="ℹ️",
        )
        k = st.slider("Strongest edges", 10, 200, 40, key="attn_topk")
        for col, (label, _), view in zip(st.columns(len(results)), results, views, strict=True):
            with col:
                if len(results) > 1:
                    st.markdown(f"**{label}**")
                st.dataframe(
                    edges_frame(top_edges(view, k)), hide_index=True, width="stretch", height=300
                )
    st.caption(f"Sent to the browser by these views: about {ui.human_bytes(sent)}.")

    st.subheader("Export")
    for label, result in results:
        cols = st.columns(4)
        cols[0].markdown(f"**{label}** · {result.n_tokens} tokens · {result.provenance.model}")
        stem = f"attention-{label}".replace("/", "_").replace(" ", "_")
        cols[1].download_button(
            "Tensors (.npz)",
            result.npz_bytes,
            f"{stem}.npz",
            "application/octet-stream",
            key=f"npz-{label}",
            on_click="ignore",
        )
        chart = charts[[lab for lab, _ in results].index(label)]
        cols[2].download_button(
            "Heatmap (.png)",
            lambda c=chart, r=result: chart_png(c, provenance=_png_provenance(r)),
            f"{stem}.png",
            "image/png",
            key=f"png-{label}",
            on_click="ignore",
        )
        cols[3].download_button(
            "Head table (.csv)",
            lambda r=result: head_table_csv(r),
            f"{stem}.csv",
            "text/csv",
            key=f"csv-{label}",
            on_click="ignore",
        )


def _png_provenance(result) -> dict:
    """What the heatmap PNG records about itself: the run's provenance and the input."""
    return {**result.to_provenance_dict(), "text": result.text, "tokens": result.n_tokens}


def _neuron_section(results: list, budget: int) -> int:
    """bertviz's neuron view per input (BERT-style encoders only); returns bytes sent."""
    from engine.attention.neuron import NEURON_UNSUPPORTED, estimate_neuron_bytes, neuron_view_html

    sent = 0
    for col, (label, result) in zip(st.columns(len(results)), results, strict=True):
        with col:
            if len(results) > 1:
                st.markdown(f"**{label}**")
            if result.queries is None:
                st.info(f"{result.provenance.model}: {NEURON_UNSUPPORTED}", icon="ℹ️")
                continue
            estimate = estimate_neuron_bytes(result)
            if estimate > budget:
                st.info(
                    f"The neuron view would send about {estimate / 1e6:.1f} MB (budget "
                    f"{budget / 1e6:.1f} MB) for {result.n_tokens} tokens: use a shorter text.",
                    icon="ℹ️",
                )
                continue
            with ui.guard():
                html = neuron_view_html(result, budget=budget)
                sent += len(html)
                st.iframe(html, height=min(260 + 26 * result.n_tokens, 4000))
    return sent


results = st.session_state.get(RESULTS)
if results:
    explorer(results, st.session_state[STATS])
