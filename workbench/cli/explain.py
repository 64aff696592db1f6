"""``workbench explain MODEL TEXT [--target TEXT] [--label L] --method NAME [--json] [--html F]``.

Output paths are checked before anything is loaded or computed: a report that cannot be
written fails at once with one line, not after the whole explanation.
"""

from __future__ import annotations

import sys

from engine.files import check_writable
from workbench.cli.common import open_workbench, print_json, progress_printer


def _options(args) -> dict:
    from engine.attribution import get_method

    method = get_method(args.method)
    names = {spec.name for spec in method.option_specs()}
    given = {
        "steps": args.steps,
        "baseline": args.baseline,
        "samples": args.samples,
        "internal_batch_size": args.internal_batch_size,
        "max_steps": args.max_steps,
        "auto_steps": False if args.no_auto_steps else None,
    }
    return {k: v for k, v in given.items() if v is not None and k in names}


def explain(args, _extra) -> int:
    report = check_writable(args.html, "the HTML report") if args.html else None
    from engine.attribution import ExplanationSpec, MethodRun, TargetSpec

    options = _options(args)  # an unknown method fails here, before loading the model
    model = open_workbench().load(args.model, progress=progress_printer)
    spec = ExplanationSpec(
        args.text,
        TargetSpec(text=args.target or "", label=args.label, contrast=args.contrast),
        methods=(MethodRun(args.method, options),),
        per_token=args.per_token,
        faithfulness=not args.no_faithfulness,
        seed=args.seed,
    )
    explanation = model.start_explanation(spec).wait()  # a run, recorded in the ledger
    (result,) = explanation.attributions
    if report is not None:
        from engine.files import atomic_write_text

        atomic_write_text(report, explanation.html_report(), "the HTML report")
        print(f"report written to {report}", file=sys.stderr)
    if args.json:
        data = result.to_dict()
        data["tokens"] = list(result.tokens)
        data["scores"] = [float(s) for s in result.scores]
        data["convergence_delta"] = result.convergence_delta
        data["relative_delta"] = result.relative_delta
        data["steps_used"] = result.steps_used
        data["step_trials"] = [list(t) for t in result.step_trials]
        print_json(data)
        return 0
    print(f"{result.method_title} on {result.model}: {result.target_description}")
    print(f"score f(input) = {result.target_score:.4f} nats   ({result.seconds:.2f} s)")
    statement = result.delta_statement()
    if statement:
        print(statement)
    width = max((len(repr(t)) for t in result.tokens), default=5)
    for token, score, free in zip(result.tokens, result.scores, result.free, strict=True):
        mark = "" if free else "  (special, fixed)"
        print(f"{token!r:>{width}}  {score:+.4f}{mark}")
    f = result.faithfulness
    if f is not None:
        print(
            f"faithfulness: comprehensiveness {f.comprehensiveness:.4f} (random "
            f"{f.random_comprehensiveness:.4f}), sufficiency {f.sufficiency:.4f}"
        )
    return 0


def register(sub) -> None:
    parser = sub.add_parser(
        "explain",
        help="attribute a prediction to input tokens (captum)",
        description="Which input tokens made the model say this? Methods: "
        "integrated_gradients, saliency, input_x_gradient, gradient_shap, deeplift, "
        "feature_ablation, occlusion, shapley_value_sampling, lime, kernel_shap, "
        "attention_rollout.",
    )
    parser.add_argument("model", help="embedded alias, store name, local folder or hub id")
    parser.add_argument("text", help="the input text (the prompt, for a causal LM)")
    parser.add_argument("--target", help="causal LM: continuation to explain (default: next token)")
    parser.add_argument("--label", help="classifier: label name or index (default: predicted)")
    parser.add_argument("--contrast", help="why TARGET/LABEL rather than this alternative")
    parser.add_argument("--method", default="integrated_gradients", help="attribution method")
    parser.add_argument("--steps", type=int, help="Integrated Gradients: path steps")
    parser.add_argument(
        "--max-steps", type=int, help="Integrated Gradients: step refinement cap (default 400)"
    )
    parser.add_argument(
        "--no-auto-steps",
        action="store_true",
        help="Integrated Gradients: keep --steps even when the completeness error is above 1%%",
    )
    parser.add_argument("--baseline", choices=("pad", "zero", "mask"), help="baseline token")
    parser.add_argument("--samples", type=int, help="sampling methods: number of samples")
    parser.add_argument("--internal-batch-size", type=int, help="rows per forward pass")
    parser.add_argument("--per-token", action="store_true", help="per-output-token matrix")
    parser.add_argument("--no-faithfulness", action="store_true", help="skip deletion curves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--html", help="also write a self-contained HTML report here")
    parser.add_argument("--json", action="store_true", help="tokens, scores, delta, provenance")
    parser.set_defaults(func=explain)
