"""The built-in attribution methods (captum, imported lazily) and attention rollout.

Every method attributes a scalar score ``fn: (B, k, d) -> (B,)`` (see ``targets.Target``) to the
k free input tokens and returns one score per free token:

- gradient methods attribute to the embeddings (B, k, d) and sum over the hidden dimension d
  (Saliency takes the L2 norm of the gradient instead);
- perturbation methods replace whole tokens' embeddings by the baseline's (one feature per
  token), so their scores are changes of the target score in nats;
- attention rollout ignores the target (a baseline to compare against).

Random methods (GradientSHAP, Shapley Value Sampling, LIME, KernelSHAP) draw from private
generators seeded with the run's seed (``_generators``): the process-wide torch and numpy
generators are never seeded or drawn from, so two explanations running at once in two threads
each give their single-thread result. The private draws are the same sequence captum would take
from the global generators after ``torch.manual_seed(seed)`` / ``np.random.seed(seed)``, so a
result equals a direct captum call seeded that way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from engine.attribution.registry import BASELINES, Method, Options, option, register


@dataclass(frozen=True)
class MethodOutput:
    """Scores for the k free tokens, (k,); IG's completeness error when it has one."""

    scores: np.ndarray
    convergence_delta: float | None = None


def _generators(ctx, device: torch.device | str = "cpu"):
    """Private generators for one run: (torch.Generator on ``device``, numpy RandomState).

    Seeded like ``torch.manual_seed(seed)`` / ``np.random.seed(seed)`` would seed the global
    ones, so the draws match captum's with globally seeded generators.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(ctx.seed))
    return generator, np.random.RandomState(int(ctx.seed) % 2**32)


def _token_mask(ctx) -> torch.Tensor:
    """(1, k, 1) feature mask: one feature per free token."""
    k = ctx.inputs.shape[1]
    return torch.arange(k, device=ctx.inputs.device).view(1, k, 1)


def _per_token(attr: torch.Tensor) -> np.ndarray:
    """(1, k, d) embedding attributions -> (k,) token scores (sum over d)."""
    return attr.detach().float().sum(-1)[0].cpu().numpy()


# --- gradient methods -------------------------------------------------------------------------


@register
class IntegratedGradients(Method):
    name = "integrated_gradients"
    title = "Integrated Gradients"
    summary = (
        "Path integral of gradients from a baseline to the input embeddings (layer IG on the "
        "embedding layer). Complete: scores sum to f(input) - f(baseline), up to the "
        "convergence delta shown."
    )
    family = "gradient"

    @dataclass(frozen=True)
    class Options(Options):
        steps: int = option(
            50, "Steps", "Points on the path (more = smaller delta).", min=2, max=1000
        )
        auto_steps: bool = option(
            True,
            "Refine steps",
            "When the completeness error is above 1%, re-run with twice the steps (up to Max "
            "steps) until it is under 1%; the run with the smallest error is kept.",
        )
        max_steps: int = option(
            400, "Max steps", "Refinement stops at this many steps.", min=2, max=1000
        )
        baseline: Literal["pad", "zero", "mask"] = option(
            "pad", "Baseline", "What a token is replaced by at the path's start.", choices=BASELINES
        )
        integration: Literal[
            "gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right"
        ] = option(
            "gausslegendre",
            "Integration rule",
            "captum's quadrature rule.",
            choices=("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right"),
        )
        internal_batch_size: int = option(
            0,
            "Internal batch size",
            "Path points per forward pass (0 = choose to fit memory).",
            min=0,
            max=4096,
        )

    @classmethod
    def attempts(cls, options) -> list:
        """steps, then doubled steps up to max_steps (50 -> 100 -> 200 -> 400) when refining."""
        plan, steps = [options], options.steps
        while options.auto_steps and steps < options.max_steps:
            steps = min(2 * steps, options.max_steps)
            plan.append(dataclasses.replace(options, steps=steps))
        return plan

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return options.steps + 2  # the path, plus input and baseline for the delta

    def run(self, ctx) -> MethodOutput:
        from captum.attr import IntegratedGradients as CaptumIG

        o = ctx.options
        attr, delta = CaptumIG(ctx.fn).attribute(
            ctx.inputs,
            baselines=ctx.baselines,
            n_steps=o.steps,
            method=o.integration,
            internal_batch_size=ctx.batch_size,
            return_convergence_delta=True,
        )
        return MethodOutput(_per_token(attr), float(delta.reshape(-1)[0]))


@register
class Saliency(Method):
    name = "saliency"
    title = "Saliency"
    summary = "L2 norm of the score's gradient at each token's embedding (unsigned, local)."
    family = "gradient"

    @dataclass(frozen=True)
    class Options(Options):
        pass

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return 1

    def run(self, ctx) -> MethodOutput:
        from captum.attr import Saliency as CaptumSaliency

        grad = CaptumSaliency(ctx.fn).attribute(ctx.inputs, abs=False)
        return MethodOutput(grad.detach().float().norm(dim=-1)[0].cpu().numpy())


@register
class InputXGradient(Method):
    name = "input_x_gradient"
    title = "Input x Gradient"
    summary = "Embedding times gradient, summed over the hidden dimension (signed, local)."
    family = "gradient"

    @dataclass(frozen=True)
    class Options(Options):
        pass

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return 1

    def run(self, ctx) -> MethodOutput:
        from captum.attr import InputXGradient as CaptumIxG

        return MethodOutput(_per_token(CaptumIxG(ctx.fn).attribute(ctx.inputs)))


@register
class GradientShap(Method):
    name = "gradient_shap"
    title = "GradientSHAP"
    summary = (
        "Expected gradients: gradients at random points between the baseline and noisy "
        "copies of the input, times (input - baseline)."
    )
    family = "gradient"

    @dataclass(frozen=True)
    class Options(Options):
        samples: int = option(20, "Samples", "Random points per explanation.", min=1, max=2000)
        stdevs: float = option(
            0.0, "Noise std", "Gaussian noise added to the input.", min=0.0, max=10.0
        )
        baseline: Literal["pad", "zero", "mask"] = option(
            "pad", "Baseline", "What a token is replaced by.", choices=BASELINES
        )

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return options.samples

    def run(self, ctx) -> MethodOutput:
        """captum's GradientShap (NoiseTunnel over InputBaselineXGradient), on private generators.

        For each of n samples: a noisy input x_i = x + N(0, stdev), a point
        p_i = c_i x_i + (1 - c_i) b with c_i ~ U(0, 1), and (x_i - b) * grad f(p_i); the
        attribution is their mean. The draws follow captum's order (torch: the noise; numpy: a
        baseline index, then the coefficients), in batches of ``ctx.batch_size`` rows.
        """
        x, base = ctx.inputs.detach(), ctx.baselines.detach()  # (1, k, d)
        n = ctx.options.samples
        generator, numpy_rng = _generators(ctx, x.device)
        stdev = torch.tensor(float(ctx.options.stdevs), device=x.device).repeat((n, *x.shape[1:]))
        noisy = x.repeat_interleave(n, dim=0) + torch.normal(0, stdev, generator=generator)
        numpy_rng.choice(base.shape[0], n)  # captum draws a baseline per sample (one here)
        coefficient = torch.tensor(numpy_rng.uniform(0.0, 1.0, n), dtype=x.dtype).to(x.device)
        total = torch.zeros_like(x[0])
        step = max(int(ctx.batch_size), 1)
        for start in range(0, n, step):
            xi = noisy[start : start + step]
            c = coefficient[start : start + step].view(-1, *([1] * (x.dim() - 1)))
            points = (c * xi + (1.0 - c) * base).requires_grad_()
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(ctx.fn(points).sum(), points)
            total += ((xi - base) * grad).detach().sum(0)
        return MethodOutput(_per_token((total / n).unsqueeze(0)))


def _deeplift_blockers(model: torch.nn.Module) -> list[str]:
    """Activation modules DeepLift has no rule for (it would silently use plain gradients)."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    supported = set(SUPPORTED_NON_LINEAR)
    blockers = set()
    for module in model.modules():
        cls = type(module)
        is_activation = cls.__module__ == "torch.nn.modules.activation" or cls.__name__.endswith(
            ("Activation", "GELU", "SiLU", "Swish")
        )
        if (
            is_activation
            and cls not in supported
            and not isinstance(module, torch.nn.MultiheadAttention)
        ):
            blockers.add(cls.__name__)
    return sorted(blockers)


class _ScoreModule(torch.nn.Module):
    """The target score as an ``nn.Module`` (DeepLift hooks the model's activations)."""

    def __init__(self, model: torch.nn.Module, fn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@register
class DeepLift(Method):
    name = "deeplift"
    title = "DeepLift"
    summary = (
        "Rescale rule on the model's activation modules (ReLU, Tanh, Sigmoid, ...). Only "
        "offered when every activation has a rule; attention softmax and LayerNorm are "
        "treated by their gradients."
    )
    family = "gradient"

    @dataclass(frozen=True)
    class Options(Options):
        baseline: Literal["pad", "zero", "mask"] = option(
            "pad", "Baseline", "Reference input.", choices=BASELINES
        )

    @classmethod
    def incompatibility(cls, loaded) -> str | None:
        blockers = _deeplift_blockers(loaded.model)
        if blockers:
            return (
                f"DeepLift has no rule for its {', '.join(blockers)} activation(s); use "
                "Integrated Gradients instead."
            )
        return None

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return 2

    def run(self, ctx) -> MethodOutput:
        from captum.attr import DeepLift as CaptumDeepLift

        module = _ScoreModule(ctx.loaded.model, ctx.fn)
        attr = CaptumDeepLift(module).attribute(ctx.inputs, baselines=ctx.baselines)
        return MethodOutput(_per_token(attr))


# --- perturbation methods ---------------------------------------------------------------------


def _perturbation_scores(attr: torch.Tensor) -> np.ndarray:
    """(1, k, d) attributions, constant over d within a token -> (k,)."""
    return attr.detach().float()[0, :, 0].cpu().numpy()


_BASELINE_OPTION = dict(
    label="Replacement", help="What a removed token becomes.", choices=BASELINES
)
_BATCH = dict(
    label="Internal batch size", help="Perturbations per forward pass (0 = auto).", min=0, max=4096
)


@register
class FeatureAblation(Method):
    name = "feature_ablation"
    title = "Feature Ablation"
    summary = "Score drop when each token alone is replaced by the baseline token (leave-one-out)."
    family = "perturbation"

    @dataclass(frozen=True)
    class Options(Options):
        baseline: Literal["pad", "zero", "mask"] = option("pad", **_BASELINE_OPTION)
        internal_batch_size: int = option(0, **_BATCH)

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return n_features + 1

    def run(self, ctx) -> MethodOutput:
        from captum.attr import FeatureAblation as CaptumFA

        attr = CaptumFA(ctx.fn).attribute(
            ctx.inputs,
            baselines=ctx.baselines,
            feature_mask=_token_mask(ctx),
            perturbations_per_eval=ctx.batch_size,
        )
        return MethodOutput(_perturbation_scores(attr))


@register
class Occlusion(Method):
    name = "occlusion"
    title = "Occlusion"
    summary = "Score drop when a sliding window of tokens is replaced, averaged per token."
    family = "perturbation"

    @dataclass(frozen=True)
    class Options(Options):
        window: int = option(3, "Window", "Tokens hidden at once.", min=1, max=64)
        baseline: Literal["pad", "zero", "mask"] = option("pad", **_BASELINE_OPTION)
        internal_batch_size: int = option(
            0, "Internal batch size", "Windows per forward pass (0 = auto).", min=0, max=4096
        )

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return max(n_features - options.window + 1, 1) + 1

    def run(self, ctx) -> MethodOutput:
        from captum.attr import Occlusion as CaptumOcclusion

        k, d = ctx.inputs.shape[1:]
        window = min(ctx.options.window, k)
        attr = CaptumOcclusion(ctx.fn).attribute(
            ctx.inputs,
            sliding_window_shapes=(window, d),
            strides=(1, d),
            baselines=ctx.baselines,
            perturbations_per_eval=ctx.batch_size,
        )
        return MethodOutput(_perturbation_scores(attr))


@register
class ShapleyValueSampling(Method):
    name = "shapley_value_sampling"
    title = "Shapley Value Sampling"
    summary = "Average marginal contribution of each token over random token orderings."
    family = "perturbation"

    @dataclass(frozen=True)
    class Options(Options):
        samples: int = option(25, "Samples", "Random permutations (n_samples).", min=1, max=1000)
        baseline: Literal["pad", "zero", "mask"] = option("pad", **_BASELINE_OPTION)
        internal_batch_size: int = option(0, **_BATCH)

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return options.samples * n_features + 1  # captum: one baseline row, then k per permutation

    def run(self, ctx) -> MethodOutput:
        from captum.attr import ShapleyValueSampling as CaptumSVS

        generator, _ = _generators(ctx)

        def permutations(num_features: int, num_samples: int):
            # captum's _perm_generator, on the run's private generator
            for _ in range(num_samples):
                yield torch.randperm(num_features, generator=generator).tolist()

        explainer = CaptumSVS(ctx.fn)
        explainer.permutation_generator = permutations
        attr = explainer.attribute(
            ctx.inputs,
            baselines=ctx.baselines,
            feature_mask=_token_mask(ctx),
            n_samples=ctx.options.samples,
            perturbations_per_eval=ctx.batch_size,
        )
        return MethodOutput(_perturbation_scores(attr))


class _SurrogateMethod(Method):
    """LIME / KernelSHAP: captum's sampling with a closed-form surrogate (``surrogate.py``)."""

    family = "perturbation"

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return options.samples

    def explainer(self, ctx, generator: torch.Generator):
        """The captum explainer, drawing its samples from ``generator``."""
        raise NotImplementedError

    def run(self, ctx) -> MethodOutput:
        generator, _ = _generators(ctx)
        attr = self.explainer(ctx, generator).attribute(
            ctx.inputs,
            baselines=ctx.baselines,
            feature_mask=_token_mask(ctx),
            n_samples=ctx.options.samples,
            perturbations_per_eval=ctx.batch_size,
        )
        return MethodOutput(_perturbation_scores(attr))


_SAMPLES = dict(label="Samples", help="Random token subsets scored.", min=2, max=20000)


@register
class Lime(_SurrogateMethod):
    name = "lime"
    title = "LIME"
    summary = (
        "A sparse linear model (weighted Lasso, captum's default objective) fitted to the "
        "scores of random token subsets, weighted by cosine similarity to the input."
    )

    @dataclass(frozen=True)
    class Options(Options):
        samples: int = option(200, **_SAMPLES)
        alpha: float = option(
            0.01, "Lasso alpha", "L1 penalty (0 = plain least squares).", min=0.0, max=10.0
        )
        baseline: Literal["pad", "zero", "mask"] = option("pad", **_BASELINE_OPTION)
        internal_batch_size: int = option(0, **_BATCH)

    def explainer(self, ctx, generator: torch.Generator):
        from captum.attr import Lime as CaptumLime

        from engine.attribution.surrogate import WeightedLasso

        def perturb(original_inp, **kwargs) -> torch.Tensor:
            # captum's default_perturb_func (each token kept with probability 1/2), private
            device = (
                original_inp.device if torch.is_tensor(original_inp) else original_inp[0].device
            )
            probs = torch.ones(1, int(kwargs["num_interp_features"])) * 0.5
            return torch.bernoulli(probs, generator=generator).to(device=device).long()

        return CaptumLime(
            ctx.fn, interpretable_model=WeightedLasso(ctx.options.alpha), perturb_func=perturb
        )


@register
class KernelShap(_SurrogateMethod):
    name = "kernel_shap"
    title = "KernelSHAP"
    summary = (
        "Weighted linear regression on token subsets drawn from the Shapley kernel: "
        "approximates Shapley values."
    )

    @dataclass(frozen=True)
    class Options(Options):
        samples: int = option(200, **_SAMPLES)
        baseline: Literal["pad", "zero", "mask"] = option("pad", **_BASELINE_OPTION)
        internal_batch_size: int = option(0, **_BATCH)

    def explainer(self, ctx, generator: torch.Generator):
        from captum.attr import KernelShap as CaptumKernelShap

        from engine.attribution.surrogate import WeightedLinearRegression

        def perturb(original_inp, **kwargs):
            # captum's kernel_shap_perturb_generator, on the private generator: the all-on and
            # all-off vectors, then k ones (k from the Shapley kernel) at random positions
            device = (
                original_inp.device if torch.is_tensor(original_inp) else original_inp[0].device
            )
            m = int(kwargs["num_interp_features"])
            probs = kwargs["num_select_distribution"].probs
            probs = probs.reshape(-1, probs.shape[-1])  # (1, m): p(k ones), k = 0..m-1
            yield torch.ones(1, m, device=device, dtype=torch.long)
            yield torch.zeros(1, m, device=device, dtype=torch.long)
            while True:
                # Categorical.sample() is torch.multinomial(probs, 1, True).T
                selected = torch.multinomial(probs, 1, True, generator=generator).T.reshape(())
                values = torch.randn(1, m, generator=generator)
                threshold = torch.kthvalue(values, m - selected).values.item()
                yield (values > threshold).to(device=device).long()

        explainer = CaptumKernelShap(ctx.fn)
        explainer.interpretable_model = WeightedLinearRegression()  # no scikit-learn needed
        explainer.perturb_func = perturb
        return explainer


# --- attention baseline -----------------------------------------------------------------------


@register
class AttentionRollout(Method):
    name = "attention_rollout"
    title = "Attention rollout"
    summary = (
        "Attention weights multiplied through the layers (Abnar & Zuidema 2020), read at the "
        "predicting position. Ignores the target: a baseline, not an explanation."
    )
    family = "attention"

    @dataclass(frozen=True)
    class Options(Options):
        head_fusion: Literal["mean", "max"] = option(
            "mean", "Head fusion", "How heads are combined per layer.", choices=("mean", "max")
        )

    @classmethod
    def forward_rows(cls, n_features: int, options) -> int:
        return 1

    def run(self, ctx) -> MethodOutput:
        target = ctx.target
        with ctx.loaded.eager_attention(), torch.no_grad():
            out = ctx.loaded.model(input_ids=target.input_ids, output_attentions=True)
        attentions = [a for a in (out.attentions or ()) if a is not None]
        if not attentions:
            from engine.errors import EngineError

            raise EngineError(
                f"{ctx.loaded.name} returned no attention weights: rollout needs them."
            )
        n = target.n_tokens
        rollout = torch.eye(n)
        for layer in attentions:  # (1, heads, n, n)
            a = layer[0].float().cpu()
            a = a.max(0).values if ctx.options.head_fusion == "max" else a.mean(0)
            a = 0.5 * a + 0.5 * torch.eye(n)
            a = a / a.sum(-1, keepdim=True)
            rollout = a @ rollout
        cls_first = (not target.is_lm) and not bool(target.free[0])
        query = 0 if cls_first else n - 1
        row = rollout[query].numpy()
        return MethodOutput(row[target.free_mask()])
