"""Per-head attention statistics and the head table export."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from engine.attention.extract import AttentionResult
from engine.errors import InputError


@dataclass(frozen=True)
class HeadStatistics:
    """Per-head summaries, each shaped (layer, head), averaged over query positions.

    ``entropy``: mean entropy of a query's attention row, in nats (0 = one key takes all).
    ``first_token``: mean weight on key 0 (the "attention sink" / [CLS]).
    ``previous_token``: mean weight on key q-1 (queries 1..n-1).
    ``self_token``: mean weight on key q (the diagonal).
    ``mean_distance``: mean of sum_k w[q, k] * |q - k|, in tokens.
    """

    entropy: np.ndarray  # (layer, head)
    first_token: np.ndarray  # (layer, head)
    previous_token: np.ndarray  # (layer, head)
    self_token: np.ndarray  # (layer, head)
    mean_distance: np.ndarray  # (layer, head)

    COLUMNS = ("entropy", "first_token", "previous_token", "self_token", "mean_distance")

    def to_frame(self):
        """A pandas DataFrame with one row per head: layer, head and the five statistics."""
        import pandas as pd

        n_layers, n_heads = self.entropy.shape
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        data = {"layer": layer.ravel(), "head": head.ravel()}
        for name in self.COLUMNS:
            data[name] = getattr(self, name).ravel().astype(float)
        return pd.DataFrame(data)


def head_statistics(attentions: np.ndarray) -> HeadStatistics:
    """Statistics of an (layer, head, query, key) array, one layer at a time (bounded memory)."""
    if attentions.ndim != 4 or attentions.shape[2] != attentions.shape[3]:
        raise InputError(
            f"attentions must be shaped (layer, head, query, key) with query == key "
            f"(got {attentions.shape})."
        )
    n_layers, n_heads, n, _ = attentions.shape
    pos = np.arange(n)
    distance = np.abs(pos[:, None] - pos[None, :]).astype(np.float32)  # (query, key)
    stats = {
        name: np.zeros((n_layers, n_heads), dtype=np.float64) for name in HeadStatistics.COLUMNS
    }
    for layer in range(n_layers):
        a = attentions[layer].astype(np.float32, copy=False)  # (head, query, key)
        safe = np.where(a > 0, a, 1.0)
        stats["entropy"][layer] = (-(a * np.log(safe)).sum(-1)).mean(-1)
        stats["first_token"][layer] = a[:, :, 0].mean(-1)
        stats["self_token"][layer] = np.diagonal(a, axis1=1, axis2=2).mean(-1)
        if n > 1:
            stats["previous_token"][layer] = np.diagonal(a, offset=-1, axis1=1, axis2=2).mean(-1)
        stats["mean_distance"][layer] = (a * distance).sum(-1).mean(-1)
    return HeadStatistics(**stats)


def head_table_csv(result: AttentionResult, stats: HeadStatistics | None = None) -> str:
    """The head-statistics table as CSV, preceded by ``# key: value`` provenance lines."""
    stats = stats or head_statistics(result.attentions)
    prov = result.to_provenance_dict()
    header = [f"# {key}: {json.dumps(value, ensure_ascii=False)}" for key, value in prov.items()]
    header.append(f"# text: {json.dumps(result.text, ensure_ascii=False)}")
    header.append(f"# tokens: {result.n_tokens}")
    return "\n".join(header) + "\n" + stats.to_frame().to_csv(index=False)
