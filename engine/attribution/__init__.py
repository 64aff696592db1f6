"""Attribution ("Explain"): which input tokens made the model produce this output.

Public API::

    from engine.attribution import ExplanationSpec, MethodRun, TargetSpec, start_explanation
    run = start_explanation(model, ExplanationSpec(
        "The capital of France is", TargetSpec(text=" Paris"),
        methods=(MethodRun("integrated_gradients", {"steps": 50}), MethodRun("occlusion"))))
    result = run.wait()            # ExplanationSet: attributions, agreement table, provenance
    result.attributions[0].scores  # (n_tokens,) one score per input token

    explain(loaded, text, TargetSpec(...), "integrated_gradients", {"steps": 50})  # one method,
                                                                                   # in this thread

Methods live in a registry (``available_methods(loaded)`` lists the compatible ones, each with
a frozen options dataclass); targets, faithfulness, agreement, the pre-flight estimate and its
timing calibration, views (frames and charts) and the HTML report are one module each. captum
is imported lazily, inside the methods; LIME and KernelSHAP use closed-form surrogates
(``surrogate.py``) instead of captum's scikit-learn ones. Random methods draw from private
generators seeded by the spec's seed, never from the process-wide ones. For a causal LM whose
tokenizer adds no BOS token, the first token is held fixed (``TargetSpec.anchor_first``): it is
the attention sink, and moving it along IG's path breaks convergence.
"""

from engine.attribution.agreement import Agreement, agreement
from engine.attribution.explainer import estimate, explain
from engine.attribution.registry import (
    Method,
    OptionSpec,
    all_methods,
    available_methods,
    get_method,
)
from engine.attribution.report import html_report
from engine.attribution.result import (
    Attribution,
    Estimate,
    ExplanationSet,
    Faithfulness,
    estimate_frame,
)
from engine.attribution.run import explain_set, start_explanation
from engine.attribution.spec import ExplanationSpec, MethodRun
from engine.attribution.targets import TargetSpec, label_names

__all__ = [
    "Agreement",
    "Attribution",
    "Estimate",
    "ExplanationSet",
    "ExplanationSpec",
    "Faithfulness",
    "Method",
    "MethodRun",
    "OptionSpec",
    "TargetSpec",
    "agreement",
    "all_methods",
    "available_methods",
    "estimate",
    "estimate_frame",
    "explain",
    "explain_set",
    "get_method",
    "html_report",
    "label_names",
    "start_explanation",
]
