"""4- and 8-bit grouped weights for the fast decode path, as torch's int4 CPU kernel wants them.

The embedded SmolLM2 ships as a GGUF file whose matrices are Q4_1 (groups of 32 values
``d * q + m``, q in 0..15) and whose embedding (tied to the output layer) is Q8_0 (groups of 32
values ``d * q``, q in -127..127). The workbench's float32 copy holds exactly those values, so
they can be packed back without loss:

- ``pack_q4``: per group of 32 along the input, ``m = min``, ``d = (max - min) / 15``,
  ``q = round((w - m) / d)``; torch's kernel computes ``(q - 8) * scale + zero``, so
  ``scale = d`` and ``zero = m + 8 d``.
- ``pack_q8``: per group of 32, ``d = max|w| / 127``, ``q = round(w / d)``, split as
  ``q = 16 hi + lo`` (hi in -8..7, lo in 0..15) into two 4-bit matrices whose products add up
  to the 8-bit one.

Each packed matrix reports ``max_error``, the largest |dequantized - original| weight: float32
rounding (about 1e-8) for weights that came from such a file, the quantization error for any
other model. The products are float32 in and out (``torch.ops.aten._weight_int4pack_mm_for_cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GROUP", "PackedLinear", "pack_q4", "pack_q8", "int4_kernel_available"]

GROUP = 32


def int4_kernel_available() -> bool:
    """True when this torch has the CPU int4 weight-only product."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


@dataclass
class _Int4:
    packed: torch.Tensor  # kernel layout
    scale_zero: torch.Tensor  # (in / GROUP, out, 2) float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zero)


def _int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> _Int4:
    """q: (out, in) integers 0..15; scale, zero: (out, in / GROUP). The kernel wants ``out`` a
    multiple of 16: extra rows are zeros (``PackedLinear`` drops their outputs)."""
    extra = -q.shape[0] % 16
    if extra:
        q, scale, zero = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, scale, zero))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().float()
    return _Int4(packed, scale_zero)


@dataclass
class PackedLinear:
    """A linear layer on packed grouped weights: (rows, in) float32 -> (rows, out) float32."""

    parts: tuple[_Int4, ...]
    bias: torch.Tensor | None
    bits: int
    max_error: float  # largest |dequantized - original| weight
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = self.parts[0](x)
        for part in self.parts[1:]:
            out = out + part(x)
        if out.shape[-1] != self.out_features:
            out = out[:, : self.out_features]
        return out if self.bias is None else out + self.bias

    @property
    def nbytes(self) -> int:
        return sum(p.packed.nbytes + p.scale_zero.nbytes for p in self.parts)


def _groups(weight: torch.Tensor) -> torch.Tensor:
    out, inp = weight.shape
    if inp % GROUP:
        raise ValueError(f"input size {inp} is not a multiple of {GROUP}")
    return weight.detach().float().reshape(out, inp // GROUP, GROUP)


def pack_q4(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """Pack a float weight (out, in) as 4-bit groups of 32 with a scale and a minimum."""
    w = _groups(weight)
    low, high = w.amin(-1), w.amax(-1)
    d = (high - low) / 15
    step = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((w - low[..., None]) / step[..., None]).clamp(0, 15)
    error = (q * d[..., None] + low[..., None] - w).abs().max()
    part = _int4(q.reshape(weight.shape), d, low + 8 * d)
    return PackedLinear((part,), bias, 4, float(error), weight.shape[0])


def pack_q8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """Pack a float weight (out, in) as 8-bit symmetric groups of 32 (two 4-bit halves)."""
    w = _groups(weight)
    d = w.abs().amax(-1) / 127
    step = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(w / step[..., None]).clamp(-127, 127).to(torch.int32)
    error = (q * d[..., None] - w).abs().max()
    high, low = q >> 4, q & 15  # q = 16 * high + low, high in -8..7, low in 0..15
    shape = weight.shape
    parts = (
        _int4((high + 8).reshape(shape), 16 * d, torch.zeros_like(d)),
        _int4(low.reshape(shape), d, 8 * d),
    )
    return PackedLinear(parts, bias, 8, float(error), weight.shape[0])
