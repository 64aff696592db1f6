"""``workbench rerun FILE.json|RUN_ID [--json]``: re-run a recorded run and give the verdict."""

from __future__ import annotations

from workbench.cli.common import open_workbench, print_json


def rerun(args, _extra) -> int:
    from engine.reproduce import reproduce

    verdict = reproduce(open_workbench(), args.source)
    if args.json:
        print_json(verdict.to_dict())
    else:
        print(f"{verdict.operation} run {verdict.run_id or '(from file)'}: {verdict.verdict}")
        for line in verdict.differences:
            print(f"  {line}")
        print(f"  tolerance: {verdict.tolerance}")
        if verdict.new_run_id:
            print(f"  re-run recorded as {verdict.new_run_id}")
    return 0 if verdict.match else 1


def register(sub) -> None:
    parser = sub.add_parser("rerun", help="re-run a recorded run and compare the numbers")
    parser.add_argument("source", help="a run id from `workbench history list`, or a JSON file")
    parser.add_argument("--json", action="store_true", help="machine-readable verdict")
    parser.set_defaults(func=rerun)
