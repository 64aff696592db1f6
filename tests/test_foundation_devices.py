import pytest
import torch

from engine.devices import (
    choose_device,
    choose_dtype,
    choose_placement,
    default_memory_budget,
    memory_snapshot,
)
from engine.errors import InputError


def test_cpu_defaults_to_float32(monkeypatch):
    monkeypatch.delenv("WORKBENCH_DTYPE", raising=False)
    assert choose_dtype("cpu") == torch.float32


def test_overrides_from_environment(monkeypatch):
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    monkeypatch.setenv("WORKBENCH_DTYPE", "bf16")
    placement = choose_placement()
    assert placement.device == "cpu"
    assert placement.dtype == torch.bfloat16
    assert placement.dtype_name == "bfloat16"


def test_auto_choice_prefers_cuda(monkeypatch):
    monkeypatch.delenv("WORKBENCH_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_device() == "cuda"
    assert choose_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_dtype("cuda") == torch.float16


def test_auto_choice_falls_back_to_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("WORKBENCH_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert choose_device() == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert choose_device() == "cpu"


@pytest.mark.parametrize("bad", ["tpu", "gpu0"])
def test_unknown_device_is_a_clear_error(bad):
    with pytest.raises(InputError, match="Unknown device"):
        choose_device(bad)


def test_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="not available"):
        choose_device("cuda")


def test_bad_dtype_lists_choices():
    with pytest.raises(InputError, match="float32"):
        choose_dtype("cpu", "float8")


def test_memory_budget_and_snapshot(monkeypatch):
    monkeypatch.setenv("WORKBENCH_MEMORY_BUDGET_GB", "1.5")
    assert default_memory_budget("cpu") == int(1.5 * 2**30)
    monkeypatch.setenv("WORKBENCH_MEMORY_BUDGET_GB", "lots")
    with pytest.raises(InputError):
        default_memory_budget("cpu")
    snap = memory_snapshot()
    assert 0 < snap.process_rss < snap.system_total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_placement_uses_bf16_and_accounts_memory(tiny_models, tmp_path):
    from engine import Workbench

    wb = Workbench(home=tmp_path, device="cuda")
    model = wb.load(str(tiny_models["llama"]))
    info = model.info()
    assert info.device.startswith("cuda")
    assert info.dtype in {"bfloat16", "float16"}
    assert wb.memory().gpu_allocated >= info.memory_bytes
