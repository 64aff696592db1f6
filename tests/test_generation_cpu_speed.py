"""oneDNN linears for CPU decoding: same numbers (to float32 rounding), undone on exit."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_llama(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()


def test_swap_keeps_logits_and_greedy_tokens_and_is_undone(tiny_llama):
    from engine.generation.cpu_speed import onednn_linears, onednn_usable

    if not onednn_usable(tiny_llama):
        pytest.skip("this torch build has no oneDNN")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        stock = tiny_llama(ids).logits
        stock_greedy = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
        with onednn_linears(tiny_llama) as swapped:
            fast = tiny_llama(ids).logits
            fast_greedy = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
    n_linear = sum(type(m) is torch.nn.Linear for m in tiny_llama.modules())
    assert swapped == n_linear > 0
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-5)
    assert torch.equal(fast_greedy, stock_greedy)
    assert not any("forward" in m.__dict__ for m in tiny_llama.modules())


def test_switched_off_by_env_and_for_training(tiny_llama, monkeypatch):
    from engine.generation.cpu_speed import onednn_linears

    monkeypatch.setenv("WORKBENCH_ONEDNN_DECODE", "0")
    with onednn_linears(tiny_llama) as swapped:
        assert swapped == 0
    monkeypatch.delenv("WORKBENCH_ONEDNN_DECODE")
    ids = torch.tensor([[1, 5, 9]])
    with onednn_linears(tiny_llama):  # with grad enabled the stock path runs: gradients flow
        tiny_llama(ids).logits.sum().backward()
    assert tiny_llama.lm_head.weight.grad is not None
