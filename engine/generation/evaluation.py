"""Evaluate text: perplexity under a causal LM, and BLEU / chrF against a reference.

Perplexity is exp(mean negative log-likelihood) over every token after the first, computed in
windows of the model's context with a stride (each scored token sees up to ``window`` tokens of
left context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine import runs
from engine.access import check_limit
from engine.errors import InputError
from engine.generation.core import context_length
from engine.manager import LoadedModel
from engine.provenance import Provenance
from engine.results import Result

MAX_EVAL_TOKENS = 32_768


@dataclass(frozen=True)
class PerplexityResult(Result):
    """Perplexity of ``text``. ``token_logprobs`` has shape (scored_tokens,), natural log.

    ``token_ids`` has shape (tokens,); token ``i + 1`` is scored by ``token_logprobs[i]``.
    """

    text: str
    token_ids: np.ndarray  # (tokens,)
    token_texts: tuple[str, ...]
    token_logprobs: np.ndarray  # (tokens - 1,)
    perplexity: float
    mean_nll: float
    provenance: Provenance


@dataclass(frozen=True)
class OverlapScores(Result):
    """BLEU and chrF (sacrebleu, sentence level, 0-100) of a hypothesis against references."""

    hypothesis: str
    references: tuple[str, ...]
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str


def start_perplexity(
    loaded: LoadedModel, text: str, window: int | None = None
) -> runs.Run[PerplexityResult]:
    """``perplexity`` as a run (result: ``PerplexityResult``); returns at once.

    In the caller's thread: the text's tokens against the acting user's ``max_input_tokens``
    and their requests per minute (``LimitError``). Bad input (empty text, not a causal LM)
    fails the run with its one-line message. The run's ``cost`` is the text's tokens.
    """
    spec = {"model": loaded.name, "fingerprint": loaded.fingerprint, "text": text}
    if window is not None:
        spec["window"] = window
    n = _count_tokens(loaded, text)
    limits = runs.enforced_limits()
    if limits is not None and n is not None:
        check_limit(n, limits.max_input_tokens, "The text", "tokens")
    return runs.start(
        "perplexity", lambda _ctx: perplexity(loaded, text, window), spec=spec, cost=n or 1
    )


def _count_tokens(loaded: LoadedModel, text: str, **kwargs) -> int | None:
    """Tokens of ``text`` (None when it is not a non-empty string, or fails to tokenize: the
    run then reports the problem)."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        return len(loaded.encode(text, **kwargs)["input_ids"])
    except Exception:  # the run meets it again and reports it
        return None


def perplexity(loaded: LoadedModel, text: str, window: int | None = None) -> PerplexityResult:
    """Perplexity of ``text`` under a causal LM (needs at least two tokens)."""
    if loaded.kind != "causal-lm":
        raise InputError(
            f"Perplexity needs a causal language model; {loaded.name} is a {loaded.kind} model."
        )
    if not isinstance(text, str) or not text.strip():
        raise InputError("The text is empty: paste some text to score.")
    ids = loaded.encode(text, return_tensors="pt")["input_ids"][0]
    n = int(ids.shape[0])
    if n < 2:
        raise InputError("Perplexity needs at least two tokens: paste a longer text.")
    if n > MAX_EVAL_TOKENS:
        raise InputError(f"The text has {n} tokens; at most {MAX_EVAL_TOKENS} can be scored.")
    window = min(window or context_length(loaded), context_length(loaded))
    if window < 2:
        raise InputError("The scoring window must be at least 2 tokens.")
    stride = max(1, window // 2)
    logprobs = torch.empty(n - 1)
    scored_until = 1  # token positions < scored_until already have a log-prob
    with loaded.use(), torch.inference_mode():
        start = 0
        while scored_until < n:
            end = min(start + window, n)
            chunk = ids[start:end].unsqueeze(0).to(loaded.device)
            logits = loaded.model(input_ids=chunk).logits[0].float()  # (chunk, vocab)
            lp = torch.log_softmax(logits[:-1], dim=-1)
            targets = chunk[0, 1:]
            chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).cpu()  # (chunk - 1,)
            # position p (target index) lives at chosen[p - start - 1]
            first = max(scored_until, start + 1)
            logprobs[first - 1 : end - 1] = chosen[first - start - 1 :]
            scored_until = end
            start += stride
    with loaded.tokenizing() as tokenizer:
        token_texts = tuple(tokenizer.decode([i]) for i in ids.tolist())
    lp_np = logprobs.numpy().astype(np.float64)
    mean_nll = float(-lp_np.mean())
    return PerplexityResult(
        text=text,
        token_ids=ids.numpy(),
        token_texts=token_texts,
        token_logprobs=lp_np,
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        provenance=Provenance.of(loaded),
    )


def overlap_scores(hypothesis: str, references: str | list[str]) -> OverlapScores:
    """Sentence-level BLEU and chrF of ``hypothesis`` against one or more references."""
    import sacrebleu

    refs = [references] if isinstance(references, str) else list(references)
    refs = [r for r in refs if r and r.strip()]
    if not hypothesis or not hypothesis.strip():
        raise InputError("The output to score is empty: generate or paste some text.")
    if not refs:
        raise InputError("The reference is empty: paste the expected text.")
    bleu = sacrebleu.metrics.BLEU(effective_order=True)
    chrf = sacrebleu.metrics.CHRF()
    return OverlapScores(
        hypothesis=hypothesis,
        references=tuple(refs),
        bleu=float(bleu.sentence_score(hypothesis, refs).score),
        chrf=float(chrf.sentence_score(hypothesis, refs).score),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )
