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


def serve(args, extra: list[str]) -> int:
    command, cwd, env = serve_command(extra)
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
    parser.set_defaults(func=serve, accepts_extra=True)
