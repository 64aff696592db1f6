"""HTML views of generated tokens, shared by every place that draws a generation.

Token text is made inert with ``engine.html.text_html`` (escaped HTML, Markdown characters as
character references): the view is safe in ``st.html`` and in ``st.markdown``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from engine.generation.decoding import TokenStep
from engine.html import text_html


def prob_colour(p: float) -> str:
    """Red (unlikely) to green (likely) background for a probability in [0, 1]."""
    return f"hsl({120 * max(0.0, min(1.0, p)):.0f}, 75%, 82%)"


def _span(group: Sequence[TokenStep]) -> str:
    """One coloured span for a token, or for the byte-level pieces of one character."""
    last = group[-1]
    shown = last.display if last.display is not None and len(group) > 1 else None
    if shown is None:
        shown = "".join(t.text if t.display is None else t.display or t.text for t in group)
    p = math.prod(math.exp(t.logprob) for t in group)
    tips = []
    for t in group:
        alts = " | ".join(f"{a.text!r} {math.exp(a.logprob):.3f}" for a in t.alternatives)
        tips.append(f"token {t.id}: p={math.exp(t.logprob):.4f}  logprob={t.logprob:.3f}\n{alts}")
    text = text_html(shown, newline="↵<br>") or "∅"
    # an attribute is never Markdown; no raw newline keeps the view one HTML block
    tip = html.escape("\n".join(tips)).replace("\n", "&#10;")
    return (
        f'<span class="gen-token" title="{tip}" style="background:{prob_colour(p)};'
        f'border-radius:3px;padding:0 1px;margin:0 1px;white-space:pre-wrap">{text}</span>'
    )


def token_html(tokens: Sequence[TokenStep]) -> str:
    """Tokens as coloured spans (colour = probability; hover: figures and top alternatives).

    Byte-level pieces of one character are merged into one span showing the character (its
    colour is the pieces' joint probability; the hover lists every piece).
    """
    spans, pending = [], []
    for t in tokens:
        pending.append(t)
        if t.display != "":  # "" = an incomplete character so far: wait for its last piece
            spans.append(_span(pending))
            pending = []
    if pending:
        spans.append(_span(pending))
    return f'<div class="gen-tokens" style="line-height:1.9">{"".join(spans)}</div>'
