"""A self-contained HTML report of one or more attributions (no scripts, no network)."""

from __future__ import annotations

import html
import json

import numpy as np

from engine.attribution.agreement import agreement


def colour(score: float, scale: float) -> str:
    """Background for a score: green for positive, red for negative, white at 0."""
    if scale <= 0:
        return "rgba(255,255,255,0)"
    alpha = min(abs(score) / scale, 1.0) * 0.85
    return f"rgba(22,163,74,{alpha:.2f})" if score >= 0 else f"rgba(220,38,38,{alpha:.2f})"


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


def _bars(result, k: int = 10) -> str:
    top = result.top(k)
    scale = max((abs(v) for _, v in top), default=1.0) or 1.0
    rows = []
    for label, value in top:
        width = 100 * abs(value) / scale
        rows.append(
            f"<tr><td>{html.escape(label)}</td><td class=num>{value:+.4f}</td>"
            f'<td><div class=bar style="width:{width:.0f}%;background:{colour(value, scale)}">'
            "</div></td></tr>"
        )
    return "<table class=bars>" + "".join(rows) + "</table>"


def _svg_curves(f) -> str:
    """Deletion / insertion / random curves as an inline SVG."""
    w, h, pad = 420, 220, 30
    series = {"deletion": f.deletion, "insertion": f.insertion, "random": f.random_deletion}
    values = np.concatenate(list(series.values()))
    lo, hi = float(values.min()), float(values.max())
    span = (hi - lo) or 1.0
    colours = {"deletion": "#dc2626", "insertion": "#16a34a", "random": "#6b7280"}
    lines = []
    for name, ys in series.items():
        points = " ".join(
            f"{pad + x * (w - 2 * pad):.1f},{h - pad - (y - lo) / span * (h - 2 * pad):.1f}"
            for x, y in zip(f.fractions, ys, strict=True)
        )
        lines.append(
            f'<polyline fill="none" stroke="{colours[name]}" stroke-width="2" points="{points}"/>'
        )
    legend = " ".join(f'<tspan fill="{c}">■ {n}</tspan>' for n, c in colours.items())
    return (
        f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" '
        f'stroke="#ccc"/>{"".join(lines)}'
        f'<text x="{pad}" y="18" font-size="12">{legend}</text>'
        f'<text x="{pad}" y="{h - 8}" font-size="11">0</text>'
        f'<text x="{w - pad - 30}" y="{h - 8}" font-size="11">100% of tokens</text>'
        f'<text x="2" y="{pad + 10}" font-size="10">{hi:.2f}</text>'
        f'<text x="2" y="{h - pad}" font-size="10">{lo:.2f}</text></svg>'
    )


def _section(result) -> str:
    out = [f"<h2>{html.escape(result.method_title)}</h2>"]
    out.append(
        f"<p><b>Target:</b> {html.escape(result.target_description)} = "
        f"{result.target_score:.4f} nats · {result.seconds:.2f} s · "
        f"{result.forward_rows} forward rows · options <code>"
        f"{html.escape(json.dumps(result.options))}</code></p>"
    )
    statement = result.delta_statement()
    if statement:
        cls = "ok" if result.delta_ok else "warn"
        out.append(f'<p class="{cls}">{html.escape(statement)}</p>')
    out.append(f'<div class="text">{coloured_text(result)}</div>')
    out.append("<h3>Top tokens</h3>" + _bars(result))
    f = result.faithfulness
    if f is not None:
        out.append(
            "<h3>Faithfulness</h3>"
            f"<p>Comprehensiveness (AOPC) {f.comprehensiveness:.4f} · random order "
            f"{f.random_comprehensiveness:.4f} · sufficiency {f.sufficiency:.4f} "
            f"(replacement: {html.escape(f.replacement)})</p>" + _svg_curves(f)
        )
    return "\n".join(out)


def _agreement_table(results, table=None) -> str:
    table = table or agreement(results)
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r.method_a)}</td><td>{esc(r.method_b)}</td>"
        f"<td class=num>{r.spearman:.3f}</td>"
        f"<td class=num>{r.kendall:.3f}</td><td class=num>{r.top_k_overlap:.2f}</td></tr>"
        for r in table.rows
    )
    return (
        "<h2>Method agreement</h2><table class=grid><tr><th>A</th><th>B</th><th>Spearman</th>"
        f"<th>Kendall</th><th>top-{table.rows[0].k} overlap</th></tr>{rows}</table>"
    )


_CSS = """
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#111}
.text{line-height:2;font-size:1.1em;border:1px solid #ddd;padding:.6em;border-radius:6px}
.tok{border-radius:3px;padding:1px 1px}
.num{text-align:right;font-family:monospace}.bar{height:12px}
table.bars td{padding:2px 8px}table.grid td,table.grid th{border:1px solid #ddd;padding:3px 8px}
.ok{color:#166534}.warn{color:#b91c1c;font-weight:bold}code{font-size:.85em}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}
"""


def html_report(results) -> str:
    """One HTML document for an ``ExplanationSet`` or one or several attributions of the same
    input. Every piece of user text (input, target, labels, tokens) is escaped; no scripts."""
    table = None
    if hasattr(results, "attributions"):  # an ExplanationSet: its own agreement table
        table = results.agreement
        results = list(results.attributions)
    results = [results] if not isinstance(results, list | tuple) else list(results)
    first = results[0]
    p = first.provenance
    body = [
        "<h1>Attribution report</h1>",
        f"<p><b>Model:</b> {html.escape(first.model)} · fingerprint "
        f"<code>{html.escape(p.fingerprint)}</code> · {html.escape(p.dtype)} on "
        f"{html.escape(p.device)} · seed {p.seed}</p>",
        f"<p><b>Input:</b> {html.escape(first.text)}</p>",
    ]
    body += [_section(r) for r in results]
    if len(results) > 1:
        body.append(_agreement_table(results, table))
    body.append(
        "<h2>Provenance</h2><pre>"
        + html.escape(json.dumps(p.__dict__, indent=2, default=str))
        + "</pre>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Attribution report</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )
