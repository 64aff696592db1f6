"""Out of memory in a run: the run ends failed with one line (what ran out, how much was
asked, what to do), the work's tensors are freed, the model's lock is released and the next
run on the same model works. On CPU the errors are simulated (a model whose forward raises)
and real (the CPU allocator refusing, and an attention request too big for an address-space
limit set in a subprocess); on CUDA a real allocation failure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import runs
from engine.errors import MemoryBudgetError

REPO = Path(__file__).resolve().parents[1]
CUDA_TEXT = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB "
    "of which 1.20 GiB is free. Including non-PyTorch memory, this process has 77.9 GiB in use."
)
CPU_TEXT = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)"
)


# --- recognising and describing the error --------------------------------------------------


def numpy_refusal() -> MemoryError:
    try:
        np.empty(2**45, dtype=np.uint8)  # 32 TiB
    except MemoryError as exc:
        return exc
    pytest.skip("numpy allocated 32 TiB (no overcommit limit here)")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.OutOfMemoryError(CUDA_TEXT), True),
        (lambda: RuntimeError(CPU_TEXT), True),
        (MemoryError, True),
        (numpy_refusal, True),
        (lambda: RuntimeError("shape '[2, 3]' is invalid for input of size 5"), False),
        (lambda: ValueError("out of range"), False),
    ],
)
def test_allocation_failures_are_recognised_and_others_are_not(make, expected):
    assert runs.is_out_of_memory(make()) is expected


def test_numpys_refusal_says_how_much_was_asked():
    line = str(runs.out_of_memory_error(numpy_refusal(), "explain"))
    assert line.startswith("Explain ran out of CPU memory (it asked for 32.0 TiB more)")


def test_an_allocation_failure_raised_from_inside_another_error_is_recognised():
    try:
        try:
            raise torch.OutOfMemoryError(CUDA_TEXT)
        except RuntimeError as inner:
            raise ValueError("the method failed") from inner
    except ValueError as outer:
        assert runs.is_out_of_memory(outer)


def test_the_message_says_what_ran_out_how_much_was_asked_and_what_to_do():
    gpu = str(runs.out_of_memory_error(torch.OutOfMemoryError(CUDA_TEXT), "attention"))
    assert gpu.startswith("Attention ran out of GPU memory (it asked for 2.00 GiB more, 1.20 GiB")
    assert "shorter input" in gpu and "smaller batch" in gpu and "fewer steps" in gpu
    cpu = str(runs.out_of_memory_error(RuntimeError(CPU_TEXT), "explain"))
    assert cpu.startswith("Explain ran out of CPU memory (it asked for 16.00 GiB more)")
    bare = str(runs.out_of_memory_error(MemoryError(), "perplexity"))
    assert bare.startswith("Perplexity ran out of CPU memory; the memory was freed")
    assert all("\n" not in line for line in (gpu, cpu, bare))


# --- a run that runs out of memory ---------------------------------------------------------


def failing_work(error: BaseException, held: list):
    def work(ctx):
        big = torch.ones(8 * 2**20)  # 32 MiB the work holds when the allocation fails
        held.append(weakref.ref(big))
        raise error

    return work


def test_a_run_out_of_memory_fails_with_one_line_and_frees_the_works_tensors():
    held: list = []
    run = runs.start("generate", failing_work(torch.OutOfMemoryError(CUDA_TEXT), held))
    assert run.join(10)
    snap = run.snapshot()
    assert snap.state == "failed" and "\n" not in snap.error
    assert snap.error.startswith("Generate ran out of GPU memory (it asked for 2.00 GiB more")
    with pytest.raises(MemoryBudgetError, match="ran out of GPU memory"):
        run.wait(1)
    assert held[0]() is None  # freed although the run (and its error) is still held
    # the contrast: an ordinary failure keeps its traceback, and with it the work's tensor
    kept: list = []
    other = runs.start("generate", failing_work(ValueError("no"), kept))
    assert other.join(10) and other.snapshot().state == "failed"
    assert kept[0]() is not None


def test_a_real_cpu_allocator_failure_ends_the_run_and_the_next_one_works():
    def work(ctx):
        return torch.empty(2**45, dtype=torch.uint8)  # 32 TiB: the allocator refuses

    run = runs.start("attention", work)
    assert run.join(10)
    assert run.snapshot().error.startswith("Attention ran out of CPU memory (it asked for 32768")
    assert runs.start("attention", lambda ctx: torch.zeros(4).sum().item()).wait(10) == 0.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_models):
    from engine import Workbench

    wb = Workbench(home=tmp_path_factory.mktemp("oom-home"), device="cpu")
    return wb.load(str(tiny_models["llama"])).loaded


TEXT = "the cat sat on the mat"


def test_perplexity_out_of_memory_then_the_same_model_works_again(llama, monkeypatch):
    from engine.generation.evaluation import perplexity, start_perplexity

    expected = perplexity(llama, TEXT).perplexity
    held: list = []

    def forward(*args, **kwargs):
        big = torch.ones(8 * 2**20)
        held.append(weakref.ref(big))
        raise torch.OutOfMemoryError(CUDA_TEXT)

    with monkeypatch.context() as patch:
        patch.setattr(llama.model, "forward", forward)
        run = start_perplexity(llama, TEXT)
        assert run.join(30)
        assert run.snapshot().error.startswith("Perplexity ran out of GPU memory")
    assert held and all(ref() is None for ref in held)
    # the model lock was released and nothing was left behind: the next run gives the answer
    assert start_perplexity(llama, TEXT).wait(30).perplexity == pytest.approx(expected)


def test_attention_out_of_memory_releases_its_result_reservation(llama, monkeypatch):
    from engine.attention import start_attention

    budget = runs.ResultBudget(budget_bytes=2**30)
    reference = start_attention([("A", llama, TEXT)], budget=budget).wait(30)
    del reference  # drop the run's result: the budget is empty again
    import gc

    gc.collect()
    assert budget.used_bytes == 0
    gate = threading.Event()

    def forward(*args, **kwargs):
        gate.wait(10)
        raise MemoryError()

    with monkeypatch.context() as patch:
        patch.setattr(llama.model, "forward", forward)
        run = start_attention([("A", llama, TEXT)], budget=budget)
        assert budget.used_bytes > 0  # reserved while it runs
        gate.set()
        assert run.join(30)
        assert run.snapshot().error.startswith("Attention ran out of CPU memory")
        assert budget.used_bytes == 0  # released with the failure, while the run is held
    again = start_attention([("A", llama, TEXT)], budget=budget).wait(30)
    fresh = start_attention([("A", llama, TEXT)]).wait(30)
    np.testing.assert_array_equal(
        again.sides[0].result.attentions, fresh.sides[0].result.attentions
    )


REAL_ATTENTION_OOM = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from engine import Workbench, runs, testing
    from engine.attention import AttentionSettings, start_attention

    root = Path(sys.argv[1])
    tok = testing.tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    folder = root / "long-llama"
    folder.mkdir()
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    loaded = Workbench(home=root / "home", device="cpu").load(str(folder)).loaded
    settings = AttentionSettings(max_tokens=4096)
    small = "the cat sat on the mat"
    before = start_attention([("A", loaded, small)], settings).wait(60)

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize"):
                return int(line.split()[1]) * 1024

    # the injected budget: 400 MiB of address space more than the process uses now; the
    # attention of ~3600 tokens (2 layers x 4 heads x tokens^2 x 4 bytes, ~400 MB, plus the
    # softmax's intermediates) does not fit, a short text does
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 400 * 2**20, resource.RLIM_INFINITY))
    big = start_attention([("A", loaded, " ".join([small] * 600))], settings)
    big.join(120)
    snap = big.snapshot()
    used = runs.result_budget().used_bytes  # the failed run is still held here
    after = start_attention([("A", loaded, small)], settings).wait(60)
    print(json.dumps({
        "state": snap.state,
        "error": snap.error,
        "tokens": big.spec.sides and len(loaded.tokenizer(big.spec.sides[0][2])["input_ids"]),
        "budget_used": used,
        "same": bool((after.sides[0].result.attentions == before.sides[0].result.attentions).all()),
    }))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")
def test_a_real_attention_too_big_for_the_memory_left_fails_and_the_next_one_works(tmp_path):
    import json

    script = tmp_path / "real_oom.py"
    script.write_text(REAL_ATTENTION_OOM)
    env = {**os.environ, "WORKBENCH_RESULT_BUDGET_GB": "8", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert 3000 < report["tokens"] <= 4096  # within every other limit: only memory refuses it
    assert report["state"] == "failed"
    assert report["error"].startswith("Attention ran out of CPU memory (it asked for ")
    assert "shorter input" in report["error"]
    assert report["budget_used"] == 0  # the failed run's reservation was released
    assert report["same"]  # the process lives on and the model gives the same answer


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_memory_frees_the_device_memory_and_the_next_run_works(tiny_models, tmp_path):
    from engine import Workbench
    from engine.generation.evaluation import perplexity, start_perplexity

    wb = Workbench(home=tmp_path / "home", device="cuda")
    loaded = wb.load(str(tiny_models["llama"])).loaded
    expected = perplexity(loaded, TEXT).perplexity
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    free, total = torch.cuda.mem_get_info()

    def work(ctx):
        held = torch.ones(256 * 2**20, device="cuda")  # 1 GiB the work holds
        # then ask for more than the device has: a real torch.OutOfMemoryError
        return held, torch.empty(int(total * 2), dtype=torch.uint8, device="cuda")

    run = runs.start("attention", work)
    assert run.join(60)
    error = run.snapshot().error
    assert error.startswith("Attention ran out of GPU memory (it asked for "), error
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated  # the 1 GiB the work held is freed
    assert torch.cuda.memory_reserved() <= reserved + 2**20  # and returned to the device
    assert start_perplexity(loaded, TEXT).wait(60).perplexity == pytest.approx(expected, rel=1e-3)
