"""Generation engine on tiny random models: parity with plain ``generate``, sampling, stops,
context overflow, streaming + cancel, chat, presets, evaluation, comparison, seq2seq."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time

import pytest
import torch

from engine.errors import InputError
from engine.generation import (
    GenerationResult,
    GenerationSettings,
    parse_seed,
    parse_stop_sequences,
    prepare,
)
from engine.generation.chat import ChatMessage, render_chat

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("gen-home"), device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def t5(wb, tiny_models):
    return wb.load(str(tiny_models["t5"]))


def plain_generate(loaded, prompt: str, n: int, **kwargs) -> list[int]:
    """Reference: transformers' own generate, greedy, same prompt."""
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
            **kwargs,
        )
    start = 1 if loaded.kind == "seq2seq" else enc["input_ids"].shape[1]
    return out[0, start:].tolist()


def test_greedy_matches_plain_generate(llama):
    result = llama.generate(PROMPT, max_new_tokens=20, greedy=True)
    assert [t.id for t in result.tokens] == plain_generate(llama.loaded, PROMPT, 20)
    assert result.text == llama.loaded.tokenizer.decode(
        [t.id for t in result.tokens], skip_special_tokens=True
    )
    assert result.finish_reason in ("length", "eos")


def test_repetition_penalty_matches_plain_generate(llama):
    result = llama.generate(PROMPT, max_new_tokens=15, greedy=True, repetition_penalty=1.5)
    expected = plain_generate(llama.loaded, PROMPT, 15, repetition_penalty=1.5)
    assert [t.id for t in result.tokens] == expected


def test_logprobs_and_alternatives_match_a_direct_forward(llama):
    result = llama.generate(PROMPT, max_new_tokens=3, greedy=True)
    ids = llama.loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = llama.loaded.model(input_ids=ids).logits[0, -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    first = result.tokens[0]
    assert first.id == int(logprobs.argmax())
    assert first.logprob == pytest.approx(float(logprobs.max()), abs=1e-4)
    assert len(first.alternatives) == 5
    assert [a.id for a in first.alternatives] == torch.topk(logprobs, 5).indices.tolist()
    assert result.logprob == pytest.approx(sum(t.logprob for t in result.tokens))
    assert result.perplexity == pytest.approx(math.exp(-result.logprob / 3))


def test_seeded_sampling_is_reproducible_and_seed_matters(llama):
    settings = GenerationSettings(max_new_tokens=25, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    a = llama.generate(PROMPT, settings)
    b = llama.generate(PROMPT, settings)
    assert a.text == b.text and [t.id for t in a.tokens] == [t.id for t in b.tokens]
    others = {llama.generate(PROMPT, settings, seed=s).text for s in range(1, 5)}
    assert len(others | {a.text}) > 1, "different seeds should give different samples"
    # the seed is recorded, and an unseeded run records the one it drew
    unseeded = llama.generate(PROMPT, settings, seed=None)
    assert unseeded.settings.seed is not None and unseeded.provenance.seed is not None
    again = llama.generate(PROMPT, settings, seed=unseeded.settings.seed)
    assert again.text == unseeded.text


def test_temperature_zero_is_greedy(llama):
    greedy = llama.generate(PROMPT, max_new_tokens=12, greedy=True)
    zero = llama.generate(PROMPT, max_new_tokens=12, temperature=0.0, seed=3)
    assert zero.text == greedy.text


def test_stop_sequence_cuts_the_text(llama):
    full = llama.generate(PROMPT, max_new_tokens=30, greedy=True)
    words = full.text.split()
    assert len(words) > 3
    stop = " " + words[2]
    cut = llama.generate(PROMPT, max_new_tokens=30, greedy=True, stop_sequences=(stop,))
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert len(cut.tokens) < len(full.tokens)


def test_context_overflow_errors_or_keeps_last_tokens(llama):
    long_prompt = " ".join(["the movie was good"] * 40)  # 160 tokens > 128 context
    with pytest.raises(InputError, match="context of 128 tokens.*keep last tokens"):
        llama.generate(long_prompt, max_new_tokens=8, greedy=True)
    kept = llama.generate(long_prompt, max_new_tokens=8, greedy=True, keep_last_tokens=True)
    assert kept.prompt_tokens == 120 and kept.dropped_prompt_tokens == 40
    assert len(kept.tokens) == 8
    with pytest.raises(InputError, match="must be below the model's context"):
        llama.generate(PROMPT, max_new_tokens=128, greedy=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
    ],
)
def test_out_of_range_settings_are_rejected(llama, overrides, message):
    with pytest.raises(InputError, match=message):
        llama.generate(PROMPT, **overrides)


def test_bad_prompts(llama, wb, tiny_models):
    with pytest.raises(InputError, match="empty"):
        llama.generate("   ")
    # emoji, RTL and mixed scripts: unknown words for the tiny vocabulary, still generates
    result = llama.generate("مرحبا 😀 the film שלום 你好", max_new_tokens=4, greedy=True)
    assert len(result.tokens) == 4
    encoder = wb.load(str(tiny_models["bert"]))
    with pytest.raises(InputError, match="cannot generate"):
        encoder.generate(PROMPT)


def test_parse_helpers():
    assert parse_seed("") is None and parse_seed(" 42 ") == 42
    with pytest.raises(InputError, match="whole number"):
        parse_seed("4.2x")
    assert parse_stop_sequences(r"\n\n|END|") == ("\n\n", "END")


def test_json_round_trip_and_csv(llama):
    result = llama.generate(PROMPT, max_new_tokens=5, seed=1)
    data = json.loads(result.to_json())
    assert data["settings"]["seed"] == 1 and data["provenance"]["fingerprint"]
    assert "torch" in data["provenance"]["versions"]
    assert all("logprob" in t for t in data["tokens"])
    back = GenerationResult.from_dict(data)
    assert back.tokens == result.tokens and back.settings == result.settings
    lines = result.to_csv().strip().splitlines()
    assert lines[0].startswith("position,id,token,prob,logprob,alt1")
    assert len(lines) == 1 + len(result.tokens)


@contextlib.contextmanager
def slowed(model, seconds: float):
    """Make every forward pass of ``model`` take at least ``seconds`` longer."""
    from engine.testing import watching_forward

    with watching_forward(model.loaded, lambda rows: time.sleep(seconds)):
        yield


def streamed_tokens(run) -> int:
    """Tokens in the run's partial output so far (0 before the first)."""
    partial = run.snapshot().partial
    return 0 if partial is None else len(partial.tokens)


def test_stream_reports_tokens_and_stop_ends_the_run_early(llama):
    n = 100
    # Reference: left alone, this prompt runs to all n tokens (no end-of-text before), so a
    # run that ends with fewer tokens can only have been stopped.
    full = llama.generate(PROMPT, max_new_tokens=n, greedy=True)
    assert full.finish_reason == "length" and len(full.tokens) == n
    with slowed(llama, 0.02):  # at least 2 s for n tokens: a Stop that does not stop shows
        run = llama.stream(PROMPT, GenerationSettings(max_new_tokens=n, greedy=True))
        seen = []
        deadline = time.monotonic() + 30
        while not run.done and time.monotonic() < deadline:
            seen.append(streamed_tokens(run))
            if seen[-1] >= 3:
                run.cancel()
                break
            time.sleep(0.002)
        result = run.wait(timeout=10)
    assert seen and seen[-1] >= 3, f"tokens did not stream: {seen[-5:]}"
    assert seen == sorted(seen), "the streamed token count must only grow"
    assert result.finish_reason == "cancelled"
    assert 3 <= len(result.tokens) < n // 5, len(result.tokens)
    # what was generated before the stop is the start of the uninterrupted run
    assert [t.id for t in result.tokens] == [t.id for t in full.tokens][: len(result.tokens)]
    assert run.snapshot().finished
    assert not llama.loaded.busy, "the model lock must be released once stopped"


def test_stop_releases_the_lock_mid_run(llama):
    """A slow step (simulated) shows Stop returns within one step, not at max_new_tokens."""
    with slowed(llama, 0.05):  # 100 tokens would take at least 5 s
        run = llama.stream(PROMPT, GenerationSettings(max_new_tokens=100, greedy=True))
        while streamed_tokens(run) < 2 and not run.done:
            time.sleep(0.01)
        assert not run.done, "the run ended before it could be stopped"
        stopped_at = time.monotonic()
        run.cancel()
        result = run.wait(timeout=5)
        assert time.monotonic() - stopped_at < 1.0
    assert result.finish_reason == "cancelled" and 2 <= len(result.tokens) < 20
    assert not llama.loaded.busy
    acquired = threading.Event()
    with llama.loaded.use(timeout_s=1):
        acquired.set()
    assert acquired.is_set()


def test_streaming_bad_input_raises_before_the_thread(llama):
    with pytest.raises(InputError):
        llama.stream("", GenerationSettings())


def test_chat_without_template_uses_a_plain_transcript(llama):
    messages = [ChatMessage("system", "be good"), ChatMessage("user", "hello world")]
    rendered = render_chat(llama.loaded.tokenizer, messages)
    assert rendered == "System: be good\nUser: hello world\nAssistant:"
    result = llama.chat(messages, max_new_tokens=4, greedy=True)
    assert result.mode == "chat" and result.model_input == rendered and len(result.tokens) == 4
    with pytest.raises(InputError, match="last chat message"):
        llama.chat([ChatMessage("assistant", "hi")])
    with pytest.raises(InputError, match="role"):
        prepare(llama.loaded, "", GenerationSettings(), [ChatMessage("robot", "hi")])


def test_presets_save_list_delete(tmp_path):
    from engine.generation import presets

    names = [p.name for p in presets.list_presets(tmp_path)]
    for wanted in ("Continue text", "Chat", "Summarize", "Translate to French", "Write code"):
        assert wanted in names
    saved = presets.save_preset(tmp_path, presets.Preset("Haiku", "Write a haiku about {input}"))
    assert (tmp_path / "presets.json").is_file()
    assert presets.get_preset(tmp_path, "Haiku") == saved
    assert saved.render("rain") == "Write a haiku about rain"
    presets.save_preset(tmp_path, presets.Preset("Summarize", "TL;DR: {input}", "chat"))
    assert presets.get_preset(tmp_path, "Summarize").template == "TL;DR: {input}"
    presets.delete_preset(tmp_path, "Haiku")
    assert "Haiku" not in [p.name for p in presets.list_presets(tmp_path)]
    with pytest.raises(InputError, match="must contain"):
        presets.save_preset(tmp_path, presets.Preset("Bad", "no placeholder"))
    with pytest.raises(InputError, match="not a saved preset"):
        presets.delete_preset(tmp_path, "Chat")


def test_perplexity_matches_a_direct_computation(llama):
    from engine.generation.evaluation import perplexity

    text = "the movie was good and the plot was great"
    result = perplexity(llama.loaded, text)
    ids = llama.loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = llama.loaded.model(input_ids=ids, labels=ids).loss
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)
    # a window smaller than the text (sliding) still scores every token
    windowed = perplexity(llama.loaded, text, window=4)
    assert len(windowed.token_logprobs) == ids.shape[1] - 1
    assert windowed.token_logprobs[0] == pytest.approx(result.token_logprobs[0], abs=1e-4)
    with pytest.raises(InputError, match="at least two tokens"):
        perplexity(llama.loaded, "movie")


# (hypothesis, reference, BLEU, chrF). BLEU is worked out by hand below each pair (sentence
# BLEU: geometric mean of the 1-4-gram precisions, exp smoothing of a zero count, times the
# brevity penalty); chrF values were computed once with sacrebleu 2.6 directly
# (sacrebleu.sentence_chrf), independently of overlap_scores.
BLEU_CASES = [
    # 1-4-gram matches 5/6, 3/5, 1/4, 0/3 (smoothed to 1/(2*3)); same length, no penalty
    (
        "the cat is on the mat",
        "the cat sat on the mat",
        100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25,
        61.9251512899325,
    ),
    # one extra word: precisions 6/7, 5/6, 4/5, 3/4; longer than the reference, no penalty
    (
        "the cat sat on the mat today",
        "the cat sat on the mat",
        100 * (3 / 7) ** 0.25,
        93.48516357545938,
    ),
    # every n-gram matches but one word short: brevity penalty exp(1 - 6/5) only
    ("the cat sat on the", "the cat sat on the mat", 100 * math.exp(-0.2), 82.47762218711755),
]


@pytest.mark.parametrize(("hypothesis", "reference", "bleu", "chrf"), BLEU_CASES)
def test_bleu_and_chrf_match_known_values(hypothesis, reference, bleu, chrf):
    from engine.generation.evaluation import overlap_scores

    scores = overlap_scores(hypothesis, reference)
    assert scores.bleu == pytest.approx(bleu, abs=1e-6)
    assert scores.chrf == pytest.approx(chrf, abs=1e-6)
    assert scores.references == (reference,)


def test_bleu_and_chrf_edges():
    import sacrebleu

    from engine.generation.evaluation import overlap_scores

    same = overlap_scores("the cat sat on the mat", "the cat sat on the mat")
    assert same.bleu == pytest.approx(100.0) and same.chrf == pytest.approx(100.0)
    diff = overlap_scores("a dog ran", "the cat sat on the mat")
    assert diff.bleu < 5 and diff.chrf < 20
    # several references: n-grams are clipped against the best match among them
    refs = ["a dog sat on a rug", "the cat is on a mat"]
    multi = overlap_scores("the cat is on the mat", refs)
    assert multi.bleu == pytest.approx(sacrebleu.sentence_bleu("the cat is on the mat", refs).score)
    assert multi.bleu > overlap_scores("the cat is on the mat", refs[0]).bleu
    assert "nrefs:2" in multi.bleu_signature
    with pytest.raises(InputError, match="reference"):
        overlap_scores("x", " ")


def test_compare_two_models_side_by_side(wb, tiny_models, tmp_path):
    from engine import testing
    from engine.generation.comparison import compare

    other = testing.tiny_llama(tmp_path / "other-llama", seed=1)
    names = [str(tiny_models["llama"]), str(other)]
    comparison = compare(wb, names, PROMPT, GenerationSettings(max_new_tokens=6, greedy=True))
    assert [o.model for o in comparison.outcomes] == names
    a, b = (o.result for o in comparison.outcomes)
    assert a.provenance.fingerprint != b.provenance.fingerprint
    assert [t.id for t in a.tokens] == plain_generate(wb.load(names[0]).loaded, PROMPT, 6)
    broken = compare(wb, [names[0], str(tiny_models["bert"])], PROMPT, GenerationSettings())
    assert broken.outcomes[1].error and "cannot generate" in broken.outcomes[1].error
    with pytest.raises(InputError, match="at least two"):
        compare(wb, names[:1], PROMPT, GenerationSettings())
    # Stop during the first model: its run ends early, the second model never starts
    cancel = threading.Event()
    stopped = compare(
        wb,
        names,
        PROMPT,
        GenerationSettings(max_new_tokens=50, greedy=True),
        cancel=cancel,
        report=lambda _f, _m: cancel.set(),
    )
    assert len(stopped.outcomes) == 1
    assert stopped.outcomes[0].result.finish_reason == "cancelled"
    assert len(stopped.outcomes[0].result.tokens) == 1


def test_seq2seq_t5_matches_plain_generate(t5):
    assert t5.kind == "seq2seq"
    result = t5.generate("translate the film is good", max_new_tokens=6, greedy=True)
    assert [t.id for t in result.tokens] == plain_generate(
        t5.loaded, "translate the film is good", 6
    )
    sampled = t5.generate("the film", max_new_tokens=6, seed=2, temperature=1.0)
    assert sampled.text == t5.generate("the film", max_new_tokens=6, seed=2, temperature=1.0).text
