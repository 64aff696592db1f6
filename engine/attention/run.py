"""Attention as a run: one input, or two side by side (two texts, or one text on two models).

    run = start_attention([("A", loaded, "The cat sat."), ("B", loaded, "The dog sat.")])
    snap = run.snapshot()          # progress, "waiting for ..." while another run holds the model
    comparison = run.wait()        # AttentionComparison: per side, the result and its statistics

Before the run starts, every input is checked and tokenized (``prepare_input``: context length,
``max_tokens``, truncation) and the results' size is reserved in the result budget
(``MemoryBudgetError`` saying how many tokens would fit when it does not), and each input is
held to the acting user's ``max_input_tokens`` (``LimitError``). The reservation is
released when nobody holds the run any more, so a caller keeps the run, not copies of its result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine import runs
from engine.access import check_limit
from engine.attention.extract import (
    AttentionResult,
    AttentionSettings,
    attention_forward,
    prepare_input,
)
from engine.attention.memory import check_fits
from engine.attention.statistics import HeadStatistics, head_statistics
from engine.errors import InputError
from engine.manager import LoadedModel
from engine.provenance import Provenance

IDLE_TIMEOUT_S = 120.0  # a run nobody polls this long (a closed tab) stops


@dataclass(frozen=True)
class AttentionRequest:
    """What an attention run was asked for: ``sides`` of (label, model name, text)."""

    sides: tuple[tuple[str, str, str], ...]
    settings: AttentionSettings

    def describe(self, limit: int = 80) -> str:
        """One line per side: ``label · model · “text…”`` (the label only when comparing)."""
        lines = []
        for label, model, text in self.sides:
            flat = " ".join(text.split())
            shown = flat if len(flat) <= limit else flat[: limit - 1] + "…"
            prefix = f"{label} · " if len(self.sides) > 1 and label != model else ""
            lines.append(f"{prefix}{model} · “{shown}”")
        return "\n".join(lines)


@dataclass(frozen=True)
class AttentionSide:
    """One input's result and its per-head statistics (computed once, with the result)."""

    label: str
    result: AttentionResult
    stats: HeadStatistics


@dataclass(frozen=True)
class AttentionComparison:
    """The result of one attention run: one ``AttentionSide`` per input, in request order.

    ``request``: what was asked; ``seconds``: wall time of the whole run (s). Each side's
    ``result.provenance`` names its model, fingerprint, dtype, device and library versions.
    """

    request: AttentionRequest
    sides: tuple[AttentionSide, ...]
    seconds: float

    @property
    def results(self) -> list[tuple[str, AttentionResult]]:
        """(label, result) per side."""
        return [(side.label, side.result) for side in self.sides]

    @property
    def stats(self) -> list[HeadStatistics]:
        return [side.stats for side in self.sides]

    @property
    def provenance(self) -> tuple[Provenance, ...]:
        """One ``Provenance`` per side."""
        return tuple(side.result.provenance for side in self.sides)

    @property
    def nbytes(self) -> int:
        """Bytes held by the sides' arrays."""
        return sum(side.result.nbytes for side in self.sides)

    def save_npz(self, target) -> None:
        """Write every side (``side{i}_attentions`` (layer, head, query, key), tokens, ids,
        text, provenance, queries/keys when recorded) and the request to an uncompressed .npz
        (a path ending in .npz or an open binary file). Uncompressed: the run ledger stores
        results as they end, and compressing a 1 GB tensor would take tens of seconds."""
        from dataclasses import asdict

        arrays: dict[str, np.ndarray] = {
            "request": np.array(
                json.dumps({"sides": self.request.sides, "settings": asdict(self.request.settings)})
            ),
            "seconds": np.array(self.seconds),
            "labels": np.array([side.label for side in self.sides], dtype=str),
        }
        for i, side in enumerate(self.sides):
            r = side.result
            arrays |= {
                f"side{i}_attentions": r.attentions,
                f"side{i}_tokens": np.array(r.tokens, dtype=str),
                f"side{i}_token_ids": np.array(r.token_ids, dtype=np.int64),
                f"side{i}_word_ids": np.array(r.word_ids, dtype=np.int64),
                f"side{i}_text": np.array(r.text),
                f"side{i}_causal": np.array(r.causal),
                f"side{i}_dropped_tokens": np.array(r.dropped_tokens, dtype=np.int64),
                f"side{i}_provenance": np.array(json.dumps(asdict(r.provenance))),
                f"side{i}_seconds": np.array(r.seconds),
            }
            if r.queries is not None:
                arrays[f"side{i}_queries"], arrays[f"side{i}_keys"] = r.queries, r.keys
        np.savez(target, **arrays)

    @classmethod
    def load_npz(cls, source) -> AttentionComparison:
        """Read back what ``save_npz`` wrote (head statistics are recomputed)."""
        with np.load(source, allow_pickle=False) as data:
            raw = json.loads(str(data["request"]))
            request = AttentionRequest(
                tuple(tuple(side) for side in raw["sides"]), AttentionSettings(**raw["settings"])
            )
            sides = []
            for i, label in enumerate(data["labels"]):

                def get(name: str, i: int = i):
                    key = f"side{i}_{name}"
                    return data[key] if key in data.files else None

                queries = get("queries")
                result = AttentionResult(
                    text=str(get("text")),
                    tokens=[str(t) for t in get("tokens")],
                    token_ids=[int(t) for t in get("token_ids")],
                    word_ids=[int(t) for t in get("word_ids")],
                    attentions=np.asarray(get("attentions"), dtype=np.float32),
                    causal=bool(get("causal")),
                    provenance=Provenance(**json.loads(str(get("provenance")))),
                    seconds=float(get("seconds")),
                    queries=None if queries is None else np.asarray(queries),
                    keys=None if queries is None else np.asarray(get("keys")),
                    dropped_tokens=int(get("dropped_tokens")),
                )
                sides.append(AttentionSide(str(label), result, head_statistics(result.attentions)))
            return cls(request, tuple(sides), float(data["seconds"]))

    def summary(self) -> dict:
        """Everything but the tensors (JSON-ready)."""
        return {
            "seconds": self.seconds,
            "sides": [{"label": s.label, **s.result.summary()} for s in self.sides],
        }


def start_attention(
    jobs: Sequence[tuple[str, LoadedModel, str]],
    settings: AttentionSettings | None = None,
    *,
    budget: runs.ResultBudget | None = None,
    idle_timeout_s: float | None = IDLE_TIMEOUT_S,
) -> runs.Run[AttentionComparison]:
    """Start the forward passes of ``jobs`` ((label, loaded model, text) each) as one run.

    Raises, before anything runs: ``InputError`` for a bad input (empty, too long for the model
    or ``max_tokens`` without ``truncate``, an encoder-decoder model), ``LimitError`` for an
    input over the acting user's ``max_input_tokens`` (or past their requests per minute) and
    ``MemoryBudgetError`` when the results would not fit in the result budget (``budget``: the
    process's by default). The run's ``cost`` is the tokens of all inputs.
    """
    settings = (settings or AttentionSettings()).validated()
    if not jobs:
        raise InputError("Nothing to run: give at least one (label, model, text).")
    prepared = [
        (label, loaded, prepare_input(loaded, text, settings)) for label, loaded, text in jobs
    ]
    limits = runs.enforced_limits()
    if limits is not None:
        for label, _, inputs in prepared:
            what = f"The input {label!r}" if len(prepared) > 1 else "The input"
            check_limit(inputs.n_tokens, limits.max_input_tokens, what, "tokens")
    cost = sum(inputs.n_tokens for _, _, inputs in prepared)
    reserve = check_fits([(loaded, p.n_tokens) for _, loaded, p in prepared], budget)
    request = AttentionRequest(
        tuple((label, loaded.name, text) for label, loaded, text in jobs), settings
    )

    def work(ctx: runs.RunContext) -> AttentionComparison:
        started = time.perf_counter()
        sides = []
        for i, (label, loaded, inputs) in enumerate(prepared):
            ctx.check()
            name = f"{label} on {loaded.name}" if label != loaded.name else loaded.name
            ctx.progress(i / len(prepared), f"Running {name} ({inputs.n_tokens} tokens)…")
            result = attention_forward(loaded, inputs)
            ctx.check()
            ctx.progress((i + 0.9) / len(prepared), f"Head statistics of {name}…")
            sides.append(AttentionSide(label, result, head_statistics(result.attentions)))
        return AttentionComparison(request, tuple(sides), time.perf_counter() - started)

    if budget is None:
        return runs.start(
            "attention",
            work,
            spec=request,
            idle_timeout_s=idle_timeout_s,
            reserve_bytes=reserve,
            cost=cost,
        )
    return runs.Run(
        "attention",
        work,
        spec=request,
        idle_timeout_s=idle_timeout_s,
        reserve_bytes=reserve,
        budget=budget,
        cost=cost,
    )
