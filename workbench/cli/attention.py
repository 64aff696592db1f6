"""``workbench attention MODEL TEXT --out FILE.npz [--max-tokens N] [--json]``.

The npz holds ``attentions`` shaped (layer, head, query, key), ``tokens``, ``token_ids``,
``word_ids``, ``text`` and ``provenance`` (a JSON string). ``--json`` prints the tokens, the
shape, the per-head statistics and the provenance (not the tensor).
"""

from __future__ import annotations

from pathlib import Path

from workbench.cli.common import open_workbench, print_json, progress_printer


def attention(args, _extra) -> int:
    from engine.attention import AttentionSettings, head_statistics

    model = open_workbench().load(args.model, progress=progress_printer)
    result = model.attention(args.text, AttentionSettings(max_tokens=args.max_tokens))
    out = Path(args.out)
    if out.suffix != ".npz":
        out = out.with_suffix(out.suffix + ".npz")  # numpy would add it silently
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save_npz(out)
    if args.json:
        data = result.summary()
        data["out"] = str(out)
        data["heads"] = head_statistics(result.attentions).to_frame().to_dict(orient="records")
        print_json(data)
    else:
        n_layers, n_heads, n, _ = result.shape
        print(f"{n_layers} layers x {n_heads} heads x {n} tokens -> {out}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("attention", help="save every layer's and head's attention to .npz")
    parser.add_argument("model", help="embedded alias, store name, local folder or hub id")
    parser.add_argument("text")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--max-tokens", type=int, default=1024, help="refuse longer inputs")
    parser.add_argument("--json", action="store_true", help="tokens, shape, head statistics")
    parser.set_defaults(func=attention)
