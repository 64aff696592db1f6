"""Who is acting, what their role allows, and the limits that apply to them.

The engine checks permissions itself (pages only hide what a role may not use). The acting
user travels with the work: pages, the CLI and the HTTP API set it for a block with
``acting_as(user)``; a run captures the user that started it and its worker acts as that user,
so a ledger record, a notebook or a job always belongs to whoever asked for it.

With no user set, the caller is ``LOCAL`` (an admin: a single user on a laptop, the Python API,
the CLI) unless the process serves with login required (``WORKBENCH_AUTH=required``, set by
``workbench serve`` on a network address): then nobody is anybody until logged in.

    with acting_as(User("ana", "student")):
        require("run")                 # fine
        require("models.manage")       # AccessError: students may not ...
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, get_args

from engine.errors import EngineError, InputError

Role = Literal["admin", "instructor", "student", "auditor"]
ROLES: tuple[Role, ...] = get_args(Role)


class AccessError(EngineError, PermissionError):
    """The acting user's role does not allow this (or nobody is logged in)."""


class LimitError(EngineError):
    """A request over one of the acting user's limits (size, rate, concurrency).

    ``retry_after_s``: when a retry may succeed (rate limits), else None.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class User:
    """An authenticated person (or the local user). ``name`` owns runs, notebooks and jobs."""

    name: str
    role: Role = "student"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InputError(f"Unknown role {self.role!r}: choose one of {', '.join(ROLES)}.")

    @property
    def priority(self) -> int:
        """Scheduling priority: lower goes first (instructors and admins before students)."""
        return 0 if self.role in ("admin", "instructor") else 1


LOCAL = User("local", "admin")

# action -> roles allowed. Every engine entry point that changes or reveals something names
# one of these; `can` answers for the UI, `require` enforces in the engine.
PERMISSIONS: dict[str, frozenset[Role]] = {
    # run a loaded (or catalog) model: generate, perplexity, classify, attention, explain
    "run": frozenset({"admin", "instructor", "student"}),
    # re-run a recorded run and compare
    "reproduce": frozenset({"admin", "instructor", "student", "auditor"}),
    "finetune": frozenset({"admin", "instructor", "student"}),
    # load from a folder or hub id, unload, delete or verify store entries, prepare models
    "models.manage": frozenset({"admin"}),
    "users.manage": frozenset({"admin"}),
    # read every user's runs, notebooks and jobs (the ledger as a whole)
    "runs.read_all": frozenset({"admin", "instructor", "auditor"}),
    # cancel or resume another user's job or run
    "runs.control_all": frozenset({"admin"}),
    "notebooks.write": frozenset({"admin", "instructor", "student"}),
    "notebooks.push": frozenset({"admin", "instructor"}),
    # opt in to remote code or pickled weights when loading
    "models.unsafe": frozenset({"admin"}),
}

_ACTING: contextvars.ContextVar[User | None] = contextvars.ContextVar(
    "workbench_user", default=None
)


def auth_required() -> bool:
    """True when this process serves with login required (no implicit local admin)."""
    return os.environ.get("WORKBENCH_AUTH", "").strip().lower() == "required"


def current_user() -> User:
    """The acting user; ``LOCAL`` when none is set and login is not required.

    Raises ``AccessError`` when login is required and nobody is acting.
    """
    user = _ACTING.get()
    if user is not None:
        return user
    if auth_required():
        raise AccessError("Log in first: this workbench requires a login.")
    return LOCAL


def acting_user_or_none() -> User | None:
    """The user explicitly set for this thread/task (None if none was set)."""
    return _ACTING.get()


@contextlib.contextmanager
def acting_as(user: User | None) -> Iterator[User | None]:
    """Act as ``user`` inside the block (this thread or task only). ``None`` keeps the
    default (``LOCAL``, or nobody when login is required)."""
    token = _ACTING.set(user)
    try:
        yield user
    finally:
        _ACTING.reset(token)


def can(action: str, user: User | None = None) -> bool:
    """Whether ``user`` (default: the acting user) may do ``action`` (a key of PERMISSIONS)."""
    if action not in PERMISSIONS:
        raise KeyError(f"unknown action {action!r}")
    try:
        user = user or current_user()
    except AccessError:
        return False
    return user.role in PERMISSIONS[action]


_WHAT = {
    "run": "run models",
    "reproduce": "re-run recorded runs",
    "finetune": "fine-tune models",
    "models.manage": "load models from folders or the hub, unload or delete models",
    "users.manage": "manage users",
    "runs.read_all": "read other users' runs",
    "runs.control_all": "stop or resume other users' runs and jobs",
    "notebooks.write": "create or change notebooks",
    "notebooks.push": "push a notebook to the class",
    "models.unsafe": "load models with remote code or pickled weights",
}


def require(action: str, user: User | None = None) -> User:
    """The acting user, if allowed to do ``action``; else ``AccessError`` saying who may."""
    user = user or current_user()
    if not can(action, user):
        allowed = sorted(PERMISSIONS[action])
        raise AccessError(
            f"{user.role.capitalize()}s may not {_WHAT[action]} (allowed: {', '.join(allowed)}): "
            "ask an admin."
        )
    return user


def may_read(owner: str, user: User | None = None) -> bool:
    """Whether ``user`` may see something owned by ``owner`` (own things, or a reading role)."""
    user = user or current_user()
    return owner == user.name or can("runs.read_all", user)


def may_control(owner: str, user: User | None = None) -> bool:
    """Whether ``user`` may cancel, resume or delete something owned by ``owner``."""
    user = user or current_user()
    return owner == user.name or can("runs.control_all", user)


_REPRODUCING: contextvars.ContextVar[bool] = contextvars.ContextVar("reproducing", default=False)


@contextlib.contextmanager
def reproducing() -> Iterator[None]:
    """Inside the block, starting a run is a re-run of a recorded one: the "reproduce"
    permission suffices (auditors may re-run, not run new work)."""
    require("reproduce")
    token = _REPRODUCING.set(True)
    try:
        yield
    finally:
        _REPRODUCING.reset(token)


def in_reproduction() -> bool:
    """True inside ``reproducing()``."""
    return _REPRODUCING.get()


def require_run() -> User:
    """The acting user, if allowed to start a model run here (a re-run inside
    ``reproducing()`` needs only "reproduce")."""
    return require("reproduce" if _REPRODUCING.get() else "run")


# --- limits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request or one user may use. Sizes in tokens or bytes, rates per minute.

    A limit of 0 allows none (e.g. ``concurrent_jobs = 0``: this role may not train). The
    implicit local user (``LOCAL``: no login, a laptop, the CLI) is not limited at all
    (``engine.runs.enforced_limits``); named users, admins included, are.
    """

    max_new_tokens: int = 2048
    max_input_tokens: int = 8192
    upload_bytes: int = 256 * 2**20
    attribution_steps: int = 512
    concurrent_runs: int = 8  # running at once per user (more wait in the queue)
    concurrent_jobs: int = 4  # fine-tuning jobs queued or running per user
    requests_per_minute: int = 600


DEFAULT_LIMITS: dict[Role, Limits] = {
    "admin": Limits(),
    "instructor": Limits(max_new_tokens=1024, concurrent_runs=4, concurrent_jobs=2),
    "student": Limits(
        max_new_tokens=256,
        max_input_tokens=2048,
        upload_bytes=16 * 2**20,
        attribution_steps=128,
        concurrent_runs=1,
        concurrent_jobs=1,
        requests_per_minute=30,
    ),
    "auditor": Limits(max_new_tokens=512, concurrent_runs=2, concurrent_jobs=0),
}


def load_limits(home: str | Path | None) -> dict[Role, Limits]:
    """Limits per role: the defaults, overridden by ``HOME/limits.toml``::

        [student]
        max_new_tokens = 128
        requests_per_minute = 20

    Unknown roles or keys, or non-positive values, raise ``InputError`` naming them.
    """
    limits = dict(DEFAULT_LIMITS)
    path = Path(home) / "limits.toml" if home else None
    if path is None or not path.is_file():
        return limits
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"Cannot read {path}: {exc}") from None
    known = {f.name for f in fields(Limits)}
    for role, values in table.items():
        if role not in ROLES or not isinstance(values, dict):
            raise InputError(f"{path}: [{role}] is not a role; use one of {', '.join(ROLES)}.")
        for key, value in values.items():
            if key not in known:
                raise InputError(
                    f"{path}: unknown limit {key!r}; known: {', '.join(sorted(known))}."
                )
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{path}: {role}.{key} must be a whole number >= 0.")
        limits[role] = replace(limits[role], **values)
    return limits


_LIMITS: dict[Role, Limits] | None = None


def limits_for(user: User | None = None) -> Limits:
    """The limits of ``user``'s role (default: the acting user), from ``WORKBENCH_HOME``."""
    global _LIMITS
    user = user or current_user()
    if _LIMITS is None:
        from engine.store import workbench_home

        _LIMITS = load_limits(workbench_home())
    return _LIMITS[user.role]


def set_limits(limits: dict[Role, Limits] | None) -> None:
    """Replace the process's limits table (tests, or after editing limits.toml); None reloads."""
    global _LIMITS
    _LIMITS = limits


def check_limit(value: int, limit: int, what: str, unit: str) -> None:
    """``LimitError`` when ``value`` exceeds ``limit``: "... at most N unit for a ROLE"."""
    if value > limit:
        raise LimitError(
            f"{what} is {value:,} {unit}; {acting_role()} may use at most {limit:,} {unit} "
            "(limits.toml sets this)."
        )


def acting_role() -> str:
    """The acting user's role with its article, for messages: "a student", "an admin"."""
    role = current_user().role
    return f"{'an' if role[0] in 'aeiou' else 'a'} {role}"
