"""Offline bertviz HTML (no CDN), its size estimate and budget, heatmaps and PNG export."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from engine.attention import AttentionResult
from engine.attention.aggregate import aggregate
from engine.attention.views import (
    BertvizSelection,
    bertviz_html,
    chart_payload_bytes,
    chart_png,
    estimate_bertviz_bytes,
    heatmap_chart,
)
from engine.errors import InputError
from engine.provenance import Provenance


def random_result(layers=2, heads=3, n=10, seed=0) -> AttentionResult:
    rng = np.random.default_rng(seed)
    a = rng.random((layers, heads, n, n)).astype(np.float32)
    a /= a.sum(-1, keepdims=True)
    return AttentionResult(
        text="x",
        tokens=["[CLS]"] + [f"Ġw{i}" for i in range(n - 1)],
        token_ids=list(range(n)),
        word_ids=[-1] + list(range(n - 1)),
        attentions=a,
        causal=False,
        provenance=Provenance("m", "fp", "float32", "cpu"),
        seconds=0.0,
    )


@pytest.mark.parametrize("view", ["head", "model"])
def test_bertviz_html_is_self_contained(view):
    html = bertviz_html(random_result(), view)
    assert "cdnjs" not in html and "<script src" not in html
    assert "d3js.org v5.7.0" in html and "jQuery v2.2.4" in html
    assert "window.require = function" in html
    # the attention appears once (bertviz's template fills a comment with a second copy)
    assert html.count('"attn"') == 1
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert all("w3.org" in u or "d3js.org" in u or "github.com" in u for u in urls), urls


def test_estimate_is_close_and_grows_with_tokens_squared():
    small, big = random_result(n=20), random_result(n=40)
    for result in (small, big):
        actual = len(bertviz_html(result, "head", budget=None))
        assert 0.8 * actual <= estimate_bertviz_bytes(result) <= 1.3 * actual
    attn_small = estimate_bertviz_bytes(small) - estimate_bertviz_bytes(random_result(n=2))
    attn_big = estimate_bertviz_bytes(big) - estimate_bertviz_bytes(random_result(n=2))
    assert 3.0 < attn_big / attn_small < 5.0


def test_budget_refuses_oversized_views_and_layer_selection_shrinks_them():
    result = random_result(layers=6, heads=4, n=60)
    full = estimate_bertviz_bytes(result)
    with pytest.raises(InputError, match="fewer layers"):
        bertviz_html(result, "head", budget=full // 2)
    one = BertvizSelection(layers=(2, 2))
    assert estimate_bertviz_bytes(result, one) < full / 2
    html = bertviz_html(result, "head", one, budget=full // 2)
    assert "Layers 2–2" in html
    with pytest.raises(InputError, match="out of range"):
        bertviz_html(result, "head", BertvizSelection(layers=(0, 6)))


def test_heatmap_png_and_payload():
    view = aggregate(random_result(n=6))
    chart = heatmap_chart(view)
    spec = chart.to_dict()
    assert spec["mark"]["type"] == "rect"
    assert spec["encoding"]["x"]["field"] == "key" and spec["encoding"]["y"]["field"] == "query"
    assert 0 < chart_payload_bytes(chart) < 50_000
    png = chart_png(chart, scale=1.0, provenance={"model": "m", "fingerprint": "fp"})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    image.load()  # checks every chunk's CRC
    assert json.loads(image.text["provenance"]) == {"model": "m", "fingerprint": "fp"}
    assert image.size[0] > 100


def test_neuron_view_html_is_self_contained_and_sized():
    from engine.attention.neuron import estimate_neuron_bytes, neuron_view_html

    base = random_result(n=12)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2, 3, 12, 8)).astype(np.float32)
    result = AttentionResult(**{**base.__dict__, "queries": vectors, "keys": vectors + 1})
    html = neuron_view_html(result)
    assert "cdnjs" not in html and "<script src" not in html
    assert "window.bertviz_params" in html and '"queries"' in html
    assert 0.7 * len(html) <= estimate_neuron_bytes(result) <= 1.3 * len(html)
    with pytest.raises(InputError, match="neuron view would be"):
        neuron_view_html(result, budget=len(html) // 2)
