"""A class on one served workbench, in real browsers: ``workbench serve --auth`` with built-in
accounts (8 students, an instructor, and an admin as the control that the checked buttons
exist at all).

1. Isolation with separate browser sessions: student B sees neither A's run (History) nor A's
   notebook, and no admin control ("Other model", Unload); the instructor sees both students'
   runs with their users.
2. Load: the 8 students generate at once, several rounds each. Every answer the page shows
   equals the single-user answer computed in this process (greedy, same settings), every
   ledger record holds exactly that text, the app answers its health check throughout, and
   the ledger's ``batch_size`` shows the requests were decoded together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import statistics
import threading
import time
import urllib.request

import pytest
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, served_workbench

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PASSWORD = "a long class password"
MODEL = "smollm2-135m"
TOKENS = 8  # new tokens per request, greedy
ROUNDS = 5  # requests per student in the load test
# student -> the prompt it sends in the load test (each its own)
LOAD_PROMPTS = {
    "ana": "The capital of France is",
    "ben": "Water boils at a temperature of",
    "cai": "The largest planet in our solar system is",
    "dev": "A recipe for pancakes needs flour, eggs and",
    "eli": "The first person to walk on the moon was",
    "fay": "Photosynthesis is the process by which plants",
    "gus": "In 1492, Christopher Columbus",
    "hal": "The three primary colours are",
}
ROLES = {**dict.fromkeys(LOAD_PROMPTS, "student"), "tess": "instructor", "root": "admin"}
# the isolation test: A and B with prompts nobody else sends
PROMPT_A = "Ana's secret question zq7: the capital of Peru is"
PROMPT_B = "Ben asks: the tallest mountain in Africa is"
NOTEBOOK_A = "Ana private notebook zq7"
WAIT = 60_000  # ms for a page to show what is expected (the CPU is shared)

# The Generate page has finished a run: the live view is gone and the result is drawn (its
# text and its metrics), or an error is shown. Evaluated in the page.
FINISHED_JS = """() => {
  const error = document.querySelector('[data-testid="stAlertContentError"]');
  if (error) return 'error: ' + error.innerText;
  if (document.querySelector('.st-key-gen_stream')) return false;
  const out = document.querySelector('.st-key-gen_output .gen-output b');
  if (!out || !document.querySelector('[data-testid="stMetric"]')) return false;
  return 'done';
}"""
GREEDY_ON_JS = "() => document.querySelector('.st-key-gen_greedy input')?.checked === true"
# No script run is going on. Settings are typed, then checked once the page has settled: under
# load a value typed while an earlier run of the page was still drawing was seen replaced by
# the widget's default (the kept settings are re-assigned on every run, workbench/persist.py).
SETTLED_JS = "() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')"
GO_ENABLED_JS = "() => document.querySelector('.st-key-gen_go button')?.disabled === false"


def words(text: str) -> str:
    """``text`` with its whitespace collapsed (how the page lays text out)."""
    return " ".join(text.split())


# --- the served class -----------------------------------------------------------------------


def _health(url: str, timeout: float = 10.0) -> int | str:
    """The status of ``GET /_stcore/health``, or the error's text."""
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=timeout) as resp:
            return resp.status
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def class_server(tmp_path_factory, shared_home):
    """``workbench serve --auth`` on a private home holding the shared store's SmolLM2 (hard
    links where the file system allows) and the class's accounts; yields (url, home)."""
    from engine.access import LOCAL, acting_as
    from engine.auth import UserStore

    home = tmp_path_factory.mktemp("class-home")
    (home / "models").mkdir()

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(
        shared_home / "models" / MODEL, home / "models" / MODEL, copy_function=link_or_copy
    )
    with acting_as(LOCAL):
        users = UserStore(home)
        for name, role in ROLES.items():
            users.add(name, role, PASSWORD)

    with served_workbench(home, "--auth", name="class-server", timeout_s=60) as url:
        yield url, home


@pytest.fixture(scope="module")
def references(smollm) -> dict:
    """prompt -> the single-user answer: the same greedy settings as the page (its defaults,
    greedy on, ``TOKENS`` new tokens), one request at a time in this process."""
    from engine.generation import GenerationSettings

    settings = GenerationSettings(max_new_tokens=TOKENS, greedy=True)
    answers = {}
    for prompt in [PROMPT_A, PROMPT_B, *LOAD_PROMPTS.values()]:
        result = smollm.generate(prompt, settings)
        assert result.batch_size == 1 and result.shared_by == 1  # alone: a true reference
        answers[prompt] = result
    assert len({r.text for r in answers.values()}) == len(answers)  # prompts tell apart
    return answers


# --- one browser session (sync API) ---------------------------------------------------------


def log_in(browser, url: str, name: str, width: int = 1900):
    """A new browser context logged in as ``name``; returns (context, page)."""
    context = browser.new_context(viewport={"width": width, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(url + "/")
    page.get_by_role("heading", name="Log in").wait_for()
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in", exact=True).click()
    expect(page.get_by_test_id("stSidebar").get_by_text(f"{name} · {ROLES[name]}")).to_be_visible(
        timeout=120_000
    )
    return context, page


def open_page(page, title: str, heading: str | None = None) -> None:
    """Follow the sidebar's link to ``title`` (a new URL would be a new, logged-out session)."""
    page.get_by_test_id("stSidebarNav").get_by_role("link").filter(has_text=title).click()
    page.get_by_role("heading", name=heading or title).first.wait_for()


def set_up_generation(page, prompt: str) -> None:
    """On the Generate page: ``prompt``, ``TOKENS`` new tokens, greedy."""
    open_page(page, "Generate")
    page.locator(".st-key-gen_input textarea").fill(prompt)
    max_tokens = page.locator(".st-key-gen_max_new_tokens input")
    greedy = page.locator(".st-key-gen_greedy input")
    for _ in range(3):  # see SETTLED_JS
        max_tokens.fill(str(TOKENS))
        max_tokens.press("Enter")
        if not greedy.is_checked():
            page.locator(".st-key-gen_greedy").get_by_text("Greedy (deterministic)").click()
        page.wait_for_function(GREEDY_ON_JS)
        page.wait_for_timeout(500)
        page.wait_for_function(SETTLED_JS, polling=100)
        if max_tokens.input_value() == str(TOKENS) and greedy.is_checked():
            return
    raise AssertionError("Max new tokens / Greedy did not keep their values")


def generate(page) -> tuple[str, str]:
    """Click Generate and wait for the result: (the generated text shown, the Tokens metric)."""
    page.wait_for_function(GO_ENABLED_JS)
    page.locator(".st-key-gen_go button").click()
    page.locator(".st-key-gen_stream").wait_for()  # this run's live view replaced the last result
    state = page.wait_for_function(FINISHED_JS, polling=100).json_value()
    assert state == "done", state
    text = page.locator(".st-key-gen_output .gen-output b").inner_text()
    metric = page.locator("[data-testid='stMetric']").filter(has_text="Tokens").first
    return text, metric.inner_text().split()[-1]


def history_cells(page) -> list[str]:
    """The History table's cell texts (the grid's accessible cells) once it has loaded."""
    page.get_by_text("runs shown.").wait_for()
    cells = page.locator("[data-testid='stDataFrame'] [role='gridcell']")
    cells.first.wait_for(state="attached")  # a hidden accessible copy of the canvas grid
    return [text.strip() for text in cells.all_text_contents()]


def admin_controls(page) -> dict[str, int]:
    """How many "Other model" expanders the sidebar has and Unload buttons the Models page."""
    sidebar = page.get_by_test_id("stSidebar")
    other = sidebar.get_by_test_id("stExpander").filter(has_text="Other model").count()
    open_page(page, "Models & system")
    page.get_by_role("heading", name="Available models").wait_for()
    return {
        "other_model": other,
        "unload": page.get_by_role("button", name="Unload", exact=True).count(),
    }


@pytest.mark.timeout(600)
def test_two_students_see_only_their_own_work(class_server, references, browser):
    url, _ = class_server
    contexts = []
    try:
        # A: a notebook with a distinctive name, a generation added to it
        context_a, a = log_in(browser, url, "ana")
        contexts.append(context_a)
        a.get_by_role("heading", name="Notebook").first.wait_for()
        a.get_by_test_id("stSidebar").get_by_label("New notebook").fill(NOTEBOOK_A)
        a.get_by_test_id("stSidebar").get_by_role("button", name="Create").click()
        picker = a.get_by_role("combobox", name="Notebook")
        expect(picker).to_have_value(re.compile(re.escape(NOTEBOOK_A)), timeout=WAIT)
        set_up_generation(a, PROMPT_A)
        text_a, tokens_a = generate(a)
        assert words(text_a) == words(references[PROMPT_A].text)
        assert tokens_a == str(len(references[PROMPT_A].tokens))
        a.get_by_role("button", name="Add to notebook").click()
        expect(a.get_by_text(f"Added to notebook '{NOTEBOOK_A}' as cell 1.")).to_be_visible(
            timeout=WAIT
        )
        open_page(a, "History")
        cells_a = history_cells(a)
        assert words(PROMPT_A) in cells_a and "ana" in cells_a, cells_a  # A sees A's run

        # B, in a separate browser context: no notebook of A's, no run of A's, no admin controls
        context_b, b = log_in(browser, url, "ben")
        contexts.append(context_b)
        b.get_by_role("heading", name="Notebook").first.wait_for()
        expect(b.get_by_text("No notebook yet.")).to_be_visible(timeout=WAIT)
        assert b.get_by_text(NOTEBOOK_A).count() == 0
        assert b.get_by_text("zq7").count() == 0
        assert admin_controls(b) == {"other_model": 0, "unload": 0}
        set_up_generation(b, PROMPT_B)
        text_b, _ = generate(b)
        assert words(text_b) == words(references[PROMPT_B].text)
        open_page(b, "History")
        cells_b = history_cells(b)
        expect(b.get_by_text(re.compile(r"^1 runs shown\."))).to_be_visible(timeout=WAIT)
        assert words(PROMPT_B) in cells_b and "ben" in cells_b, cells_b
        assert not any("zq7" in cell or cell == "ana" for cell in cells_b), cells_b
        b.get_by_label("Input contains").fill("zq7")
        b.get_by_label("Input contains").press("Enter")
        expect(b.get_by_text("No recorded run matches.")).to_be_visible(timeout=WAIT)
        open_page(b, "Notebook")  # B's own run made no notebook appear either
        expect(b.get_by_text("No notebook yet.")).to_be_visible(timeout=WAIT)
        assert b.get_by_text("zq7").count() == 0
        b.screenshot(path=str(ARTIFACTS / "class-student-b.png"))

        # the instructor reads the class's runs: both, each with its user
        context_t, t = log_in(browser, url, "tess")
        contexts.append(context_t)
        open_page(t, "History")
        cells_t = history_cells(t)
        expect(t.get_by_text(re.compile(r"^2 runs shown\."))).to_be_visible(timeout=WAIT)
        for prompt, user in ((PROMPT_A, "ana"), (PROMPT_B, "ben")):
            assert words(prompt) in cells_t and user in cells_t, (prompt, user, cells_t)
        t.screenshot(path=str(ARTIFACTS / "class-instructor-history.png"))

        # control: the admin does see both controls, so their absence above means something
        context_r, r = log_in(browser, url, "root")
        contexts.append(context_r)
        assert admin_controls(r) == {"other_model": 1, "unload": 1}
    finally:
        for context in contexts:
            context.close()


# --- the load test (async API: 8 sessions at once from one thread) ---------------------------


async def _student(browser, url: str, name: str, ready: asyncio.Barrier) -> dict:
    """One student: log in, open Generate, wait for the class, then ``ROUNDS`` requests.
    Returns the answers shown with their tokens metric and latency (click -> result drawn)."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1600})
    try:
        page = await context.new_page()
        page.set_default_timeout(180_000)
        await page.goto(url + "/")
        await page.get_by_role("heading", name="Log in").wait_for()
        await page.get_by_label("Name").fill(name)
        await page.get_by_label("Password", exact=True).fill(PASSWORD)
        await page.get_by_role("button", name="Log in", exact=True).click()
        await page.get_by_test_id("stSidebar").get_by_text(f"{name} · student").wait_for()
        nav = page.get_by_test_id("stSidebarNav").get_by_role("link")
        await nav.filter(has_text="Generate").click()
        await page.get_by_role("heading", name="Generate").first.wait_for()
        await page.locator(".st-key-gen_input textarea").fill(LOAD_PROMPTS[name])
        max_tokens = page.locator(".st-key-gen_max_new_tokens input")
        greedy = page.locator(".st-key-gen_greedy input")
        for setup_tries in range(1, 4):  # noqa: B007 - reported; see SETTLED_JS
            await max_tokens.fill(str(TOKENS))
            await max_tokens.press("Enter")
            if not await greedy.is_checked():
                await (
                    page.locator(".st-key-gen_greedy").get_by_text("Greedy (deterministic)").click()
                )
            await page.wait_for_function(GREEDY_ON_JS)
            await page.wait_for_timeout(500)
            await page.wait_for_function(SETTLED_JS, polling=100)
            if await max_tokens.input_value() == str(TOKENS) and await greedy.is_checked():
                break
        else:
            raise AssertionError(f"{name}: Max new tokens / Greedy did not keep their values")
        await page.wait_for_function(GO_ENABLED_JS)
        await asyncio.wait_for(ready.wait(), timeout=300)
    except BaseException:
        await ready.abort()  # the others stop waiting for this one
        await context.close()
        raise
    answers = []
    try:
        for round_ in range(ROUNDS):
            await page.wait_for_function(GO_ENABLED_JS)
            setting = await max_tokens.input_value()  # what this request will be sent with
            started = time.monotonic()
            await page.locator(".st-key-gen_go button").click()
            await page.locator(".st-key-gen_stream").wait_for()
            state = await (await page.wait_for_function(FINISHED_JS, polling=100)).json_value()
            latency = time.monotonic() - started
            assert state == "done", f"{name}: {state}"
            text = await page.locator(".st-key-gen_output .gen-output b").inner_text()
            metric = page.locator("[data-testid='stMetric']").filter(has_text="Tokens").first
            tokens = (await metric.inner_text()).split()[-1]
            setting_after = await max_tokens.input_value()
            answers.append(
                {
                    "round": round_,
                    "max_new_tokens_shown": setting,
                    "max_new_tokens_after": setting_after,
                    "text": text,
                    "tokens": tokens,
                    "latency_s": latency,
                    "end": time.monotonic(),
                }
            )
        await page.screenshot(path=str(ARTIFACTS / f"class-load-{name}.png"))
    finally:
        await context.close()
    return {"name": name, "answers": answers, "setup_tries": setup_tries}


async def _class_at_once(url: str) -> tuple[list, float]:
    """All students at once in one Chromium; returns their outcomes and when they started."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ready = asyncio.Barrier(len(LOAD_PROMPTS) + 1)
            tasks = [
                asyncio.create_task(_student(browser, url, name, ready)) for name in LOAD_PROMPTS
            ]
            # a student that failed to get ready breaks the barrier: its error shows below
            with contextlib.suppress(asyncio.BrokenBarrierError, TimeoutError):
                await asyncio.wait_for(ready.wait(), timeout=360)
            started = time.monotonic()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await browser.close()
    return outcomes, started


class HealthWatch(threading.Thread):
    """Polls ``GET /_stcore/health`` every ``every_s`` seconds until stopped."""

    def __init__(self, url: str, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.seen: list[int | str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.seen.append(_health(self.url))
            self.stopped.wait(self.every_s)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ledger_runs(home, since: float, users, expected: int) -> tuple[list, dict]:
    """The ``generate`` records of ``users`` since ``since`` (waiting up to 30 s for
    ``expected`` of them) and their results by run id, read as the local admin."""
    from engine.access import LOCAL, acting_as
    from engine.ledger import Ledger

    deadline = time.monotonic() + 30
    with acting_as(LOCAL):
        ledger = Ledger(home)
        while True:
            records = [
                r for r in ledger.records(kind="generate") if r.created >= since and r.user in users
            ]
            if len(records) >= expected or time.monotonic() > deadline:
                return records, {r.id: ledger.load_result(r) for r in records}
            time.sleep(0.5)


@pytest.mark.timeout(900)
def test_eight_students_at_once_get_their_single_user_answers(class_server, references):
    url, home = class_server
    since = time.time()
    watch = HealthWatch(url)
    watch.start()
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(out=asyncio.run(_class_at_once(url))))
    worker.start()
    worker.join(timeout=800)
    watch.stopped.set()
    watch.join(timeout=15)
    assert not worker.is_alive(), "the students did not finish"
    outcomes, started = box["out"]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failed, failed
    served = {o["name"]: o["answers"] for o in outcomes}
    records, results = _ledger_runs(home, since, set(served), len(served) * ROUNDS)

    # figures first (throughput and latency are reported, not asserted: this CPU is shared)
    latencies = [a["latency_s"] for answers in served.values() for a in answers]
    wall = max(a["end"] for answers in served.values() for a in answers) - started
    mean_latency = {
        name: statistics.mean(a["latency_s"] for a in answers) for name, answers in served.items()
    }
    most = min(mean_latency, key=mean_latency.get)
    least = max(mean_latency, key=mean_latency.get)
    batch_sizes = sorted(getattr(results[r.id], "batch_size", 0) for r in records)
    figures = {
        "students": len(served),
        "requests": len(latencies),
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "tokens_per_s": round(len(latencies) * TOKENS / wall, 1),
        "latency_p50_s": round(_percentile(latencies, 0.5), 2),
        "latency_p95_s": round(_percentile(latencies, 0.95), 2),
        # (student, answers received, mean latency in s): the best and the worst served
        "most_served": (most, len(served[most]), round(mean_latency[most], 2)),
        "least_served": (least, len(served[least]), round(mean_latency[least], 2)),
        "batch_sizes": batch_sizes,
        "shared_by": sorted(getattr(results[r.id], "shared_by", 0) for r in records),
        "health_checks": len(watch.seen),
        # tries until Max new tokens and Greedy kept their values (1: at once)
        "setup_tries": {o["name"]: o["setup_tries"] for o in outcomes},
    }
    print("\nclass load:", figures)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "class-load.txt").write_text(f"{figures}\n{served}\n")

    # every answer shown equals the single-user answer of that student's prompt
    wrong = []
    for name, answers in served.items():
        reference = references[LOAD_PROMPTS[name]]
        for answer in answers:
            shown = (words(answer["text"]), answer["tokens"], answer["max_new_tokens_shown"])
            if shown != (words(reference.text), str(len(reference.tokens)), str(TOKENS)):
                wrong.append((name, answer["round"], shown, reference.text))
    assert not wrong, wrong
    assert {name: len(a) for name, a in served.items()} == dict.fromkeys(LOAD_PROMPTS, ROUNDS)

    # the app answered its health check throughout, and still does
    assert watch.seen and all(status == 200 for status in watch.seen), watch.seen
    assert _health(url) == 200

    # the ledger: each student's runs under its own name, each exactly the reference
    per_user = {name: [r for r in records if r.user == name] for name in served}
    assert {n: len(rs) for n, rs in per_user.items()} == dict.fromkeys(LOAD_PROMPTS, ROUNDS)
    for name, recs in per_user.items():
        reference = references[LOAD_PROMPTS[name]]
        for record in recs:
            result = results[record.id]
            assert record.status == "done", record
            assert result.prompt == LOAD_PROMPTS[name], (name, result.prompt)
            assert result.text == reference.text, (name, result.text, reference.text)
            assert [t.id for t in result.tokens] == [t.id for t in reference.tokens], name
    # concurrent greedy requests on one model were decoded together at least once
    assert max(batch_sizes) >= 2, batch_sizes
