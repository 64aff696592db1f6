"""Query and key capture for BERT-style self-attention (bertviz's neuron view).

Rotary-position models (Llama, SmolLM2) are not supported: their scores come from rotated
vectors, which the view cannot show.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np


def _self_attention_modules(model) -> list:
    """BERT-style self-attention modules in forward order (``query``/``key`` Linear layers)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "query")
        and hasattr(m, "key")
        and hasattr(m, "attention_head_size")
        and hasattr(m, "num_attention_heads")
    ]


@contextlib.contextmanager
def capture_queries_keys(model) -> Iterator[dict[str, list[np.ndarray]]]:
    """Record each layer's queries and keys, each (head, token, head_dim) float32, during the
    block. Yields ``{"queries": [...], "keys": [...]}`` (one entry per layer; empty lists
    when the model has no BERT-style self-attention)."""
    captured: dict[str, list[np.ndarray]] = {"queries": [], "keys": []}
    handles = []

    def hook(store: list, heads: int, size: int):
        def record(_module, _inputs, output) -> None:
            # (1, token, heads * size) -> (head, token, size)
            out = output[0].detach().float().cpu()
            store.append(out.view(out.shape[0], heads, size).transpose(0, 1).numpy().copy())

        return record

    for module in _self_attention_modules(model):
        heads, size = int(module.num_attention_heads), int(module.attention_head_size)
        handles.append(module.query.register_forward_hook(hook(captured["queries"], heads, size)))
        handles.append(module.key.register_forward_hook(hook(captured["keys"], heads, size)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def records_queries_keys(model) -> tuple[int, int] | None:
    """(layers, head_dim) of the queries/keys ``capture_queries_keys`` records; None when the
    model has no BERT-style self-attention (nothing is recorded)."""
    modules = _self_attention_modules(model)
    if not modules:
        return None
    return len(modules), int(modules[0].attention_head_size)
