"""The embedded SmolLM2: greedy output through the engine, the CLI and the page is identical to
plain transformers ``generate``; its chat template is used in chat mode."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.conftest import SHARED_HOME

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
N = 8


def test_smollm_greedy_is_identical_everywhere(smollm, monkeypatch, capsys):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from engine.generation import GenerationSettings, prepare
    from engine.generation.chat import ChatMessage
    from workbench.cli import main

    loaded = smollm.loaded
    enc = loaded.tokenizer(PROMPT, return_tensors="pt")
    with loaded.use(), torch.inference_mode():
        out = loaded.model.generate(**enc, max_new_tokens=N, do_sample=False)
    plain = out[0, enc["input_ids"].shape[1] :].tolist()

    engine_ids = [t.id for t in smollm.generate(PROMPT, max_new_tokens=N, greedy=True).tokens]
    assert engine_ids == plain
    assert "Paris" in loaded.tokenizer.decode(plain)

    monkeypatch.setenv("WORKBENCH_HOME", str(SHARED_HOME))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    capsys.readouterr()
    assert (
        main(["generate", "smollm2-135m", PROMPT, "--max-new-tokens", str(N), "--greedy", "--json"])
        == 0
    )
    assert [t["id"] for t in json.loads(capsys.readouterr().out)["tokens"]] == plain

    st.cache_resource.clear()
    at = AppTest.from_file("../workbench/app.py", default_timeout=120).run()
    at.switch_page("../pages/generate.py").run()
    at.text_area(key="gen_input").input(PROMPT)
    at.number_input(key="gen_max_new_tokens").set_value(N)
    at.toggle(key="gen_greedy").set_value(True)
    at.button(key="gen_go").click().run()
    deadline = time.monotonic() + 120
    while "gen_result" not in at.session_state and time.monotonic() < deadline:
        time.sleep(0.1)
        at.run()
    assert not at.exception
    assert [t.id for t in at.session_state["gen_result"].tokens] == plain
    st.cache_resource.clear()

    chat = prepare(loaded, "", GenerationSettings(), [ChatMessage("user", "Hi")])
    assert chat.model_input.startswith("<|im_start|>") and chat.model_input.endswith(
        "<|im_start|>assistant\n"
    )
