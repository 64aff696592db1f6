"""The shared model manager: caching, LRU eviction within a budget, locking, unloading."""

import threading

import pytest

from engine import Workbench
from engine.errors import InputError, MemoryBudgetError


def test_lru_eviction_keeps_within_budget(tiny_models, tmp_path):
    probe = Workbench(home=tmp_path / "probe", device="cpu")
    size = probe.load(str(tiny_models["llama"])).info().memory_bytes
    wb = Workbench(home=tmp_path / "h", device="cpu", memory_budget_bytes=int(size * 2.5))
    wb.load(str(tiny_models["llama"]))
    wb.load(str(tiny_models["bert"]))
    wb.load(str(tiny_models["llama"]))  # touch: bert is now least recently used
    wb.load(str(tiny_models["classifier"]))
    names = {m.name for m in wb.loaded()}
    assert str(tiny_models["bert"]) not in names
    assert {str(tiny_models["llama"]), str(tiny_models["classifier"])} <= names


def test_busy_models_are_not_evicted(tiny_models, tmp_path):
    probe = Workbench(home=tmp_path / "probe", device="cpu")
    size = probe.load(str(tiny_models["llama"])).info().memory_bytes
    wb = Workbench(home=tmp_path / "h", device="cpu", memory_budget_bytes=int(size * 1.5))
    busy = wb.load(str(tiny_models["llama"])).loaded
    holding, release = threading.Event(), threading.Event()

    def hold():  # another session in the middle of a call on the model
        with busy.use():
            holding.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    holding.wait(10)
    try:
        assert busy.busy
        with pytest.raises(MemoryBudgetError, match="busy"):
            wb.load(str(tiny_models["bert"]))
    finally:
        release.set()
        worker.join()
    assert [m.name for m in wb.loaded()] == [busy.name]


def test_model_larger_than_budget_is_refused(tiny_models, tmp_path):
    wb = Workbench(home=tmp_path, device="cpu", memory_budget_bytes=1000)
    with pytest.raises(MemoryBudgetError, match="WORKBENCH_MEMORY_BUDGET_GB"):
        wb.load(str(tiny_models["llama"]))


def test_unload(workbench, tiny_models):
    name = str(tiny_models["bert"])
    workbench.load(name)
    workbench.unload(name)
    assert workbench.loaded() == []
    with pytest.raises(InputError, match="not loaded"):
        workbench.unload(name)


def test_concurrent_loads_share_one_instance(workbench, tiny_models):
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(workbench.load(str(tiny_models["llama"])).loaded)
        )
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len({id(r) for r in results}) == 1


def test_concurrent_generation_matches_sequential(workbench, tiny_models):
    model = workbench.load(str(tiny_models["llama"]))
    prompts = ["the movie was", "i love this", "paris is a city", "hello world"]
    expected = {p: model.generate(p, max_new_tokens=6, greedy=True).tokens for p in prompts}
    assert len({tuple(t.id for t in v) for v in expected.values()}) > 1, "prompts too alike"
    jobs = prompts * 3
    got: list = [None] * len(jobs)  # one slot per thread: no result can overwrite another
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(i: int, prompt: str) -> None:
        try:
            start.wait(timeout=10)
            got[i] = model.generate(prompt, max_new_tokens=6, greedy=True).tokens
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for i, prompt in enumerate(jobs):
        assert got[i] is not None, f"thread {i} ({prompt!r}) produced nothing"
        assert [t.id for t in got[i]] == [t.id for t in expected[prompt]], (i, prompt)
        assert [t.logprob for t in got[i]] == pytest.approx(
            [t.logprob for t in expected[prompt]], abs=1e-4
        ), (i, prompt)
