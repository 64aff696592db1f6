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
