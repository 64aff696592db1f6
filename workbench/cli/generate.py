"""``workbench generate MODEL PROMPT [--max-new-tokens N] [--greedy | sampling options] [--json]``.

Also ``workbench perplexity MODEL TEXT`` and ``workbench score HYPOTHESIS REFERENCE``.
"""

from __future__ import annotations

import sys

from engine.generation import GenerationSettings
from engine.generation.paths import DECODE_PATHS
from workbench.cli.common import open_workbench, print_json, progress_printer


def _settings(args) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_sequences=tuple(args.stop or ()),
        keep_last_tokens=args.keep_last_tokens,
        decode_path=None if args.decode == "auto" else args.decode,
    )


def generate(args, _extra) -> int:
    from engine.generation import conversation

    settings = _settings(args)
    model = open_workbench().load(args.model, progress=progress_printer)
    messages = None
    if args.chat:
        messages = conversation([], args.prompt, args.system or "")
    if args.json:
        result = model.start_generation(args.prompt, settings, messages).wait()
        print_json(result.to_dict())
        return 0
    run = model.start_generation(args.prompt, settings, messages)
    shown = 0
    try:
        while not run.done:
            run.join(0.05)
            partial = run.snapshot().partial
            text = partial.text if partial is not None else ""
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    except KeyboardInterrupt:
        run.cancel()
    result = run.wait()
    sys.stdout.write(result.text[shown:] + "\n")
    ppl = f"{result.perplexity:.2f}" if result.perplexity is not None else "n/a"
    print(
        f"[{len(result.tokens)} tokens, {result.finish_reason}, perplexity {ppl}, "
        f"{'seed ' + str(result.settings.seed) if result.settings.seed is not None else 'no seed (greedy)'}, "
        f"{result.provenance.decode_path} path, {result.tokens_per_second or 0:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def perplexity(args, _extra) -> int:
    model = open_workbench().load(args.model, progress=progress_printer)
    result = model.perplexity(args.text)
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"perplexity {result.perplexity:.3f} over {len(result.token_logprobs)} tokens")
    return 0


def score(args, _extra) -> int:
    from engine.generation.evaluation import overlap_scores

    result = overlap_scores(args.hypothesis, args.reference)
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"BLEU {result.bleu:.2f}  chrF {result.chrf:.2f}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("generate", help="continue a prompt (or reply to it with --chat)")
    parser.add_argument("model", help="embedded alias, store name, local folder or hub id")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="deterministic: always the top token")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 switches it off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 switches it off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="reproducible sampling")
    parser.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)"
    )
    parser.add_argument(
        "--keep-last-tokens",
        action="store_true",
        help="if the prompt is too long for the context, keep its last tokens",
    )
    parser.add_argument(
        "--decode",
        choices=("auto", *DECODE_PATHS),
        default="auto",
        help="decode path (default: $WORKBENCH_DECODE, else the measured default, lean on CPU)",
    )
    parser.add_argument("--chat", action="store_true", help="use the model's chat template")
    parser.add_argument("--system", default="", help="system message (with --chat)")
    parser.add_argument("--json", action="store_true", help="text, tokens with log-probs, settings")
    parser.set_defaults(func=generate)

    ppl = sub.add_parser("perplexity", help="perplexity of a text under a causal LM")
    ppl.add_argument("model")
    ppl.add_argument("text")
    ppl.add_argument("--json", action="store_true")
    ppl.set_defaults(func=perplexity)

    sc = sub.add_parser("score", help="BLEU and chrF of a hypothesis against a reference")
    sc.add_argument("hypothesis")
    sc.add_argument("reference")
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=score)
