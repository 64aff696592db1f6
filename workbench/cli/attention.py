"""``workbench attention MODEL TEXT --out FILE.npz [--max-tokens N] [--truncate] [--json]``.

The npz holds ``attentions`` shaped (layer, head, query, key), ``tokens``, ``token_ids``,
``word_ids``, ``text``, ``dropped_tokens`` and ``provenance`` (a JSON string). ``--json``
prints the tokens, the shape, the per-head statistics and the provenance (not the tensor).
The output path is checked before the model loads: an unwritable ``--out`` fails at once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from engine.errors import InputError
from workbench.cli.common import open_workbench, print_json, progress_printer


def writable_output(raw: str) -> Path:
    """``raw`` as an .npz path that can be written (``InputError`` before any computation)."""
    from engine.files import check_writable

    given = Path(raw).expanduser()
    if given.is_dir():
        raise InputError(f"--out {raw} is a folder: give a file name such as {given / 'a.npz'}.")
    out = given if given.suffix == ".npz" else given.with_suffix(given.suffix + ".npz")
    with contextlib.suppress(OSError):  # a new folder is made; an impossible one is reported
        out.parent.mkdir(parents=True, exist_ok=True)
    return check_writable(out, "--out")


def attention(args, _extra) -> int:
    out = writable_output(args.out)  # before importing torch: a bad path fails in a blink
    from engine.attention import AttentionSettings, head_statistics

    settings = AttentionSettings(max_tokens=args.max_tokens, truncate=args.truncate).validated()
    model = open_workbench().load(args.model, progress=progress_printer)
    result = model.attention(args.text, settings)
    result.save_npz(out)
    if args.json:
        data = result.summary()
        data["out"] = str(out)
        data["heads"] = head_statistics(result.attentions).to_frame().to_dict(orient="records")
        print_json(data)
    else:
        n_layers, n_heads, n, _ = result.shape
        dropped = f" ({result.dropped_tokens} tokens truncated)" if result.dropped_tokens else ""
        print(f"{n_layers} layers x {n_heads} heads x {n} tokens{dropped} -> {out}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("attention", help="save every layer's and head's attention to .npz")
    parser.add_argument("model", help="embedded alias, store name, local folder or hub id")
    parser.add_argument("text")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--max-tokens", type=int, default=1024, help="refuse longer inputs")
    parser.add_argument(
        "--truncate",
        action="store_true",
        help="cut a longer input to the model's context (or --max-tokens) instead of refusing",
    )
    parser.add_argument("--json", action="store_true", help="tokens, shape, head statistics")
    parser.set_defaults(func=attention)
