"""A real browser fine-tunes MiniLM on the shipped sentiment sample: start, live progress,
cancel, resume, then use the finished classifier."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_finetune_in_the_browser(app_server, page, shared_home):
    from engine.finetune import JobStore
    from engine.store import ModelStore

    name = f"browser-ft-{int(time.time())}"
    jobs, store = JobStore(shared_home), ModelStore(shared_home)
    before = {j.id for j in jobs.list()}
    try:
        page.goto(app_server + "/finetune")
        page.get_by_role("heading", name="New job").wait_for()
        expect(page.get_by_text("316 rows", exact=False)).to_be_visible(timeout=120_000)
        page.get_by_text("Hyper-parameters").click()
        steps = page.get_by_label("Max steps (0: use epochs)")
        # enough steps that Cancel lands mid-run even on a quiet machine (small batches are fast)
        steps.fill("40")
        steps.press("Enter")
        length = page.get_by_label("Max length (tokens)")
        length.fill("32")
        length.press("Enter")
        out = page.get_by_label("Save as (store name)")
        out.fill(name)
        out.press("Enter")
        page.get_by_role("button", name="Start fine-tuning").click()

        expect(page.get_by_text(re.compile(r"Step [1-9]/40"))).to_be_visible(timeout=180_000)
        page.get_by_role("button", name="Cancel").click()
        expect(page.get_by_text("cancelled", exact=True)).to_be_visible(timeout=120_000)
        page.get_by_role("button", name="Resume").click()
        expect(page.get_by_text("completed", exact=True)).to_be_visible(timeout=240_000)
        expect(page.get_by_text(f"Saved as {name}", exact=False)).to_be_visible()
        expect(page.get_by_text("Confusion matrix", exact=False)).to_be_visible()

        page.get_by_role("button", name=f"Use {name} in the sidebar").click()
        picker = page.get_by_test_id("stSidebar").get_by_role("combobox", name="Model")
        expect(picker).to_have_value(name, timeout=60_000)
        page.get_by_role("button", name="Run", exact=True).click()
        expect(page.get_by_text("Prediction:", exact=False)).to_be_visible(timeout=120_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "finetune-page.png"))
        assert name in store.names()
    finally:
        for job in jobs.list():
            if job.id not in before:
                if job.active:
                    jobs.cancel(job.id)
                    jobs.wait(job.id, timeout_s=60)
                jobs.delete(job.id)
        if name in store.names():
            store.remove(name)
