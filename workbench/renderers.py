"""Result renderers: one piece of code draws a result wherever it appears (its page, a notebook
cell, the history). ``render(result, key)`` picks the renderer by the result's type; each
capability registers its own with ``@renderer("TypeName")``.

``key`` makes widget keys unique when several results share a page.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

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
        st.markdown(
            f"<span style='opacity:.55'>{html.escape(shown)}</span>"
            f"<b>{html.escape(result.text)}</b>".replace("\n", "<br>"),
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
        f"{result.provenance.model} · fingerprint {result.provenance.fingerprint[:23]}…"
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
        f"model {result.provenance.model}"
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
            st.markdown(f"**{html.escape(outcome.label or outcome.model)}**")
            if outcome.error:
                st.error(outcome.error, icon="⚠️")
                continue
            r = outcome.result
            st.markdown(html.escape(r.text).replace("\n", "<br>"), unsafe_allow_html=True)
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


@renderer("FinetuneResult")
def finetune(result, key: str) -> None:
    """Before/after metrics of a finished fine-tune and the model it produced."""
    st.markdown(
        f"**{html.escape(result.model or '(adapter kept in the job folder)')}** — "
        f"{html.escape(result.task)} on {html.escape(result.base)}, {result.steps} steps"
    )
    rows = result.comparison()
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(f"job {result.job_id} · data {result.data_hash[:23]}…")
