"""Attribution: seconds per Integrated Gradients explanation (50 steps), workbench vs captum.

    .venv/bin/python bench/attribution.py          # 32 and 128 tokens + per-method table (<3 min)
    .venv/bin/python bench/attribution.py --full   # adds 512 tokens (about 5 more minutes on 2 cores)

SmolLM2-135M on the CPU, float32, one process, the same weights for both sides:

- workbench: ``Model.explain(text, target, options={"steps": 50, "auto_steps": False},
  faithfulness=False)`` (step refinement off: exactly 50 steps, like captum): layer
  IG on the embeddings, batch of path points chosen to fit memory, gradients to the input
  embeddings only (the weights' gradients are skipped), logits only at the target position,
  plus the two extra rows of the convergence delta;
- direct captum: ``LLMGradientAttribution(LayerIntegratedGradients(model, embeddings),
  tokenizer).attribute(TextTokenInput(text, tokenizer), target=target)`` with captum's defaults
  (50 steps, Gauss-Legendre, every path point in one batch). When that single batch would not
  fit in memory (estimated by the workbench's memory model) it is NOT run; captum is then run
  with ``internal_batch_size`` equal to the workbench's batch and the table says so.

Runs alternate (workbench, captum, workbench, ...) and the median is reported; the machine is
shared, so figures are noisy. Fewer repetitions at 128 and 512 tokens (long runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import HOME, SENTENCES  # sets the offline environment first

TARGET = " the"
REPS = {32: 3, 128: 1, 512: 1}
SAMPLED = {"gradient_shap": 20, "shapley_value_sampling": 10, "lime": 100, "kernel_shap": 100}


def text_of(tokenizer, n: int) -> str:
    """English text of exactly ``n`` tokens (cut at a token boundary that round-trips)."""
    words = " ".join(SENTENCES * (1 + n // 10))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    for cut in range(n, 0, -1):
        text = tokenizer.decode(ids[:cut])
        if len(tokenizer(text)["input_ids"]) == n:
            return text
    raise RuntimeError(f"no {n}-token text")


def direct_captum(loaded, text: str, batch: int | None) -> float:
    """Seconds of one direct captum LLMGradientAttribution call (captum's defaults)."""
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    model, tok = loaded.model, loaded.tokenizer
    with loaded.use():
        started = time.perf_counter()
        llm = LLMGradientAttribution(
            LayerIntegratedGradients(model, model.get_input_embeddings()), tok
        )
        kwargs = {} if batch is None else {"internal_batch_size": batch}
        llm.attribute(TextTokenInput(text, tok), target=TARGET, **kwargs)
        return time.perf_counter() - started


def workbench_ig(model, text: str) -> tuple[float, object]:
    started = time.perf_counter()
    result = model.explain(
        text, TARGET, options={"steps": 50, "auto_steps": False}, faithfulness=False
    )
    return time.perf_counter() - started, result


def ig_table(model, lengths: tuple[int, ...]) -> list[str]:
    import psutil

    from engine.attribution import TargetSpec, budget, estimate

    loaded = model.loaded
    lines = [
        "Integrated Gradients, 50 steps, SmolLM2-135M, CPU float32 (median seconds)",
        f"{'tokens':>6} {'reps':>4} {'workbench':>10} {'batch':>5} {'captum':>10} "
        f"{'captum setting':<42} {'captum/wb':>9}  rel. delta",
    ]
    for n in lengths:
        text = text_of(loaded.tokenizer, n)
        plan = estimate(
            loaded, text, TargetSpec(text=TARGET), "ig", {"steps": 50, "auto_steps": False}
        )
        # captum's default: all 50 path points in one batch, full-sequence logits
        default_bytes = 50 * budget.row_bytes(loaded, n + 1, n + 1, True)
        free = psutil.virtual_memory().available
        if default_bytes < 0.7 * free:
            batch, setting = None, "defaults (one batch of 50)"
        else:
            batch = plan.batch_size
            setting = (
                f"batch {batch}: default needs ~{default_bytes / 2**30:.0f} GiB, "
                f"{free / 2**30:.0f} free"
            )
        mine, theirs, result = [], [], None
        workbench_ig(model, text_of(loaded.tokenizer, 8))  # warm-up
        for _ in range(REPS[n]):
            seconds, result = workbench_ig(model, text)
            mine.append(seconds)
            theirs.append(direct_captum(loaded, text, batch))
        wb_s, captum_s = statistics.median(mine), statistics.median(theirs)
        lines.append(
            f"{n:>6} {REPS[n]:>4} {wb_s:>10.2f} {plan.batch_size:>5} {captum_s:>10.2f} "
            f"{setting:<42} {captum_s / wb_s:>8.2f}x  {result.relative_delta:.2%}"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def method_table(model) -> list[str]:
    from engine.attribution import TargetSpec, available_methods, estimate

    loaded = model.loaded
    text = text_of(loaded.tokenizer, 16)
    lines = [
        "",
        "Per method, 16 tokens, target ' the' (seconds; faithfulness = deletion/insertion curves)",
        f"{'method':<24} {'options':<14} {'rows':>5} {'estimate':>8} {'method':>7} "
        f"{'faithful.':>9} {'s/row':>6}",
    ]
    for method in available_methods(loaded):
        options = {"samples": SAMPLED[method.name]} if method.name in SAMPLED else {}
        if method.name == "integrated_gradients":
            options = {"steps": 50, "auto_steps": False}
        plan = estimate(loaded, text, TargetSpec(text=TARGET), method.name, options)
        started = time.perf_counter()
        result = model.explain(text, TARGET, method=method.name, options=options)
        total = time.perf_counter() - started
        shown = ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        lines.append(
            f"{method.name:<24} {shown:<14} {result.forward_rows:>5} {plan.seconds:>8.2f} "
            f"{result.seconds:>7.2f} {total - result.seconds:>9.2f} "
            f"{result.seconds / max(result.forward_rows, 1):>6.3f}"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also 512 tokens (slow on CPU)")
    args = parser.parse_args()
    import torch

    from engine import Workbench

    started = time.perf_counter()
    model = Workbench(home=HOME, device="cpu").load("smollm2-135m")
    lengths = (32, 128, 512) if args.full else (32, 128)
    lines = ig_table(model, lengths)
    if not args.full:
        lines.append("   512 tokens: run with --full (about 5 more minutes on 2 CPU cores)")
    lines += method_table(model)
    lines.append(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"total {time.perf_counter() - started:.0f} s. Goal: captum/wb >= 1 (never slower)."
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
