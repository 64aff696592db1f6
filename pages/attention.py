"""Attention: where each head looks (bertviz offline, heatmaps, head statistics, comparison).

"Show attention" starts one engine run (``engine.attention.start_attention``): the inputs are
checked against the model's context length and the result's memory is reserved before it
starts. The run is the only thing kept in session state (its result's reservation is freed
when it is replaced); a fragment draws its snapshot while it goes (progress, "waiting for the
model", Cancel). Its error stays on the page until the next run, and its result is always shown
with the input it belongs to. The explorer is a fragment: changing the layer, head or view
never runs the model again.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from engine.errors import EngineError
from workbench import ui

RUN = "attention_run"  # the current Run: the only reference to its result
REFUSED = "attention_refused"  # (message, AttentionRequest) of a run refused before it started
PREFS = "attention_view_prefs"  # the explorer's last choices (see _kept)
LAST_GENERATION = "gen_result"  # the Generate page's GenerationResult (prompt + continuation)
DEFAULT_TEXT = "The cat sat on the mat because it was tired."
DEFAULT_PAIR = "The cat sat on the mat because it was hungry."
POLL_S = 0.75  # how often the progress fragment redraws while a run goes (never otherwise)

st.title("Attention")
ui.page_needs("run")
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


def _md(text: str) -> str:
    """``text`` shown literally inside Streamlit markdown (user text is not markup)."""
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|<>~$" else c for c in text)


# --- inputs -------------------------------------------------------------------------------
if _last_generation() and st.button("Use the last generation"):
    st.session_state["attn_text"] = _last_generation()
text = st.text_area("Text", DEFAULT_TEXT, key="attn_text", height=90)
left, mid, right = st.columns([5, 3, 4])
compare = left.radio(
    "Compare side by side",
    ["Off", "Another text", "Another model"],
    horizontal=True,
    key="attn_compare",
    help="A minimal pair on one model, or one text on two models.",
)
max_tokens = mid.number_input(
    "Max tokens",
    min_value=2,
    max_value=4096,
    value=1024,
    step=64,
    key="attn_max_tokens",
    help="Longer inputs are refused unless truncation is chosen (nothing is cut silently).",
)
truncate = right.checkbox(
    "Truncate to the model's context",
    key="attn_truncate",
    help="Cut a longer input to the model's context length (or Max tokens, if smaller) instead "
    "of refusing it; the result says how many tokens were dropped.",
)
text_b, model_b = text, model_name
if compare == "Another text":
    text_b = st.text_area("Second text", DEFAULT_PAIR, key="attn_text_b", height=90)
elif compare == "Another model":
    names = [e.name for e in wb.catalog() if e.name != model_name] or [model_name]
    model_b = st.selectbox("Second model", names, key="attn_model_b")


def _sides() -> tuple[tuple[str, str, str], ...]:
    """(label, model, text) for each side."""
    if compare == "Another text":
        return (("A", model_name, text), ("B", model_name, text_b))
    if compare == "Another model":
        return ((model_name, model_name, text), (model_b, model_b, text))
    return ((model_name, model_name, text),)


def _start(sides: tuple[tuple[str, str, str], ...]) -> None:
    """Load the models here (progress bar), then start the run; a refusal stays on the page."""
    from engine.attention import AttentionRequest, AttentionSettings, start_attention

    # drop the previous run (and with it its result and its budget reservation) first
    st.session_state.pop(RUN, None)
    st.session_state.pop(REFUSED, None)
    settings = AttentionSettings(max_tokens=int(max_tokens), truncate=bool(truncate))
    request = AttentionRequest(sides, settings)
    try:
        models = {name: _load(name) for _, name, _ in sides}
        jobs = [(label, models[name], body) for label, name, body in sides]
        with wb.recording():  # the run goes into the run ledger (History, notebooks)
            st.session_state[RUN] = start_attention(jobs, settings)
    except EngineError as exc:  # a load failure or a refusal: kept until the next click
        st.session_state[REFUSED] = (str(exc), request)


def _load(name: str):
    """The shared loaded model ``name``, with a progress bar when it has to load."""
    cached = wb.manager.get(name)
    if cached is not None:
        return cached
    bar = st.progress(0.0, text=f"Loading {name}…")
    try:
        return wb.load(
            name, progress=lambda fraction, message: bar.progress(min(fraction, 1.0), text=message)
        ).loaded
    finally:
        bar.empty()


def _for(request) -> str:
    return "  \n".join(_md(line) for line in request.describe().splitlines())


def _progress() -> None:
    """The running run's snapshot; a full rerun once it ends (to draw its result or error)."""
    run = st.session_state.get(RUN)
    if run is None:
        return
    snap = run.snapshot()
    if snap.finished:
        st.rerun()
    if snap.waiting:
        st.info(snap.message, icon="⏳")
    else:
        st.progress(snap.fraction, text=f"{snap.message} ({snap.seconds:.0f} s)")
    st.caption(f"For: {_for(run.spec)}")
    if st.button("Cancel", key="attn_cancel"):
        run.cancel()


# --- the explorer's choices, kept while a new run hides it ------------------------------
# A widget not drawn in a script run loses its state; the explorer is hidden while a run goes,
# so its choices (layer range, view, ...) are remembered here and given back as defaults.


def _kept(key: str, default, valid=lambda _value: True):
    """The default for the explorer widget ``key``: its last value if still ``valid``."""
    if key in st.session_state and not valid(st.session_state[key]):
        del st.session_state[key]  # e.g. a layer range beyond a smaller model's layers
    value = st.session_state.setdefault(PREFS, {}).get(key, default)
    return value if valid(value) else default


def _keep(key: str, widget, *args, **kwargs):
    """Draw ``widget(*args, key=key, **kwargs)`` and remember its value."""
    value = widget(*args, key=key, **kwargs)
    st.session_state.setdefault(PREFS, {})[key] = value
    return value


def _within(n: int):
    """Valid (low, high) index ranges for ``n`` layers or heads."""
    return lambda v: isinstance(v, tuple | list) and len(v) == 2 and 0 <= v[0] <= v[1] <= n - 1


# --- explorer (a fragment: widgets here rerun only this part) -----------------------------
@st.fragment
def explorer() -> None:
    """Heatmap, head table, bertviz and exports of the current run's result (read from session
    state, not passed in, so the fragment keeps no reference to a replaced result)."""
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

    run = st.session_state.get(RUN)
    comparison = run.result if run is not None else None
    if comparison is None:
        return
    results, stats = comparison.results, comparison.stats
    n_layers = min(r.n_layers for _, r in results)
    n_heads = min(r.n_heads for _, r in results)
    longest = max(r.n_tokens for _, r in results)
    st.subheader("Heatmap")
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    layers = _keep(
        "attn_layers",
        c1.slider,
        "Layers (mean over the range)",
        0,
        n_layers - 1,
        _kept("attn_layers", (0, 0), _within(n_layers)),
    )
    heads = _keep(
        "attn_heads",
        c2.slider,
        "Heads (mean over the range)",
        0,
        n_heads - 1,
        _kept("attn_heads", (0, 0), _within(n_heads)),
    )
    merge = c3.toggle("Merge sub-words into words", value=longest > 64, key="attn_merge")
    side = _keep(
        "attn_side",
        c4.number_input,
        "Max rows",
        16,
        128,
        _kept("attn_side", 96),
        step=16,
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
        _keep(
            "attn_bertviz_view",
            st.segmented_control,
            "View",
            ["head", "model", "neuron"],
            default=_kept("attn_bertviz_view", "head"),
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
        k = _keep("attn_topk", st.slider, "Strongest edges", 10, 200, _kept("attn_topk", 40))
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


def _result_header(comparison, current: tuple) -> None:
    """Which input these results belong to, and whether that is still the text above."""
    from engine.attention.memory import human
    from engine.runs import result_budget

    if tuple(comparison.request.sides) != current:
        st.warning(
            f"These results are for:  \n{_for(comparison.request)}  \nnot for the input above: "
            "press Show attention to run it.",
            icon="↩️",
        )
    else:
        st.caption(f"Results for: {_for(comparison.request)}")
    for label, result in comparison.results:
        if result.dropped_tokens:
            who = f"{label}: t" if len(comparison.sides) > 1 else "T"
            st.info(
                f"{who}he text was truncated to {result.n_tokens} tokens "
                f"({result.dropped_tokens} tokens dropped from the end).",
                icon="✂️",
            )
    budget = result_budget()
    st.caption(
        f"This result holds {human(comparison.nbytes)} of memory (result budget: "
        f"{human(budget.used_bytes)} used of {human(budget.budget_bytes)})."
    )


def main() -> None:
    """Show attention, the run's status or error, then its result with the input it is for.

    The run and its snapshot are locals here, never script globals: a global would outlive the
    script run (fragments keep the script's namespace) and keep a replaced run's memory held.
    """
    current = _sides()
    run = st.session_state.get(RUN)
    snap = run.snapshot() if run is not None else None
    running = snap is not None and not snap.finished
    if st.button("Show attention", type="primary", disabled=running):
        run = snap = None  # hold no reference to the previous run: _start drops it
        _start(current)
        run = st.session_state.get(RUN)
        snap = run.snapshot() if run is not None else None
        running = snap is not None and not snap.finished

    if REFUSED in st.session_state:
        message, request = st.session_state[REFUSED]
        ui.show_error(message)
        st.caption(f"Not run, for: {_for(request)}")
    elif running:
        st.fragment(_progress, run_every=POLL_S)()
    elif snap is not None and snap.state != "done":
        if snap.cancelled:
            st.warning(snap.error or "Cancelled.", icon="⏹️")
        else:
            ui.show_error(snap.error or "Attention failed.")
        st.caption(f"For: {_for(run.spec)}")
    elif snap is not None:
        _result_header(snap.result, current)
        explorer()
        ui.add_to_notebook(run.id, "attn_add_to_notebook")


main()
