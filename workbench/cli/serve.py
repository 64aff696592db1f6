"""``workbench serve [Streamlit options]``: start the app with the repo's Streamlit config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "workbench" / "app.py"


def serve(args, extra: list[str]) -> int:
    # Streamlit reads .streamlit/config.toml from the working directory.
    command = [sys.executable, "-m", "streamlit", "run", str(APP), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.call(command, cwd=REPO, env=env)
    except KeyboardInterrupt:
        return 0


def register(sub) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the app (default http://localhost:8501)",
        description="Serve the workbench. Extra options go to Streamlit, e.g. --server.port 8600.",
    )
    parser.set_defaults(func=serve, accepts_extra=True)
