"""A real browser: a full Integrated Gradients run on SmolLM2 in the Explain page, its
completeness statement, the faithfulness view, and both exports (JSON and HTML)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_full_run_faithfulness_and_export(app_server, page):
    page.goto(app_server + "/explain")
    page.get_by_role("heading", name="Explain").first.wait_for()
    page.get_by_text("Pre-flight estimate").first.wait_for()
    run = page.locator(".st-key-explain_run button")
    run.click()
    # the completeness error is stated next to the result, whichever way it went
    statement = page.get_by_text(re.compile(r"Integrated Gradients (converged|did NOT converge)"))
    statement.first.wait_for(timeout=180_000)
    text = statement.first.inner_text()
    assert "completeness error" in text and "f(baseline)" in text
    # faithfulness view: AOPC figures and the deletion / insertion chart
    page.get_by_text("Comprehensiveness (AOPC)").first.wait_for()
    page.get_by_text("Sufficiency").first.wait_for()
    charts = page.locator("[data-testid='stVegaLiteChart']")
    charts.nth(1).wait_for()  # bars + curves (they draw after the text)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explain-result.png"))

    with page.expect_download() as download:
        page.locator(".st-key-explain_dl_json button").click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["type"] == "ExplanationSet" and exported["agreement"] is None
    (result,) = exported["attributions"]
    assert result["method"] == "integrated_gradients" and result["options"]["steps"] == 50
    assert result["model"] == "smollm2-135m" and result["target"]["text"] == " Paris"
    assert len(result["scores"]) == len(result["tokens"]) >= 5
    assert isinstance(result["convergence_delta"], float)
    assert result["provenance"]["fingerprint"].startswith("sha256:")
    assert {"torch", "transformers", "captum"} <= set(result["provenance"]["versions"])
    assert len(result["faithfulness"]["deletion"]) == len(result["faithfulness"]["fractions"])

    with page.expect_download() as download:
        page.locator(".st-key-explain_dl_html button").click()
    report = Path(download.value.path()).read_text()
    assert report.startswith("<!doctype html>") and "Faithfulness" in report
    assert "<script" not in report and "completeness error" in report
