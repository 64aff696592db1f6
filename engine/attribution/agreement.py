"""Method agreement: rank correlation and top-k overlap between attributions of one target."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from engine.results import Result


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on average ranks); nan if either is constant."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (ties handled as in scipy.stats.kendalltau); nan if either is constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    concordant_minus_discordant = float((da * db).sum())
    n_a, n_b = float((da != 0).sum()), float((db != 0).sum())
    if n_a == 0 or n_b == 0:
        return float("nan")
    return concordant_minus_discordant / np.sqrt(n_a * n_b)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of the k highest-scored positions that both rankings have in their top k."""
    k = max(1, min(k, len(a)))
    top_a = set(np.argsort(-np.asarray(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.asarray(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


@dataclass(frozen=True)
class AgreementRow:
    """One pair of methods compared on the same tokens."""

    method_a: str
    method_b: str
    spearman: float
    kendall: float
    top_k_overlap: float
    k: int


@dataclass(frozen=True)
class Agreement(Result):
    """Pairwise agreement of several attributions of the same target (free tokens only)."""

    methods: tuple[str, ...]
    rows: tuple[AgreementRow, ...]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([r.__dict__ for r in self.rows])


def agreement(results, k: int = 5) -> Agreement:
    """Compare attributions (``Attribution`` objects of one text and target) pairwise."""
    from engine.errors import InputError

    results = list(results)
    if len(results) < 2:
        raise InputError("Method agreement needs at least two methods run on the same target.")
    first = results[0]
    for r in results[1:]:
        if r.tokens != first.tokens or r.target != first.target or r.model != first.model:
            raise InputError(
                "Method agreement compares runs on the same model, text and target: re-run the "
                "methods on one input."
            )
    free = np.asarray(first.free, bool)
    rows = []
    for a, b in combinations(results, 2):
        x, y = np.asarray(a.scores)[free], np.asarray(b.scores)[free]
        rows.append(
            AgreementRow(
                a.method, b.method, spearman(x, y), kendall(x, y), top_k_overlap(x, y, k), k
            )
        )
    return Agreement(methods=tuple(r.method for r in results), rows=tuple(rows))
