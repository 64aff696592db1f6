"""``workbench serve [Streamlit options]``: start the app with the repo's Streamlit config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "workbench" / "app.py"
# What `streamlit run` serves: an st.App with the pages (APP) and the /v1 HTTP API in one
# process, sharing one engine (see workbench/http/asgi.py).
SERVED = REPO / "workbench" / "http" / "asgi.py"

# Settings the app needs whatever folder it is started from, passed as flags as well as kept
# in REPO/.streamlit/config.toml (an installed copy has no .streamlit folder). Streamlit's
# default post-script gc.collect(2) costs ~214 ms of GIL per rerun with torch loaded and
# starves decoding when several sessions poll (see the config file). Extra options given to
# `workbench serve` come after these, so a user can still override them.
REQUIRED_FLAGS = ("--runner.postScriptGC", "false")


def serve_command(extra: list[str]) -> tuple[list[str], Path, dict[str, str]]:
    """The command line, working folder and environment ``workbench serve`` runs."""
    command = [sys.executable, "-m", "streamlit", "run", str(SERVED), *REQUIRED_FLAGS, *extra]
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


def secrets_files(extra: list[str], cwd: Path = REPO) -> list[Path]:
    """The secrets.toml files Streamlit will read: ``--secrets.files`` if given, else
    ``CWD/.streamlit/secrets.toml`` and ``~/.streamlit/secrets.toml``."""
    given: list[str] = []
    for i, arg in enumerate(extra):
        if arg == "--secrets.files" and i + 1 < len(extra):
            given.append(extra[i + 1])
        elif arg.startswith("--secrets.files="):
            given.append(arg.split("=", 1)[1])
    if given:
        return [Path(v.strip()).expanduser() for v in given]
    return [cwd / ".streamlit" / "secrets.toml", Path.home() / ".streamlit" / "secrets.toml"]


HOW_TO_LOG_IN = (
    "add an account with `workbench users add NAME --role admin`, or configure an OIDC "
    "provider in an [auth] table in .streamlit/secrets.toml"
)


def check_exposure(
    extra: list[str],
    no_auth: bool,
    *,
    require_login: bool = False,
    home: str | Path | None = None,
    cwd: Path = REPO,
) -> bool:
    """Whether the served app must require a login; refuses what would be unsafe or useless.

    Local address: no login (a single user's laptop), unless ``require_login`` (``--auth``).
    Non-local address: login required; refused when nobody could log in (no account in
    ``HOME/auth.db`` and no ``[auth]`` provider in secrets.toml), unless ``no_auth``
    (``--no-auth``: open access, shown in a banner).
    """
    from engine.auth import login_configured
    from engine.errors import InputError
    from engine.store import workbench_home

    address = listen_address(extra)
    local = address in LOCAL_ADDRESSES
    if no_auth and require_login:
        raise InputError("--auth and --no-auth contradict each other: pass one of them.")
    if no_auth or (local and not require_login):
        return False
    if login_configured(home or workbench_home(), secrets_files(extra, cwd)):
        return True
    if require_login:
        raise InputError(
            f"Cannot require a login (--auth): nobody can log in yet; {HOW_TO_LOG_IN}."
        )
    raise InputError(
        f"Refusing to serve on {address} without a login (anyone who reaches it could use "
        f"every model, notebook and run): {HOW_TO_LOG_IN}; or pass --no-auth to serve openly "
        "(the pages then say so in a banner)."
    )


def exposure_env(env: dict[str, str], *, login_required: bool, no_auth: bool) -> dict[str, str]:
    """Set the served process's ``WORKBENCH_AUTH`` / ``WORKBENCH_NO_AUTH`` (returns ``env``)."""
    env.pop("WORKBENCH_NO_AUTH", None)
    if login_required:
        env["WORKBENCH_AUTH"] = "required"
    if no_auth:
        env["WORKBENCH_NO_AUTH"] = "1"  # the app shows the open-access banner
    return env


def serve(args, extra: list[str]) -> int:
    login_required = check_exposure(extra, args.no_auth, require_login=args.auth)
    command, cwd, env = serve_command(extra)
    exposure_env(env, login_required=login_required, no_auth=args.no_auth)
    # Become the server (exec, not a child): a signal to `workbench serve` (a supervisor's
    # stop, a test's terminate) reaches Streamlit itself instead of orphaning it.
    os.chdir(cwd)
    os.execve(command[0], command, env)
    return 0  # not reached


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
    parser.add_argument(
        "--auth",
        action="store_true",
        help="require a login on localhost too (a login is always required on other addresses)",
    )
    parser.set_defaults(func=serve, accepts_extra=True)
