"""What an explanation run is asked to do: a frozen, JSON-friendly spec.

spec = ExplanationSpec(
    "The capital of France is",
    TargetSpec(text=" Paris"),
    methods=(MethodRun("integrated_gradients", {"steps": 50}), MethodRun("occlusion")),
    seed=0,
)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.attribution.registry import check_compatible, get_method
from engine.attribution.targets import TargetSpec
from engine.errors import InputError


@dataclass(frozen=True)
class MethodRun:
    """One method to run: its registry name and option overrides.

    ``options`` may be given as a dict; it is kept as sorted (name, value) pairs so the spec
    stays immutable and comparable. ``options_dict()`` gives it back as a dict.
    """

    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        raw = self.options
        pairs = raw.items() if isinstance(raw, dict) else (raw or ())
        try:
            frozen = tuple(sorted((str(k), v) for k, v in pairs))
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"Options of {self.method} must be name/value pairs, e.g. {{'steps': 50}}."
            ) from exc
        object.__setattr__(self, "options", frozen)

    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)


# The option that says how much sampling a method does: its "steps" in the role limits.
STEP_OPTIONS = ("steps", "samples")


def method_steps(run: MethodRun) -> tuple[int, str]:
    """(steps, unit) of one method: its ``steps`` option (Integrated Gradients) or ``samples``
    (GradientSHAP, Shapley sampling, LIME, KernelSHAP), defaults included; (1, "pass") for a
    method with neither (Saliency, DeepLift, Feature ablation, Occlusion, rollout: their work
    grows with the input's tokens, which ``max_input_tokens`` limits)."""
    options = get_method(run.method).make_options(run.options_dict())
    for name in STEP_OPTIONS:
        value = getattr(options, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, name
    return 1, "pass"


@dataclass(frozen=True)
class ExplanationSpec:
    """An explanation run: one text and target, one or more methods, shared settings.

    per_token: for multi-token continuations, also attribute each output token (a matrix).
    faithfulness: also compute deletion/insertion curves and AOPC.
    seed: seeds the random methods' private generators (GradientSHAP, Shapley sampling,
    LIME, KernelSHAP) and the faithfulness curves' random order.
    """

    text: str
    target: TargetSpec = field(default_factory=TargetSpec)
    methods: tuple[MethodRun, ...] = (MethodRun("integrated_gradients"),)
    per_token: bool = False
    faithfulness: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        methods = self.methods
        if isinstance(methods, MethodRun | str):
            methods = (methods,)
        runs = tuple(m if isinstance(m, MethodRun) else MethodRun(str(m)) for m in methods or ())
        object.__setattr__(self, "methods", runs)

    def validated(self, loaded) -> ExplanationSpec:
        """Check every method and option against ``loaded`` now (``InputError`` naming the bad
        one), before any work starts. Returns the spec with canonical method names."""
        if not self.methods:
            raise InputError("Choose at least one attribution method.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"The seed must be a whole number (got {self.seed!r}).")
        if not isinstance(self.text, str):
            raise InputError("The text must be a string.")
        runs = []
        for run in self.methods:
            cls = get_method(run.method)
            check_compatible(cls, loaded)
            cls.make_options(run.options_dict())  # InputError for a bad name, type or range
            runs.append(MethodRun(cls.name, run.options))
        return ExplanationSpec(
            text=self.text,
            target=self.target,
            methods=tuple(runs),
            per_token=bool(self.per_token),
            faithfulness=bool(self.faithfulness),
            seed=self.seed,
        )

    def steps(self, targets: int = 1) -> int:
        """Attribution steps this spec asks for: each method's steps (``method_steps``) summed,
        times ``targets`` (the output tokens each method runs for, with ``per_token``)."""
        return sum(method_steps(run)[0] for run in self.methods) * max(int(targets), 1)

    def describe_steps(self, targets: int = 1) -> str:
        """E.g. "Integrated Gradients 50 steps + LIME 200 samples, x 3 target tokens"."""
        parts = []
        for run in self.methods:
            n, unit = method_steps(run)
            parts.append(f"{get_method(run.method).title} {n} {unit}")
        text = " + ".join(parts)
        return text + (f", x {targets} target tokens" if targets > 1 else "")

    def refinement_capped(self, max_steps: int) -> ExplanationSpec:
        """The spec with every step refinement (Integrated Gradients' ``auto_steps``) stopping
        at ``max_steps`` at most (never below the method's own ``steps``); unchanged when no
        refinement goes that far. The returned spec records the lowered ``max_steps``."""
        runs = []
        for run in self.methods:
            options = get_method(run.method).make_options(run.options_dict())
            ceiling = getattr(options, "max_steps", None)
            if getattr(options, "auto_steps", False) and isinstance(ceiling, int):
                capped = max(min(ceiling, max_steps), options.steps)
                if capped != ceiling:
                    run = MethodRun(run.method, {**run.options_dict(), "max_steps": capped})
            runs.append(run)
        return dataclasses.replace(self, methods=tuple(runs))
