"""Tables and charts of explanation results (pandas frames and altair charts, no Streamlit).

The result objects call these (``Attribution.bar_chart()``, ``Faithfulness.chart()``, ...), so
the Explain page, a notebook cell and a script draw a result with the same code. pandas and
altair are imported lazily.
"""

from __future__ import annotations

import html

import numpy as np

POSITIVE, NEGATIVE = "#16a34a", "#dc2626"  # green raises the target score, red lowers it
MAX_ALPHA = 0.85  # opacity of the largest |score|: text stays readable on the strongest colour


def colour(score: float, scale: float) -> str:
    """CSS background for a score, the one scale of the app's coloured text and the report:
    ``POSITIVE`` for a positive score, ``NEGATIVE`` for a negative one, opacity |score| / scale
    (capped at ``MAX_ALPHA``); transparent when ``scale`` <= 0. Returns "rgba(r,g,b,a)"."""
    if scale <= 0:
        return "rgba(255,255,255,0)"
    alpha = min(abs(score) / scale, 1.0) * MAX_ALPHA
    hex_colour = POSITIVE if score >= 0 else NEGATIVE
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha:.2f})"


def group_frame(result, level: str = "token"):
    """Scores per token, word or sentence: DataFrame with columns [level, "score", "order"]."""
    import pandas as pd

    labels, values = result.groups(level)
    return pd.DataFrame({level: labels, "score": values, "order": range(len(labels))})


def top_frame(result, level: str = "token", k: int = 15):
    """The k largest-|score| rows of ``group_frame``, largest first."""
    frame = group_frame(result, level)
    return frame.reindex(frame["score"].abs().sort_values(ascending=False).index).head(k)


def bar_chart(result, level: str = "token", k: int = 15):
    """Horizontal bars of the k largest-|score| tokens (or words, sentences): altair Chart."""
    import altair as alt

    top = top_frame(result, level, k)
    return (
        alt.Chart(top)
        .mark_bar()
        .encode(
            x=alt.X("score:Q", title="attribution"),
            y=alt.Y(f"{level}:N", sort=alt.SortField("score", order="descending"), title=None),
            color=alt.condition("datum.score >= 0", alt.value(POSITIVE), alt.value(NEGATIVE)),
            tooltip=[level, "score"],
        )
    )


def matrix_frame(result):
    """Per-output-token scores in long form: [output, input, score] (None without a matrix)."""
    import pandas as pd

    if result.token_matrix is None:
        return None
    keep = np.flatnonzero(result.free)
    return pd.DataFrame(
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


def matrix_chart(result):
    """Heat map of the (output token, input token) matrix: altair Chart, or None."""
    import altair as alt

    frame = matrix_frame(result)
    if frame is None:
        return None
    return (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("input:N", sort=None),
            y=alt.Y("output:N", sort=None),
            color=alt.Color("score:Q", scale=alt.Scale(scheme="redyellowgreen", domainMid=0)),
            tooltip=["input", "output", "score"],
        )
    )


def curves_frame(faithfulness):
    """Deletion, insertion and random-deletion curves: [fraction, score, curve] rows."""
    import pandas as pd

    f = faithfulness
    n = len(f.fractions)
    return pd.DataFrame(
        {
            "fraction": list(f.fractions) * 3,
            "score": [*f.deletion, *f.insertion, *f.random_deletion],
            "curve": ["deletion"] * n + ["insertion"] * n + ["random deletion"] * n,
        }
    )


def curves_chart(faithfulness):
    """The faithfulness curves as lines: altair Chart."""
    import altair as alt

    return (
        alt.Chart(curves_frame(faithfulness))
        .mark_line(point=True)
        .encode(
            x=alt.X("fraction:Q", title="share of tokens removed / inserted"),
            y=alt.Y("score:Q", title="target score (nats)"),
            color="curve:N",
        )
    )


def coloured_text(result) -> str:
    """The input text with each token's background coloured by its score (HTML spans)."""
    scores = np.asarray(result.scores, float)
    scale = float(np.abs(scores).max()) if scores.size else 0.0
    parts, cursor = [], 0
    for i, token in enumerate(result.tokens):
        start, end = (int(v) for v in result.offsets[i])
        if not result.free[i] or end <= start:
            continue
        if start > cursor:
            parts.append(html.escape(result.text[cursor:start]))
        title = f"{token!r}: {scores[i]:+.4f}"
        parts.append(
            f'<span class="tok" title="{html.escape(title)}" '
            f'style="background:{colour(scores[i], scale)}">'
            f"{html.escape(result.text[start:end])}</span>"
        )
        cursor = max(cursor, end)
    parts.append(html.escape(result.text[cursor:]))
    return "".join(parts)


def coloured_html(result) -> str:
    """The input text with each token coloured by its score, in a block (escaped HTML)."""
    return f'<div style="line-height:2;font-size:1.1em">{coloured_text(result)}</div>'
