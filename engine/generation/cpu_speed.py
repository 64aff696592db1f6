"""Faster CPU decoding: the model's linear layers through oneDNN while a generation runs.

At batch 1 a decode step is mostly matrix-vector products (every ``nn.Linear`` on one token).
PyTorch sends those to MKL's gemv, which runs them on ONE thread and reads the weights at about
a third of the machine's memory bandwidth; oneDNN's inner-product kernel
(``torch.ops.mkldnn._linear_pointwise``, on the same dense weight, no copy) uses every torch
thread. Measured on the embedded SmolLM2-135M, float32, 2 cores: 23 -> 33-36 tok/s, from about
37 % to 52-57 % of the bandwidth ceiling (``bench/generation.py``).

    with onednn_linears(loaded.model):   # only around the decode, under the model's lock
        loaded.model.generate(...)

The swap is per module instance and undone on exit, so other features (attention, attribution,
fine-tuning) keep the stock layers. oneDNN sums the dot products in another order than MKL:
logits differ by ~1e-5 relative (float32 rounding), so greedy output equals plain
``generate``'s except where two top tokens are tied to within that rounding. Set
``WORKBENCH_ONEDNN_DECODE=0`` to decode with the stock layers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

__all__ = ["onednn_linears", "onednn_usable"]

ENV = "WORKBENCH_ONEDNN_DECODE"


def onednn_usable(model: torch.nn.Module) -> bool:
    """True when the swap applies: float32 weights on CPU, oneDNN built in, not switched off."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cpu" and param.dtype == torch.float32


def _onednn_forward(layer: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, bias = layer.weight, layer.bias
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) float32 -> (..., out_features)."""
        if x.dtype != weight.dtype or x.dim() < 2 or torch.is_grad_enabled():
            return torch.nn.functional.linear(x, weight, bias)
        out = linear(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])

    return forward


@contextlib.contextmanager
def onednn_linears(model: torch.nn.Module) -> Iterator[int]:
    """Run ``model``'s plain ``nn.Linear`` layers through oneDNN inside the block.

    Yields how many layers were swapped (0 when ``onednn_usable`` is false). Layers of other
    types (quantized, LoRA wrappers' own code), non-contiguous or non-float32 weights, and
    layers whose ``forward`` is already overridden are left alone. Hold the model's lock.
    """
    swapped: list[torch.nn.Linear] = []
    if onednn_usable(model):
        for module in model.modules():
            if (
                type(module) is torch.nn.Linear
                and "forward" not in module.__dict__
                and module.weight.dtype == torch.float32
                and module.weight.is_contiguous()
            ):
                module.forward = _onednn_forward(module)
                swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
