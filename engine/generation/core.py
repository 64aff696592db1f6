"""Text generation on a loaded model: settings in, a typed ``GenerationResult`` out.

    prepared = prepare(loaded, "The capital of France is", settings)   # validate + tokenize
    result = run_generation(loaded, prepared, settings)                # decode (fair queue)

``run_generation`` and ``generate(loaded, prompt, settings)`` (both) live in
``engine.generation.batching``, which decodes concurrent requests together;
``engine.generation.streaming.start_generation`` runs the decode as a run that streams tokens and
can be cancelled.

Decoding follows ``transformers``' ``generate`` loop with small hooks
(``engine.generation.decoding``), on the decode path chosen by ``engine.generation.paths``
(the reference ``generate`` itself, or a lean decoder with the same logits to float32
rounding). Log-probabilities are those of the model's own distribution (log-softmax of the raw
logits), not of the distribution after temperature/top-k/top-p processing.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from engine import access
from engine.errors import InputError
from engine.generation.chat import ChatMessage, render_chat
from engine.generation.decoding import Alternative, Recorder, Sampler, TokenStep
from engine.manager import LoadedModel
from engine.provenance import Provenance
from engine.results import Result

__all__ = [
    "Alternative",
    "GenerationResult",
    "GenerationSettings",
    "Prepared",
    "TokenStep",
    "context_length",
    "generate_kwargs",
    "prepare",
]

MAX_NEW_TOKENS = 8192
GENERATIVE_KINDS = ("causal-lm", "seq2seq")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. ``greedy`` ignores temperature/top-k/top-p; temperature 0 is greedy.

    ``top_k`` 0 and ``top_p`` 1 switch those filters off. ``stop_sequences`` end the run when
    the generated text contains one (the text is cut before it). ``keep_last_tokens``: when
    the prompt plus ``max_new_tokens`` exceeds the context window, keep the prompt's last
    tokens instead of refusing. ``seed`` makes sampling reproducible (a sampled run without a
    seed gets a random one, recorded in its result). ``top_alternatives``: alternatives kept
    per generated token (0 to 20). ``decode_path``: "reference", "lean" or "int8" to ask for one
    (``engine.generation.paths``; a model that cannot take it gets the reference); None or
    "auto" takes the workbench's choice. The path used is in the result's provenance.
    """

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    keep_last_tokens: bool = False
    top_alternatives: int = 5
    decode_path: str | None = None

    def validated(self) -> GenerationSettings:
        """Checked copy; raises ``InputError`` naming the bad value and the allowed range."""
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (got {self.max_new_tokens})."
            )
        if not 0 <= self.temperature <= 10 or math.isnan(self.temperature):
            raise InputError(f"temperature must be between 0 and 10 (got {self.temperature}).")
        if self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or positive (got {self.top_k}).")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {self.top_p}).")
        if not 0 < self.repetition_penalty <= 10:
            raise InputError(
                f"repetition_penalty must be in (0, 10] (got {self.repetition_penalty})."
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be a non-negative integer (got {self.seed}).")
        if not 0 <= self.top_alternatives <= 20:
            raise InputError(
                f"top_alternatives must be between 0 and 20 (got {self.top_alternatives})."
            )
        path = self.decode_path
        if path is not None:
            from engine.generation.paths import requested_path

            path = requested_path(str(path) or "auto")  # InputError naming the choices
        stops = tuple(self.stop_sequences)
        if any(not isinstance(s, str) for s in stops):
            raise InputError("stop_sequences must be strings.")
        return replace(
            self,
            stop_sequences=tuple(s for s in stops if s),
            decode_path=None if path == "auto" else path,
        )

    @property
    def sampling(self) -> bool:
        return not self.greedy and self.temperature > 0


@dataclass(frozen=True)
class Prepared:
    """A validated, tokenized request, ready to decode.

    ``input_ids`` has shape (1, prompt_tokens) on the CPU; ``model_input`` is the text the
    model sees (after the chat template and any truncation).
    """

    prompt: str
    model_input: str
    input_ids: torch.Tensor  # (1, prompt_tokens)
    mode: str  # "text" or "chat"
    messages: tuple[ChatMessage, ...]
    dropped_prompt_tokens: int


@dataclass(frozen=True)
class GenerationResult(Result):
    """A finished generation. ``text`` is the continuation only, without the prompt.

    ``finish_reason``: "eos" (end-of-sequence token), "length" (max_new_tokens), "stop" (a
    stop sequence; the text is cut before it) or "cancelled" (Stop). ``seconds`` is the wall
    time of the decode, ``first_token_seconds`` the time to the first token (prefill).
    ``batch_size``: computations decoded together in one batch with this one (1: alone);
    ``shared_by``: identical requests served by this one computation (1: not shared).
    """

    prompt: str
    text: str
    tokens: tuple[TokenStep, ...]
    settings: GenerationSettings
    provenance: Provenance
    finish_reason: str
    seconds: float
    first_token_seconds: float | None = None
    prompt_tokens: int = 0
    dropped_prompt_tokens: int = 0
    mode: str = "text"
    model_input: str = ""
    messages: tuple[ChatMessage, ...] = ()
    batch_size: int = 1
    shared_by: int = 1

    @property
    def logprob(self) -> float:
        """Sum of the tokens' log-probabilities (natural log)."""
        return float(sum(t.logprob for t in self.tokens))

    @property
    def perplexity(self) -> float | None:
        """exp(-mean log-probability) of the generated tokens; None without tokens."""
        if not self.tokens:
            return None
        return math.exp(-self.logprob / len(self.tokens))

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token (tokens/s); None with fewer than two tokens."""
        if len(self.tokens) < 2 or self.first_token_seconds is None:
            return None
        decode = self.seconds - self.first_token_seconds
        return (len(self.tokens) - 1) / decode if decode > 0 else None

    def token_rows(self) -> list[dict]:
        """One row per generated token: position, id, text, prob, logprob, alternatives."""
        rows = []
        for i, t in enumerate(self.tokens):
            row = {
                "position": i,
                "id": t.id,
                "token": t.text,
                "prob": round(t.prob, 6),
                "logprob": round(t.logprob, 6),
            }
            for j, alt in enumerate(t.alternatives, 1):
                row[f"alt{j}"] = alt.text
                row[f"alt{j}_prob"] = round(math.exp(alt.logprob), 6)
            rows.append(row)
        return rows

    def to_csv(self) -> str:
        """The token table as CSV text (header row first)."""
        rows = self.token_rows()
        fields: list[str] = []
        for row in rows:
            fields.extend(k for k in row if k not in fields)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields or ["position", "id", "token", "prob"])
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["logprob"] = self.logprob
        data["perplexity"] = self.perplexity
        return data


def context_length(loaded: LoadedModel) -> int:
    """Maximum positions the model accepts (tokens)."""
    config = loaded.model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    max_len = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(max_len, int) and 0 < max_len < 1_000_000:
        return max_len
    return 2048


def prepare(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings,
    messages: Sequence[ChatMessage] | None = None,
) -> Prepared:
    """Validate and tokenize a request. Raises ``InputError`` with a fix for bad input and
    ``LimitError`` past the acting user's limits (``max_new_tokens``, ``max_input_tokens``;
    with ``keep_last_tokens`` the prompt is cut to the input limit instead).

    With ``messages`` (chat mode) the prompt is the conversation rendered with the model's chat
    template and ``prompt`` is ignored.
    """
    settings = settings.validated()
    if loaded.kind not in GENERATIVE_KINDS:
        raise InputError(
            f"{loaded.name} is a {loaded.kind} model and cannot generate text: pick a causal LM "
            "or an encoder-decoder model."
        )
    limits = access.limits_for()
    access.check_limit(
        settings.max_new_tokens, limits.max_new_tokens, "max_new_tokens", "new tokens"
    )
    with loaded.tokenizing() as tokenizer:
        if messages:
            msgs = tuple(messages)
            model_input = render_chat(tokenizer, msgs)
            prompt, mode, special = msgs[-1].content, "chat", False
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError("The prompt is empty: type some text to continue.")
            msgs, model_input, mode, special = (), prompt, "text", True
        ids = tokenizer(model_input, return_tensors="pt", add_special_tokens=special)["input_ids"]
    n = int(ids.shape[1])
    if n == 0:
        raise InputError("The prompt has no tokens for this model: type some text.")
    limit = context_length(loaded)
    room = limit if loaded.kind == "seq2seq" else limit - settings.max_new_tokens
    if loaded.kind == "causal-lm" and settings.max_new_tokens >= limit:
        raise InputError(
            f"max_new_tokens ({settings.max_new_tokens}) must be below the model's context of "
            f"{limit} tokens: ask for at most {limit - 1}."
        )
    if not settings.keep_last_tokens or limits.max_input_tokens < 1:
        access.check_limit(n, limits.max_input_tokens, "The prompt", "tokens")
    dropped = 0
    if n > room:
        if not settings.keep_last_tokens:
            raise InputError(
                f"Prompt ({n} tokens) plus max_new_tokens ({settings.max_new_tokens}) exceeds the "
                f"model's context of {limit} tokens: shorten the prompt, generate fewer tokens, or "
                "turn on 'keep last tokens' to drop the start of the prompt."
            )
        dropped = n - room
        ids = ids[:, -room:]
    if settings.keep_last_tokens and ids.shape[1] > limits.max_input_tokens:
        dropped += int(ids.shape[1]) - limits.max_input_tokens  # keep what the limit allows
        ids = ids[:, -limits.max_input_tokens :]
    if dropped:
        with loaded.tokenizing() as tokenizer:
            model_input = tokenizer.decode(ids[0])
    return Prepared(prompt, model_input, ids, mode, msgs, dropped)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def generate_kwargs(
    loaded: LoadedModel, prepared: Prepared, settings: GenerationSettings
) -> tuple[dict, Recorder]:
    """Keyword arguments for ``model.generate`` (without the observer) and the recorder."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    recorder = Recorder(settings.top_alternatives)
    processors: list = [recorder]
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.sampling:
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
        generator = torch.Generator(device=loaded.device)
        generator.manual_seed(int(settings.seed or 0))
        processors.append(Sampler(generator))
    input_ids = prepared.input_ids.to(loaded.device)
    tokenizer = loaded.tokenizer
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "max_new_tokens": settings.max_new_tokens,
        # Sampling happens in ``Sampler`` (own generator); generate then takes its argmax.
        "do_sample": False,
        "num_beams": 1,
        "temperature": None,
        "top_k": None,
        "top_p": None,
        "repetition_penalty": 1.0,  # applied by our processor, after the recorder
        "logits_processor": LogitsProcessorList(processors),
        "pad_token_id": tokenizer.pad_token_id,
    }
    return kwargs, recorder


def settings_dict(settings: GenerationSettings) -> dict:
    return asdict(settings)


def parse_seed(text: str | int | None) -> int | None:
    """A seed typed by a user: empty means none (random); raises ``InputError`` otherwise."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        seed = int(str(text).strip())
    except ValueError as exc:
        raise InputError(
            f"Seed {text!r} is not a whole number: type e.g. 42, or leave it empty."
        ) from exc
    if seed < 0:
        raise InputError(f"Seed must be zero or positive (got {seed}).")
    return seed


def parse_stop_sequences(text: str) -> tuple[str, ...]:
    r"""Stop sequences typed on one line, separated by ``|``; ``\n`` and ``\t`` are escapes."""
    if not text:
        return ()
    parts = [p.replace("\\n", "\n").replace("\\t", "\t") for p in text.split("|")]
    return tuple(p for p in parts if p)
