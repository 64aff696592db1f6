"""LIME / KernelSHAP surrogates (closed form, no scikit-learn) and their captum wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attribution import TargetSpec, explain
from engine.attribution.surrogate import WeightedLasso, WeightedLinearRegression, weighted_lasso
from engine.attribution.targets import Target

LM_TEXT = "the capital of france is"


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_models):
    from engine import Workbench

    wb = Workbench(home=tmp_path_factory.mktemp("surrogate-home"), device="cpu")
    return wb.load(str(tiny_models["llama"])).loaded


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, size=(60, 5)).astype(float)
    y = x @ np.array([1.0, -2.0, 0.0, 0.5, 0.05]) + 0.3 + rng.normal(0, 0.01, 60)
    w = rng.uniform(0.1, 2.0, 60)
    return x, y, w


def test_alpha_zero_is_weighted_least_squares():
    x, y, w = _problem()
    coef, intercept = weighted_lasso(x, y, w, 0.0)
    design = np.hstack([x, np.ones((len(x), 1))]) * np.sqrt(w)[:, None]
    expected = np.linalg.lstsq(design, y * np.sqrt(w), rcond=None)[0]
    np.testing.assert_allclose(coef, expected[:-1], atol=1e-10)
    assert intercept == pytest.approx(expected[-1], abs=1e-10)


def test_lasso_satisfies_its_optimality_conditions():
    """KKT of (1/2 sum w) sum w r^2 + alpha |b|_1: |grad_j| <= alpha, = alpha where b_j != 0."""
    x, y, w = _problem(1)
    alpha = 0.05
    coef, intercept = weighted_lasso(x, y, w, alpha)
    v = w / w.sum()
    residual = y - x @ coef - intercept
    grad = (v * residual) @ x  # correlation of each feature with the residual
    assert abs(float(v @ residual)) < 1e-9  # the intercept is optimal
    active = coef != 0
    np.testing.assert_allclose(grad[active], alpha * np.sign(coef[active]), atol=1e-7)
    assert np.all(np.abs(grad[~active]) <= alpha + 1e-9)
    assert coef[4] == 0 and coef[2] == 0  # the small and the zero weight are shrunk away


def test_lime_and_kernel_shap_equal_a_direct_captum_call(llama):
    from captum.attr import KernelShap, Lime

    with llama.use():
        target = Target(llama, LM_TEXT, TargetSpec(text=" paris"))
        x, base = target.free_embeds(), target.baseline_free_embeds("pad")
        k = x.shape[1]
        mask = torch.arange(k).view(1, k, 1)
        torch.manual_seed(0)
        np.random.seed(0)
        lime = Lime(target.score, interpretable_model=WeightedLasso(0.01)).attribute(
            x, baselines=base, feature_mask=mask, n_samples=64, perturbations_per_eval=16
        )
        torch.manual_seed(0)
        np.random.seed(0)
        shap = KernelShap(target.score)
        shap.interpretable_model = WeightedLinearRegression()
        shap = shap.attribute(
            x, baselines=base, feature_mask=mask, n_samples=64, perturbations_per_eval=16
        )
    for name, direct in (("lime", lime), ("kernel_shap", shap)):
        result = explain(
            llama,
            LM_TEXT,
            TargetSpec(text=" paris"),
            name,
            {"samples": 64, "internal_batch_size": 16},
            faithfulness=False,
        )
        np.testing.assert_allclose(result.scores[result.free], direct[0, :, 0], atol=1e-6)


def test_kernel_shap_approaches_exact_shapley_values(llama):
    from captum.attr import ShapleyValues

    with llama.use():
        target = Target(llama, LM_TEXT, TargetSpec(text=" paris"))
        x, base = target.free_embeds(), target.baseline_free_embeds("pad")
        k = x.shape[1]
        exact = ShapleyValues(target.score).attribute(
            x, baselines=base, feature_mask=torch.arange(k).view(1, k, 1)
        )[0, :, 0]
    result = explain(
        llama,
        LM_TEXT,
        TargetSpec(text=" paris"),
        "kernel_shap",
        {"samples": 600},
        faithfulness=False,
    )
    scale = float(exact.abs().max())
    np.testing.assert_allclose(result.scores[result.free], exact.numpy(), atol=0.03 * scale)
