"""A real browser opens the served app and sees the default model."""

import pytest
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.browser


def test_app_serves_and_shows_default_model(app_server, page):
    page.goto(app_server + "/models")
    page.get_by_text("Models & system").first.wait_for()
    picker = page.get_by_test_id("stSidebar").get_by_role("combobox", name="Model")
    expect(picker).to_have_value("smollm2-135m", timeout=120_000)
    page.get_by_text("Device:").first.wait_for()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "models-page.png"))
