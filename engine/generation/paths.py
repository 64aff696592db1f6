"""The decode path: how a generation computes its tokens, chosen here and nowhere else.

- ``reference``: transformers' own ``generate`` on the model as loaded. Attention, attribution
  and fine-tuning always use this model, so "explain this answer" explains the reference.
- ``lean``: ``engine.generation.lean.LeanDecoder`` on the same float32 weights (one call for
  q/k/v and one for gate/up, a static KV cache). Logits equal the reference's to float32
  rounding.
- ``int8``: the lean decoder with int8 products for decode steps (``engine.generation.int8``:
  int8 weights per output channel, int8 activations per token, smoothed, fbgemm); prompts stay
  float32. About twice as fast on a CPU, not exact: ``bench/generation.py`` reports how often its
  greedy continuations match and its perplexity.

``WORKBENCH_DECODE`` = ``auto`` (default), ``reference``, ``lean`` or ``int8``. ``auto`` takes the
measured default (``lean``, ``bench/generation.py``) on a CPU where the model allows it, else the
reference (GPUs keep the reference until the lean path is measured there).
A request can ask for a path (``GenerationSettings.decode_path``; reproduction asks for the
recorded one). The path used is recorded in every result's provenance and shown in the sidebar.

Every path decodes through ``Decoder.generate``, which takes the keyword arguments of
``transformers``' ``generate`` that ``engine.generation.core.generate_kwargs`` builds (logits
processors, stopping criteria, left-padded batches), so hooks, streaming, cancel and batching
are the same on every path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.errors import InputError
from engine.generation.int8 import ALPHA, int8_available, int8_linears
from engine.generation.lean import LeanDecoder, float_linear, lean_supported

__all__ = [
    "DECODE_PATHS",
    "DESCRIPTIONS",
    "DecodePath",
    "Decoder",
    "choose_decode_path",
    "decoder_for",
    "generation_eos",
    "requested_path",
]

ENV = "WORKBENCH_DECODE"
DECODE_PATHS = ("reference", "lean", "int8")
DEFAULT = "lean"  # chosen by measurement, idle and under load: README "Decode paths"
DESCRIPTIONS = {
    "reference": "transformers' own generate on the model as loaded",
    "lean": "lean decoder on the same weights (static KV cache, fewer operations per step); "
    "logits equal the reference's to float32 rounding",
    "int8": "lean decoder with int8 weights and activations (fbgemm): about twice as fast on "
    "a CPU, not exact (see bench/generation.py for how close)",
}


@dataclass(frozen=True)
class DecodePath:
    """A decode path in words: ``name`` (one of ``DECODE_PATHS``) and what it computes."""

    name: str
    detail: str


def requested_path(override: str | None = None) -> str:
    """``override`` or ``$WORKBENCH_DECODE`` ("auto" when unset); raises ``InputError``."""
    wanted = (override or os.environ.get(ENV) or "auto").strip().lower()
    if wanted != "auto" and wanted not in DECODE_PATHS:
        raise InputError(f"Unknown decode path {wanted!r}: use auto, {', '.join(DECODE_PATHS)}.")
    return wanted


def choose_decode_path(model: torch.nn.Module, kind: str, override: str | None = None) -> str:
    """The path a generation on ``model`` takes: the request (or environment) when the model
    allows it, else the reference. ``auto`` is the measured default."""
    wanted = requested_path(override)
    param = next(model.parameters())
    if wanted == "auto":  # measured on CPUs; on GPUs the reference until measured there
        wanted = DEFAULT if param.device.type == "cpu" else "reference"
    if wanted == "reference" or kind != "causal-lm" or lean_supported(model) is not None:
        return "reference"
    if wanted == "int8" and (param.device.type != "cpu" or not int8_available()):
        return "lean"
    return wanted


class Decoder:
    """Runs ``generate`` keyword arguments on one path of one loaded model.

    Built once per model and path (``decoder_for``) and used by one generation at a time: the
    caller holds the model's grant.
    """

    def __init__(self, model: torch.nn.Module, path: DecodePath, lean: LeanDecoder | None):
        self.model = model
        self.path = path
        self.lean = lean

    def generate(self, **kwargs) -> torch.Tensor:
        """``model.generate(**kwargs)`` on this path; returns the ids (B, T + new)."""
        if self.lean is None:
            return self.model.generate(**kwargs)
        return _lean_generate(self.lean, generation_eos(self.model), **kwargs)


def generation_eos(model: torch.nn.Module) -> set[int]:
    """The end-of-text ids ``generate`` itself stops on (the model's generation config's)."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value or ()}


@torch.inference_mode()
def _lean_generate(
    lean: LeanDecoder,
    eos: set[int],
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    logits_processor: Callable,
    stopping_criteria: Callable,
    pad_token_id: int | None = None,
    **_: object,
) -> torch.Tensor:
    """Greedy/processed decoding as ``generate``'s sampling loop does it, on ``lean``.

    Per step: processors(ids, logits) -> argmax (a ``Sampler`` processor leaves only its draw)
    -> finished rows get the pad id -> append -> stopping criteria and end-of-text end rows.
    """
    ids = input_ids
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=ids.device)
    try:
        logits = lean.prefill(ids, attention_mask, max_new_tokens)
        for step in range(max_new_tokens):
            scores = logits_processor(ids, logits)
            chosen = scores.argmax(-1)
            if pad_token_id is not None:
                chosen = torch.where(unfinished, chosen, pad_token_id)
            ids = torch.cat([ids, chosen[:, None]], dim=-1)
            done = stopping_criteria(ids, scores) | torch.isin(chosen, eos_ids)
            unfinished &= ~done
            if not bool(unfinished.any()) or step == max_new_tokens - 1:
                break
            logits = lean.step(chosen)
    finally:
        lean.release()
    return ids


def _build(loaded, name: str) -> Decoder:
    model = loaded.model
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if name == "reference":
        return Decoder(model, DecodePath("reference", f"transformers generate, {dtype}"), None)
    if name == "lean":
        lean = LeanDecoder(model, float_linear)
        detail = f"lean decoder, {dtype}, static KV cache"
        return Decoder(model, DecodePath("lean", detail), lean)
    errors: list[float] = []
    with loaded.tokenizing() as tokenizer:
        make = int8_linears(model, tokenizer, errors)
    lean = LeanDecoder(model, make)
    detail = (
        "lean decoder, int8 weights (per output channel) and activations (per token), "
        f"SmoothQuant alpha {ALPHA}, fbgemm; prompts in {dtype}; "
        f"largest weight error {max(errors):.1e}"
    )
    return Decoder(model, DecodePath("int8", detail), lean)


def decoder_for(loaded, name: str) -> Decoder:
    """The ``Decoder`` of path ``name`` (as ``choose_decode_path`` chose it) for a
    ``LoadedModel``'s generations: built once per path, then kept.

    Call holding the model's grant (building the int8 path calibrates and packs weights).
    """
    decoder = loaded.decoders.get(name)
    if decoder is None:
        decoder = loaded.decoders[name] = _build(loaded, name)
    return decoder
