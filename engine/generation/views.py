"""HTML views of generated tokens, shared by every place that draws a generation."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from engine.generation.decoding import TokenStep


def prob_colour(p: float) -> str:
    """Red (unlikely) to green (likely) background for a probability in [0, 1]."""
    return f"hsl({120 * max(0.0, min(1.0, p)):.0f}, 75%, 82%)"


def token_html(tokens: Sequence[TokenStep]) -> str:
    """Tokens as coloured spans; hover shows probability and the top alternatives."""
    spans = []
    for t in tokens:
        p = math.exp(t.logprob)
        alts = " | ".join(f"{a.text!r} {math.exp(a.logprob):.3f}" for a in t.alternatives)
        text = html.escape(t.text).replace("\n", "↵<br>") or "∅"
        tip = html.escape(f"p={p:.4f}  logprob={t.logprob:.3f}\n{alts}")
        spans.append(
            f'<span class="gen-token" title="{tip}" style="background:{prob_colour(p)};'
            f'border-radius:3px;padding:0 1px;margin:0 1px;white-space:pre-wrap">{text}</span>'
        )
    return f'<div class="gen-tokens" style="line-height:1.9">{"".join(spans)}</div>'
