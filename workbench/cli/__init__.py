"""``workbench`` command line. Each command group lives in its own module with ``register``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from engine.errors import EngineError

# One module per command group; each defines register(subparsers).
COMMAND_MODULES = (
    "serve",
    "models",
    "generate",
    "attention",
    "explain",
    "finetune",
    "classify",
    "history",
    "rerun",
    "notebook",
    "users",
    "keys",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="LLMOS Workbench: generate, fine-tune, attention, attribution.",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="allow pickled .bin weights (can run code)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow a model's own Python code"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"workbench.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.allow_pickle:
        os.environ["WORKBENCH_ALLOW_PICKLE"] = "1"
    if args.trust_remote_code:
        os.environ["WORKBENCH_TRUST_REMOTE_CODE"] = "1"
    try:
        return int(args.func(args, extra) or 0)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
