"""Faithfulness: does removing the tokens a method ranks highest change the score?

Tokens are ranked by attribution (largest first). Deletion replaces the top-k tokens by the
baseline token and re-scores the target; insertion starts from the all-baseline input and puts
back only the top-k. AOPC (area over the perturbation curve, DeYoung et al. 2020, ERASER):

- comprehensiveness = mean_k [f(x) - f(x without top-k)]  (higher = the top tokens matter)
- sufficiency       = mean_k [f(x) - f(only top-k)]       (lower = the top tokens suffice)

A random order gives a reference comprehensiveness: a faithful method should beat it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine.attribution.result import Faithfulness

MAX_POINTS = 20


def curve_points(k_total: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Numbers of tokens removed at each point: 0..k_total, at most ``max_points`` + 1 points."""
    return np.unique(np.round(np.linspace(0, k_total, min(k_total, max_points) + 1)).astype(int))


def _masked(order: np.ndarray, ks: np.ndarray, k_total: int) -> torch.Tensor:
    """(p, k_total) bool: True where the token is among the first ks[i] of ``order``."""
    mask = torch.zeros(len(ks), k_total, dtype=torch.bool)
    for i, k in enumerate(ks):
        mask[i, torch.as_tensor(order[:k], dtype=torch.long)] = True
    return mask


def aopc(full_score: float, curve: np.ndarray) -> float:
    """Mean of f(x) - curve over the points with k >= 1."""
    return float(np.mean(full_score - curve[1:])) if len(curve) > 1 else 0.0


def faithfulness(
    target,
    scores: np.ndarray,
    replacement: str,
    batch_size: int,
    seed: int = 0,
    check: Callable[[], None] = lambda: None,
) -> Faithfulness:
    """Deletion/insertion curves and AOPC for ``scores`` (k,) over the target's free tokens."""
    inputs = target.free_embeds()  # (1, k, d)
    base = target.baseline_free_embeds(replacement)  # (1, k, d)
    k_total = inputs.shape[1]
    ks = curve_points(k_total)
    order = np.argsort(-np.asarray(scores), kind="stable")
    rng = np.random.default_rng(seed)
    random_order = rng.permutation(k_total)
    delete = _masked(order, ks, k_total)
    keep = delete
    random_delete = _masked(random_order, ks, k_total)
    masks = torch.cat([delete, random_delete]).to(inputs.device)  # True = replaced
    rows = torch.where(masks.unsqueeze(-1), base, inputs)  # (2p, k, d)
    inserted = torch.where(keep.to(inputs.device).unsqueeze(-1), inputs, base)  # (p, k, d)
    batch = torch.cat([rows, inserted])
    values = []
    with torch.no_grad():
        for start in range(0, batch.shape[0], max(batch_size, 1)):
            check()
            values.append(target.score(batch[start : start + max(batch_size, 1)]).float().cpu())
    out = torch.cat(values).numpy().astype(float)
    p = len(ks)
    deletion, random_deletion, insertion = out[:p], out[p : 2 * p], out[2 * p :]
    full = float(deletion[0])
    return Faithfulness(
        fractions=ks / max(k_total, 1),
        deletion=deletion,
        insertion=insertion,
        random_deletion=random_deletion,
        comprehensiveness=aopc(full, deletion),
        sufficiency=aopc(full, insertion),
        random_comprehensiveness=aopc(full, random_deletion),
        replacement=replacement,
    )
