"""Basic generation contract on tiny models: equals plain transformers, results round-trip."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from engine.errors import InputError
from engine.generation import GenerationResult, GenerationSettings


def plain_greedy(folder, prompt, n, seq2seq=False):
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )
    start = 1 if seq2seq else ids["input_ids"].shape[1]
    return tok.decode(out[0][start:], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_greedy_equals_plain_transformers(workbench, tiny_models, which):
    folder = tiny_models[which]
    result = workbench.load(str(folder)).generate(
        "the movie was very", max_new_tokens=8, greedy=True
    )
    assert result.text == plain_greedy(folder, "the movie was very", 8, seq2seq=which == "t5")
    assert len(result.tokens) == 8
    assert all(t.logprob <= 0 for t in result.tokens)


def test_logprobs_match_a_direct_forward(workbench, tiny_models):
    model = workbench.load(str(tiny_models["llama"]))
    result = model.generate("i love this", max_new_tokens=3, greedy=True)
    tok, net = model.loaded.tokenizer, model.loaded.model
    ids = tok("i love this", return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([[t.id for t in result.tokens]])], dim=1)
    with torch.no_grad():
        logprobs = torch.log_softmax(net(full).logits[0], dim=-1)
    n = ids.shape[1]
    direct = [float(logprobs[n - 1 + i, t.id]) for i, t in enumerate(result.tokens)]
    assert direct == pytest.approx([t.logprob for t in result.tokens], abs=1e-5)


def test_seeded_sampling_is_reproducible(workbench, tiny_models):
    model = workbench.load(str(tiny_models["llama"]))
    settings = GenerationSettings(max_new_tokens=10, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    assert model.generate("hello", settings).text == model.generate("hello", settings).text


def test_result_round_trips_through_json(workbench, tiny_models, tmp_path):
    result = workbench.load(str(tiny_models["llama"])).generate(
        "hello", max_new_tokens=4, greedy=True
    )
    path = result.save(tmp_path / "run.json")
    data = json.loads(path.read_text())
    assert data["type"] == "GenerationResult"
    assert data["provenance"]["fingerprint"] == result.provenance.fingerprint
    assert "torch" in data["provenance"]["versions"]
    assert GenerationResult.load(path) == result


@pytest.mark.parametrize(
    "prompt, settings, message",
    [
        ("   ", GenerationSettings(), "prompt is empty"),
        ("hi", GenerationSettings(max_new_tokens=0), "max_new_tokens"),
        ("hi", GenerationSettings(top_p=0), "top_p"),
        ("hi", GenerationSettings(temperature=-1), "temperature"),
        ("hi " * 200, GenerationSettings(max_new_tokens=8), "context"),
    ],
)
def test_bad_input_is_a_clear_error(workbench, tiny_models, prompt, settings, message):
    model = workbench.load(str(tiny_models["llama"]))
    with pytest.raises(InputError, match=message):
        model.generate(prompt, settings)


def test_encoder_cannot_generate(workbench, tiny_models):
    with pytest.raises(InputError, match="cannot generate"):
        workbench.load(str(tiny_models["bert"])).generate("hello")
