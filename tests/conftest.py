"""Shared fixtures. Tests never touch the network: the hub is forced offline."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# Integration tests share one store per checkout, so the one-off SmolLM2 conversion happens
# once per clone rather than once per test run.
SHARED_HOME = REPO / ".cache" / "test-home"


def run_cli(*args: str, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m workbench.cli ARGS`` in a subprocess on a private CPU store."""
    env = {
        **os.environ,
        "WORKBENCH_HOME": str(home),
        "WORKBENCH_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny random models: llama, bert, bert-classifier, t5."""
    from engine import testing

    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": testing.tiny_llama(root / "tiny-llama"),
        "bert": testing.tiny_bert(root / "tiny-bert"),
        "classifier": testing.tiny_bert(root / "tiny-classifier", num_labels=2),
        "t5": testing.tiny_t5(root / "tiny-t5"),
    }


@pytest.fixture
def workbench(tmp_path):
    """A CPU workbench with an empty private store."""
    from engine import Workbench

    return Workbench(home=tmp_path / "home", device="cpu")


@pytest.fixture(scope="session")
def shared_home() -> Path:
    """The per-checkout store holding the converted embedded models."""
    SHARED_HOME.mkdir(parents=True, exist_ok=True)
    return SHARED_HOME


@pytest.fixture(scope="session")
def real_workbench(shared_home):
    """One CPU workbench on the embedded models for all integration tests."""
    from engine import Workbench

    return Workbench(home=shared_home, device="cpu")


@pytest.fixture(scope="session")
def smollm(real_workbench):
    return real_workbench.load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm(real_workbench):
    return real_workbench.load("minilm-l6")


@pytest.fixture(scope="session")
def minilm_sentiment(shared_home) -> str:
    """Store name of MiniLM fine-tuned on the shipped sentiment sample (trained once if the
    shared store lacks it, about 15 s; reused while its data and base weights are unchanged)."""
    from engine.finetune.recipes import ensure_sentiment_classifier

    return ensure_sentiment_classifier(shared_home)


@pytest.fixture
def clf_data(tmp_path):
    """A tiny two-label CSV (text,label): 20 positive and 20 negative short phrases."""
    good = ["good movie", "great film", "i love this film", "a fun plot", "very good actor"]
    bad = ["bad movie", "terrible film", "i hate this film", "a boring plot", "very bad actor"]
    rows = [f"{t},positive" for t in good * 4] + [f"{t},negative" for t in bad * 4]
    path = tmp_path / "sentiment.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- real browser -------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "artifacts"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_workbench(
    home: Path,
    *flags: str,
    ready: str = "/_stcore/health",
    name: str = "server",
    env: dict | None = None,
    timeout_s: float = 90.0,
) -> Iterator[str]:
    """``workbench serve FLAGS`` on a free local port over ``home``; yields its base URL once
    ``ready`` answers 200, stops the server afterwards. Its output goes to
    ``artifacts/NAME-PORT.log``. ``env``: extra environment (what ``serve`` decides, login
    and open access, is never inherited; batching stays at its default)."""
    import time
    import urllib.request

    port = _free_port()
    environment = {**os.environ, "WORKBENCH_HOME": str(home), "WORKBENCH_DEVICE": "cpu"}
    for decided_here in ("WORKBENCH_AUTH", "WORKBENCH_NO_AUTH", "WORKBENCH_BATCHING"):
        environment.pop(decided_here, None)
    environment.update(env or {})
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / f"{name}-{port}.log"
    command = [sys.executable, "-m", "workbench.cli", "serve", *flags]
    command += ["--server.address", "127.0.0.1", "--server.port", str(port)]
    command += ["--server.headless", "true"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, cwd=REPO, env=environment, stdout=fh, stderr=fh)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"workbench serve exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(url + ready, timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
            if time.monotonic() > deadline:
                pytest.fail(f"workbench serve did not answer on {url} within {timeout_s} s; {log}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def app_server(shared_home):
    """The real app (``workbench serve``) on a free local port; yields its base URL."""
    with served_workbench(shared_home, name="streamlit") as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright. Missing browser: skip locally, FAIL under CI."""
    if not Path(CHROMIUM).exists():
        message = "chromium is not installed (make test installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message + "; under CI the browser tests must run")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    """A fresh browser tab with a tall viewport (Streamlit scrolls inside its own container)."""
    context = browser.new_context(viewport={"width": 1400, "height": 2000})
    tab = context.new_page()
    tab.set_default_timeout(120_000)
    yield tab
    context.close()
