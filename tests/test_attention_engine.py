"""Attention extraction, statistics, aggregation and offline bertviz HTML on tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from engine.attention import (
    AttentionResult,
    AttentionSettings,
    extract_attention,
    head_statistics,
    head_table_csv,
)
from engine.attention.aggregate import (
    AggregationSettings,
    aggregate,
    block_groups,
    merge,
    top_edges,
    word_groups,
)
from engine.errors import EngineError, InputError

TEXT = "the movie was very good , i love the plot"


def plain_eager_attentions(folder, text: str, kind: str) -> np.ndarray:
    """Reference: a plain transformers eager forward with output_attentions=True."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        out = model(**tokenizer(text, return_tensors="pt"), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).numpy()


@pytest.fixture(scope="module")
def tiny_wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("attn-home"), device="cpu")


@pytest.mark.parametrize("name,kind", [("llama", "causal-lm"), ("bert", "encoder")])
def test_api_attentions_equal_plain_transformers_and_rows_sum_to_one(
    tiny_wb, tiny_models, name, kind
):
    model = tiny_wb.load(str(tiny_models[name]))
    result = model.attention(TEXT)
    expected = plain_eager_attentions(tiny_models[name], TEXT, kind)
    assert (
        result.attentions.shape == expected.shape == (2, 4, len(result.tokens), len(result.tokens))
    )
    assert result.attentions.dtype == np.float32
    np.testing.assert_allclose(result.attentions, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.attentions.sum(-1), 1.0, atol=1e-5)
    assert result.causal == (kind == "causal-lm")
    if result.causal:  # no weight on future keys
        assert np.allclose(np.triu(result.attentions, k=1), 0.0)
    assert result.provenance.model == str(tiny_models[name])
    np.testing.assert_array_equal(result.head(1, 2), result.attentions[1, 2])
    with pytest.raises(InputError, match="head must be in 0..3"):
        result.head(0, 4)


def test_shared_model_keeps_its_attention_implementation(tiny_wb, tiny_models):
    model = tiny_wb.load(str(tiny_models["llama"]))
    config = model.loaded.model.config
    config._attn_implementation = "sdpa"
    model.loaded.model.set_attn_implementation("sdpa")
    result = model.attention(TEXT)
    assert result.attentions.size > 0
    assert model.loaded.model.config._attn_implementation == "sdpa"


def test_bad_input_raises_clear_errors(tiny_wb, tiny_models):
    model = tiny_wb.load(str(tiny_models["llama"]))
    with pytest.raises(InputError, match="empty"):
        model.attention("   ")
    with pytest.raises(InputError, match="max_tokens=3"):
        model.attention(TEXT, AttentionSettings(max_tokens=3))
    with pytest.raises(InputError, match="max_tokens must be"):
        model.attention(TEXT, AttentionSettings(max_tokens=1))


def test_empty_weights_raise_engine_error(tiny_wb, tiny_models, monkeypatch):
    loaded = tiny_wb.load(str(tiny_models["llama"])).loaded
    original = loaded.model.forward

    class NoWeights:
        attentions = ()

    monkeypatch.setattr(
        loaded.model, "forward", lambda *a, **k: (original(*a, **k), NoWeights())[1]
    )
    with pytest.raises(EngineError, match="no attention weights"):
        extract_attention(loaded, TEXT)


def _result(attentions: np.ndarray, word_ids=None) -> AttentionResult:
    from engine.provenance import Provenance

    n = attentions.shape[-1]
    return AttentionResult(
        text="x",
        tokens=[f"t{i}" for i in range(n)],
        token_ids=list(range(n)),
        word_ids=word_ids if word_ids is not None else list(range(n)),
        attentions=attentions,
        causal=False,
        provenance=Provenance("m", "fp", "float32", "cpu"),
        seconds=0.0,
    )


def test_head_statistics_on_hand_built_heads():
    n = 5
    first = np.zeros((n, n))
    first[:, 0] = 1
    prev = np.eye(n, k=-1)
    prev[0, 0] = 1
    self_ = np.eye(n)
    uniform = np.full((n, n), 1 / n)
    stats = head_statistics(np.stack([first, prev, self_, uniform])[None].astype(np.float32))
    np.testing.assert_allclose(stats.first_token[0], [1, 0.4, 0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose(stats.previous_token[0], [0.25, 1, 0, 0.2], atol=1e-6)
    np.testing.assert_allclose(stats.self_token[0], [0.2, 0.2, 1, 0.2], atol=1e-6)
    np.testing.assert_allclose(stats.entropy[0], [0, 0, 0, np.log(n)], atol=1e-6)
    np.testing.assert_allclose(stats.mean_distance[0, 0], np.mean(np.arange(n)), atol=1e-6)
    np.testing.assert_allclose(stats.mean_distance[0, 2], 0, atol=1e-6)
    frame = stats.to_frame()
    assert list(frame.columns) == [
        "layer",
        "head",
        "entropy",
        "first_token",
        "previous_token",
        "self_token",
        "mean_distance",
    ]
    assert len(frame) == 4


def test_word_merging_keeps_rows_stochastic():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 7, 7)).astype(np.float32)
    a /= a.sum(-1, keepdims=True)
    word_ids = [-1, 0, 0, 1, 2, 2, -1]
    assert word_groups(word_ids) == [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7)]
    view = aggregate(_result(a, word_ids), AggregationSettings(merge_words=True))
    assert view.matrix.shape == (5, 5)
    np.testing.assert_allclose(view.matrix.sum(-1), 1.0, atol=1e-5)
    mean = a.mean((0, 1))
    # attention from word 1 (tokens 1-2) to word 3 (tokens 4-5): mean of rows, sum of columns
    assert view.matrix[1, 3] == pytest.approx(mean[1:3, 4:6].sum(1).mean(), abs=1e-6)
    assert "merged into 5 words" in view.description


def test_pooling_bounds_the_matrix_for_long_inputs():
    n = 300
    a = np.tril(np.ones((n, n), dtype=np.float32))
    a /= a.sum(-1, keepdims=True)
    view = aggregate(_result(a[None, None]), AggregationSettings(max_side=64))
    assert view.matrix.shape[0] <= 64 and view.matrix.shape == (len(view.labels),) * 2
    np.testing.assert_allclose(view.matrix.sum(-1), 1.0, atol=1e-5)
    assert view.spans[0][0] == 0 and view.spans[-1][1] == n
    assert len(block_groups([(i, i + 1) for i in range(10)], 20)) == 10


def test_layer_and_head_ranges_average_and_are_validated():
    a = np.zeros((3, 2, 2, 2), dtype=np.float32)
    a[..., 0] = 1.0
    a[2, 1] = [[0, 1], [0, 1]]
    view = aggregate(_result(a), AggregationSettings(layers=(2, 2), heads=(0, 1)))
    np.testing.assert_allclose(view.matrix, [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(InputError, match="layers"):
        aggregate(_result(a), AggregationSettings(layers=(0, 3)))


def test_top_edges_are_sorted_and_correct():
    m = np.array([[0.1, 0.9], [0.6, 0.4]])
    view = aggregate(_result(m[None, None].astype(np.float32)))
    edges = top_edges(view, 3)
    assert [(e.query, e.key) for e in edges] == [(0, 1), (1, 0), (1, 1)]
    assert edges[0].weight == pytest.approx(0.9)
    assert [(e.query, e.key) for e in top_edges(view, 2, include_self=False)] == [(0, 1), (1, 0)]
    np.testing.assert_allclose(merge(m, [(0, 2)]), [[1.0]])


def test_npz_and_csv_exports_keep_data_and_provenance(tiny_wb, tiny_models, tmp_path):
    result = tiny_wb.load(str(tiny_models["bert"])).attention(TEXT)
    path = result.save_npz(tmp_path / "a.npz")
    with np.load(path) as data:
        assert data["attentions"].shape == result.shape
        assert list(data["tokens"]) == result.tokens
    back = AttentionResult.load_npz(path)
    np.testing.assert_array_equal(back.attentions, result.attentions)
    assert back.provenance.fingerprint == result.provenance.fingerprint
    csv = head_table_csv(result)
    assert csv.startswith("# model: ")
    assert "fingerprint" in csv and "layer,head,entropy" in csv
    assert len([line for line in csv.splitlines() if not line.startswith("#")]) == 1 + 2 * 4


def real_sha256(folder) -> str:
    """Independent fingerprint: sha256 over each weight file's name then bytes, by name."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_provenance_names_the_real_weights_dtype_device_and_libraries(tiny_wb, tiny_models):
    import json
    import platform
    import shutil
    import time
    from importlib import metadata

    folder = tiny_models["llama"]
    before = time.time()
    model = tiny_wb.load(str(folder))
    prov = model.attention(TEXT).provenance
    assert prov.model == str(folder)
    assert prov.fingerprint == "sha256:" + real_sha256(folder)
    params = list(model.loaded.model.parameters())
    assert {f"torch.{prov.dtype}"} == {str(p.dtype) for p in params} == {"torch.float32"}
    assert {prov.device} == {str(p.device) for p in params} == {"cpu"}
    for name in ("torch", "transformers", "bertviz"):
        assert prov.versions[name] == metadata.version(name)
    assert prov.versions["python"] == platform.python_version()
    assert before <= prov.created <= time.time()
    assert prov.seed is None

    # a store entry: the manifest's fingerprint, which is the weights' real sha256
    entry = tiny_wb.store.write(
        "tiny-llama-provenance",
        lambda tmp: [shutil.copy(f, tmp) for f in folder.iterdir() if f.is_file()],
        kind="causal-lm",
        source="test",
        licence="apache-2.0",
        overwrite=True,
    )
    manifest = json.loads((entry.path / "manifest.json").read_text())
    real = real_sha256(entry.path)
    assert manifest["fingerprint"] == "sha256:" + real
    stored = tiny_wb.load("tiny-llama-provenance").attention(TEXT).provenance
    assert stored.model == "tiny-llama-provenance"
    assert real in stored.fingerprint


def test_bert_queries_and_keys_reproduce_the_attention(tiny_wb, tiny_models):
    """The neuron view's vectors are the real ones: softmax(q k^T / sqrt(d)) == attentions."""
    result = tiny_wb.load(str(tiny_models["bert"])).attention(TEXT)
    n = result.n_tokens
    assert result.queries is not None and result.keys is not None
    assert result.queries.shape[:3] == result.keys.shape[:3] == (2, 4, n)
    d = result.queries.shape[-1]
    scores = result.queries @ np.swapaxes(result.keys, -1, -2) / np.sqrt(d)
    softmax = np.exp(scores - scores.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(softmax, result.attentions, rtol=1e-4, atol=1e-6)


def test_neuron_view_refuses_rotary_models(tiny_wb, tiny_models):
    from engine.attention.neuron import neuron_view_html

    result = tiny_wb.load(str(tiny_models["llama"])).attention(TEXT)
    assert result.queries is None and result.keys is None
    with pytest.raises(InputError, match="BERT-style"):
        neuron_view_html(result)
