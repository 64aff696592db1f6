"""``workbench serve [Streamlit options]``: start the app with the repo's Streamlit config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "workbench" / "app.py"

# Settings the app needs whatever folder it is started from, passed as flags as well as kept
# in REPO/.streamlit/config.toml (an installed copy has no .streamlit folder). Streamlit's
# default post-script gc.collect(2) costs ~214 ms of GIL per rerun with torch loaded and
# starves decoding when several sessions poll (see the config file). Extra options given to
# `workbench serve` come after these, so a user can still override them.
REQUIRED_FLAGS = ("--runner.postScriptGC", "false")


def serve_command(extra: list[str]) -> tuple[list[str], Path, dict[str, str]]:
    """The command line, working folder and environment ``workbench serve`` runs."""
    command = [sys.executable, "-m", "streamlit", "run", str(APP), *REQUIRED_FLAGS, *extra]
    # Streamlit reads .streamlit/config.toml from the working folder: run in the repo.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return command, REPO, env


LOCAL_ADDRESSES = {"localhost", "127.0.0.1", "::1", ""}


def listen_address(extra: list[str]) -> str:
    """The address Streamlit will listen on, from ``--server.address X`` / ``=X`` (default
    local)."""
    for i, arg in enumerate(extra):
        if arg == "--server.address" and i + 1 < len(extra):
            return extra[i + 1].strip()
        if arg.startswith("--server.address="):
            return arg.split("=", 1)[1].strip()
    return "localhost"


def check_exposure(extra: list[str], no_auth: bool) -> None:
    """Refuse to serve on a network address without a login, unless ``--no-auth`` says so.

    The workbench has no login yet: anyone who reaches a non-local address could load and
    unload models, read every notebook and the run ledger.
    """
    from engine.errors import InputError

    address = listen_address(extra)
    if address not in LOCAL_ADDRESSES and not no_auth:
        raise InputError(
            f"Refusing to serve on {address} without a login: the workbench has no login yet, "
            "so anyone who reaches it could use every model, notebook and run. Serve on "
            "localhost, or pass --no-auth to serve openly (the pages then say so in a banner)."
        )


def serve(args, extra: list[str]) -> int:
    check_exposure(extra, args.no_auth)
    command, cwd, env = serve_command(extra)
    if args.no_auth:
        env["WORKBENCH_NO_AUTH"] = "1"  # the app shows the open-access banner
    try:
        return subprocess.call(command, cwd=cwd, env=env)
    except KeyboardInterrupt:
        return 0


def register(sub) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the app (default http://localhost:8501)",
        description="Serve the workbench. Extra options go to Streamlit, e.g. --server.port 8600.",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="allow a non-local --server.address without a login (shown in a banner)",
    )
    parser.set_defaults(func=serve, accepts_extra=True)
