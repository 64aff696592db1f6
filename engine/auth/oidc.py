"""OIDC logins (Streamlit's ``st.login``): is a provider configured, and who is this person.

An identity maps to a built-in account when an admin linked it
(``workbench users add NAME --role ROLE --oidc EMAIL``); otherwise it gets a name of its own,
built from the email (or subject@issuer) and always holding an ``@``, so it can never be taken
for a built-in account (whose names cannot hold one), and the default role.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

from engine.access import ROLES, User
from engine.errors import InputError

MAX_NAME = 64
_UNSAFE = re.compile(r"[^a-z0-9._@+-]+")


def providers(auth: Mapping | None) -> list[str | None]:
    """Provider names in an ``[auth]`` table: None for a provider configured in ``[auth]``
    itself, then each ``[auth.NAME]`` with a ``client_id`` (the argument of ``st.login``)."""
    if not isinstance(auth, Mapping):
        return []
    found: list[str | None] = [None] if "client_id" in auth else []
    found += [k for k, v in auth.items() if isinstance(v, Mapping) and "client_id" in v]
    return found


def read_auth_table(path: str | Path) -> Mapping | None:
    """The ``[auth]`` table of a secrets.toml, or None when the file or the table is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"Cannot read {path}: {exc}") from None
    auth = table.get("auth")
    return auth if isinstance(auth, Mapping) else None


def oidc_configured(secrets_files: Iterable[str | Path]) -> bool:
    """True when one of the secrets files configures at least one OIDC provider."""
    return any(providers(read_auth_table(p)) for p in secrets_files)


def login_configured(home: str | Path, secrets_files: Iterable[str | Path] = ()) -> bool:
    """True when somebody can log in: an enabled built-in account in ``HOME/auth.db``, or an
    OIDC provider in one of ``secrets_files``."""
    from engine.auth.users import UserStore

    return UserStore(home).count() > 0 or oidc_configured(secrets_files)


def _safe(text: str) -> str:
    text = _UNSAFE.sub("-", text.strip().lower())
    text = re.sub(r"\.{2,}", ".", text).strip(".-")
    return text


def identity_name(claims: Mapping) -> str:
    """A path-safe user name for an OIDC identity with no linked account (holds an ``@``)."""
    email = claims.get("email") if claims.get("email_verified", True) is not False else None
    if isinstance(email, str) and "@" in email and _safe(email):
        name = _safe(email)
    else:
        sub = _safe(str(claims.get("sub") or "")) or "user"
        host = _safe(urlparse(str(claims.get("iss") or "")).hostname or "") or "oidc"
        name = f"{sub}@{host}"
    if "@" not in name:
        name += "@oidc"
    if len(name) > MAX_NAME:
        import hashlib

        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name[: MAX_NAME - 9] + "-" + digest
    return name


def oidc_user(claims: Mapping, home: str | Path, default_role: str = "student") -> User:
    """The ``User`` for an OIDC identity (``st.user``'s claims: ``email``, ``sub``, ``iss``).

    A linked built-in account wins (its current role; a disabled one is refused); otherwise
    ``identity_name(claims)`` with ``default_role``.
    """
    from engine.auth.users import UserStore

    if default_role not in ROLES:
        raise InputError(
            f"[workbench] oidc_default_role = {default_role!r} in secrets.toml is not a role; "
            f"use one of {', '.join(ROLES)}."
        )
    email = claims.get("email") if claims.get("email_verified", True) is not False else None
    sub = claims.get("sub")
    store = UserStore(home)
    if (Path(home).expanduser() / "auth.db").is_file():
        linked = store.for_identity(
            email if isinstance(email, str) else None, sub if isinstance(sub, str) else None
        )
        if linked is not None:
            return linked
        if store.identity_disabled(email, sub):
            from engine.access import AccessError

            raise AccessError("This account is disabled: ask an admin.")
    return User(identity_name(claims), default_role)  # type: ignore[arg-type]
