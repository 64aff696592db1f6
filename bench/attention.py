"""Attention extraction: the workbench vs a plain transformers eager forward, and page size.

    .venv/bin/python bench/attention.py            # full table (about 2-3 min on 2 cores)
    .venv/bin/python bench/attention.py --quick    # 64 and 256 tokens only

For each embedded model and input length (64, 256, 1024 tokens; MiniLM only 64 and 256: its
position limit is 512) it measures:

- time: ``Model.attention(text)`` (tokenize, eager forward, copy to one float32 numpy array)
  against ``AutoModel*.from_pretrained(path, attn_implementation="eager")`` called as
  ``model(**tokenizer(text), output_attentions=True)``; both in this process on the same
  weights, runs interleaved; the best run of each is compared (the machine is shared: noisy).
- peak memory: each case runs alone in a fresh subprocess; after loading and a warm-up the
  kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5) and ``VmHWM`` read after the
  call, so the figure is the RSS growth of that one call (torch allocations included).
- HTML: what the Attention page sends with its defaults (heatmap + bertviz head view, or the
  aggregated views when bertviz would exceed the 5 MB page budget), and bertviz's own size for
  all layers (built when small, predicted by ``estimate_bertviz_bytes`` otherwise).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import HOME, REPO, SENTENCES  # sets the offline environment first

CASES = {"smollm2-135m": (64, 256, 1024), "minilm-l6": (64, 256)}
QUICK = {"smollm2-135m": (64, 256), "minilm-l6": (64, 256)}
GOAL_RATIO = 1.1
GOAL_BYTES = 5_000_000


def text_of(tokenizer, n: int) -> str:
    """English text that the tokenizer turns into exactly (or nearly) ``n`` tokens."""
    special = len(tokenizer("x")["input_ids"]) - len(
        tokenizer("x", add_special_tokens=False)["input_ids"]
    )
    words = " ".join(SENTENCES * (1 + 4 * n // 60))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][: n - special]
    return tokenizer.decode(ids)


def load(name: str, workbench: bool = True, plain: bool = True):
    """(workbench Model, plain eager transformers model, tokenizer) on the same weights;
    either model may be skipped (None)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from engine import Workbench

    wb = Workbench(home=HOME, device="cpu")
    model = wb.load(name)
    path, causal = model.loaded.path, model.kind == "causal-lm"
    if not workbench:
        model = None
        wb.unload(name)
        gc.collect()
    cls = AutoModelForCausalLM if causal else AutoModel
    bare = None
    if plain:
        bare = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return model, bare, AutoTokenizer.from_pretrained(path)


def plain_attention(plain, tokenizer, text: str):
    """What a user writes with transformers alone: one eager forward returning attentions."""
    import torch

    with torch.inference_mode():
        return plain(**tokenizer(text, return_tensors="pt"), output_attentions=True).attentions


def timings(name: str, lengths: tuple[int, ...]) -> list[dict]:
    """Interleaved runs of both; the best run of each is compared (the least disturbed by other
    processes on a shared machine), the median is printed too."""
    import numpy as np
    import torch

    import engine.attention.extract

    model, plain, tokenizer = load(name)
    copies: list[float] = []
    collect = engine.attention._collect

    def timed_collect(layers, model_name):  # the workbench's only extra step: one array
        started = time.perf_counter()
        array = collect(layers, model_name)
        copies.append(time.perf_counter() - started)
        return array

    engine.attention._collect = timed_collect
    warm = text_of(tokenizer, 16)
    plain_attention(plain, tokenizer, warm), model.attention(warm)
    rows = []
    for n in lengths:
        text = text_of(tokenizer, n)
        repeats = 5 if n <= 64 else 3 if n <= 512 else 2
        wb_s, plain_s = [], []
        out = result = None
        copies.clear()
        for i in range(repeats):
            out = result = None  # free the previous run's tensors before timing the next
            started = time.perf_counter()
            out = plain_attention(plain, tokenizer, text)
            plain_s.append(time.perf_counter() - started)
            if i < repeats - 1:
                out = None  # the last plain output is kept for the allclose check
            started = time.perf_counter()
            result = model.attention(text)
            wb_s.append(time.perf_counter() - started)
        expected = torch.stack([a[0] for a in out]).numpy()
        equal = bool(np.allclose(result.attentions, expected, rtol=1e-4, atol=1e-5))
        out = expected = None
        rows.append(
            {
                "model": name,
                "tokens": result.n_tokens,
                "workbench_s": min(wb_s),
                "plain_s": min(plain_s),
                "workbench_median_s": statistics.median(wb_s),
                "plain_median_s": statistics.median(plain_s),
                "copy_s": min(copies),
                "allclose": equal,
                **page_bytes(result),
            }
        )
        result = None
    return rows


def page_bytes(result) -> dict:
    """Bytes the Attention page sends with its defaults, and bertviz's size for all layers."""
    from engine.attention.aggregate import AggregationSettings, aggregate
    from engine.attention.views import (
        bertviz_budget,
        bertviz_html,
        chart_payload_bytes,
        estimate_bertviz_bytes,
        heatmap_chart,
        plan_bertviz,
    )

    # the page's defaults: layer 0, head 0, words merged past 64 tokens, at most 96 rows
    settings = AggregationSettings((0, 0), (0, 0), result.n_tokens > 64, 96)
    sent = chart_payload_bytes(heatmap_chart(aggregate(result, settings)))
    plan = plan_bertviz([result], bertviz_budget(sent, 1), (0, 0))
    if plan.fits:
        sent += len(bertviz_html(result, "head", plan.selection, budget=None))
        shown = "bertviz, all layers" if plan.all_layers else "bertviz, layer 0"
    else:
        shown = "aggregated"
    full = estimate_bertviz_bytes(result)
    if full < 20_000_000:
        full, how = len(bertviz_html(result, "head", budget=None)), "built"
    else:
        how = "predicted"
    return {"page_bytes": sent, "shown": shown, "bertviz_all_bytes": full, "bertviz_how": how}


def child(name: str, impl: str, n: int) -> None:
    """One measurement in a fresh process: RSS growth of one call, printed as JSON."""
    model, plain, tokenizer = load(name, workbench=impl == "workbench", plain=impl == "plain")
    text = text_of(tokenizer, n)
    if impl == "workbench":
        model.attention(text_of(tokenizer, 16))
    else:
        plain_attention(plain, tokenizer, text_of(tokenizer, 16))
    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    out = model.attention(text) if impl == "workbench" else plain_attention(plain, tokenizer, text)
    peak = _status_kb("VmHWM")
    del out
    print(json.dumps({"before_kb": before, "peak_kb": peak}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_mb(name: str, impl: str, n: int) -> float:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, impl, str(n)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return (data["peak_kb"] - data["before_kb"]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 and 256 tokens only")
    parser.add_argument(
        "--child", nargs=3, metavar=("MODEL", "IMPL", "TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    import torch

    started = time.perf_counter()
    cases = QUICK if args.quick else CASES
    rows = [row for name, lengths in cases.items() for row in timings(name, lengths)]
    for row in rows:
        for impl in ("workbench", "plain"):
            row[f"{impl}_mb"] = peak_mb(row["model"], impl, row["tokens"])
    print(
        f"\nAttention extraction, CPU, {torch.get_num_threads()} threads, float32; times are the "
        "best of interleaved runs (the median ratio alongside)"
    )
    header = (
        f"{'model':<13} {'tokens':>6} {'workbench s':>11} {'plain s':>8} {'ratio':>6} "
        f"{'median ratio':>12} {'copy s':>6} "
        f"{'wb peak MB':>10} {'plain MB':>9} {'tensor MB':>9} {'allclose':>8} "
        f"{'page MB':>8} {'shown':<20} {'bertviz all layers MB':>22}"
    )
    print(header)
    print("-" * len(header))
    worst_ratio, worst_bytes = 0.0, 0
    for r in rows:
        ratio = r["workbench_s"] / r["plain_s"]
        worst_ratio, worst_bytes = max(worst_ratio, ratio), max(worst_bytes, r["page_bytes"])
        n = r["tokens"]
        layers_heads = {"smollm2-135m": 30 * 9, "minilm-l6": 6 * 12}[r["model"]]
        tensor_mb = layers_heads * n * n * 4 / 2**20
        print(
            f"{r['model']:<13} {n:>6} {r['workbench_s']:>11.3f} {r['plain_s']:>8.3f} {ratio:>5.2f}x "
            f"{r['workbench_median_s'] / r['plain_median_s']:>11.2f}x {r['copy_s']:>6.3f} "
            f"{r['workbench_mb']:>10.0f} {r['plain_mb']:>9.0f} {tensor_mb:>9.0f} "
            f"{str(r['allclose']):>8} {r['page_bytes'] / 1e6:>8.2f} {r['shown']:<20} "
            f"{r['bertviz_all_bytes'] / 1e6:>13.1f} ({r['bertviz_how']})"
        )
    print(
        f"\nworst time ratio {worst_ratio:.2f}x (goal <= {GOAL_RATIO}x): "
        f"{'met' if worst_ratio <= GOAL_RATIO else 'NOT met'}; "
        f"largest page {worst_bytes / 1e6:.2f} MB (goal <= {GOAL_BYTES / 1e6:.0f} MB): "
        f"{'met' if worst_bytes <= GOAL_BYTES else 'NOT met'}; "
        f"bench took {time.perf_counter() - started:.0f} s"
    )
    print(
        "copy s = the workbench's one extra step (per-layer tensors into one float32 array); "
        "peak MB = RSS growth during one call in a fresh process; tensor MB = one float32 copy "
        "of (layer, head, query, key); page MB = heatmap JSON + bertviz HTML the page sends."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
