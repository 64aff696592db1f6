"""Decode paths (engine.generation.paths): the lean decoder computes the reference's logits, the
int8 path stays close to them, the path is chosen in one place, recorded and re-taken."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.errors import InputError
from engine.generation import GenerationSettings
from engine.generation.int8 import pack_int8
from engine.generation.lean import LeanDecoder, float_linear
from engine.generation.paths import choose_decode_path, decoder_for
from engine.reproduce import reproduce

GREEDY = GenerationSettings(max_new_tokens=12, greedy=True, top_alternatives=3)
PROMPTS = ("the capital of france is", "i love this movie", "hello world model language text")


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


def test_lean_scores_every_position_like_the_forward(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ids = torch.randint(
        3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2)
    )
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    got = LeanDecoder(model, float_linear).score(ids)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_int8_products_are_close_smoothed_and_leave_several_rows_to_float():
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(96, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 96, generator=g))
    x = torch.randn(1, 1, 96, generator=g)  # one decode step of one row
    x[0, 0, 5] = 80.0  # an outlier channel, as language models have
    input_max = x[0, 0].abs()
    plain = pack_int8([layer], float_linear("o", [layer]), None)
    smoothed = pack_int8([layer], float_linear("o", [layer]), input_max)
    with torch.no_grad():
        want = layer(x)
    assert plain.max_error > 0 and smoothed.max_error > 0
    plain_error = (plain(x) - want).abs().max()
    smoothed_error = (smoothed(x) - want).abs().max()
    assert smoothed_error < plain_error / 2  # smoothing moves the outlier into the weights
    assert smoothed_error / want.abs().max() < 0.02
    prompt = torch.randn(1, 3, 96, generator=g)
    with torch.no_grad():
        assert torch.allclose(smoothed(prompt), layer(prompt), atol=1e-5)  # float for a prompt
    batch = torch.cat([torch.randn(2, 1, 96, generator=g), x])  # a step of 3 rows
    assert torch.equal(smoothed(batch)[2:], smoothed(x))  # a row's numbers are its own


def test_each_path_records_itself_and_lean_gives_the_reference_tokens(workbench, tiny_models):
    model = workbench.load(str(tiny_models["llama"]))
    results = {
        path: [model.generate(p, replace(GREEDY, decode_path=path)) for p in PROMPTS]
        for path in ("reference", "lean", "int8")
    }
    for path, runs in results.items():
        assert {run.provenance.decode_path for run in runs} == {path}
    for ref, lean, int8 in zip(*results.values(), strict=True):
        assert [t.id for t in lean.tokens] == [t.id for t in ref.tokens]
        for a, b in zip(ref.tokens, lean.tokens, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-5
        # int8 is not exact (the tiny model's near-ties can flip), but its first distribution
        # is the reference's to about 1e-2
        first = {a.id: a.logprob for a in ref.tokens[0].alternatives}
        for alt in int8.tokens[0].alternatives:
            if alt.id in first:
                assert abs(alt.logprob - first[alt.id]) < 0.05
    assert "int8 weights" in decoder_for(model.loaded, "int8").path.detail


def test_the_path_is_chosen_in_one_place(workbench, tiny_models, monkeypatch):
    llama = workbench.load(str(tiny_models["llama"]))
    t5 = workbench.load(str(tiny_models["t5"]))
    assert workbench.decode_path(llama.name) == "lean"  # the measured default
    assert workbench.decode_path(t5.name) == "reference"  # encoder-decoder: reference only
    monkeypatch.setenv("WORKBENCH_DECODE", "reference")
    assert workbench.decode_path(llama.name) == "reference"
    assert llama.generate("hello", GREEDY).provenance.decode_path == "reference"
    monkeypatch.setenv("WORKBENCH_DECODE", "int8")
    assert choose_decode_path(llama.loaded.model, "causal-lm") == "int8"
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


def test_reproduction_takes_the_recorded_path(workbench, tiny_models, monkeypatch):
    model = workbench.load(str(tiny_models["llama"]))
    monkeypatch.setenv("WORKBENCH_DECODE", "int8")
    run = model.start_generation(PROMPTS[0], GREEDY)
    assert run.wait().provenance.decode_path == "int8"
    monkeypatch.setenv("WORKBENCH_DECODE", "reference")  # the machine's choice changed since
    verdict = reproduce(workbench, run.id)
    assert verdict.verdict == "exact", verdict.differences
    assert workbench.ledger.get(verdict.new_run_id).spec["settings"]["decode_path"] == "int8"
