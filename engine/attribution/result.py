"""Result types of an explanation: token scores, faithfulness figures, method agreement."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engine.provenance import Provenance
from engine.results import Result

DELTA_TOLERANCE = 0.01  # IG completeness error allowed, as a fraction of |f(x) - f(baseline)|


@dataclass(frozen=True)
class Faithfulness(Result):
    """Re-scoring the target after removing (deletion) or keeping (insertion) the top-k tokens.

    fractions: (p,) share of the free tokens removed / inserted at each point, from 0 to 1.
    deletion: (p,) target score (nats) with the top-k tokens replaced by the baseline token.
    insertion: (p,) target score with only the top-k tokens kept (the rest replaced).
    random_deletion: (p,) deletion in a random order (seeded), a reference curve.
    comprehensiveness: AOPC of deletion, mean over k >= 1 of f(x) - f(x without top-k).
    sufficiency: mean over k >= 1 of f(x) - f(only top-k kept) (lower = more sufficient).
    random_comprehensiveness: the same AOPC for the random order.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    random_deletion: np.ndarray
    comprehensiveness: float
    sufficiency: float
    random_comprehensiveness: float
    replacement: str


@dataclass(frozen=True)
class Attribution(Result):
    """One method's explanation of one target on one text.

    tokens: (n,) display text of every input token (special tokens by name).
    offsets: (n, 2) character span of each token in ``text``.
    free: (n,) True for tokens that were attributed (special tokens are fixed, score 0).
    scores: (n,) attribution per token; units depend on the method (nats for IG, ablations).
    token_matrix: (outputs, n) per-output-token attributions for multi-token targets, or None.
    word_ids / sentence_ids: (n,) group of each token (-1 for special tokens).
    target_score: f(input) in nats; baseline_score: f(baseline) (IG only).
    convergence_delta: IG completeness error sum(scores) - (f(input) - f(baseline)).
    steps_used: IG steps of the run kept (with step refinement, the smallest error).
    step_trials: IG runs tried, ((steps, |delta| / |f(input) - f(baseline)|), ...) in order.
    """

    model: str
    text: str
    target: dict
    target_description: str
    output_tokens: tuple[str, ...]
    method: str
    method_title: str
    options: dict
    tokens: tuple[str, ...]
    offsets: np.ndarray
    free: np.ndarray
    scores: np.ndarray
    word_ids: np.ndarray
    sentence_ids: np.ndarray
    target_score: float
    seconds: float
    forward_rows: int
    provenance: Provenance
    token_matrix: np.ndarray | None = None
    baseline_score: float | None = None
    convergence_delta: float | None = None
    steps_used: int | None = None
    step_trials: tuple[tuple[int, float], ...] = ()
    faithfulness: Faithfulness | None = None
    label_probabilities: dict | None = None

    @property
    def relative_delta(self) -> float | None:
        """|delta| / |f(input) - f(baseline)| (IG only)."""
        if self.convergence_delta is None or self.baseline_score is None:
            return None
        gap = abs(self.target_score - self.baseline_score)
        return abs(self.convergence_delta) / gap if gap > 0 else float("inf")

    @property
    def delta_ok(self) -> bool | None:
        rel = self.relative_delta
        return None if rel is None else rel <= DELTA_TOLERANCE

    def delta_statement(self) -> str | None:
        """A plain sentence about IG's completeness error, or None for other methods.

        With step refinement it names the steps used and every (steps, error) tried, e.g.
        "converged after 200 steps (0.40%; tried 50 steps: 8.1%, 100 steps: 2.3%)".
        """
        rel = self.relative_delta
        if rel is None:
            return None
        figures = (
            f"completeness error {self.convergence_delta:+.4g} nats = {rel:.2%} of "
            f"|f(input) - f(baseline)| = {abs(self.target_score - self.baseline_score):.4g}"
        )
        trials = self.step_trials
        used = self.steps_used or self.options.get("steps")
        tried = "; tried " + ", ".join(f"{s} steps: {r:.2%}" for s, r in trials)
        tried = tried if len(trials) > 1 else ""
        if rel <= DELTA_TOLERANCE:
            verb = "after" if len(trials) > 1 else "at"
            return (
                f"Integrated Gradients converged {verb} {used} steps ({rel:.2%}{tried}): "
                f"{figures} (under 1%)."
            )
        most = max((s for s, _ in trials), default=used)
        if len(trials) > 1:
            kept = f"; kept the {used}-step run" if used != most else ""
            head = f"did NOT converge even at {most} steps ({rel:.2%}{kept}{tried})"
            advice = "Raise Max steps."
        else:
            head = f"did NOT converge at {used} steps ({rel:.2%})"
            refining = self.options.get("auto_steps")
            advice = (
                "Raise Max steps." if refining else "Increase the steps or turn on Refine steps."
            )
        return (
            f"Integrated Gradients {head}: {figures}, above 1%; these scores do not add up to "
            f"the score change. {advice}"
        )

    def groups(self, level: str = "word") -> tuple[list[str], np.ndarray]:
        """Scores summed per word or sentence (or per token): (labels, (g,) scores)."""
        if level == "token":
            keep = np.flatnonzero(self.free)
            return [self.tokens[i] for i in keep], self.scores[keep]
        ids = self.word_ids if level == "word" else self.sentence_ids
        labels: list[str] = []
        sums: list[float] = []
        for g in sorted({int(i) for i in ids if i >= 0}):
            members = np.flatnonzero(ids == g)
            start, end = int(self.offsets[members[0]][0]), int(self.offsets[members[-1]][1])
            labels.append(self.text[start:end].strip() or self.tokens[members[0]])
            sums.append(float(self.scores[members].sum()))
        return labels, np.asarray(sums)

    def top(self, k: int = 10, level: str = "token") -> list[tuple[str, float]]:
        """The k largest-|score| tokens (or words) with their scores."""
        labels, values = self.groups(level)
        order = np.argsort(-np.abs(values))[:k]
        return [(labels[i], float(values[i])) for i in order]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "token": list(self.tokens),
                "score": self.scores,
                "word": self.word_ids,
                "sentence": self.sentence_ids,
                "attributed": self.free,
            }
        )


def sentence_ids(text: str, offsets: list[tuple[int, int]], free: np.ndarray) -> np.ndarray:
    """(n,) sentence index of each token, -1 for special tokens. Sentences end at . ! ? or newline."""
    ends = [m.end() for m in re.finditer(r"[.!?]+(\s|$)|\n+", text)]
    out = np.full(len(offsets), -1, dtype=int)
    for i, (start, _end) in enumerate(offsets):
        if free[i]:
            out[i] = sum(1 for e in ends if e <= start)
    return out


def word_ids(word_index: list[int | None], free: np.ndarray) -> np.ndarray:
    """(n,) word index of each token from the fast tokenizer, -1 for special tokens."""
    out = np.full(len(word_index), -1, dtype=int)
    for i, w in enumerate(word_index):
        if free[i]:
            out[i] = w if w is not None else i
    return out


@dataclass(frozen=True)
class Estimate:
    """Pre-flight estimate of one run: forward rows x tokens -> time and memory.

    rows: sequences the model will run (forward, plus backward for gradient methods).
    seconds: expected wall time; peak_bytes: expected extra memory at the chosen batch size.
    extra_rows: forward-only rows of the faithfulness curves, when asked for (in ``seconds``).
    attempts / worst_rows / worst_seconds: runs the method may make (IG step refinement
    doubles the steps up to Max steps) and their rows and time if every one runs (worst case;
    equal to rows / seconds when there is one attempt); peak_bytes is the largest over them.
    """

    method: str
    rows: int
    tokens: int
    batch_size: int
    seconds: float
    peak_bytes: int
    available_bytes: int
    fits: bool
    extra_rows: int = 0
    attempts: int = 1
    worst_rows: int = 0
    worst_seconds: float = 0.0
