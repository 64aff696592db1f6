"""8-bit products for the fast decode path: int8 weights and int8 activations (fbgemm).

At batch 1 a decode step is matrix-vector products. torch's weight-only int4/int8 CPU kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) are slower than float32 there (6.5
tok/s on SmolLM2 against 38), while fbgemm's dynamic int8 product
(``torch.ops.quantized.linear_dynamic``: VNNI dot products) is about 4x faster than float32.

- Weights: int8, one symmetric scale per output row.
- Activations: int8, one scale per call; at batch 1 that is one scale per token. A few input
  channels of a language model carry values far larger than the rest, and one scale per token
  would round the others away (perplexity +3.8 % on SmolLM2). So each product is smoothed as in
  SmoothQuant (Xiao et al., 2023): ``x W^T = (x / s) (W s)^T`` with
  ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``, where ``max|x_j|`` is measured once on
  ``CALIBRATION`` (512 tokens of the shipped instruction data), the same for every machine. The
  division by ``s`` is done on the activations, so the model's weights and norms are untouched.
- A prompt runs the layers' own float32 products (its logits are the reference's); only decode
  steps are quantized, each row on its own. Requests on this path are never batched together
  (``engine.generation.batching``): a batch's float rounding moves int8 roundings.

This is not exact: ``bench/generation.py`` reports how often greedy continuations match the
reference, where they first diverge, and the perplexity change (goal: within 1 %).
``reduce_range`` (7-bit activations) is used only on CPUs without VNNI, where fbgemm's 16-bit
intermediate sums could saturate.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.generation.lean import Linear, MakeLinear, float_linear

__all__ = ["ALPHA", "Int8Linear", "int8_available", "int8_linears", "input_maxima"]

ALPHA = 0.5  # SmoothQuant's migration strength (bench/generation.py measured 0.5 and 0.7)
CALIBRATION_TOKENS = 512
CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "instructions.jsonl"


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
    """(B, T, in) float32 -> (B, T, out) float32: a decode step (T == 1) in int8, one call per
    row so that a row's numbers never depend on the other rows of a batch; a prompt (T > 1)
    through the layers' own float products.

    ``max_error``: largest |dequantized - original| weight (after smoothing, divided back).
    """

    packed: object
    smooth: torch.Tensor  # (in,) divides the activations
    layers: Linear  # the layers' own float products, for several rows
    max_error: float
    reduce_range: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            return self.layers(x)
        rows = x / self.smooth  # (B, 1, in)
        product = torch.ops.quantized.linear_dynamic
        if rows.shape[0] == 1:
            return product(rows, self.packed, self.reduce_range)
        return torch.stack([product(row, self.packed, self.reduce_range) for row in rows])


def _calibration_ids(tokenizer) -> torch.Tensor:
    rows = [json.loads(line) for line in CALIBRATION.read_text().splitlines() if line.strip()]
    text = "\n".join(f"{r['prompt']} {r['response']}" for r in rows)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids[:, :CALIBRATION_TOKENS]


@torch.inference_mode()
def input_maxima(model: torch.nn.Module, tokenizer) -> dict[torch.nn.Module, torch.Tensor]:
    """max |input| per channel of every ``nn.Linear`` of ``model`` over ``CALIBRATION``."""
    maxima: dict[torch.nn.Module, torch.Tensor] = {}

    def record(module, args) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
        maxima[module] = torch.maximum(maxima[module], x) if module in maxima else x

    hooks = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        model(input_ids=_calibration_ids(tokenizer).to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def pack_int8(
    layers: Sequence[torch.nn.Linear],
    float_product: Linear,
    input_max: torch.Tensor | None,
    alpha: float = ALPHA,
) -> Int8Linear:
    """Smooth and quantize the layers' weights, side by side, for one int8 product."""
    weight = torch.cat([m.weight.detach().float() for m in layers])  # (out, in), a copy
    biases = [m.bias for m in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.detach().float() if b is not None else weight.new_zeros(m.out_features)
                for b, m in zip(biases, layers, strict=True)
            ]
        )
    smooth = torch.ones(weight.shape[1])
    if input_max is not None:
        w_max = weight.abs().amax(0).clamp(min=1e-5)
        smooth = (input_max.clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
    weight = weight * smooth
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated as a public API
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(weight, scale, zeros, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, bias)
    error = float(((q.dequantize() - weight) / smooth).abs().max())
    return Int8Linear(packed, smooth, float_product, error, reduce_range=not _has_vnni())


def int8_linears(model: torch.nn.Module, tokenizer, errors: list[float]) -> MakeLinear:
    """A ``MakeLinear`` for ``LeanDecoder``: smoothed int8 products (calibrated once here);
    each product's weight error is appended to ``errors``."""
    maxima = input_maxima(model, tokenizer)

    def make(role: str, layers: Sequence[torch.nn.Linear]) -> Int8Linear:
        linear = pack_int8(layers, float_linear(role, layers), maxima.get(layers[0]))
        errors.append(linear.max_error)
        return linear

    return make
