"""The pages and the HTTP API share one engine: a model loaded through the API shows as loaded
on the Models & system page of the same `workbench serve` process."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from tests.conftest import ARTIFACTS, served_workbench

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_model_loaded_through_the_api_is_loaded_for_the_pages(shared_home, tmp_path, browser):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(shared_home / "models" / "minilm-l6", home / "models" / "minilm-l6")
    context = browser.new_context(viewport={"width": 1400, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    with served_workbench(home, name="api-browser") as url:
        try:
            page.goto(url + "/models")
            page.get_by_text("No model is loaded yet").wait_for()  # the pages' engine: empty

            body = json.dumps({"model": "minilm-l6", "input": "a cat"}).encode()
            request = urllib.request.Request(
                url + "/v1/embeddings", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=120) as r:
                assert r.status == 200 and json.loads(r.read())["run_id"]

            page.goto(url + "/models")
            page.get_by_role("heading", name="Loaded models").wait_for()
            page.get_by_role("heading", name="System", exact=True).wait_for()
            page.locator('[data-testid="stMetric"]').first.wait_for()  # the page has drawn fully
            page.locator('[data-testid="stDataFrame"]').first.wait_for()
            assert page.get_by_text("No model is loaded yet").count() == 0
            page.screenshot(path=str(ARTIFACTS / "api-shared-engine.png"))
        finally:
            context.close()
