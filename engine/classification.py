"""Sequence classification on a loaded classifier: text in, label and class probabilities out."""

from __future__ import annotations

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


@dataclass(frozen=True)
class ClassificationResult(Result):
    """The predicted ``label`` and ``scores`` (label -> probability, summing to 1)."""

    text: str
    label: str
    scores: dict[str, float]
    logits: np.ndarray  # (num_labels,) raw scores, in the order of the model's id2label
    provenance: Provenance

    @property
    def confidence(self) -> float:
        return self.scores[self.label]


def labels_of(loaded: LoadedModel) -> list[str]:
    """Class names in id order (``LABEL_i`` when the config names none)."""
    config = loaded.model.config
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]


def model_positions(loaded: LoadedModel, max_length: int) -> int:
    """``max_length`` capped at the positions the model has (longer input would crash it)."""
    return min(max_length, context_length(loaded)) if isinstance(max_length, int) else max_length


def start_classification(
    loaded: LoadedModel, text: str, max_length: int = 512
) -> runs.Run[ClassificationResult]:
    """``classify`` as a run (result: ``ClassificationResult``); returns at once.

    In the caller's thread: the tokens that will run (the text, truncated to ``max_length``)
    against the acting user's ``max_input_tokens`` and their requests per minute
    (``LimitError``). Bad input fails the run with its one-line message. ``cost``: tokens.
    """
    spec = {
        "model": loaded.name,
        "fingerprint": loaded.fingerprint,
        "text": text,
        "max_length": max_length,
    }
    n = None
    if isinstance(text, str) and text.strip() and isinstance(max_length, int) and max_length > 0:
        try:
            cut = model_positions(loaded, max_length)
            n = len(loaded.encode(text, truncation=True, max_length=cut)["input_ids"])
        except Exception:  # the run meets it again and reports it
            n = None
    limits = runs.enforced_limits()
    if limits is not None and n is not None:
        check_limit(n, limits.max_input_tokens, "The text", "tokens")
    return runs.start(
        "classify", lambda _ctx: classify(loaded, text, max_length), spec=spec, cost=n or 1
    )


def classify(loaded: LoadedModel, text: str, max_length: int = 512) -> ClassificationResult:
    """Classify ``text`` (truncated to ``max_length`` tokens) with a sequence classifier."""
    if not text.strip():
        raise InputError("The text is empty: type a sentence to classify.")
    if loaded.kind != "classifier":
        raise InputError(
            f"{loaded.name} is a {loaded.kind} model, not a classifier: fine-tune one on the "
            "Fine-tune page (task: classification) and pick it."
        )
    cut = model_positions(loaded, max_length)
    encoded = loaded.encode(text, truncation=True, max_length=cut, return_tensors="pt")
    with loaded.use(), torch.inference_mode():
        logits = loaded.model(**encoded.to(loaded.device)).logits[0].float().cpu()
    probs = torch.softmax(logits, dim=-1).numpy()
    labels = labels_of(loaded)
    return ClassificationResult(
        text=text,
        label=labels[int(probs.argmax())],
        scores={lab: float(p) for lab, p in zip(labels, probs, strict=True)},
        logits=logits.numpy(),
        provenance=Provenance.of(loaded),
    )
