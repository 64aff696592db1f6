"""Run ledger and notebook costs, measured against a baseline in the same run.

1. Recording cost: a short greedy generation on the embedded SmolLM2 (16 new tokens) through a
   ``Model`` that records every run in the ledger vs the same ``Model`` without a ledger,
   interleaved ``--rounds`` times; plus the time of one ``ledger.append`` of such a result.
   Goal: recording costs at most 2 % of the generation.
2. Reopening a 20-cell notebook: after the cells have run once, a fresh store and ledger
   (as after a restart) read the notebook and every cell's stored result; and the Notebook page
   itself drawn by Streamlit's AppTest after ``st.cache_resource.clear()``. Goal: under 1 s.

Run: ``.venv/bin/python bench/notebook.py`` (about 1-2 minutes on 2 CPU cores; uses the test
store, where SmolLM2 is converted once).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import HOME, REPO  # noqa: F401  (sets the offline environment)

PROMPT = "The capital of France is"


def recording_cost(rounds: int) -> None:
    from engine import Workbench
    from engine.api import Model
    from engine.generation import GenerationSettings

    home = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    wb = Workbench(home=home, device="cpu")
    # the embedded model from the shared test store (converted once), recorded in `home`
    shared = Workbench(home=HOME, device="cpu")
    loaded = shared.load("smollm2-135m").loaded
    recorded, plain = Model(loaded, wb), Model(loaded, None)
    settings = GenerationSettings(max_new_tokens=16, greedy=True)
    recorded.generate(PROMPT, settings)  # warm-up (first ledger write creates the database)
    plain.generate(PROMPT, settings)
    with_ledger, without = [], []
    for _ in range(rounds):
        for model, times in ((plain, without), (recorded, with_ledger)):
            started = time.perf_counter()
            result = model.generate(PROMPT, settings)
            times.append(time.perf_counter() - started)
    appends = []
    for i in range(rounds):
        started = time.perf_counter()
        wb.ledger.append(run_id=f"bench{i:08x}", operation="generate", spec={}, result=result)
        appends.append(time.perf_counter() - started)
    a, b = statistics.median(with_ledger), statistics.median(without)
    append = statistics.median(appends)
    print("1. recording cost (SmolLM2, 16 new tokens greedy, CPU float32)")
    print(f"   generate without ledger  median {b * 1000:8.1f} ms  ({rounds} runs)")
    print(f"   generate with ledger     median {a * 1000:8.1f} ms  ({rounds} runs)")
    print(f"   ratio with/without       {a / b:8.3f}   (goal <= 1.02)")
    print(f"   one ledger.append        median {append * 1000:8.2f} ms = {append / b:.2%} of a run")
    print(f"   ledger records: {len(wb.ledger.records())}, verify ok: {wb.ledger.verify().ok}")


def reopen_cost(cells: int) -> None:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from engine import Workbench
    from engine.notebooks import NotebookStore, cell_result

    home = Path(tempfile.mkdtemp(prefix="bench-notebook-"))
    # reuse the converted embedded model: copy the shared store's entry into this home (the
    # store refuses entries that point outside it)
    import shutil

    (home / "models").mkdir(parents=True)
    shutil.copytree(HOME / "models" / "smollm2-135m", home / "models" / "smollm2-135m")
    wb = Workbench(home=home, device="cpu")
    book = wb.notebook("Twenty cells")
    for i in range(cells):
        if i % 4 == 0:
            book.add("markdown", text=f"## Part {i // 4 + 1}\nSome notes for the class.")
        else:
            book.add(
                "generate",
                model="smollm2-135m",
                prompt=f"{PROMPT} (question {i})",
                settings={"max_new_tokens": 8, "greedy": True},
            )
    started = time.perf_counter()
    book.run_all()
    run_s = time.perf_counter() - started
    reads = []
    for _ in range(5):
        started = time.perf_counter()
        wb.__dict__.pop("ledger", None)  # a fresh ledger object, as after a restart
        loaded = NotebookStore(home).get(book.id)
        results = [cell_result(wb, c) for c in loaded.cells]
        reads.append(time.perf_counter() - started)
    shown = sum(r is not None for r in results)
    page = []
    import os

    os.environ["WORKBENCH_HOME"] = str(home)
    os.environ["WORKBENCH_DEVICE"] = "cpu"
    for _ in range(4):
        st.cache_resource.clear()
        app = AppTest.from_file(str(REPO / "workbench" / "app.py"), default_timeout=300)
        app.run()  # the shell (and, the first time, the imports)
        started = time.perf_counter()
        app.switch_page(str(REPO / "pages" / "notebook.py")).run()
        page.append(time.perf_counter() - started)
        assert not app.exception, app.exception
    tokens = sum(1 for m in app.metric if m.label == "Tokens")
    print(
        f"2. reopening a {cells}-cell notebook ({shown} stored results; Run all took {run_s:.1f} s)"
    )
    print(
        f"   store + ledger + every result, fresh objects: median {statistics.median(reads) * 1000:.0f} ms"
    )
    print(f"   Notebook page drawn after a cache clear: {', '.join(f'{p:.2f}' for p in page)} s")
    print(f"   (first includes loading the model for the engine; {tokens} generation views drawn;")
    print(f"   goal < 1 s: {'met' if min(page[1:]) < 1.0 else 'NOT met'} after the first)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cells", type=int, default=20)
    args = parser.parse_args()
    recording_cost(args.rounds)
    reopen_cost(args.cells)


if __name__ == "__main__":
    main()
