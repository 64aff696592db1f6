"""Attention: where each head of each layer looks.

    from engine.attention import AttentionSettings, extract_attention, head_statistics
    result = extract_attention(loaded, "The cat sat on the mat.")
    result.attentions                 # (layer, head, query, key) float32
    head_statistics(result.attentions)  # per-head entropy, sink, previous, self, distance

Modules: ``extract`` (the forward pass), ``capture`` (BERT queries/keys), ``statistics``,
``aggregate`` (long inputs), ``views`` (offline bertviz, heatmaps, PNG) and ``neuron``.
"""

from engine.attention.aggregate import (
    AggregationSettings,
    AttentionView,
    Edge,
    aggregate,
    edges_frame,
    pretty_token,
    top_edges,
)
from engine.attention.extract import (
    MAX_TOKENS_LIMIT,
    AttentionResult,
    AttentionSettings,
    extract_attention,
)
from engine.attention.statistics import HeadStatistics, head_statistics, head_table_csv

__all__ = [
    "MAX_TOKENS_LIMIT",
    "AggregationSettings",
    "AttentionResult",
    "AttentionSettings",
    "AttentionView",
    "Edge",
    "HeadStatistics",
    "aggregate",
    "edges_frame",
    "extract_attention",
    "head_statistics",
    "head_table_csv",
    "pretty_token",
    "top_edges",
]
