"""Attention weights of one input: extraction, per-head statistics and export.

    result = extract_attention(loaded, "The cat sat on the mat.")
    result.attentions        # (layer, head, query, key) float32, every row sums to 1
    head_statistics(result.attentions)  # entropy, first token (sink), previous, self, distance

The forward pass runs under ``loaded.use()`` and ``loaded.eager_attention()``: SDPA and flash
kernels return no weights. BERT-style encoders also get their per-head queries and keys (for
bertviz's neuron view, ``engine.attention.neuron``). Aggregation for long inputs lives in
``engine.attention.aggregate`` and the offline bertviz HTML in ``engine.attention.views``.
"""

from __future__ import annotations

import inspect
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.attention.capture import capture_queries_keys
from engine.attention.memory import check_fits
from engine.errors import EngineError, InputError
from engine.files import atomic_write
from engine.manager import LoadedModel
from engine.provenance import Provenance
from engine.results import Result

MAX_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class AttentionSettings:
    """What to feed the model.

    ``max_tokens``: longest input accepted (tokens, special tokens included). ``truncate``:
    cut a longer input to ``min(max_tokens, the model's context length)`` instead of refusing
    it (the result records how many tokens were dropped). ``add_special_tokens``: the
    tokenizer's [CLS]/[SEP] or BOS.
    """

    max_tokens: int = 1024
    add_special_tokens: bool = True
    truncate: bool = False

    def validated(self) -> AttentionSettings:
        """Checked copy; raises ``InputError`` naming the bad value and the allowed range."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise InputError(
                f"max_tokens must be a whole number of tokens (got {self.max_tokens!r})."
            )
        for name in ("add_special_tokens", "truncate"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false (got {getattr(self, name)!r}).")
        if not 2 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InputError(
                f"max_tokens must be between 2 and {MAX_TOKENS_LIMIT} (got {self.max_tokens})."
            )
        return self


@dataclass(frozen=True)
class AttentionResult(Result):
    """Self-attention weights of one input on one model.

    ``attentions``: float32 array shaped (layer, head, query, key); row ``[l, h, q]`` is the
    softmax distribution of query position ``q`` over key positions (sums to 1; a causal LM puts
    0 on keys after ``q``). ``tokens``: the tokenizer's token strings (length = positions).
    ``word_ids``: the word index of each token, -1 for special tokens (used to merge sub-words).
    ``seconds``: wall time of the forward pass (s). ``queries``/``keys``: float32 arrays shaped
    (layer, head, token, head_dim) for bertviz's neuron view, recorded for BERT-style
    self-attention only (None for other architectures, e.g. rotary-position causal LMs).
    ``dropped_tokens``: how many tokens of ``text`` were cut off the end to fit (0 = none).
    """

    text: str
    tokens: list[str]
    token_ids: list[int]
    word_ids: list[int]
    attentions: np.ndarray  # (layer, head, query, key)
    causal: bool
    provenance: Provenance
    seconds: float
    queries: np.ndarray | None = None  # (layer, head, token, head_dim)
    keys: np.ndarray | None = None  # (layer, head, token, head_dim)
    dropped_tokens: int = 0  # tokens cut off the end of ``text`` (``truncate=True``)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (attentions, and queries/keys when recorded)."""
        arrays = (self.attentions, self.queries, self.keys)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, heads, tokens, tokens)."""
        return tuple(self.attentions.shape)  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        return self.attentions.shape[0]

    @property
    def n_heads(self) -> int:
        return self.attentions.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.attentions.shape[2]

    def head(self, layer: int, head: int) -> np.ndarray:
        """One head's (query, key) matrix; raises ``InputError`` for an index out of range."""
        if not 0 <= layer < self.n_layers:
            raise InputError(f"layer must be in 0..{self.n_layers - 1} (got {layer}).")
        if not 0 <= head < self.n_heads:
            raise InputError(f"head must be in 0..{self.n_heads - 1} (got {head}).")
        return self.attentions[layer, head]

    def summary(self) -> dict:
        """Everything but the tensor: for ``--json`` and logs."""
        return {
            "text": self.text,
            "tokens": list(self.tokens),
            "shape": {
                "layer": self.n_layers,
                "head": self.n_heads,
                "query": self.n_tokens,
                "key": self.n_tokens,
            },
            "causal": self.causal,
            "dropped_tokens": self.dropped_tokens,
            "seconds": self.seconds,
            "provenance": self.to_provenance_dict(),
        }

    def to_provenance_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self.provenance)

    def save_npz(self, target: str | Path | io.BytesIO) -> str | Path | io.BytesIO:
        """Write ``attentions`` (layer, head, query, key), ``tokens``, ``token_ids``,
        ``word_ids``, ``text``, ``dropped_tokens``, ``provenance`` (JSON string) and, when
        recorded, ``queries`` and ``keys`` (layer, head, token, head_dim) to an .npz buffer or
        file. A file is written atomically (``DiskError`` when the file system refuses)."""
        if isinstance(target, str | Path):

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    self._savez(fh)

            return atomic_write(target, write, f"the attention file {target}")
        self._savez(target)
        return target

    def _savez(self, fh) -> None:
        vectors = {} if self.queries is None else {"queries": self.queries, "keys": self.keys}
        np.savez_compressed(
            fh,
            **vectors,
            attentions=self.attentions,
            tokens=np.array(self.tokens, dtype=str),
            token_ids=np.array(self.token_ids, dtype=np.int64),
            word_ids=np.array(self.word_ids, dtype=np.int64),
            text=np.array(self.text),
            causal=np.array(self.causal),
            dropped_tokens=np.array(self.dropped_tokens, dtype=np.int64),
            provenance=np.array(json.dumps(self.to_provenance_dict())),
        )

    def npz_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.save_npz(buffer)
        return buffer.getvalue()

    @classmethod
    def load_npz(cls, source: str | Path | io.BytesIO) -> AttentionResult:
        """Read back what ``save_npz`` wrote."""
        with np.load(source, allow_pickle=False) as data:
            prov = json.loads(str(data["provenance"]))
            return cls(
                text=str(data["text"]),
                tokens=[str(t) for t in data["tokens"]],
                token_ids=[int(i) for i in data["token_ids"]],
                word_ids=[int(i) for i in data["word_ids"]],
                attentions=np.asarray(data["attentions"], dtype=np.float32),
                causal=bool(data["causal"]),
                provenance=Provenance(**prov),
                seconds=0.0,
                queries=np.asarray(data["queries"]) if "queries" in data.files else None,
                keys=np.asarray(data["keys"]) if "keys" in data.files else None,
                dropped_tokens=(
                    int(data["dropped_tokens"]) if "dropped_tokens" in data.files else 0
                ),
            )


def context_length(loaded: LoadedModel) -> int | None:
    """Positions the model accepts (tokens, special tokens included); None when unknown.

    From the config (``max_position_embeddings`` / ``n_positions``). RoBERTa-style models
    offset positions by ``pad_token_id + 1``, so they take that many fewer tokens.
    """
    config = loaded.model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            model_type = str(getattr(config, "model_type", ""))
            if "roberta" in model_type or model_type in ("camembert", "longformer"):
                value -= int(getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


@dataclass(frozen=True)
class PreparedInput:
    """A checked, tokenized input, ready for the forward pass (no model lock needed).

    ``inputs``: the model's keyword tensors (``input_ids`` etc.), each (1, token) on CPU.
    ``tokens``/``token_ids``/``word_ids``: one entry per position. ``dropped_tokens``: tokens
    cut off the end by ``truncate`` (0 when none).
    """

    text: str
    tokens: list[str]
    token_ids: list[int]
    word_ids: list[int]
    inputs: dict[str, torch.Tensor]
    dropped_tokens: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def token_limit(loaded: LoadedModel, settings: AttentionSettings) -> int:
    """The longest input accepted: ``min(max_tokens, the model's context length)``."""
    context = context_length(loaded)
    return settings.max_tokens if context is None else min(settings.max_tokens, context)


def prepare_input(
    loaded: LoadedModel, text: str, settings: AttentionSettings | None = None
) -> PreparedInput:
    """Check ``text`` against the model and the settings and tokenize it.

    Raises ``InputError`` for an empty text, an encoder-decoder model, or an input longer than
    the model's context length or ``max_tokens`` (unless ``settings.truncate``: then the input
    is cut to fit and the number of dropped tokens recorded).
    """
    settings = (settings or AttentionSettings()).validated()
    if not isinstance(text, str) or not text.strip():
        raise InputError("The text is empty: type some text to look at its attention.")
    if loaded.kind == "seq2seq":
        raise InputError(
            f"{loaded.name} is an encoder-decoder model: the attention view supports causal LMs "
            "and encoders; pick one of those (e.g. smollm2-135m or minilm-l6)."
        )
    special = settings.add_special_tokens
    with loaded.tokenizing() as tokenizer:
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=special)
        n = int(encoded["input_ids"].shape[1])
        limit, dropped = token_limit(loaded, settings), 0
        if n > limit:
            if not settings.truncate:
                raise _too_long(loaded, n, settings)
            encoded = tokenizer(
                text,
                return_tensors="pt",
                add_special_tokens=special,
                truncation=True,
                max_length=limit,
            )
            dropped = n - int(encoded["input_ids"].shape[1])
            n = int(encoded["input_ids"].shape[1])
        ids = [int(i) for i in encoded["input_ids"][0].tolist()]
        tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
        word_ids = _word_ids(encoded, n)
    inputs = {
        k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    return PreparedInput(text, tokens, ids, word_ids, inputs, dropped)


def _too_long(loaded: LoadedModel, n: int, settings: AttentionSettings) -> InputError:
    context = context_length(loaded)
    if context is not None and context < settings.max_tokens:
        return InputError(
            f"The text has {n} tokens but {loaded.name} reads at most {context} positions: "
            f'shorten it, or choose "Truncate to the model\'s context" (truncate=True) to drop '
            f"the last {n - context} tokens."
        )
    return InputError(
        f"The text has {n} tokens, more than max_tokens={settings.max_tokens}: shorten it, "
        "raise max_tokens, or truncate it (truncate=True)."
    )


def _word_ids(encoded, n: int) -> list[int]:
    """Word index per token from a fast tokenizer; -1 for special tokens (no word)."""
    try:
        ids = encoded.word_ids(0)
    except (ValueError, AttributeError):  # slow tokenizer: one word per token
        return list(range(n))
    return [-1 if w is None else int(w) for w in ids]


def _forward_kwargs(loaded: LoadedModel) -> dict:
    """Skip work that attention does not need (a causal LM's logits beyond one position)."""
    if loaded.kind == "causal-lm":
        params = inspect.signature(loaded.model.forward).parameters
        if "logits_to_keep" in params:
            return {"logits_to_keep": 1}
    return {}


def _collect(layers: list, name: str) -> np.ndarray:
    """Copy per-layer (1, head, query, key) tensors into one float32 array.

    ``layers`` must hold the only references to the tensors (the model output deleted): each
    entry is set to None once copied, so peak memory stays near one copy plus one layer."""
    if not layers or any(a is None for a in layers):
        raise EngineError(
            f"{name} returned no attention weights even with eager attention: this architecture "
            "does not expose them, so its attention cannot be shown."
        )
    first = layers[0]
    n_heads, n_q, n_k = first.shape[1], first.shape[2], first.shape[3]
    # torch's allocator, not np.empty: NumPy asks the kernel for transparent huge pages on big
    # arrays, and first touching 1 GB of them stalled 1-3 s in memory compaction here
    out = torch.empty((len(layers), n_heads, n_q, n_k), dtype=torch.float32).numpy()
    for i in range(len(layers)):
        out[i] = layers[i][0].detach().to("cpu", torch.float32).numpy()
        layers[i] = None  # frees this layer's tensor (the caller holds no other reference)
    return out


def attention_forward(loaded: LoadedModel, prepared: PreparedInput) -> AttentionResult:
    """One forward pass of a prepared input under the model lock; every layer's attention.

    Waiting for the lock is reported into the current run and stops when it is cancelled.
    """
    with (
        loaded.use(),
        loaded.eager_attention(),
        torch.inference_mode(),
        capture_queries_keys(loaded.model) as vectors,
    ):
        started = time.perf_counter()
        out = loaded.model(
            **{k: v.to(loaded.device) for k, v in prepared.inputs.items()},
            output_attentions=True,
            **_forward_kwargs(loaded),
        )
        layers = list(getattr(out, "attentions", None) or ())
        del out  # the list now holds the only references: _collect frees layer by layer
        array = _collect(layers, loaded.name)
        seconds = time.perf_counter() - started
        provenance = Provenance.of(loaded)
    return AttentionResult(
        text=prepared.text,
        tokens=list(prepared.tokens),
        token_ids=list(prepared.token_ids),
        word_ids=list(prepared.word_ids),
        attentions=array,
        causal=loaded.kind == "causal-lm",
        provenance=provenance,
        seconds=seconds,
        queries=_stack(vectors["queries"], array),
        keys=_stack(vectors["keys"], array),
        dropped_tokens=prepared.dropped_tokens,
    )


def extract_attention(
    loaded: LoadedModel, text: str, settings: AttentionSettings | None = None
) -> AttentionResult:
    """Run ``text`` through ``loaded`` once and return every layer's and head's attention.

    The blocking call (Python API, CLI): checks the input (``prepare_input``) and that the
    result fits the free result budget (``MemoryBudgetError`` saying how many tokens would fit)
    before running. Pages start a run instead (``start_attention``), which also reserves it.
    """
    prepared = prepare_input(loaded, text, settings)
    check_fits([(loaded, prepared.n_tokens)])
    return attention_forward(loaded, prepared)


def _stack(per_layer: list[np.ndarray], attentions: np.ndarray) -> np.ndarray | None:
    """(layer, head, token, head_dim) when every layer was recorded with matching shape."""
    if len(per_layer) != attentions.shape[0]:
        return None
    if any(v.shape[:2] != attentions.shape[1:3] for v in per_layer):
        return None
    return np.stack(per_layer)
