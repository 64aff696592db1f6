"""Generation: text from a causal (or seq2seq) LM, streamed, compared and evaluated.

    from engine.generation import GenerationSettings, generate
    result = generate(loaded, "The capital of France is", GenerationSettings(greedy=True))

Modules: ``core`` (settings, preparation, the decode call and its result), ``decoding`` (the
logits hooks), ``batching`` (concurrent requests decoded together, identical ones once), ``paths`` (the
decode path: reference, ``lean`` decoder, ``int8`` products), ``streaming`` (runs that stream tokens),
``chat`` (chat templates and transcripts), ``presets``, ``evaluation`` (perplexity, BLEU/chrF)
and ``comparison`` (one prompt on several models).
"""

from engine.generation.batching import generate, run_generation
from engine.generation.chat import ChatMessage, conversation, render_chat
from engine.generation.core import (
    GENERATIVE_KINDS,
    GenerationResult,
    GenerationSettings,
    Prepared,
    context_length,
    parse_seed,
    parse_stop_sequences,
    prepare,
    settings_dict,
)
from engine.generation.decoding import Alternative, TokenStep

__all__ = [
    "GENERATIVE_KINDS",
    "Alternative",
    "ChatMessage",
    "GenerationResult",
    "GenerationSettings",
    "Prepared",
    "TokenStep",
    "context_length",
    "conversation",
    "generate",
    "parse_seed",
    "parse_stop_sequences",
    "prepare",
    "render_chat",
    "run_generation",
    "settings_dict",
]
