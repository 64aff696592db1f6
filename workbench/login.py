"""The login gate of a served workbench, and who is logged in on this browser session.

Only when login is required (``WORKBENCH_AUTH=required``, set by ``workbench serve`` on a
network address or with ``--auth``): the app shell calls ``gate()`` before ``st.navigation``;
with nobody logged in it draws the login page (built-in account form; a "Log in with ..."
button per OIDC provider in ``.streamlit/secrets.toml``) and stops the script.

A built-in login is a session token kept in ``st.session_state`` only: never in the URL, never
in the settings ``workbench/persist.py`` saves, so a reload or a shared link asks again. An
OIDC login is Streamlit's own identity cookie (``st.user``).

Fragments rerun without the app shell, so ``install_fragment_identity`` makes every fragment
act as the session's user too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import streamlit as st

from engine import access
from engine.access import User
from engine.errors import EngineError
from engine.store import workbench_home

TOKEN_KEY = "_auth_token"  # built-in session token (session state only)
USER_KEY = "_auth_user"  # (User, monotonic seconds when checked), for fragment reruns
RECHECK_S = 10.0  # a fragment rerun re-reads the login at most this often


# --- OIDC configuration (Streamlit secrets) ---------------------------------------------------


def _secrets_section(name: str) -> dict:
    try:
        section = st.secrets.get(name)
    except Exception:  # no secrets.toml at all, or an unreadable one
        return {}
    return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def oidc_providers() -> list[str | None]:
    """OIDC providers configured in ``[auth]`` (None: the unnamed one), for ``st.login``."""
    from engine.auth.oidc import providers

    return providers(_secrets_section("auth"))


def _provider_label(provider: str | None) -> str:
    if provider is not None:
        return provider.replace("_", " ").title()
    return str(_secrets_section("workbench").get("oidc_label") or "single sign-on")


def _oidc_claims() -> dict | None:
    """``st.user``'s claims when an OIDC login is active, else None."""
    try:
        if not st.user.is_logged_in:
            return None
        return st.user.to_dict()
    except Exception:  # no [auth] configured: st.user has no login
        return None


# --- who is logged in ---------------------------------------------------------------------


def current_login() -> User | None:
    """The user logged in on this browser session (their current role), or None."""
    from engine.auth import Sessions

    home = workbench_home()
    token = st.session_state.get(TOKEN_KEY)
    if token:
        user = Sessions(home).user_for(token)
        if user is not None:
            return user
        st.session_state.pop(TOKEN_KEY, None)  # expired, revoked, or the user was removed
    if oidc_providers():
        claims = _oidc_claims()
        if claims:
            from engine.auth import oidc_user

            role = str(_secrets_section("workbench").get("oidc_default_role") or "student")
            return oidc_user(claims, home, role)
    return None


def gate() -> User | None:
    """The logged-in user, or None when login is not required (act as ``LOCAL``).

    With login required and nobody logged in, draws the login page and stops the script.
    """
    if not access.auth_required():
        st.session_state.pop(USER_KEY, None)
        return None
    try:
        user = current_login()
    except EngineError as exc:  # e.g. a disabled OIDC account, an unusable database
        user = None
        st.error(str(exc))
    if user is None:
        st.session_state.pop(USER_KEY, None)
        # the login page as the only (hidden) page: the menu of a previous login disappears
        page = st.Page(login_page, title="Log in", icon=":material/login:", default=True)
        st.navigation([page], position="hidden").run()
        st.stop()
    st.session_state[USER_KEY] = (user, time.monotonic())
    return user


def _client() -> str:
    """The browser's address, for per-client login rate limits ("" when unknown)."""
    try:
        return str(st.context.ip_address or "")
    except Exception:
        return ""


def login_page() -> None:
    """The login form (built-in accounts) and one button per OIDC provider."""
    from engine.auth import Sessions, UserStore

    home = workbench_home()
    st.title("Log in")
    st.caption("This workbench is shared: log in to use it.")
    providers = oidc_providers()
    store = UserStore(home)
    if store.count() or not providers:
        with st.form("login_form", clear_on_submit=True, enter_to_submit=True):
            name = st.text_input("Name", key="login_name", autocomplete="username")
            password = st.text_input(
                "Password", type="password", key="login_password", autocomplete="current-password"
            )
            submitted = st.form_submit_button("Log in", type="primary")
        if submitted:
            try:
                user = store.authenticate(name.strip(), password, client=_client())
            except EngineError as exc:  # wrong name or password; too many failures
                st.error(str(exc))
            else:
                st.session_state[TOKEN_KEY] = Sessions(home).create(user)
                st.rerun()
        if not store.count() and not providers:
            st.info(
                "No account exists yet: an admin adds one with `workbench users add NAME --role admin`."
            )
    for provider in providers:
        label = f"Log in with {_provider_label(provider)}"
        if st.button(label, key=f"oidc_login_{provider or 'default'}"):
            st.login(provider) if provider else st.login()


def logout() -> None:
    """End this browser session's login (and Streamlit's OIDC cookie) and forget its state."""
    from engine.auth import Sessions

    token = st.session_state.get(TOKEN_KEY)
    if token:
        Sessions(workbench_home()).revoke(token)
    oidc = _oidc_claims() is not None
    for key in list(st.session_state):  # the next person on this tab starts clean
        del st.session_state[key]
    st.query_params.clear()  # drop the persisted-settings token (?s=) of this user
    if oidc:
        st.logout()
    st.rerun()


def sidebar(user: User | None) -> None:
    """ "name · role" and a Log out button (nothing when login is not required)."""
    if user is None:
        return
    st.sidebar.text(f"{user.name} · {user.role}")
    if st.sidebar.button("Log out", key="logout", icon=":material/logout:"):
        logout()


# --- fragments --------------------------------------------------------------------------------


def fragment_user() -> User | None:
    """The session's user inside a fragment rerun (re-checked every ``RECHECK_S``)."""
    if not access.auth_required():
        return None
    cached = st.session_state.get(USER_KEY)
    if cached and time.monotonic() - cached[1] < RECHECK_S:
        return cached[0]
    user = current_login()
    if user is None:
        st.rerun(scope="app")  # logged out meanwhile: the full run shows the login page
    st.session_state[USER_KEY] = (user, time.monotonic())
    return user


def _acting_wrapper(func: Callable) -> Callable:
    @functools.wraps(func)  # same __module__ and __qualname__: the same fragment id
    def run_as_user(*args: Any, **kwargs: Any) -> Any:
        with access.acting_as(fragment_user()):
            return func(*args, **kwargs)

    return run_as_user


def install_fragment_identity() -> None:
    """Make ``st.fragment`` wrap each fragment so it acts as the session's user.

    A fragment's rerun runs only the fragment function, not the app shell's
    ``acting_as(user)`` block, so without this it would act as nobody. Idempotent.
    """
    original = st.fragment
    if getattr(original, "_workbench_acting", False):
        return

    @functools.wraps(original)
    def fragment(func: Callable | None = None, **kwargs: Any) -> Any:
        if func is None:
            return lambda f: original(_acting_wrapper(f), **kwargs)
        return original(_acting_wrapper(func), **kwargs)

    fragment._workbench_acting = True  # type: ignore[attr-defined]
    st.fragment = fragment  # type: ignore[assignment]
