"""Closed-form weighted linear surrogates for captum's LIME and KernelSHAP (no scikit-learn).

captum's ``Lime`` and ``KernelShap`` fit their interpretable model with scikit-learn by default
(``Lasso(alpha=0.01)`` and ``LinearRegression``). These two classes implement the same
objectives in float64 numpy and plug into captum through its ``Model`` interface:

- ``WeightedLasso``: minimise (1 / (2 sum w)) sum_i w_i (y_i - x_i.b - c)^2 + alpha |b|_1 by
  coordinate descent (sklearn's objective with sample weights); alpha = 0 is least squares.
- ``WeightedLinearRegression``: weighted least squares with an intercept.

Inputs are the samples' interpretable vectors x (n, k) in {0, 1}, targets y (n,) and
similarity weights w (n,); ``representation()`` is the (1, k) coefficient row captum expects.
"""

from __future__ import annotations

import numpy as np
import torch
from captum._utils.models.model import Model


def _collect(train_data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, k), y (n,), w (n,)) from captum's training data.

    captum hands a ``DataLoader`` over a ``TensorDataset``: its tensors are read directly,
    because iterating a DataLoader draws a seed from torch's process-wide generator (and the
    explanation must leave that generator alone).
    """
    tensors = getattr(getattr(train_data, "dataset", None), "tensors", None)
    batches = [tensors] if tensors is not None else train_data
    xs, ys, ws = [], [], []
    for batch in batches:
        x, y = batch[0], batch[1]
        w = batch[2] if len(batch) > 2 else torch.ones(len(x))
        xs.append(x.detach().double().cpu().numpy().reshape(len(x), -1))
        ys.append(y.detach().double().cpu().numpy().reshape(-1))
        ws.append(w.detach().double().cpu().numpy().reshape(-1))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def weighted_lasso(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float, tol: float = 1e-10
) -> tuple[np.ndarray, float]:
    """Coefficients (k,) and intercept of the weighted Lasso above (alpha >= 0)."""
    v = w / w.sum()  # (n,) normalised weights
    x_mean, y_mean = v @ x, float(v @ y)
    xc, yc = x - x_mean, y - y_mean
    if alpha == 0:
        root = np.sqrt(v)[:, None]
        coef = np.linalg.lstsq(xc * root, yc * root[:, 0], rcond=None)[0]
        return coef, y_mean - float(x_mean @ coef)
    z = v @ (xc * xc)  # (k,) weighted squared norms
    coef = np.zeros(x.shape[1])
    residual = yc.copy()
    for _ in range(10_000):
        largest = 0.0
        for j in np.flatnonzero(z > 0):
            old = coef[j]
            rho = float(v @ (xc[:, j] * residual)) + z[j] * old
            new = np.sign(rho) * max(abs(rho) - alpha, 0.0) / z[j]
            if new != old:
                residual -= xc[:, j] * (new - old)
                coef[j] = new
                largest = max(largest, abs(new - old))
        if largest <= tol * max(1.0, float(np.abs(coef).max(initial=0.0))):
            break
    return coef, y_mean - float(x_mean @ coef)


class WeightedLasso(Model):
    """captum interpretable model: weighted Lasso (LIME's default objective)."""

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = alpha
        self.coef = np.zeros(0)
        self.intercept = 0.0

    def fit(self, train_data, **_kwargs) -> dict:
        x, y, w = _collect(train_data)
        self.coef, self.intercept = weighted_lasso(x, y, w, self.alpha)
        return {"samples": len(y)}

    def representation(self) -> torch.Tensor:
        return torch.as_tensor(self.coef, dtype=torch.float32).reshape(1, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        coef = torch.as_tensor(self.coef, dtype=x.dtype, device=x.device)
        return x.reshape(len(x), -1) @ coef + self.intercept


class WeightedLinearRegression(WeightedLasso):
    """captum interpretable model: weighted least squares (KernelSHAP's regression)."""

    def __init__(self) -> None:
        super().__init__(alpha=0.0)
