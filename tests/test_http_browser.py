"""The pages and the HTTP API share one engine: a model loaded through the API shows as loaded
on the Models & system page of the same `workbench serve` process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ARTIFACTS, REPO, _free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_model_loaded_through_the_api_is_loaded_for_the_pages(shared_home, tmp_path, browser):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(shared_home / "models" / "minilm-l6", home / "models" / "minilm-l6")
    port = _free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WORKBENCH_DEVICE": "cpu"}
    env.pop("WORKBENCH_AUTH", None)
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / f"api-browser-{port}.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.cli", "serve", "--server.port", str(port),
             "--server.headless", "true", "--server.address", "127.0.0.1"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    context = browser.new_context(viewport={"width": 1400, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not start")
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
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
