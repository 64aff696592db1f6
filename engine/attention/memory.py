"""An attention result's memory, known before the model runs: estimate, fit check, token limit.

A result holds float32 attentions shaped (layer, head, token, token), so it grows with the
square of the input: layers x heads x tokens² x 4 bytes (SmolLM2-135M, 30 layers x 9 heads:
1.13 GB at 1,024 tokens, 18.1 GB at 4,096), plus, for BERT-style encoders, the queries and keys
of the neuron view (2 x layers x heads x tokens x head_dim x 4 bytes). Runs reserve this size
in the process's result budget (``engine.runs.ResultBudget``) before they start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.attention.capture import records_queries_keys
from engine.errors import MemoryBudgetError
from engine.runs import ResultBudget, result_budget

FLOAT32 = 4  # bytes


@dataclass(frozen=True)
class ResultSize:
    """Bytes of one side's result as a function of its token count ``n``:
    ``quadratic * n² + linear * n`` (attentions, then queries and keys)."""

    model: str
    layers: int
    heads: int
    quadratic: int  # bytes per token² (layers x heads x 4)
    linear: int  # bytes per token (2 x layers x heads x head_dim x 4; 0 without queries/keys)

    def bytes(self, n_tokens: int) -> int:
        return self.quadratic * n_tokens * n_tokens + self.linear * n_tokens


def result_size(loaded) -> ResultSize:
    """How an attention result on ``loaded`` grows with the input (from its config)."""
    config = loaded.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = _positive_int(getattr(text, "num_hidden_layers", None))
    heads = _positive_int(getattr(text, "num_attention_heads", None))
    vectors = records_queries_keys(loaded.model)
    linear = 0
    if vectors is not None:
        qk_layers, head_dim = vectors
        layers = layers or qk_layers
        linear = 2 * qk_layers * heads * head_dim * FLOAT32
    return ResultSize(loaded.name, layers, heads, layers * heads * FLOAT32, linear)


def _positive_int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def result_bytes(loaded, n_tokens: int) -> int:
    """Estimated bytes of the attention result of ``n_tokens`` tokens on ``loaded``."""
    return result_size(loaded).bytes(n_tokens)


def tokens_that_fit(sizes: Sequence[ResultSize], free_bytes: int) -> int:
    """The most tokens per input such that every side's result together fits ``free_bytes``."""
    a = sum(s.quadratic for s in sizes)
    b = sum(s.linear for s in sizes)
    if free_bytes <= 0:
        return 0
    if a == 0:
        return free_bytes // b if b else 10**9
    n = int((-b + math.sqrt(b * b + 4 * a * free_bytes)) / (2 * a))
    while n > 0 and a * n * n + b * n > free_bytes:  # float rounding
        n -= 1
    return n


def check_fits(sides: Sequence[tuple[object, int]], budget: ResultBudget | None = None) -> int:
    """Total bytes of the results of ``sides`` ((loaded model, token count) each).

    Raises ``MemoryBudgetError`` when they would not fit in what the result budget has free,
    saying how many tokens would.
    """
    budget = budget or result_budget()
    sizes = [result_size(loaded) for loaded, _ in sides]
    total = sum(size.bytes(n) for size, (_, n) in zip(sizes, sides, strict=True))
    free = max(budget.budget_bytes - budget.used_bytes, 0)
    if total <= free:
        return total
    fit = tokens_that_fit(sizes, free)
    counts = " + ".join(str(n) for _, n in sides)
    shapes = "; ".join(f"{s.model}: {s.layers} layers × {s.heads} heads" for s in sizes)
    per = " per text" if len(sides) > 1 else ""
    raise MemoryBudgetError(
        f"The attention of {counts} tokens ({shapes}; tokens² × 4 bytes each) would hold "
        f"{human(total)}, but the result budget has {human(free)} free of "
        f"{human(budget.budget_bytes)}: at most {fit} tokens{per} would fit. Shorten the text "
        "(or truncate it: set max tokens to that), close other results, or raise "
        "WORKBENCH_RESULT_BUDGET_GB."
    )


def human(nbytes: int) -> str:
    """1.13 GB / 96.0 MB / 12 kB (decimal units, as the docs quote them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{0 if unit == 'kB' else 2 if unit == 'GB' else 1}f} {unit}"
    return f"{nbytes} B"
