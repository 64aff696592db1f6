"""Result types of an explanation: token scores, faithfulness figures, a multi-method set.

Results draw themselves (``to_frame()``, ``bar_chart()``, ``chart()``, ``html()``, built in
``views``), so a page, a notebook and a report use the same code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engine.attribution import views
from engine.attribution.agreement import Agreement, agreement
from engine.attribution.spec import ExplanationSpec
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

    def to_frame(self):
        """The three curves in long form: DataFrame [fraction, score, curve]."""
        return views.curves_frame(self)

    def chart(self):
        """The deletion / insertion / random curves: altair Chart."""
        return views.curves_chart(self)


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
        """One row per input token: DataFrame [token, score, word, sentence, attributed]."""
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

    def group_frame(self, level: str = "token"):
        """Scores per token, word or sentence: DataFrame [level, score, order]."""
        return views.group_frame(self, level)

    def bar_chart(self, level: str = "token", k: int = 15):
        """The k largest-|score| tokens (words, sentences) as bars: altair Chart."""
        return views.bar_chart(self, level, k)

    def matrix_frame(self):
        """Per-output-token scores in long form, or None without a matrix."""
        return views.matrix_frame(self)

    def matrix_chart(self):
        """Heat map of the per-output-token matrix: altair Chart, or None."""
        return views.matrix_chart(self)

    def html(self) -> str:
        """The input text coloured by score (escaped, self-contained HTML)."""
        return views.coloured_html(self)


@dataclass(frozen=True)
class ExplanationSet(Result):
    """Several methods' explanations of one target on one text, and how well they agree.

    attributions: one ``Attribution`` per method, in the order asked.
    agreement: pairwise rank agreement of their free-token scores (None with one method).
    provenance: model, fingerprint, dtype, device, seed and library versions of the run.
    spec: what was asked (text, target, methods with options, per_token, faithfulness, seed).
    seconds: wall time of the whole run (methods, faithfulness curves, preparation).
    """

    attributions: tuple[Attribution, ...]
    agreement: Agreement | None
    provenance: Provenance
    spec: ExplanationSpec | None = None
    seconds: float = 0.0

    @classmethod
    def of(
        cls,
        attributions,
        provenance: Provenance,
        spec: ExplanationSpec | None = None,
        seconds: float = 0.0,
    ) -> ExplanationSet:
        """The set of ``attributions`` with their agreement table (two or more methods)."""
        attributions = tuple(attributions)
        table = agreement(attributions) if len(attributions) > 1 else None
        return cls(attributions, table, provenance, spec, seconds)

    @property
    def model(self) -> str:
        return self.provenance.model

    @property
    def text(self) -> str:
        return self.attributions[0].text if self.attributions else ""

    def agreement_frame(self):
        """The agreement table: DataFrame [method_a, method_b, spearman, kendall, ...], or None."""
        return None if self.agreement is None else self.agreement.to_frame()

    def html_report(self) -> str:
        """One self-contained HTML document (no scripts, no network) for the whole set."""
        from engine.attribution.report import html_report

        return html_report(self)


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
    seconds: expected wall time; seconds_low / seconds_high: the range to show (from the
    fastest and slowest measured rates on this machine, see ``calibration``);
    calibrated: False while no rate is measured for this model and length (arithmetic
    fallback, a wider range). peak_bytes: expected extra memory at the chosen batch size.
    extra_rows: forward-only rows of the faithfulness curves, when asked for (in the seconds).
    attempts / worst_rows / worst_seconds / worst_seconds_high: runs the method may make (IG
    step refinement doubles the steps up to Max steps) and their rows and time if every one
    runs (worst case; equal to rows / seconds when there is one attempt); peak_bytes is the
    largest over them.
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
    seconds_low: float = 0.0
    seconds_high: float = 0.0
    worst_seconds_high: float = 0.0
    calibrated: bool = False

    def time_range(self) -> str:
        """The expected time as a range, e.g. "2.1-3.4 s" ("~" before an uncalibrated one)."""
        mark = "" if self.calibrated else "~"
        return f"{mark}{_short(self.seconds_low)}-{_short(self.seconds_high)} s"

    def row(self, title: str) -> dict:
        """One row of the pre-flight table (the page and the CLI show the same columns)."""
        return {
            "method": title,
            "forward rows": self.rows,
            "+ faithfulness rows": self.extra_rows,
            "tokens": self.tokens,
            "batch": self.batch_size,
            "estimated time": self.time_range(),
            "memory": _human_bytes(self.peak_bytes),
            "fits": "yes" if self.fits else "NO",
            "worst case (step refinement)": (
                f"up to {_short(self.worst_seconds_high)} s, {self.worst_rows} rows "
                f"({self.attempts} runs)"
                if self.attempts > 1
                else "-"
            ),
        }


def _short(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def estimate_frame(estimates: list[Estimate], titles: list[str]):
    """The pre-flight table of several runs: a pandas DataFrame, one row per method."""
    import pandas as pd

    return pd.DataFrame([e.row(t) for e, t in zip(estimates, titles, strict=True)])
