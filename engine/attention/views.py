"""HTML and charts for attention: bertviz head/model views that work offline, and heatmaps.

bertviz's HTML loads require.js, d3 5.7 and jQuery from a CDN, so offline it is an empty
"Layer:" box. ``bertviz_html`` calls bertviz itself (``html_action="return"``), then replaces
the require.js ``<script src>`` with the vendored d3 and jQuery inlined (``engine/assets``,
licences kept) and a tiny ``require`` shim that hands both to bertviz's callback. Weights are
rounded to 3 decimals before bertviz serialises them, which cuts the payload about 3x.

bertviz's payload grows with layers x heads x tokens²: ``estimate_bertviz_bytes`` predicts it,
and callers switch to the aggregated views above ``BERTVIZ_BUDGET_BYTES``.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

import numpy as np

from engine.attention.aggregate import AttentionView, pretty_token
from engine.attention.extract import AttentionResult
from engine.errors import InputError, MissingPackageError
from engine.html import script_json

BERTVIZ_BUDGET_BYTES = 5_000_000
PAGE_BUDGET_BYTES = 5_000_000  # everything one page view sends to the browser
PAGE_MARGIN_BYTES = 100_000  # head table, edge table and widgets
DECIMALS = 3
_REQUIRE_TAG = (
    '<script src="https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js"></script>'
)
_SHIM = """
window.requirejs = window.require = function (deps, callback) {
  var modules = {d3: window.d3, jquery: window.jQuery};
  callback.apply(null, deps.map(function (name) { return modules[name]; }));
};
window.require.config = window.requirejs.config = function () {};
"""
_CDN = re.compile(r"https://cdnjs\.cloudflare\.com/ajax/libs/[^'\"]*")
_COMMENT_COPY = re.compile(r"// HACK: \{[^\n]*")
View = Literal["head", "model"]


@cache
def offline_scripts() -> str:
    """``<script>`` tags with d3 5.7.0, jQuery 2.2.4 and the require shim, inlined."""
    assets = resources.files("engine.assets")
    d3 = assets.joinpath("d3-5.7.0.min.js").read_text(encoding="utf-8")
    jquery = assets.joinpath("jquery-2.2.4.min.js").read_text(encoding="utf-8")
    return "".join(f"<script>\n{code}\n</script>\n" for code in (d3, jquery, _SHIM))


def _placeholder(i: int) -> str:
    return f"@@bertviz-token-{i}@@"


_PLACEHOLDER = re.compile(r'"@@bertviz-token-(\d+)@@"')


def _fill_placeholders(html: str, tokens: list[str]) -> str:
    """Each quoted placeholder becomes its token as script-safe JSON (``engine.html``)."""
    return _PLACEHOLDER.sub(lambda m: script_json(tokens[int(m.group(1))]), html)


@dataclass(frozen=True)
class BertvizSelection:
    """Which layers and heads bertviz gets (None = all). Fewer layers = a smaller page."""

    layers: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None

    def ranges(self, result: AttentionResult) -> tuple[range, range]:
        l0, l1 = self.layers or (0, result.n_layers - 1)
        h0, h1 = self.heads or (0, result.n_heads - 1)
        if not (0 <= l0 <= l1 < result.n_layers and 0 <= h0 <= h1 < result.n_heads):
            raise InputError(
                f"layers/heads out of range: the model has {result.n_layers} layers and "
                f"{result.n_heads} heads (got layers={self.layers}, heads={self.heads})."
            )
        return range(l0, l1 + 1), range(h0, h1 + 1)


def _rounded(attentions: np.ndarray) -> np.ndarray:
    return np.round(attentions.astype(np.float64), DECIMALS)


def estimate_bertviz_bytes(
    result: AttentionResult, selection: BertvizSelection | None = None
) -> int:
    """Predicted size of ``bertviz_html`` in bytes, from one serialised head (cheap)."""
    layers, heads = (selection or BertvizSelection()).ranges(result)
    pairs = [(layer, head) for layer in layers for head in heads]
    picks = pairs[:: max(1, len(pairs) // 6)][:6]  # a few heads spread over the selection
    n = result.n_tokens
    rows = np.unique(np.linspace(0, n - 1, min(n, 32)).astype(int))  # rows spread over the input
    per_row = np.mean(
        [
            len(json.dumps(_rounded(result.attentions[lay, hd, rows]).tolist())) / len(rows)
            for lay, hd in picks
        ]
    )
    per_head = per_row * n
    tokens = len(json.dumps([pretty_token(t) for t in result.tokens]))
    return int(len(offline_scripts()) + 40_000 + per_head * len(pairs) + 2 * tokens)


def bertviz_html(
    result: AttentionResult,
    view: View = "head",
    selection: BertvizSelection | None = None,
    budget: int | None = BERTVIZ_BUDGET_BYTES,
) -> str:
    """A self-contained bertviz head or model view (no network request).

    Raises ``InputError`` when the page would exceed ``budget`` bytes (None = no limit): use
    fewer layers/heads or the aggregated views.
    """
    if view not in ("head", "model"):
        raise InputError(f"view must be 'head' or 'model' (got {view!r}).")
    selection = selection or BertvizSelection()
    layers, heads = selection.ranges(result)
    if budget is not None:
        estimate = estimate_bertviz_bytes(result, selection)
        if estimate > budget:
            raise InputError(
                f"The bertviz view would be about {estimate / 1e6:.1f} MB (limit "
                f"{budget / 1e6:.1f} MB): choose fewer layers or heads, or use the aggregated "
                "views."
            )
    try:
        import torch
        from bertviz import head_view, model_view
    except ImportError as exc:  # pragma: no cover - bertviz is a dependency
        raise MissingPackageError("bertviz is not installed: pip install 'bertviz>=1.4'.") from exc

    block = _rounded(result.attentions[layers.start : layers.stop, heads.start : heads.stop])
    attention = [torch.from_numpy(block[i : i + 1]) for i in range(len(layers))]  # (1, h, q, k)
    tokens = [pretty_token(t) for t in result.tokens]
    # bertviz writes its parameters into a <script> with plain json.dumps, which does not
    # escape "</script>": it gets placeholders, replaced below by escaped JSON strings.
    marks = [_placeholder(i) for i in range(len(tokens))]
    if view == "head":
        html = head_view(attention, marks, prettify_tokens=False, html_action="return").data
    else:
        html = model_view(
            attention, marks, prettify_tokens=False, display_mode="light", html_action="return"
        ).data
    if _REQUIRE_TAG not in html:
        raise InputError("Unexpected bertviz HTML (require.js tag not found): check its version.")
    html = html.replace(_REQUIRE_TAG, offline_scripts())
    html = _CDN.sub("inline", html)  # require.config paths: unused, the shim serves both
    # bertviz's template replace also fills a comment ("// HACK: PYTHON_PARAMS ..."), which
    # doubles the payload: drop that second copy.
    html = _COMMENT_COPY.sub("", html)
    html = _fill_placeholders(html, tokens)
    if layers.start or heads.start:
        note = (
            f"<p style='font:12px sans-serif;color:#555'>Layers {layers.start}–"
            f"{layers.stop - 1}, heads {heads.start}–{heads.stop - 1} (bertviz numbers them "
            "from 0 within this selection).</p>"
        )
        html = note + html
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + html + "</body></html>"
    )


@dataclass(frozen=True)
class BertvizPlan:
    """What the bertviz section can show within a byte budget.

    ``selection``: all layers if they fit, else only ``layers``; None when even that would
    exceed the budget (show the aggregated views instead). ``estimate``: predicted bytes of
    the largest input's view for the last selection tried. ``budget``: bytes per input.
    """

    selection: BertvizSelection | None
    estimate: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.selection is not None

    @property
    def all_layers(self) -> bool:
        return self.selection is not None and self.selection.layers is None


def bertviz_budget(sent: int, n_inputs: int, page_budget: int = PAGE_BUDGET_BYTES) -> int:
    """Bytes left for each input's bertviz page once ``sent`` bytes of charts are on the page."""
    return max(0, (page_budget - sent - PAGE_MARGIN_BYTES) // max(1, n_inputs))


def plan_bertviz(
    results: list[AttentionResult], budget: int, layers: tuple[int, int] | None = None
) -> BertvizPlan:
    """Choose all layers, else the ``layers`` range, else nothing, so that each of
    ``results``' bertviz pages stays within ``budget`` bytes (one page per input)."""
    candidates = [BertvizSelection()]
    if layers is not None:
        candidates.append(BertvizSelection(layers=layers))
    estimate = 0
    for candidate in candidates:
        estimate = max(estimate_bertviz_bytes(r, candidate) for r in results)
        if estimate <= budget:
            return BertvizPlan(candidate, estimate, budget)
    return BertvizPlan(None, estimate, budget)


def bertviz_height(result: AttentionResult, view: View = "head") -> int:
    """A pixel height that shows the whole view without an inner scrollbar."""
    if view == "head":
        return min(120 + 23 * result.n_tokens, 4000)
    return min(120 + 110 * result.n_layers, 4000)


# --- native charts (altair) -------------------------------------------------------------


def heatmap_chart(view: AttentionView, title: str = "", size: int = 560):
    """An altair heatmap of a view: query labels on the y axis, key labels on the x axis."""
    import altair as alt
    import pandas as pd

    n = len(view.labels)
    labels = [f"{i}: {lab}" for i, lab in enumerate(view.labels)]
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    frame = pd.DataFrame(
        {
            "query": np.asarray(labels, dtype=object)[q.ravel()],
            "key": np.asarray(labels, dtype=object)[k.ravel()],
            "weight": np.round(view.matrix.ravel().astype(float), 4),
        }
    )
    label_limit = 140 if n <= 64 else 90
    return (
        alt.Chart(frame, title=title or view.description)
        .mark_rect()
        .encode(
            x=alt.X(
                "key:O",
                sort=labels,
                title="key (attended to)",
                axis=alt.Axis(
                    labelLimit=label_limit, labelAngle=-60, labelFontSize=10 if n <= 64 else 7
                ),
            ),
            y=alt.Y(
                "query:O",
                sort=labels,
                title="query (attending)",
                axis=alt.Axis(labelLimit=label_limit, labelFontSize=10 if n <= 64 else 7),
            ),
            color=alt.Color(
                "weight:Q", scale=alt.Scale(scheme="blues", domain=[0, 1], type="sqrt")
            ),
            tooltip=["query", "key", alt.Tooltip("weight:Q", format=".4f")],
        )
        .properties(width=size, height=size)
    )


def png_with_text(png: bytes, text: dict[str, str]) -> bytes:
    """``png`` with one tEXt chunk per item (keyword -> Latin-1 text) after its header, so
    the file carries its provenance (``exiftool``/PIL show it)."""
    signature, ihdr_end = 8, 8 + 4 + 4 + 13 + 4  # IHDR is always first, 13 bytes of data
    if png[:signature] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise InputError("Not a PNG file.")
    chunks = b""
    for key, value in text.items():
        data = key.encode("latin-1") + b"\0" + value.encode("latin-1", errors="replace")
        kind_data = b"tEXt" + data
        chunks += struct.pack(">I", len(data)) + kind_data
        chunks += struct.pack(">I", zlib.crc32(kind_data) & 0xFFFFFFFF)
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def chart_png(chart, scale: float = 2.0, provenance: dict | None = None) -> bytes:
    """PNG bytes of an altair chart (needs ``vl-convert-python``); ``provenance`` is stored
    as a JSON tEXt chunk named "provenance"."""
    try:
        import vl_convert  # noqa: F401
    except ImportError as exc:
        raise MissingPackageError(
            "PNG export needs vl-convert-python: pip install 'vl-convert-python>=1.6'."
        ) from exc
    import altair as alt

    buffer = io.BytesIO()
    with alt.data_transformers.disable_max_rows():  # our views are already bounded
        chart.save(buffer, format="png", scale_factor=scale)
    png = buffer.getvalue()
    if provenance:
        png = png_with_text(png, {"provenance": json.dumps(provenance, ensure_ascii=True)})
    return png


def chart_payload_bytes(chart) -> int:
    """Size of the chart's Vega-Lite JSON (what the browser receives)."""
    import altair as alt

    with alt.data_transformers.disable_max_rows():
        return len(chart.to_json(indent=None))
