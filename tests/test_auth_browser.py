"""A real browser logs in to a served workbench: a built-in account, and OIDC through
``st.login`` against oidc-provider-mock on 127.0.0.1 (offline)."""

from __future__ import annotations

import os
import threading

import pytest
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS, served_workbench

pytestmark = pytest.mark.browser

PASSWORD = "correct horse battery"


def _nav_titles(page) -> list[str]:
    """Titles of the sidebar's page links (each link's text is its icon name, then its title)."""
    links = page.get_by_test_id("stSidebarNav").get_by_role("link").all_inner_texts()
    return [text.split("\n")[-1].strip() for text in links]


@pytest.fixture(scope="module")
def accounts_server(tmp_path_factory):
    from engine.access import LOCAL, acting_as
    from engine.auth import UserStore

    home = tmp_path_factory.mktemp("auth-home")
    with acting_as(LOCAL):
        UserStore(home).add("ana", "student", PASSWORD)
        UserStore(home).add("audrey", "auditor", PASSWORD)
    with served_workbench(home, "--auth", name="auth-server") as url:
        yield url


def _log_in(page, url: str, name: str, password: str) -> None:
    page.goto(url + "/")
    page.get_by_role("heading", name="Log in").wait_for(timeout=60_000)
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Log in", exact=True).click()


def test_built_in_account_login_in_the_browser(accounts_server, page):
    _log_in(page, accounts_server, "ana", "a wrong password")
    expect(page.get_by_text("Wrong name or password.")).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("stSidebarNav")).to_have_count(0)  # nothing behind the gate

    _log_in(page, accounts_server, "ana", PASSWORD)
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_text("ana · student")).to_be_visible(timeout=60_000)
    titles = _nav_titles(page)
    assert {"Notebook", "Generate", "Fine-tune", "History"} <= set(titles), titles
    assert "s=" not in page.url or PASSWORD not in page.url
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "login-student.png"))

    # the login lives in this browser session only: a reload (a new session) asks again,
    # and so does a direct link to a page
    page.goto(accounts_server + "/generate")
    page.get_by_role("heading", name="Log in").wait_for(timeout=60_000)
    expect(page.get_by_test_id("stSidebarNav")).to_have_count(0)

    # an auditor sees no Fine-tune page
    _log_in(page, accounts_server, "audrey", PASSWORD)
    expect(sidebar.get_by_text("audrey · auditor")).to_be_visible(timeout=60_000)
    titles = _nav_titles(page)
    assert "Generate" in titles and "Fine-tune" not in titles, titles

    sidebar.get_by_role("button", name="Log out").click()
    page.get_by_role("heading", name="Log in").wait_for(timeout=60_000)
    expect(page.get_by_test_id("stSidebarNav")).to_have_count(0)


# --- OIDC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oidc_provider():
    """oidc-provider-mock on 127.0.0.1 (a thread of this process); yields its base URL."""
    import werkzeug.serving
    from oidc_provider_mock import app as provider_app

    server = werkzeug.serving.make_server("127.0.0.1", 0, provider_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def oidc_server(oidc_provider, tmp_path):
    home = tmp_path / "home"
    secrets = tmp_path / "secrets.toml"
    # the redirect URI names the app's port, known only once it serves: Streamlit fills
    # "{port}" in redirect_uri with the port it listens on
    secrets.write_text(
        "[auth]\n"
        'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
        f'cookie_secret = "{os.urandom(16).hex()}"\n'
        'client_id = "workbench"\n'
        'client_secret = "mock-client-secret"\n'
        f'server_metadata_url = "{oidc_provider}/.well-known/openid-configuration"\n'
        "[workbench]\n"
        'oidc_label = "Mock ID"\n'
        'oidc_default_role = "auditor"\n'
    )
    flags = ("--auth", "--secrets.files", str(secrets))
    with served_workbench(home, *flags, name="auth-oidc") as url:
        yield url


def test_oidc_login_with_st_login_against_a_mock_provider(oidc_server, oidc_provider, page):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(oidc_server + "/")
    page.get_by_role("heading", name="Log in").wait_for(timeout=60_000)
    expect(page.get_by_label("Password", exact=True)).to_have_count(0)  # no built-in accounts
    page.get_by_role("button", name="Log in with Mock ID").click()

    # the provider's own page: who to log in as
    page.wait_for_url(oidc_provider + "/**", timeout=30_000)
    page.locator("input[name=sub]").fill("zoe@school.org")
    page.get_by_role("button", name="Authorize").click()

    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_text("zoe@school.org · auditor")).to_be_visible(timeout=60_000)
    assert page.url.startswith(oidc_server)
    titles = _nav_titles(page)
    assert "Generate" in titles and "Fine-tune" not in titles, titles
    # everything stayed on this machine (the mock's own page asks a CDN for its CSS; offline)
    outside = [r for r in requests if not r.startswith(("http://127.0.0.1", "data:", "blob:"))]
    assert all("cdn.jsdelivr.net/npm/@picocss" in r for r in outside), outside
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "login-oidc.png"))

    sidebar.get_by_role("button", name="Log out").click()
    page.get_by_role("heading", name="Log in").wait_for(timeout=60_000)
