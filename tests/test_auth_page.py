"""AppTest of the login gate: login page, wrong password, roles' navigation, logout, OIDC."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

APP = "../workbench/app.py"
PASSWORD = "correct horse battery"


@pytest.fixture
def home(tmp_path, monkeypatch):
    import streamlit as st

    from engine.access import LOCAL, acting_as
    from engine.auth import UserStore

    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    monkeypatch.setenv("WORKBENCH_AUTH", "required")
    with acting_as(LOCAL):
        store = UserStore(home)
        store.add("ana", "student", PASSWORD)
        store.add("audrey", "auditor", PASSWORD)
    st.cache_resource.clear()
    yield home
    st.cache_resource.clear()


def _pages(at: AppTest) -> set[str]:
    """File stems (pages/NAME.py) of the pages the last run put in the navigation."""
    from pathlib import Path

    return {
        Path(str(info["script_path"])).stem
        for info in at._registered_pages.values()
        if info.get("script_path")
    }


def _log_in(at: AppTest, name: str, password: str) -> AppTest:
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(password)
    next(b for b in at.button if b.label == "Log in").click()
    return at.run()


def test_login_page_then_wrong_then_right_password(home):
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Log in"]
    assert "notebook" not in _pages(at)  # no navigation before a login
    assert "_auth_token" not in at.session_state

    _log_in(at, "ana", "wrong password")
    assert not at.exception
    assert [e.value for e in at.error] == ["Wrong name or password."]
    assert [t.value for t in at.title] == ["Log in"]

    _log_in(at, "nobody", PASSWORD)  # an unknown name reads the same
    assert [e.value for e in at.error] == ["Wrong name or password."]

    _log_in(at, "ana", PASSWORD)
    assert not at.exception, at.exception
    assert "Log in" not in [t.value for t in at.title]
    assert {"notebook", "generate", "finetune", "history", "models"} <= _pages(at)
    assert any(t.value == "ana · student" for t in at.sidebar.text)
    token = at.session_state["_auth_token"]
    assert token and token not in str(at.query_params)  # never in the URL


def test_auditor_has_no_finetune_page(home):
    at = AppTest.from_file(APP, default_timeout=120).run()
    _log_in(at, "audrey", PASSWORD)
    assert not at.exception
    pages = _pages(at)
    assert "generate" in pages and "history" in pages
    assert "finetune" not in pages
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("../pages/finetune.py")


def test_rate_limit_message_after_five_failures(home):
    at = AppTest.from_file(APP, default_timeout=120).run()
    for _ in range(5):
        _log_in(at, "ana", "not the password")
        assert [e.value for e in at.error] == ["Wrong name or password."]
    _log_in(at, "ana", PASSWORD)  # even the right password waits now
    assert "Too many failed logins" in at.error[0].value
    assert [t.value for t in at.title] == ["Log in"]


def test_logout_and_removed_user_return_to_login(home):
    from engine.access import LOCAL, acting_as
    from engine.auth import Sessions, UserStore

    at = AppTest.from_file(APP, default_timeout=120).run()
    _log_in(at, "ana", PASSWORD)
    token = at.session_state["_auth_token"]
    next(b for b in at.sidebar.button if b.label == "Log out").click().run()
    assert [t.value for t in at.title] == ["Log in"]
    assert Sessions(home).user_for(token) is None  # revoked, not only forgotten

    _log_in(at, "ana", PASSWORD)
    assert "Log in" not in [t.value for t in at.title]
    with acting_as(LOCAL):
        UserStore(home).remove("ana")
    at.run()
    assert [t.value for t in at.title] == ["Log in"]


def test_no_login_page_when_login_is_not_required(home, monkeypatch):
    monkeypatch.delenv("WORKBENCH_AUTH")
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    assert "Log in" not in [t.value for t in at.title]
    assert "finetune" in _pages(at)
    assert not [b for b in at.sidebar.button if b.label == "Log out"]


OIDC_SECRETS = {
    "auth": {
        "redirect_uri": "http://localhost:8501/oauth2callback",
        "cookie_secret": "x" * 32,
        "client_id": "workbench",
        "client_secret": "secret",
        "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration",
    },
    "workbench": {"oidc_default_role": "auditor", "oidc_label": "School ID"},
}


def test_oidc_button_and_identity_mapping(home):
    from engine.access import LOCAL, acting_as
    from engine.auth import UserStore

    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in OIDC_SECRETS.items():
        at.secrets[key] = value
    at.run()
    assert any(b.label == "Log in with School ID" for b in at.button)

    # a person with no linked account: own name (with an @), default role from secrets
    at.user = {"is_logged_in": True, "email": "Zoe@School.org", "sub": "z-1"}
    at.run()
    assert not at.exception
    assert any(t.value == "zoe@school.org · auditor" for t in at.sidebar.text)
    assert "finetune" not in _pages(at)

    # an admin links the identity to an instructor account: that account and role
    with acting_as(LOCAL):
        UserStore(home).add("ms-zoe", "instructor", None, identity="zoe@school.org")
    at.run()
    assert any(t.value == "ms-zoe · instructor" for t in at.sidebar.text)
    assert "finetune" in _pages(at)


def _fragment_script():
    import streamlit as st

    from engine import access
    from workbench import login

    login.install_fragment_identity()
    user = login.gate()

    @st.fragment
    def part():
        st.button("Again", key="again")
        try:
            st.text(f"fragment acts as {access.current_user().name}")
        except access.AccessError as exc:
            st.text(f"fragment: {exc}")

    with access.acting_as(user):
        st.text(f"page acts as {access.current_user().name}")
    # A fragment's own rerun runs only its function, outside the shell's acting_as block
    # (AppTest always reruns the whole script, so call it out there to see what it sees).
    part()


def test_fragment_reruns_act_as_the_logged_in_user(home, monkeypatch):
    import streamlit as st
    from streamlit.runtime.fragment import fragment as streamlit_fragment

    monkeypatch.setattr(st, "fragment", streamlit_fragment)  # undo an earlier test's install
    at = AppTest.from_function(_fragment_script, default_timeout=60).run()
    _log_in(at, "ana", PASSWORD)
    assert [t.value for t in at.text] == ["page acts as ana", "fragment acts as ana"]
    at.button(key="again").click().run()
    assert not at.exception
    assert "fragment acts as ana" in [t.value for t in at.text]
