"""The Attention page in a real browser with every non-local request aborted: bertviz draws."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def block_outside(page) -> list[str]:
    """Abort every request that leaves the machine; returns the list of aborted URLs."""
    blocked: list[str] = []

    def only_local(route):
        url = route.request.url
        host = urlparse(url).hostname or ""
        if url.startswith(("data:", "blob:", "about:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    page.route("**/*", only_local)
    return blocked


def test_bertviz_renders_with_network_blocked(app_server, page):
    blocked = block_outside(page)
    page.goto(app_server + "/attention")
    page.get_by_role("button", name="Show attention").click()
    frame = page.frame_locator("iframe").first
    # bertviz's head view: the layer menu is filled by jQuery, the tokens drawn by d3 as svg
    frame.locator("#vis svg text").first.wait_for()
    assert frame.locator("#vis svg text").count() >= 2 * 10  # left and right token columns
    assert frame.locator("select#layer option").count() == 30  # SmolLM2: 30 layers
    assert "cat" in (frame.locator("#vis svg").first.text_content() or "")
    page.get_by_text("Head statistics").first.wait_for()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "attention-page.png"))
    # switching to the model view does not run the model again and also draws
    page.get_by_text("Model view", exact=True).click()
    frame = page.frame_locator("iframe").first
    # the model view draws one thumbnail per layer and head (30 x 9 for SmolLM2)
    frame.locator("#attn_background_29_8").wait_for(state="attached")
    assert frame.locator("select#layer").count() == 0
    assert not blocked, blocked


def test_too_long_for_minilm_keeps_its_error_then_truncates(app_server, page):
    """The reported failure, in the browser: a 757-token text on MiniLM flashed a raw
    RuntimeError and the previous text's results came back. Now the refusal stays, no old
    result is shown, and "Truncate to the model's context" runs it on 512 tokens."""
    from playwright.sync_api import expect

    page.goto(app_server + "/attention")
    picker = page.get_by_test_id("stSidebar").get_by_role("combobox", name="Model")
    picker.click()
    page.get_by_role("option", name="minilm-l6").click()
    expect(picker).to_have_value("minilm-l6", timeout=60_000)
    page.get_by_role("button", name="Show attention").click()
    expect(page.get_by_text("Head statistics")).to_be_visible(timeout=120_000)

    box = page.get_by_label("Text", exact=True)
    box.fill(" ".join(["The capital of France is Paris, and unbelievably it rains there."] * 50))
    box.press("Control+Enter")
    page.get_by_role("button", name="Show attention").click()
    error = page.get_by_text("reads at most 512 positions")
    expect(error).to_be_visible(timeout=60_000)
    page.wait_for_timeout(2_000)  # the old page lost its error within half a second
    expect(error).to_be_visible()
    expect(page.get_by_text("Head statistics")).to_have_count(0)
    assert "RuntimeError" not in page.inner_text("body")

    page.get_by_test_id("stCheckbox").get_by_text("Truncate to the model's context").click()
    page.get_by_role("button", name="Show attention").click()
    expect(page.get_by_text("The text was truncated to 512 tokens")).to_be_visible(timeout=120_000)
    expect(page.get_by_text("Results for:")).to_be_visible()
    expect(error).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "attention-truncated.png"))


def test_neuron_view_renders_with_network_blocked(page, tiny_models, tmp_path):
    """The neuron view (a BERT-style encoder's queries and keys) draws offline."""
    from engine import Workbench
    from engine.attention.neuron import neuron_view_html

    result = Workbench(home=tmp_path / "home", device="cpu").load(str(tiny_models["bert"]))
    result = result.attention("the movie was very good")
    blocked = block_outside(page)
    page.route(
        "http://127.0.0.1:9/neuron.html",
        lambda r: r.fulfill(body=neuron_view_html(result), content_type="text/html"),
    )
    page.goto("http://127.0.0.1:9/neuron.html")
    page.locator("#vis svg text", has_text="movie").first.wait_for(state="attached")
    page.wait_for_function(
        "[...document.querySelectorAll('#vis svg text')]"
        ".some(t => t.textContent.includes('movie') && t.getBoundingClientRect().width > 0)"
    )
    assert page.locator("select#layer option").count() == result.n_layers
    assert page.locator("select#att_head option").count() == result.n_heads
    assert "movie" in (page.locator("#vis svg").first.text_content() or "")
    # expand a query token: the view draws its query vector, every key vector and q x k
    assert page.locator("#vis #expanded").get_attribute("visibility") == "hidden"
    page.locator("#vis #collapsed rect[width='16']").nth(1).dispatch_event("click")
    page.wait_for_function(
        "document.querySelector('#vis #expanded').getAttribute('visibility') === 'visible'"
    )
    assert page.locator("#vis #expanded text", has_text="Query q").count() == 1
    assert page.locator("#vis #expanded #queries rect").count() > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "attention-neuron.png"))
    assert not blocked, blocked
