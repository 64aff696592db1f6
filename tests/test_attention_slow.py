"""The embedded models: SmolLM2 (causal) and MiniLM (encoder) attentions equal plain
transformers eager attentions; the bertviz HTML stays under budget or is refused."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEXT = "The capital of France is Paris, and unbelievably it rains there."


def plain_attentions(loaded, text: str) -> np.ndarray:
    """A fresh transformers model from the same folder, eager, output_attentions=True."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if loaded.kind == "causal-lm" else AutoModel
    model = cls.from_pretrained(loaded.path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(loaded.path)
    with torch.inference_mode():
        out = model(**tokenizer(text, return_tensors="pt"), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).numpy()


@pytest.mark.parametrize("fixture,shape", [("smollm", (30, 9)), ("minilm", (6, 12))])
def test_embedded_models_match_plain_transformers(request, fixture, shape):
    from engine.attention.aggregate import AggregationSettings, aggregate
    from engine.attention.views import bertviz_html

    model = request.getfixturevalue(fixture)
    before = model.loaded.model.config._attn_implementation
    result = model.attention(TEXT)
    assert model.loaded.model.config._attn_implementation == before  # restored after the run
    assert result.shape[:2] == shape
    expected = plain_attentions(model.loaded, TEXT)
    np.testing.assert_allclose(result.attentions, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.attentions.sum(-1), 1.0, atol=1e-4)
    words = aggregate(result, AggregationSettings(merge_words=True))
    assert "unbelievably" in [w.strip() for w in words.labels]
    html = bertviz_html(result, "head")
    assert len(html) < 5_000_000 and "cdnjs" not in html


def test_minilm_long_text_is_refused_then_truncated_to_its_512_positions(minilm):
    """The reported failure: a 757-token text on MiniLM gave a raw RuntimeError (tensor a (757)
    vs b (512)). Now: a one-line InputError before running, or truncation when chosen."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from engine.attention import AttentionSettings, start_attention
    from engine.errors import InputError

    text = " ".join([TEXT] * 50)
    tokenizer = AutoTokenizer.from_pretrained(minilm.loaded.path)
    n = len(tokenizer(text)["input_ids"])
    assert n > 700
    with pytest.raises(InputError, match=rf"{n} tokens but minilm-l6 reads at most 512 positions"):
        minilm.attention(text)
    run = start_attention([("x", minilm.loaded, text)], AttentionSettings(truncate=True))
    result = run.wait(120).sides[0].result
    assert result.n_tokens == 512 and result.dropped_tokens == n - 512
    assert result.tokens[0] == "[CLS]" and result.tokens[-1] == "[SEP]"
    model = AutoModel.from_pretrained(minilm.loaded.path, attn_implementation="eager").eval()
    encoded = tokenizer(text, truncation=True, max_length=512, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.stack([a[0] for a in model(**encoded, output_attentions=True).attentions])
    np.testing.assert_allclose(result.attentions, expected.numpy(), rtol=1e-4, atol=1e-5)
