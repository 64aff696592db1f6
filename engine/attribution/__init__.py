"""Attribution ("Explain"): which input tokens made the model produce this output.

Public API::

    from engine.attribution import TargetSpec, explain, available_methods, agreement
    result = explain(loaded, "The capital of France is", TargetSpec(text=" Paris"),
                     "integrated_gradients", {"steps": 50})
    result.scores            # (n_tokens,) one score per input token
    result.delta_statement() # IG's completeness error in words

Methods live in a registry (``available_methods(loaded)`` lists the compatible ones, each with
a frozen options dataclass); targets, faithfulness, agreement and the HTML report are one
module each. captum is imported lazily, inside the methods; LIME and KernelSHAP use closed-form
surrogates (``surrogate.py``) instead of captum's scikit-learn ones. For a causal LM whose
tokenizer adds no BOS token, the first token is held fixed (``TargetSpec.anchor_first``): it is
the attention sink, and moving it along IG's path breaks convergence.
"""

from engine.attribution.agreement import Agreement, agreement
from engine.attribution.explainer import estimate, explain
from engine.attribution.jobs import ExplainJob, MethodRun
from engine.attribution.registry import (
    Method,
    OptionSpec,
    all_methods,
    available_methods,
    get_method,
)
from engine.attribution.report import html_report
from engine.attribution.result import Attribution, Estimate, Faithfulness
from engine.attribution.targets import TargetSpec, label_names

__all__ = [
    "Agreement",
    "Attribution",
    "Estimate",
    "ExplainJob",
    "Faithfulness",
    "MethodRun",
    "Method",
    "OptionSpec",
    "TargetSpec",
    "agreement",
    "all_methods",
    "available_methods",
    "estimate",
    "explain",
    "get_method",
    "html_report",
    "label_names",
]
