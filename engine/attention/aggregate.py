"""Server-side aggregation of attention for long inputs: bounded-size matrices and top-k edges.

``aggregate(result, AggregationSettings(...))`` averages a layer range and a head range, can
merge sub-word tokens into words, and pools positions into at most ``max_side`` blocks, so a
1024-token input becomes a matrix small enough to draw. Merging follows Clark et al. (2019):
attention *to* a group is the sum over its tokens, attention *from* a group is the mean over
its tokens, so every row still sums to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.attention.extract import AttentionResult
from engine.errors import InputError

_MARKERS = ("Ġ", "▁", "Ċ")


def pretty_token(token: str) -> str:
    """A token as a reader sees it: byte-level/sentencepiece space markers become spaces,
    WordPiece ``##`` continuation markers are dropped."""
    text = token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n").replace("</w>", "")
    return text.removeprefix("##")


@dataclass(frozen=True)
class AggregationSettings:
    """Which part of the attention to show and how to shrink it.

    ``layers``/``heads``: inclusive index ranges averaged together (None = all).
    ``merge_words``: merge sub-word tokens into words. ``max_side``: at most this many rows and
    columns (positions are pooled into consecutive blocks beyond it).
    """

    layers: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None
    merge_words: bool = False
    max_side: int = 128

    def validated(self, n_layers: int, n_heads: int) -> AggregationSettings:
        for name, rng, n in (("layers", self.layers, n_layers), ("heads", self.heads, n_heads)):
            if rng is not None and not (0 <= rng[0] <= rng[1] < n):
                raise InputError(f"{name} must be a range within 0..{n - 1} (got {rng}).")
        if not 2 <= self.max_side <= 1024:
            raise InputError(f"max_side must be between 2 and 1024 (got {self.max_side}).")
        return self


@dataclass(frozen=True)
class AttentionView:
    """An aggregated (query, key) matrix with labels; rows sum to 1.

    ``spans``: for each row/column, the [start, end) token positions it covers.
    ``description``: what was averaged, merged and pooled, in words.
    """

    matrix: np.ndarray  # (query group, key group)
    labels: list[str]
    spans: list[tuple[int, int]]
    description: str


@dataclass(frozen=True)
class Edge:
    """One attention edge of an ``AttentionView``: from row ``query`` to column ``key``."""

    query: int
    key: int
    weight: float
    query_label: str
    key_label: str


def word_groups(word_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive tokens sharing a word id; -1 (special) stays alone."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(word_ids) + 1):
        if i == len(word_ids) or word_ids[i] == -1 or word_ids[i] != word_ids[start]:
            spans.append((start, i))
            start = i
    return spans


def block_groups(spans: list[tuple[int, int]], max_side: int) -> list[tuple[int, int]]:
    """Pool consecutive spans into at most ``max_side`` blocks of (nearly) equal count."""
    if len(spans) <= max_side:
        return spans
    size = -(-len(spans) // max_side)  # ceil
    return [
        (spans[i][0], spans[min(i + size, len(spans)) - 1][1]) for i in range(0, len(spans), size)
    ]


def merge(matrix: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """(query, key) -> (group, group): mean over a group's query rows, sum over its key columns."""
    n = matrix.shape[-1]
    onehot = np.zeros((n, len(spans)), dtype=np.float64)
    for g, (a, b) in enumerate(spans):
        onehot[a:b, g] = 1.0
    sizes = onehot.sum(0)
    summed_keys = matrix.astype(np.float64) @ onehot  # (query, group)
    return (onehot / sizes).T @ summed_keys  # (group, group)


def _label(tokens: list[str], span: tuple[int, int], limit: int = 24) -> str:
    text = "".join(pretty_token(t) for t in tokens[span[0] : span[1]]).strip() or tokens[span[0]]
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def aggregate(
    result: AttentionResult, settings: AggregationSettings | None = None
) -> AttentionView:
    """Average the chosen layers and heads, optionally merge words, then pool to ``max_side``."""
    settings = (settings or AggregationSettings()).validated(result.n_layers, result.n_heads)
    l0, l1 = settings.layers or (0, result.n_layers - 1)
    h0, h1 = settings.heads or (0, result.n_heads - 1)
    # mean over layers then heads, one layer at a time (bounded memory)
    matrix = np.zeros((result.n_tokens, result.n_tokens), dtype=np.float64)
    for layer in range(l0, l1 + 1):
        matrix += result.attentions[layer, h0 : h1 + 1].mean(0, dtype=np.float64)
    matrix /= l1 - l0 + 1
    spans = [(i, i + 1) for i in range(result.n_tokens)]
    parts = [
        f"layer {l0}" if l0 == l1 else f"layers {l0}–{l1} (mean)",
        f"head {h0}" if h0 == h1 else f"heads {h0}–{h1} (mean)",
    ]
    if settings.merge_words:
        spans = word_groups(result.word_ids)
        parts.append(f"{result.n_tokens} tokens merged into {len(spans)} words")
    pooled = block_groups(spans, settings.max_side)
    if len(pooled) < len(spans):
        parts.append(f"pooled into {len(pooled)} blocks of consecutive positions")
    if len(pooled) < result.n_tokens:
        matrix = merge(matrix, pooled)
    labels = [_label(result.tokens, s) for s in pooled]
    if len(pooled) < len(spans):
        labels = [f"{a}–{b - 1}: {lab}" for (a, b), lab in zip(pooled, labels, strict=True)]
    return AttentionView(matrix.astype(np.float32), labels, pooled, ", ".join(parts))


def top_edges(view: AttentionView, k: int = 50, include_self: bool = True) -> list[Edge]:
    """The ``k`` strongest (query, key) weights of a view, strongest first."""
    if k < 1:
        raise InputError(f"k must be at least 1 (got {k}).")
    matrix = view.matrix.astype(np.float64).copy()
    if not include_self:
        np.fill_diagonal(matrix, -1.0)
    flat = matrix.ravel()
    k = min(k, flat.size)
    idx = np.argpartition(-flat, k - 1)[:k]
    idx = idx[np.argsort(-flat[idx], kind="stable")]
    n = matrix.shape[1]
    edges = []
    for i in idx:
        q, key = divmod(int(i), n)
        if flat[i] < 0:
            continue
        edges.append(Edge(q, key, float(flat[i]), view.labels[q], view.labels[key]))
    return edges


def edges_frame(edges: list[Edge]):
    """Top edges as a pandas DataFrame (rank, from, to, weight)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "rank": r + 1,
                "from (query)": f"{e.query}: {e.query_label}",
                "to (key)": f"{e.key}: {e.key_label}",
                "weight": e.weight,
            }
            for r, e in enumerate(edges)
        ]
    )
