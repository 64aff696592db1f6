"""bertviz's neuron view: per-head query and key vectors, for BERT-style self-attention.

bertviz's own neuron view needs its bundled copy of old pytorch-transformers models. Instead,
``capture_queries_keys`` hooks the ``query`` and ``key`` projections of every BERT-style
self-attention module (BERT, RoBERTa, ELECTRA, MiniLM, ...) during the one forward pass that
also returns the attention, and ``neuron_view_html`` fills bertviz's ``neuron_view.js`` with
them, offline. Rotary-position models (Llama, SmolLM2) are not supported: their scores come
from rotated vectors, which the view cannot show; bertviz does not support them either.
"""

from __future__ import annotations

import json
import uuid
from importlib import resources

import numpy as np

from engine.attention.aggregate import pretty_token
from engine.attention.extract import AttentionResult
from engine.errors import InputError
from engine.html import script_json

NEURON_UNSUPPORTED = (
    "The neuron view needs BERT-style self-attention (separate query and key projections, no "
    "rotary positions): pick an encoder such as minilm-l6."
)


def _payload(result: AttentionResult) -> dict:
    tokens = [pretty_token(t) for t in result.tokens]
    return {
        "attention": {
            "all": {
                "attn": np.round(result.attentions.astype(np.float64), 3).tolist(),
                "left_text": tokens,
                "right_text": tokens,
                "queries": np.round(result.queries.astype(np.float64), 3).tolist(),
                "keys": np.round(result.keys.astype(np.float64), 3).tolist(),
            }
        },
        "default_filter": "all",
        "root_div_id": f"bertviz-{uuid.uuid4().hex}",
        "bidirectional": not result.causal,
        "display_mode": "light",
        "layer": None,
        "head": None,
    }


def estimate_neuron_bytes(result: AttentionResult) -> int:
    """Predicted size of ``neuron_view_html``: attention plus queries and keys, as JSON."""
    if result.queries is None or result.keys is None:
        return 0
    from engine.attention.views import BertvizSelection, estimate_bertviz_bytes

    per_value = len(json.dumps(np.round(result.queries[0, 0].astype(np.float64), 3).tolist()))
    per_value /= result.queries[0, 0].size
    vectors = 2 * result.queries.size * per_value
    return int(estimate_bertviz_bytes(result, BertvizSelection()) + vectors + 40_000)


def neuron_view_html(result: AttentionResult, budget: int | None = 5_000_000) -> str:
    """A self-contained bertviz neuron view (no network request) of ``result``.

    Raises ``InputError`` when the result has no queries/keys (unsupported architecture) or
    the page would exceed ``budget`` bytes (None = no limit).
    """
    from engine.attention.views import _CDN, offline_scripts

    if result.queries is None or result.keys is None:
        raise InputError(NEURON_UNSUPPORTED)
    if budget is not None and (estimate := estimate_neuron_bytes(result)) > budget:
        raise InputError(
            f"The neuron view would be about {estimate / 1e6:.1f} MB (limit {budget / 1e6:.1f} "
            "MB): use a shorter text."
        )
    params = _payload(result)
    script = resources.files("bertviz").joinpath("neuron_view.js").read_text(encoding="utf-8")
    script = _CDN.sub("inline", script)  # require.config paths: unused, the shim serves both
    vis = f"""
<div id="{params["root_div_id"]}" style="padding:8px;font-family:Helvetica, Arial, sans-serif;">
  <span style="user-select:none">
    <span class="dropdown-label">Layer: </span><select id="layer"></select>
    <span class="dropdown-label">Head: </span> <select id="att_head"></select>
  </span>
  <div id='vis'></div>
</div>"""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        + offline_scripts()
        + vis
        + f"<script>window.bertviz_params = {script_json(params)};</script>"
        + f"<script>{script}</script></body></html>"
    )
