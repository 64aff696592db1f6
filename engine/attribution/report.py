"""A self-contained HTML report of one or more attributions (no scripts, no network, printable).

Drawn in the app's light theme (primary ``PRIMARY``, as in .streamlit/config.toml) with the
app's score colours (``views.colour``). Faithfulness figures come with what they mean, which
direction is better, their unit, and a plain verdict against the random-order baseline.
"""

from __future__ import annotations

import datetime as dt
import html
import json

import numpy as np

from engine.attribution.agreement import agreement
from engine.attribution.views import NEGATIVE, POSITIVE, colour, coloured_text

__all__ = ["colour", "coloured_text", "faithfulness_verdict", "html_report", "when"]

PRIMARY = "#2f6fde"  # the app's primaryColor (.streamlit/config.toml, light theme)
TEXT, BORDER, HEADER_BG = "#31333f", "#d5dae3", "#eef3fd"  # Streamlit light text, our tables
RANDOM = "#6b7280"
RANDOM_MARGIN = 0.20  # comprehensiveness must beat the random order by more than 20% of it
TIME_KEYS = ("created", "started", "finished", "updated")  # epoch seconds, shown as UTC dates
UNIT_NOTE = (
    "All figures are in nats, the unit of the target score (a natural-log probability, or a "
    "difference of two log-probabilities for a contrast target)."
)


def when(seconds: float | None) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS UTC`` ("–" for None)."""
    if seconds is None:
        return "–"
    return dt.datetime.fromtimestamp(float(seconds), tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    return (
        "<table class=grid><tr><th>token</th><th>score</th><th>|score|, coloured as above</th>"
        "</tr>" + "".join(rows) + "</table>"
    )


def faithfulness_verdict(f, margin: float = RANDOM_MARGIN) -> tuple[str, str]:
    """Comprehensiveness against the random-order baseline, in words: (kind, sentence).

    kind is "clear" (more than ``margin`` x |random| above it), "barely" (above, within the
    margin), "equal" (the same AOPC, e.g. one attributed token) or "below" (under it).
    """
    comp, rand = float(f.comprehensiveness), float(f.random_comprehensiveness)
    diff = comp - rand
    ratio = f"{comp / rand:.2f}× " if rand > 0 else ""
    figures = (
        f"comprehensiveness {comp:.4f} is {ratio}the random order's {rand:.4f} ({diff:+.4f} nats)"
    )
    pct = f"{margin:.0%}"
    if np.isclose(comp, rand, rtol=0, atol=1e-9):
        return "equal", (
            f"Equal to random: {figures}; the ranking cannot be told apart from a random order "
            "(with one attributed token both orders are the same)."
        )
    if diff < 0:
        return "below", (
            f"Below random: the ranking is not faithful: {figures}; deleting tokens in a "
            "random order lowers the score more than deleting the top-ranked ones first."
        )
    if diff <= margin * abs(rand):
        return "barely", (
            f"Barely above random (within {pct}): {figures}; the ranking is hardly better "
            "than deleting tokens at random."
        )
    return "clear", (
        f"Clearly above random: {figures}, more than {pct} above it; the top-ranked tokens "
        "matter more than random ones."
    )


# --- the deletion / insertion curves -----------------------------------------------------

CHAR_EM = 0.62  # estimated glyph width in em: generous for lower case and digits


def text_width(text: str, font_size: float) -> float:
    """Estimated drawn width of ``text`` in SVG user units (pixels) at ``font_size``."""
    return len(text) * font_size * CHAR_EM


def _svg_text(x: float, y: float, text: str, size: int, anchor: str = "start", **attrs) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{html.escape(text)}</text>"
    )


def _svg_curves(f) -> str:
    """Deletion / insertion / random curves as an inline SVG (no external reference).

    Margins are computed from the estimated widths of the labels (``text_width``), so every
    label lies inside the viewBox.
    """
    w, h, tick, small = 480, 270, 11, 12
    series = {
        "deletion": (f.deletion, NEGATIVE, ""),
        "insertion": (f.insertion, POSITIVE, ""),
        "random deletion": (f.random_deletion, RANDOM, ' stroke-dasharray="5 3"'),
    }
    values = np.concatenate([np.asarray(s[0], float) for s in series.values()])
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:  # flat curves: a unit range around them
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    y_ticks = [hi, (hi + lo) / 2, lo]
    y_labels = [f"{v:.2f}" for v in y_ticks]
    left = 10 + max(text_width(s, tick) for s in y_labels)
    right, top, bottom = 16, 48, h - 40
    x0, x1 = left, w - right

    def px(x: float) -> float:
        return x0 + x * (x1 - x0)

    def py(y: float) -> float:
        return bottom - (y - lo) / span * (bottom - top)

    parts = [
        f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{bottom - top}" '
        f'fill="none" stroke="{BORDER}"/>'
    ]
    for value, label in zip(y_ticks, y_labels, strict=True):
        parts.append(
            f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{py(value):.1f}" y2="{py(value):.1f}" '
            f'stroke="{BORDER}" stroke-width="0.5"/>'
        )
        parts.append(_svg_text(x0 - 6, py(value) + tick * 0.35, label, tick, "end"))
    for ys, stroke, dash in series.values():
        points = " ".join(
            f"{px(float(x)):.1f},{py(float(y)):.1f}" for x, y in zip(f.fractions, ys, strict=True)
        )
        parts.append(
            f'<polyline fill="none" stroke="{stroke}" stroke-width="2"{dash} points="{points}"/>'
        )
    # legend: a short line and a name per curve, in one row above the plot
    x = x0
    for name, (_, stroke, dash) in series.items():
        parts.append(
            f'<line x1="{x:.1f}" x2="{x + 16:.1f}" y1="12" y2="12" stroke="{stroke}" '
            f'stroke-width="2"{dash}/>'
        )
        parts.append(_svg_text(x + 20, 16, name, small, fill=stroke))
        x += 20 + text_width(name, small) + 14
    parts.append(_svg_text(6, top - 14, "target score (nats)", tick))
    parts.append(_svg_text(x0, bottom + 15, "0%", tick))
    parts.append(_svg_text((x0 + x1) / 2, bottom + 15, "50%", tick, "middle"))
    parts.append(_svg_text(x1, bottom + 15, "100%", tick, "end"))
    parts.append(_svg_text((x0 + x1) / 2, h - 8, "share of tokens deleted / kept", tick, "middle"))
    return (
        f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="deletion, insertion and random-deletion curves" '
        f'font-family="sans-serif" fill="{TEXT}">{"".join(parts)}</svg>'
    )


def _faithfulness(f) -> str:
    kind, sentence = faithfulness_verdict(f)
    replaced = f"replaced by the {html.escape(f.replacement)} baseline"
    rows = [
        (
            "Comprehensiveness (AOPC)",
            f.comprehensiveness,
            "Mean drop of the target score when the top-ranked tokens are deleted first "
            f"({replaced}), averaged over the curve from one token deleted up to all.",
            "higher is better",
        ),
        (
            "Random-order comprehensiveness",
            f.random_comprehensiveness,
            "The same, deleting tokens in a random (seeded) order: the reference a faithful "
            "ranking must clearly beat.",
            "reference",
        ),
        (
            "Sufficiency",
            f.sufficiency,
            "Mean drop of the target score when only the top-ranked tokens are kept (the rest "
            f"{replaced}); 0 means the top tokens alone keep the score.",
            "lower is better",
        ),
    ]
    table = "".join(
        f"<tr><td>{name}</td><td class=num>{value:.4f}</td><td>{meaning}</td><td>{better}</td></tr>"
        for name, value, meaning, better in rows
    )
    css = "ok" if kind == "clear" else "warn"
    return (
        "<h3>Faithfulness</h3><table class=grid><tr><th>figure</th><th>nats</th>"
        f"<th>what it measures</th><th>direction</th></tr>{table}</table>"
        f'<p class="{css}">{html.escape(sentence)}</p>'
        f"<p class=note>{UNIT_NOTE} The verdict compares comprehensiveness with the random "
        f"order: clearly above means more than {RANDOM_MARGIN:.0%} above it.</p>"
        "<figure>" + _svg_curves(f) + "<figcaption class=note>Target score as tokens are "
        "deleted top-ranked first (deletion, should fall fast), kept top-ranked first "
        "(insertion, should rise fast) or deleted in a random order.</figcaption></figure>"
    )


def _section(result) -> str:
    out = [f"<section><h2>{html.escape(result.method_title)}</h2>"]
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
    out.append(
        f'<p class=note>Green (<span class=swatch style="background:{colour(1, 1)}"></span>) '
        f'raises the target score, red (<span class=swatch style="background:{colour(-1, 1)}">'
        "</span>) lowers it; the stronger the colour, the larger |score|.</p>"
    )
    out.append("<h3>Top tokens</h3>" + _bars(result))
    if result.faithfulness is not None:
        out.append(_faithfulness(result.faithfulness))
    out.append("</section>")
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
        "<section><h2>Method agreement</h2><table class=grid><tr><th>A</th><th>B</th>"
        f"<th>Spearman</th><th>Kendall</th><th>top-{table.rows[0].k} overlap</th></tr>{rows}"
        "</table></section>"
    )


def _provenance(p) -> str:
    rows = []
    for key, value in p.__dict__.items():
        if key in TIME_KEYS and isinstance(value, int | float):
            shown = when(value)
        elif isinstance(value, dict):
            shown = ", ".join(f"{k} {v}" for k, v in value.items())
        else:
            shown = "–" if value is None else str(value)
        rows.append(f"<tr><th>{html.escape(key)}</th><td class=mono>{html.escape(shown)}</td></tr>")
    return f"<section><h2>Provenance</h2><table class=grid>{''.join(rows)}</table></section>"


_CSS = f"""
body{{font-family:"Source Sans Pro",system-ui,sans-serif;max-width:960px;margin:2em auto;
color:{TEXT};background:#fff;padding:0 1em}}
h1{{color:{PRIMARY}}}h2{{color:{PRIMARY};border-bottom:2px solid {PRIMARY};padding-bottom:.2em;
margin-top:1.8em}}h3{{color:{PRIMARY}}}
.text{{line-height:2;font-size:1.1em;border:1px solid {BORDER};padding:.6em;border-radius:6px}}
.tok{{border-radius:3px;padding:1px 1px}}
.num{{text-align:right;font-family:ui-monospace,monospace}}.bar{{height:12px;min-width:1px}}
.mono{{font-family:ui-monospace,monospace;word-break:break-all}}
table.grid{{border-collapse:collapse;margin:.6em 0;font-size:.92em}}
table.grid td,table.grid th{{border:1px solid {BORDER};padding:3px 8px;text-align:left;
vertical-align:top}}table.grid th{{background:{HEADER_BG}}}table.grid td.num{{text-align:right}}
.swatch{{display:inline-block;width:1em;height:.8em;border-radius:2px;vertical-align:middle}}
.ok{{color:#166534}}.warn{{color:#b91c1c;font-weight:bold}}code{{font-size:.85em}}
.note{{color:#5a6272;font-size:.9em}}figure{{margin:.6em 0}}svg{{max-width:100%;height:auto}}
*{{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
@media print{{body{{margin:0;max-width:none}}section,figure,table{{page-break-inside:avoid}}}}
"""


def html_report(results) -> str:
    """One HTML document for an ``ExplanationSet`` or one or several attributions of the same
    input. Every piece of user text (input, target, labels, tokens) is escaped; no scripts,
    no external references; times in UTC; prints with its colours."""
    table, p = None, None
    if hasattr(results, "attributions"):  # an ExplanationSet: its own agreement table
        table, p = results.agreement, results.provenance
        results = list(results.attributions)
    results = [results] if not isinstance(results, list | tuple) else list(results)
    first = results[0]
    p = p or first.provenance
    seed = "–" if p.seed is None else p.seed
    body = [
        "<h1>Attribution report</h1>",
        f"<p><b>Model:</b> {html.escape(first.model)} · fingerprint "
        f"<code>{html.escape(p.fingerprint)}</code> · {html.escape(p.dtype)} on "
        f"{html.escape(p.device)} · seed {seed} · created {when(p.created)}</p>",
        f"<p><b>Input:</b> {html.escape(first.text)}</p>",
    ]
    body += [_section(r) for r in results]
    if len(results) > 1:
        body.append(_agreement_table(results, table))
    body.append(_provenance(p))
    return (
        "<!doctype html><html lang=en><head><meta charset='utf-8'>"
        f"<title>Attribution report</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>"
    )
