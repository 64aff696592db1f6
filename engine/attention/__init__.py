"""Attention: where each head of each layer looks.

    from engine.attention import AttentionSettings, extract_attention, head_statistics
    result = extract_attention(loaded, "The cat sat on the mat.")
    result.attentions                 # (layer, head, query, key) float32
    head_statistics(result.attentions)  # per-head entropy, sink, previous, self, distance

    run = start_attention([("A", loaded, "The cat sat.")])  # a Run (progress, cancel)
    run.wait().sides[0].result                             # the same AttentionResult

Modules: ``extract`` (input checks and the forward pass), ``run`` (attention as a run, one or
two sides), ``memory`` (the result's size before it runs), ``capture`` (BERT queries/keys),
``statistics``, ``aggregate`` (long inputs), ``views`` (offline bertviz, heatmaps, PNG) and
``neuron``.
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
    PreparedInput,
    context_length,
    extract_attention,
    prepare_input,
)
from engine.attention.memory import check_fits, result_bytes, tokens_that_fit
from engine.attention.run import (
    AttentionComparison,
    AttentionRequest,
    AttentionSide,
    start_attention,
)
from engine.attention.statistics import HeadStatistics, head_statistics, head_table_csv

__all__ = [
    "MAX_TOKENS_LIMIT",
    "AggregationSettings",
    "AttentionComparison",
    "AttentionRequest",
    "AttentionResult",
    "AttentionSettings",
    "AttentionSide",
    "AttentionView",
    "Edge",
    "HeadStatistics",
    "PreparedInput",
    "aggregate",
    "check_fits",
    "context_length",
    "edges_frame",
    "extract_attention",
    "head_statistics",
    "head_table_csv",
    "prepare_input",
    "pretty_token",
    "result_bytes",
    "start_attention",
    "tokens_that_fit",
    "top_edges",
]
