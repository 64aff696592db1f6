"""The decode path: how a generation computes its tokens, chosen here and nowhere else.

- ``reference``: transformers' own ``generate`` on the model as loaded. Attention, attribution
  and fine-tuning always use this model, so "explain this answer" explains the reference.
- ``lean``: ``engine.generation.lean.LeanDecoder`` on the same float32 weights (fused
  products, a static KV cache). Logits equal the reference's to float32 rounding.
- ``q4``: the lean decoder on 4-bit groups of 32 (the output layer 8-bit), packed by
  ``engine.generation.quantized``. Exact for a model whose weights came from a Q4_1/Q8_0 GGUF
  (the embedded SmolLM2): each packed matrix is checked, and its largest weight error is part of
  the path's description.

``WORKBENCH_DECODE`` = ``auto`` (default), ``reference``, ``lean`` or ``q4``. ``auto`` takes the
measured default (``bench/generation.py``) where the model allows it, else the reference.
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
import torch.nn.functional as F

from engine.errors import InputError
from engine.generation.lean import LeanDecoder, lean_supported
from engine.generation.quantized import int4_kernel_available, pack_q4, pack_q8

__all__ = [
    "DECODE_PATHS",
    "DESCRIPTIONS",
    "DecodePath",
    "Decoder",
    "choose_decode_path",
    "decoder_for",
    "requested_path",
]

ENV = "WORKBENCH_DECODE"
DECODE_PATHS = ("reference", "lean", "q4")
DEFAULT = "lean"  # chosen by measurement under load: bench/generation.py, README "Speed"
EXACT_RELATIVE = 1e-6  # a packed weight within this of max|w| counts as exact
DESCRIPTIONS = {
    "reference": "transformers' own generate on the model as loaded",
    "lean": "lean decoder on the same weights: fused products, static KV cache; "
    "logits equal the reference's to float32 rounding",
    "q4": "lean decoder on 4-bit weights (output layer 8-bit), exact for a model from a "
    "Q4_1 GGUF file such as the embedded SmolLM2",
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
    if wanted == "auto":
        wanted = DEFAULT
    if wanted == "reference" or kind != "causal-lm" or lean_supported(model) is not None:
        return "reference"
    param = next(model.parameters())
    if wanted == "q4" and (param.device.type != "cpu" or not int4_kernel_available()):
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
        return _lean_generate(self.lean, _eos(self.model), **kwargs)


def _eos(model: torch.nn.Module) -> set[int]:
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


def _float_linear(role: str, weight: torch.Tensor, bias: torch.Tensor | None):
    return lambda x: F.linear(x, weight, bias)


def _build(model: torch.nn.Module, name: str) -> Decoder:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if name == "reference":
        return Decoder(model, DecodePath("reference", f"transformers generate, {dtype}"), None)
    if name == "lean":
        lean = LeanDecoder(model, _float_linear)
        detail = f"lean decoder, {dtype}, fused q/k/v and gate/up, static KV cache"
        return Decoder(model, DecodePath("lean", detail), lean)
    errors: list[float] = []
    scale = max(float(p.detach().abs().max()) for p in model.parameters() if p.dim() == 2)

    def packed(role: str, weight: torch.Tensor, bias: torch.Tensor | None):
        linear = pack_q8(weight, bias) if role == "head" else pack_q4(weight, bias)
        errors.append(linear.max_error)
        return linear

    lean = LeanDecoder(model, packed)
    exact = max(errors) <= EXACT_RELATIVE * scale
    detail = (
        "lean decoder, 4-bit weights in groups of 32 (output layer 8-bit), float32 activations; "
        f"weights {'exact' if exact else 'quantized'} (max error {max(errors):.1e})"
    )
    return Decoder(model, DecodePath("q4", detail), lean)


def decoder_for(loaded, override: str | None = None) -> Decoder:
    """The ``Decoder`` for a ``LoadedModel``'s generations (built once per path, then kept).

    Call holding the model's grant (building packs weights: seconds for 135 M parameters).
    """
    name = choose_decode_path(loaded.model, loaded.kind, override)
    decoder = loaded.decoders.get(name)
    if decoder is None:
        decoder = loaded.decoders[name] = _build(loaded.model, name)
    return decoder
