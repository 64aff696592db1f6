"""8-bit products for the fast decode path: int8 weights and int8 activations (fbgemm).

At batch 1 a decode step is matrix-vector products. torch's weight-only int4/int8 CPU kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) are slower than float32 there (6.5
tok/s on SmolLM2 against 38: ``bench/generation.py``), while fbgemm's dynamic int8 product
(``torch.ops.quantized.linear_dynamic``: VNNI dot products, both threads) is about 4x faster than
float32. Each weight row is quantized symmetrically to int8 (one scale per output channel) and
each input row of activations per call (one scale and zero point per call), as fbgemm does.

This is not exact: the bench reports how often greedy continuations match the reference, where
they first diverge, and the perplexity change. ``reduce_range`` (7-bit activations) is used only
on CPUs without VNNI, where fbgemm's 16-bit intermediate sums could saturate.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Int8Linear", "int8_available", "pack_int8"]


@functools.cache
def int8_available() -> bool:
    """True when torch has a quantized engine for dynamic int8 products on this CPU."""
    engines = torch.backends.quantized.supported_engines
    return any(e in engines for e in ("fbgemm", "x86", "qnnpack"))


@functools.cache
def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@dataclass
class Int8Linear:
    """(rows, in) float32 -> (rows, out) float32 through int8. ``max_error``: largest
    |dequantized - original| weight."""

    packed: object
    max_error: float
    reduce_range: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """Quantize a float weight (out, in): int8, one symmetric scale per output row."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated as a public API
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, zeros, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())
    error = float((q.dequantize() - w).abs().max())
    return Int8Linear(packed, error, reduce_range=not _has_vnni())
