"""Property-based tests: every engine entry point given arbitrary text (hypothesis).

Each call on the tiny offline models either returns or raises an ``EngineError`` subclass
(``InputError``, ``LimitError``, ...) with a one-line message; nothing else escapes and no
call hangs (each runs under a time limit).
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.access import User, acting_as
from engine.errors import EngineError

HOSTILE = [
    "",
    " ",
    "\n\n\n",
    "\x00",
    "</script><script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "![p](http://127.0.0.1:1/x.png)",
    "../../../../etc/passwd",
    "/etc",
    "~",
    "{input}",
    "%s%n%x",
    "\u202e\u2028\u2029\ufeff",
    "😀" * 40,
    "the " * 400,  # longer than the tiny models' 128 positions
    "a" * 5000,
    "' OR 1=1 --",
    "%",
    "_",
]
TEXT = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=80))
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIME_LIMIT_S = 60.0
STUDENT = User("stu", "student")


def outcome(fn, *args, **kwargs):
    """Run ``fn`` with a time limit: its value, or the ``EngineError`` it raised. Any other
    exception, or no answer within ``TIME_LIMIT_S``, fails the test."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except EngineError as exc:
            box["error"] = exc
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["unexpected"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT_S)
    assert not thread.is_alive(), f"{fn.__name__} did not answer within {TIME_LIMIT_S} s"
    if "unexpected" in box:
        raise AssertionError(f"{fn.__name__} raised {box['unexpected']!r}") from box["unexpected"]
    if "error" in box:
        message = str(box["error"])
        assert message and "\n" not in message.strip(), f"not one line: {message!r}"
    return box.get("value")


@pytest.fixture(scope="module")
def wb(tiny_models, tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("prop") / "home", device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def classifier(wb, tiny_models):
    return wb.load(str(tiny_models["classifier"]))


@SETTINGS
@given(text=TEXT)
def test_prepare_tokenize_and_generate(llama, text):
    from engine.generation import GenerationSettings, prepare

    greedy = GenerationSettings(max_new_tokens=2, greedy=True)
    outcome(prepare, llama.loaded, text, greedy)
    outcome(llama.loaded.encode, text)
    result = outcome(llama.generate, text, greedy)
    if result is not None:
        assert len(result.tokens) <= 2
    with acting_as(STUDENT):
        outcome(llama.generate, text, max_new_tokens=1000, greedy=True)  # over the limit


@SETTINGS
@given(text=TEXT)
def test_perplexity_and_attention(llama, text):
    outcome(llama.perplexity, text)
    result = outcome(llama.attention, text)
    if result is not None:
        assert result.attentions.shape[-1] == result.n_tokens


@SETTINGS
@given(text=TEXT)
def test_classification(classifier, text):
    outcome(classifier.classify, text)


def test_classification_longer_than_the_models_positions(classifier):
    outcome(classifier.classify, "the " * 400)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=TEXT, target=st.sampled_from(["", " good", "<b>x</b>", "\x00"]))
def test_explain(llama, text, target):
    outcome(
        llama.explain,
        text,
        target,
        method="integrated_gradients",
        options={"steps": 2},
        faithfulness=False,
    )


@SETTINGS
@given(text=TEXT)
def test_names_search_and_model_resolution(wb, text):
    from engine.catalog import resolve

    outcome(wb.notebooks.create, text)
    outcome(wb.notebooks.find, text)
    outcome(wb.notebook, text)
    outcome(wb.ledger.records, kind=text, model=text, text=text)
    with acting_as(STUDENT):
        outcome(wb.ledger.records, text=text)
        outcome(resolve, text, set(wb.store.names()))
        outcome(wb.load, text)  # never a folder or hub id for a student
    outcome(resolve, text, set())


@SETTINGS
@given(name=TEXT, data=st.binary(max_size=400), template=TEXT)
def test_uploads_and_presets(wb, name, data, template, tmp_path_factory):
    from engine.finetune import data as ftdata
    from engine.generation import presets

    clean = ftdata.safe_name(name)
    assert "/" not in clean and "\\" not in clean and not clean.startswith(".")
    assert clean not in ("", "..")
    home = tmp_path_factory.getbasetemp() / "uploads-home"
    with acting_as(STUDENT):
        path = outcome(ftdata.store_upload, home, name, data)
        if path is not None:
            assert path.resolve().parent == (home / "uploads" / "stu").resolve()
            outcome(ftdata.read_table, path)
        outcome(ftdata.read_table, name or "x.csv", data)
        outcome(presets.save_preset, home, presets.Preset(name, template))
        outcome(presets.get_preset, home, name)
