"""Decode paths (engine.generation.paths): the lean decoder computes the reference's logits, the
4-bit path is exact on GGUF-grid weights, the path is chosen in one place and recorded."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.errors import InputError
from engine.generation import GenerationSettings
from engine.generation.lean import LeanDecoder
from engine.generation.paths import choose_decode_path, decoder_for
from engine.generation.quantized import pack_q4, pack_q8
from engine.reproduce import reproduce
from engine.testing import tiny_gguf_llama

GREEDY = GenerationSettings(max_new_tokens=12, greedy=True, top_alternatives=3)
PROMPTS = ("the capital of france is", "i love this movie", "hello world model language text")


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory):
    return tiny_gguf_llama(tmp_path_factory.mktemp("gguf") / "tiny-gguf-llama")


def float_linear(role, weight, bias):
    return lambda x: torch.nn.functional.linear(x, weight, bias)


def test_lean_logits_equal_the_reference_forward_with_left_padding(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    lean = LeanDecoder(model, float_linear)
    ids = torch.randint(
        3, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as batching sends it
    mask[2, :1] = 0
    with torch.inference_mode():
        got = lean.prefill(ids, mask, max_new_tokens=4)
        want = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        for _ in range(3):  # decode steps write and read the static cache
            chosen = want.argmax(-1)
            ids, mask = torch.cat([ids, chosen[:, None]], 1), torch.cat([mask, mask[:, -1:]], 1)
            got = lean.step(chosen)
            want = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_packed_weights_are_exact_on_the_gguf_grid_and_say_when_they_are_not():
    g = torch.Generator().manual_seed(1)
    d, low = torch.rand(16, 4, 1, generator=g) / 10, torch.randn(16, 4, 1, generator=g) / 10
    q = torch.randint(0, 16, (16, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 puts the minimum and the maximum on 0 and 15
    on_grid = (d * q + low).reshape(16, 128)
    x = torch.randn(3, 128, generator=g)
    packed = pack_q4(on_grid)
    assert packed.max_error < 1e-6
    assert torch.allclose(packed(x), x @ on_grid.T, atol=1e-5)
    q8 = torch.randint(-127, 128, (16, 4, 32), generator=g).float()
    q8[..., 0] = 127
    on_grid8 = (d * q8).reshape(16, 128)
    packed8 = pack_q8(on_grid8)
    assert packed8.max_error < 1e-6
    assert torch.allclose(packed8(x), x @ on_grid8.T, atol=1e-4)
    off_grid = torch.randn(16, 128, generator=g)
    assert pack_q4(off_grid).max_error > 1e-2  # a real quantization error, reported


def test_each_path_gives_the_reference_tokens_on_gguf_grid_weights(workbench, gguf_folder):
    model = workbench.load(str(gguf_folder))
    results = {
        path: [model.generate(p, replace(GREEDY, decode_path=path)) for p in PROMPTS]
        for path in ("reference", "lean", "q4")
    }
    for path, runs in results.items():
        for run in runs:
            assert run.provenance.decode_path == path
    for ref, lean, q4 in zip(*results.values(), strict=True):
        assert [t.id for t in lean.tokens] == [t.id for t in ref.tokens]
        assert [t.id for t in q4.tokens] == [t.id for t in ref.tokens]
        for a, b in zip(ref.tokens, q4.tokens, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
    assert "weights exact" in decoder_for(model.loaded, "q4").path.detail


def test_q4_on_weights_off_the_grid_says_they_are_quantized(workbench, tiny_models):
    model = workbench.load(str(tiny_models["llama"]))
    assert "weights quantized" in decoder_for(model.loaded, "q4").path.detail


def test_the_path_is_chosen_in_one_place(workbench, tiny_models, monkeypatch):
    llama = workbench.load(str(tiny_models["llama"]))
    t5 = workbench.load(str(tiny_models["t5"]))
    assert workbench.decode_path(llama.name) == "lean"  # the measured default
    assert workbench.decode_path(t5.name) == "reference"  # encoder-decoder: reference only
    monkeypatch.setenv("WORKBENCH_DECODE", "reference")
    assert workbench.decode_path(llama.name) == "reference"
    assert llama.generate("hello", GREEDY).provenance.decode_path == "reference"
    monkeypatch.setenv("WORKBENCH_DECODE", "q4")
    assert choose_decode_path(llama.loaded.model, "causal-lm") == "q4"
    monkeypatch.setenv("WORKBENCH_DECODE", "fastest")
    with pytest.raises(InputError, match="Unknown decode path 'fastest'"):
        llama.generate("hello", GREEDY)
    with pytest.raises(InputError, match="Unknown decode path"):
        GenerationSettings(decode_path="turbo").validated()


def test_sampling_with_a_seed_is_reproducible_on_the_lean_path(workbench, tiny_models):
    model = workbench.load(str(tiny_models["llama"]))
    sampled = GenerationSettings(max_new_tokens=10, seed=7, temperature=1.5, top_k=0, top_p=1.0)
    runs = [model.generate("i love", sampled) for _ in range(2)]
    assert runs[0].provenance.decode_path == "lean"
    assert [t.id for t in runs[0].tokens] == [t.id for t in runs[1].tokens]
    other = model.generate("i love", replace(sampled, seed=8))
    assert [t.id for t in other.tokens] != [t.id for t in runs[0].tokens]


def test_reproduction_takes_the_recorded_path(workbench, gguf_folder, monkeypatch):
    model = workbench.load(str(gguf_folder))
    monkeypatch.setenv("WORKBENCH_DECODE", "q4")
    run = model.start_generation(PROMPTS[0], GREEDY)
    assert run.wait().provenance.decode_path == "q4"
    monkeypatch.setenv("WORKBENCH_DECODE", "reference")  # the machine's choice changed since
    verdict = reproduce(workbench, run.id)
    assert verdict.verdict == "exact", verdict.differences
    again = workbench.ledger.get(verdict.new_run_id)
    assert "q4" in str(again.spec["settings"]["decode_path"])
