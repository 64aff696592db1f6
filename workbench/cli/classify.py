"""``workbench classify MODEL TEXT [--json]``: label and class probabilities."""

from __future__ import annotations

from workbench.cli.common import open_workbench, print_json, progress_printer


def classify(args, _extra) -> int:
    model = open_workbench().load(args.model, progress=progress_printer)
    result = model.classify(args.text)
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.label)
        for label, p in sorted(result.scores.items(), key=lambda kv: -kv[1]):
            print(f"  {label:20} {p:.3f}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("classify", help="classify a text with a classifier model")
    parser.add_argument("model", help="a classifier, e.g. one made with `workbench finetune`")
    parser.add_argument("text")
    parser.add_argument("--json", action="store_true", help="label, scores, logits, provenance")
    parser.set_defaults(func=classify)
