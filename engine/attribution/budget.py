"""Pre-flight arithmetic: forward rows x tokens -> seconds and bytes, and the batch size.

A *row* is one sequence through the model (a forward pass, plus a backward pass for gradient
methods). Memory per row follows the activations a transformer keeps. Time per row comes from
the measured rates of ``calibration`` (this model, device, dtype and length bucket on this
machine), as a low-high range; before they are measured it falls back to the multiply-adds at
a matrix-product throughput, with a wide range (``calibrated`` False).
"""

from __future__ import annotations

import functools
import time

import psutil
import torch

from engine.attribution.calibration import Rates
from engine.attribution.result import Estimate

TOKENS_PER_BATCH_CPU = 4096  # larger batches stop paying off on CPU (cache-bound)
MEMORY_SHARE = 0.5  # share of free memory a run may take
# Model throughput as a share of the measured matmul rate: the fallback before calibration.
EFFICIENCY = 0.8
# Its range: a matrix product says little about a whole model under a shared machine's load.
FALLBACK_LOW, FALLBACK_HIGH = 0.5, 6.0


def _config(loaded):
    c = loaded.model.config
    get = lambda *names, default=0: next(  # noqa: E731
        (getattr(c, n) for n in names if isinstance(getattr(c, n, None), int)), default
    )
    hidden = get("hidden_size", "n_embd", "d_model", default=512)
    return {
        "layers": get("num_hidden_layers", "n_layer", "num_layers", default=12),
        "hidden": hidden,
        "inter": get("intermediate_size", "n_inner", "d_ff", default=4 * hidden) or 4 * hidden,
        "heads": get("num_attention_heads", "n_head", "num_heads", default=8),
        "vocab": get("vocab_size", default=32000),
    }


def row_bytes(loaded, tokens: int, outputs: int, gradient: bool) -> int:
    """Peak extra bytes for one row of ``tokens`` (``outputs`` logit rows over the vocab)."""
    c = _config(loaded)
    item = next(loaded.model.parameters()).element_size()
    per_layer = tokens * (10 * c["hidden"] + 3 * c["inter"]) + 2 * c["heads"] * tokens**2
    logits = outputs * c["vocab"] * 4 * 3  # float32 logits, log-softmax and its gradient
    if gradient:
        return int(item * c["layers"] * per_layer + logits)
    return int(item * per_layer + logits)


def available_bytes(loaded) -> int:
    device = loaded.device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    return int(psutil.virtual_memory().available * MEMORY_SHARE)


@functools.lru_cache(maxsize=4)
def _flops_per_second(device: str) -> float:
    """Measured float32 matmul throughput on ``device`` (cached per process)."""
    a = torch.randn(384, 384, device=device)
    b = torch.randn(384, 384, device=device)
    a @ b
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = max(time.perf_counter() - started, 1e-6)
    return 20 * 2 * 384**3 / elapsed


def row_seconds(loaded, tokens: int, outputs: int, gradient: bool) -> float:
    """Arithmetic seconds of one row (multiply-adds at the matmul rate): the fallback."""
    c = _config(loaded)
    body = 2 * tokens * c["layers"] * (4 * c["hidden"] ** 2 + 3 * c["hidden"] * c["inter"])
    attention = 4 * c["layers"] * tokens**2 * c["hidden"]
    head = 2 * outputs * c["hidden"] * c["vocab"]
    # Gradient methods: forward plus a backward to the input embeddings only (the weights are
    # frozen during attribution), about two forwards.
    flops = (body + attention + head) * (2 if gradient else 1)
    return flops / (EFFICIENCY * _flops_per_second(str(loaded.device)))


def seconds(
    loaded, rows: int, tokens: int, outputs: int, gradient: bool, rates: Rates | None
) -> tuple[float, float, float]:
    """(low, expected, high) seconds of ``rows`` rows: measured rates, else the arithmetic."""
    if rates is not None:
        return rates.seconds(rows, tokens, gradient)
    expected = rows * row_seconds(loaded, tokens, outputs, gradient)
    return expected * FALLBACK_LOW, expected, expected * FALLBACK_HIGH


def choose_batch(loaded, tokens: int, outputs: int, gradient: bool, rows: int, asked: int) -> int:
    """Rows per forward pass: ``asked`` if > 0, else what fits memory (and suits the device)."""
    if asked > 0:
        return asked
    fit = max(1, available_bytes(loaded) // max(row_bytes(loaded, tokens, outputs, gradient), 1))
    if loaded.device.type == "cpu":
        fit = min(fit, max(1, TOKENS_PER_BATCH_CPU // max(tokens, 1)))
    return int(max(1, min(fit, rows)))


def estimate(
    loaded,
    method: str,
    rows: int,
    tokens: int,
    outputs: int,
    gradient: bool,
    asked: int,
    rates: Rates | None = None,
) -> Estimate:
    """Time and memory of ``rows`` rows of ``tokens`` tokens, at the batch size that fits.

    ``rates``: measured seconds per row (``calibration``); None = the arithmetic fallback.
    """
    batch = choose_batch(loaded, tokens, outputs, gradient, rows, asked)
    per_row = row_bytes(loaded, tokens, outputs, gradient)
    available = available_bytes(loaded)
    low, expected, high = seconds(loaded, rows, tokens, outputs, gradient, rates)
    return Estimate(
        method=method,
        rows=rows,
        tokens=tokens,
        batch_size=batch,
        seconds=expected,
        peak_bytes=per_row * batch,
        available_bytes=available,
        fits=per_row <= available,
        worst_rows=rows,
        worst_seconds=expected,
        seconds_low=low,
        seconds_high=high,
        worst_seconds_high=high,
        calibrated=rates is not None,
    )
