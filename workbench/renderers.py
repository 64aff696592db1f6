"""Result renderers: one piece of code draws a result wherever it appears (its page, a notebook
cell, the history). ``render(result, key)`` picks the renderer by the result's type; each
capability registers its own with ``@renderer("TypeName")``.

``key`` makes widget keys unique when several results share a page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from engine.html import markdown_literal as md
from engine.html import text_html

RENDERERS: dict[str, Callable[[Any, str], None]] = {}


def renderer(type_name: str):
    def register(fn: Callable[[Any, str], None]):
        RENDERERS[type_name] = fn
        return fn

    return register


def render(result: Any, key: str) -> None:
    """Draw ``result`` with its registered renderer (a plain JSON view when none fits)."""
    draw = RENDERERS.get(type(result).__name__)
    if draw is None:
        st.json(result.to_dict() if hasattr(result, "to_dict") else result, expanded=False)
        return
    draw(result, key)


def seed_text(seed: int | None, sampling: bool) -> str:
    if seed is None:
        return "seed: none (greedy, deterministic)" if not sampling else "seed: random"
    return f"seed {seed}"


@renderer("GenerationResult")
def generation(result, key: str) -> None:
    """Prompt + output, speed and probability figures, the token view, table and exports."""
    from engine.generation.views import token_html

    shown = result.prompt if result.mode == "text" else f"{result.prompt} → "
    with st.container(key=f"{key}_output", border=True):
        # user and model text stay text: escaped HTML and Markdown (no image, link or tag)
        st.markdown(
            f"<div class='gen-output'><span style='opacity:.55'>{text_html(shown)}</span>"
            f"<b>{text_html(result.text)}</b></div>",
            unsafe_allow_html=True,
        )
    m = st.columns(6)
    m[0].metric("Tokens", len(result.tokens))
    m[1].metric("Finish", result.finish_reason)
    m[2].metric("Log-prob", f"{result.logprob:.2f}")
    m[3].metric("Perplexity", f"{result.perplexity:.2f}" if result.perplexity else "–")
    tps = result.tokens_per_second
    m[4].metric("Tokens/s", f"{tps:.1f}" if tps else "–")
    ttft = result.first_token_seconds
    m[5].metric("First token", f"{ttft:.2f} s" if ttft is not None else "–")
    if result.dropped_prompt_tokens:
        st.warning(
            f"The prompt was too long: its first {result.dropped_prompt_tokens} tokens were "
            "dropped to fit the context window."
        )
    st.caption(
        f"{seed_text(result.settings.seed, result.settings.sampling).capitalize()} · model "
        f"{md(result.provenance.model)} · fingerprint {result.provenance.fingerprint[:23]}…"
    )
    st.markdown("**Tokens** (colour = probability; hover for the top alternatives)")
    st.markdown(token_html(result.tokens), unsafe_allow_html=True)
    with st.expander("Token table"):
        st.dataframe(pd.DataFrame(result.token_rows()), hide_index=True, width="stretch")
    d1, d2 = st.columns(2)
    d1.download_button(
        "Export run (JSON)",
        result.to_json(),
        "generation.json",
        "application/json",
        key=f"{key}_json",
    )
    d2.download_button(
        "Export tokens (CSV)", result.to_csv(), "tokens.csv", "text/csv", key=f"{key}_csv"
    )


@renderer("PerplexityResult")
def perplexity(result, key: str) -> None:
    st.metric("Perplexity", f"{result.perplexity:.2f}", help="exp(mean negative log-likelihood)")
    st.caption(
        f"{len(result.token_logprobs)} tokens scored · mean NLL {result.mean_nll:.3f} nats · "
        f"model {md(result.provenance.model)}"
    )


@renderer("OverlapScores")
def overlap(scores, key: str) -> None:
    a, b = st.columns(2)
    a.metric("BLEU", f"{scores.bleu:.2f}")
    b.metric("chrF", f"{scores.chrf:.2f}")
    st.caption(f"sacrebleu {scores.bleu_signature} · {scores.chrf_signature}")


@renderer("Comparison")
def comparison(result, key: str) -> None:
    """One column per model: its text, figures and token view (or its error)."""
    from engine.generation.views import token_html

    cols = st.columns(len(result.outcomes) or 1)
    for col, outcome in zip(cols, result.outcomes, strict=False):
        with col, st.container(border=True):
            st.markdown(f"**{md(outcome.label or outcome.model)}**")
            if outcome.error:
                st.error(outcome.error, icon="⚠️")
                continue
            r = outcome.result
            st.markdown(f"<div>{text_html(r.text)}</div>", unsafe_allow_html=True)
            ppl_text = f"{r.perplexity:.2f}" if r.perplexity else "–"
            st.caption(f"{len(r.tokens)} tokens · {r.finish_reason} · perplexity {ppl_text}")
            st.markdown(token_html(r.tokens), unsafe_allow_html=True)


@renderer("ClassificationResult")
def classification(result, key: str) -> None:
    st.metric("Label", result.label, help="the class with the highest probability")
    frame = pd.DataFrame(
        {"label": list(result.scores), "probability": list(result.scores.values())}
    )
    st.bar_chart(frame, x="label", y="probability", horizontal=True, height=160)


@renderer("CollectedData")
def collected(result, key: str) -> None:
    counts = ", ".join(f"{md(label)}: {n}" for label, n in result.per_label.items())
    st.caption(
        f"Frozen for training: {result.rows} sentences ({counts}) · sha256 {result.sha256[:16]}…"
    )


@renderer("FinetuneResult")
def finetune(result, key: str) -> None:
    """Before/after metrics of a finished fine-tune and the model it produced."""
    st.markdown(
        f"**{md(result.model or '(adapter kept in the job folder)')}** — "
        f"{md(result.task)} on {md(result.base)}, {result.steps} steps"
    )
    rows = result.comparison()
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(f"job {result.job_id} · data {result.data_hash[:23]}…")


@renderer("AttentionResult")
def attention_result(result, key: str) -> None:
    """One input's attention: a heatmap of a chosen layer and head (averages allowed) and the
    per-head statistics. The Attention page adds bertviz views on top of this."""
    from engine.attention import AggregationSettings, aggregate, head_statistics
    from engine.attention.views import heatmap_chart

    st.caption(
        f"{result.n_tokens} tokens · {result.n_layers} layers × {result.n_heads} heads · "
        f"model {md(result.provenance.model)}"
    )
    c1, c2 = st.columns(2)
    layers = ["mean", *range(result.n_layers)]
    heads = ["mean", *range(result.n_heads)]
    layer = c1.selectbox("Layer", layers, key=f"{key}_layer")
    head = c2.selectbox("Head", heads, key=f"{key}_head")
    view = aggregate(
        result,
        AggregationSettings(
            layers=None if layer == "mean" else (layer, layer),
            heads=None if head == "mean" else (head, head),
            merge_words=result.n_tokens > 64,
            max_side=64,
        ),
    )
    st.altair_chart(heatmap_chart(view, view.description, size=420), width="content")
    with st.expander("Per-head statistics"):
        st.dataframe(head_statistics(result.attentions).to_frame(), hide_index=True)


@renderer("AttentionComparison")
def attention_comparison(result, key: str) -> None:
    cols = st.columns(len(result.sides))
    for i, (col, side) in enumerate(zip(cols, result.sides, strict=True)):
        with col:
            if len(result.sides) > 1:
                st.markdown(f"**{md(side.label)}**")
            st.text(side.result.text[:300])
            attention_result(side.result, f"{key}_{i}")


@renderer("Attribution")
def attribution(result, key: str, level: str = "token") -> None:
    """One method's explanation: target, completeness, coloured text, top tokens, per-output
    matrix and faithfulness curves (the same view as the Explain page)."""
    cols = st.columns(3)
    cols[0].metric("Target score f(input)", f"{result.target_score:.4f} nats")
    cols[1].metric("Time", f"{result.seconds:.2f} s")
    cols[2].metric("Forward rows", result.forward_rows)
    st.text(f"Target: {result.target_description}")
    if result.target.get("anchor_first"):
        why = (
            "moving the first position (the model's attention sink) breaks Integrated "
            "Gradients' convergence"
            if result.method == "integrated_gradients"
            else "it is the model's attention sink, so perturbing it says little about the text"
        )
        st.caption(
            f"The first token is held fixed (score 0): the tokenizer adds no BOS token, and {why}."
        )
    statement = result.delta_statement()
    if statement:
        (st.success if result.delta_ok else st.warning)(statement)
    st.html(result.html())
    st.altair_chart(result.bar_chart(level), width="stretch")
    matrix = result.matrix_chart()
    if matrix is not None:
        st.markdown("**Per-output-token attribution** (rows: target tokens)")
        st.altair_chart(matrix, width="stretch")
    faith = result.faithfulness
    if faith is not None:
        st.markdown("**Faithfulness** (deletion / insertion of the top-ranked tokens)")
        m = st.columns(3)
        m[0].metric("Comprehensiveness (AOPC)", f"{faith.comprehensiveness:.4f}")
        m[1].metric("Random-order AOPC", f"{faith.random_comprehensiveness:.4f}")
        m[2].metric("Sufficiency", f"{faith.sufficiency:.4f}")
        st.altair_chart(faith.chart(), width="stretch")


@renderer("ExplanationSet")
def explanation_set(result, key: str, level: str = "token") -> None:
    """Every method in a tab, then the agreement table."""
    st.text(f"Input: {result.text}")
    tabs = st.tabs([a.method_title for a in result.attributions])
    for tab, one in zip(tabs, result.attributions, strict=True):
        with tab:
            attribution(one, key, level)
    if result.agreement is not None:
        st.subheader("Method agreement")
        st.dataframe(result.agreement_frame(), hide_index=True, width="stretch")


def training_curves(records: list[dict], task: str) -> None:
    """Loss (train and eval) and the eval quality metric against the optimizer step."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        st.caption("Curves appear after the first step.")
        return
    loss = pd.DataFrame(
        [{"step": r["step"], "loss": r["loss"], "series": "train loss"} for r in train]
        + [{"step": r["step"], "loss": r["eval_loss"], "series": "eval loss"} for r in evals]
    )
    left, right = st.columns(2)
    left.altair_chart(
        alt.Chart(loss, title="Loss")
        .mark_line(point=True)
        .encode(x="step:Q", y="loss:Q", color="series:N", tooltip=["step", "loss", "series"]),
        width="stretch",
    )
    keys = ("accuracy", "f1") if task == "classification" else ("perplexity",)
    quality = pd.DataFrame(
        [{"step": r["step"], "value": r[k], "metric": k} for r in evals for k in keys if k in r]
    )
    if not quality.empty:
        right.altair_chart(
            alt.Chart(quality, title="Validation " + " / ".join(keys))
            .mark_line(point=True)
            .encode(x="step:Q", y="value:Q", color="metric:N", tooltip=["step", "value", "metric"]),
            width="stretch",
        )
