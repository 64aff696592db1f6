"""What is being explained: a differentiable score of the input embeddings.

``tokenize`` checks the input and target and turns them into token ids under the tokenizer's
lock alone (the pre-flight estimate needs nothing more). A ``Target`` turns the user's request (a classifier label, a causal LM's next token or
continuation, or a contrast "A rather than B") into ``forward(free_embeds) -> (batch, outputs)``:
natural-log probabilities (nats) computed from the embeddings of the *free* input tokens (the
ones being attributed; special tokens such as [CLS]/[SEP]/BOS stay fixed).

- classifier, label L: one column, ``log softmax(logits)[L]``; contrast L vs M: ``logit_L -
  logit_M`` (the same as the difference of log-probabilities).
- causal LM, continuation t_1..t_m (teacher-forced): column j is ``log p(t_j | prompt, t_<j)``.
- causal LM, contrast A vs B: one column, ``log p(A | prompt) - log p(B | prompt)``.

``direct_score(ids)`` recomputes the score from token ids with a plain forward pass, so every
target can be checked against an independent computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import InputError
from engine.manager import LoadedModel

MAX_TARGET_TOKENS = 32


@dataclass(frozen=True)
class TargetSpec:
    """The user's choice of what to explain.

    text: causal LM continuation to explain ("" = the model's own next token).
    label: classifier label name or index ("" or None = the predicted label).
    contrast: "why A rather than B": the alternative continuation (causal LM) or label
        (classifier); None for a plain target.
    anchor_first: keep a causal LM's first token fixed (not attributed). None = automatic:
        on when the tokenizer adds no BOS token. The first position is the model's attention
        sink; perturbing it makes the score jump along IG's path (non-convergent deltas).
    """

    text: str = ""
    label: str | None = None
    contrast: str | None = None
    anchor_first: bool | None = None


def context_limit(loaded: LoadedModel) -> int:
    config = loaded.model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@dataclass(frozen=True)
class Tokenized:
    """The input and the target as token ids: everything checkable without running the model.

    ``tokenize`` builds it under the tokenizer's lock only (no model lock, no forward pass), so
    the pre-flight estimate can run while another user's run holds the model.

    input_ids: (n,) ids of the input text; offsets: (n,) character spans; word_ids: (n,) word
    index from the fast tokenizer (None for special tokens); free: (n,) True for the tokens
    being attributed; targets: causal LM target ids, then the contrast's (an empty tuple = the
    model's own next token, one token); label_ids: classifier label index (None = the predicted
    label), then the contrast's.
    """

    input_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    word_ids: tuple[int | None, ...]
    free: tuple[bool, ...]
    anchored: bool
    is_lm: bool
    targets: tuple[tuple[int, ...], ...] = ()
    label_ids: tuple[int | None, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_free(self) -> int:
        return int(sum(self.free))

    @property
    def longest_target(self) -> int:
        """Tokens of the longest target continuation (1 for the model's next token)."""
        return max((len(t) or 1 for t in self.targets), default=0)

    @property
    def n_outputs(self) -> int:
        """Output columns: target tokens (causal LM), or 1 (a contrast, a label)."""
        if self.is_lm and len(self.targets) == 1:
            return len(self.targets[0]) or 1
        return 1


def _check_kind(loaded: LoadedModel, text: str) -> None:
    if not text.strip():
        raise InputError("The text is empty: type the input to explain.")
    if loaded.kind not in ("classifier", "causal-lm"):
        raise InputError(
            f"{loaded.name} is a {loaded.kind} model: attribution needs a sequence "
            "classifier or a causal LM (fine-tune a classifier head on the Fine-tune page)."
        )
    if not getattr(loaded.tokenizer, "is_fast", False):
        raise InputError(
            f"{loaded.name} has a slow (Python) tokenizer: attribution needs a fast one "
            "(offsets); save the model with its tokenizer.json."
        )


def _continuation_ids(loaded: LoadedModel, text: str, what: str) -> tuple[int, ...]:
    ids = loaded.encode(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"The {what} is empty after tokenization: type some text.")
    if len(ids) > MAX_TARGET_TOKENS:
        raise InputError(
            f"The {what} is {len(ids)} tokens long; at most {MAX_TARGET_TOKENS} are allowed: "
            "shorten it."
        )
    return tuple(int(i) for i in ids)


def label_index(loaded: LoadedModel, label: str) -> int:
    """A classifier label's index from its name or number; ``InputError`` listing the labels."""
    labels = dict(enumerate(label_names(loaded)))
    key = str(label).strip()
    for i, name in labels.items():
        if key == name or key == str(i):
            return i
    choices = ", ".join(f"{i}={name}" for i, name in labels.items())
    raise InputError(f"{loaded.name} has no label {label!r}; choose one of: {choices}.")


def tokenize(loaded: LoadedModel, text: str, spec: TargetSpec) -> Tokenized:
    """Tokenize the input and the target and check them (lengths, labels, context size).

    Takes the tokenizer's lock only: no model lock, no forward pass. ``InputError`` for bad
    input, with what to change.
    """
    _check_kind(loaded, text)
    enc = loaded.encode(text, return_special_tokens_mask=True, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = tuple((int(a), int(b)) for a, b in enc["offset_mapping"])
    word_index = tuple(enc.word_ids(0))
    free = [not bool(m) for m in enc["special_tokens_mask"]]
    is_lm = loaded.kind == "causal-lm"
    anchor = spec.anchor_first
    if anchor is None:
        anchor = is_lm and bool(free and free[0]) and sum(free) > 1
    anchored = bool(anchor and is_lm and free and free[0])
    if anchored:
        free[0] = False
    if not any(free):
        raise InputError("The text has no ordinary tokens to attribute.")
    n, limit = len(ids), context_limit(loaded)
    targets: tuple[tuple[int, ...], ...] = ()
    label_ids: tuple[int | None, ...] = ()
    if is_lm:
        if spec.label:
            raise InputError(
                f"{loaded.name} is a causal LM: it has no labels; give a target text instead."
            )
        found = [_continuation_ids(loaded, spec.text, "target text") if spec.text else ()]
        if spec.contrast is not None:
            if not spec.contrast.strip():
                raise InputError("The contrast text is empty: type the alternative continuation.")
            found.append(_continuation_ids(loaded, spec.contrast, "contrast text"))
        targets = tuple(found)
        longest = max(len(t) or 1 for t in targets)
        if n + longest > limit:
            raise InputError(
                f"Text ({n} tokens) plus target ({longest}) exceeds the model's context of "
                f"{limit} tokens: shorten the text."
            )
    else:
        if spec.text:
            raise InputError(
                f"{loaded.name} is a classifier: choose a label (--label), not a target text."
            )
        if n > limit:
            raise InputError(
                f"The text is {n} tokens; {loaded.name} accepts at most {limit}: shorten it."
            )
        chosen = [label_index(loaded, spec.label) if spec.label not in (None, "") else None]
        if spec.contrast is not None:
            chosen.append(label_index(loaded, spec.contrast))
        label_ids = tuple(chosen)
    return Tokenized(
        input_ids=tuple(ids),
        offsets=offsets,
        word_ids=word_index,
        free=tuple(free),
        anchored=anchored,
        is_lm=is_lm,
        targets=targets,
        label_ids=label_ids,
    )


class Target:
    """A prepared target on one input text. Call ``forward`` inside ``loaded.use()``.

    Attributes (all on CPU unless noted):
        tokenized: the ``Tokenized`` input and target (ids, offsets, free mask).
        input_ids: (1, n) token ids of the input text, on the model's device.
        free: (n,) bool, True for the tokens being attributed.
        output_tokens: labels of the output columns (target tokens, or one label).
        description: one line saying what the score is.
    """

    def __init__(
        self, loaded: LoadedModel, text: str, spec: TargetSpec, tokenized: Tokenized | None = None
    ) -> None:
        self.loaded = loaded
        self.spec = spec
        self.text = text
        self.tokenized = tokenized or tokenize(loaded, text, spec)
        t = self.tokenized
        self.input_ids = torch.tensor([t.input_ids], device=loaded.device)  # (1, n)
        self.offsets = list(t.offsets)
        self.word_ids = list(t.word_ids)
        self.free = torch.tensor(t.free, dtype=torch.bool)  # (n,)
        self.anchored = t.anchored
        n = self.input_ids.shape[1]
        self.embedding = loaded.model.get_input_embeddings()
        self.free_index = torch.nonzero(self.free).flatten().to(loaded.device)
        self.is_lm = t.is_lm
        if self.is_lm:
            self._prepare_lm(n)
        else:
            self._prepare_classifier(n)

    # --- preparation ----------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        with self.loaded.tokenizing() as tok:
            return tok.decode(ids)

    def _prepare_lm(self, n: int) -> None:
        spec = self.spec
        device = self.loaded.device
        first = self.tokenized.targets[0]
        if first:
            target = torch.tensor(first, device=device)
            how = "continuation"
        else:
            with torch.no_grad():
                logits = self.loaded.model(self.input_ids, logits_to_keep=1).logits[0, -1]
            target = logits.argmax().reshape(1)
            how = "next token (the model's top choice)"
        self.targets = [target]
        self.targets += [torch.tensor(t, device=device) for t in self.tokenized.targets[1:]]
        decode = self._decode
        self.target_texts = ["".join(decode([i]) for i in t.tolist()) for t in self.targets]
        if spec.contrast is not None:
            self.output_tokens = [f"{self.target_texts[0]!r} rather than {self.target_texts[1]!r}"]
            self.description = (
                f"log p({self.target_texts[0]!r}) - log p({self.target_texts[1]!r}) given the text"
            )
        else:
            self.output_tokens = [decode([i]) for i in target.tolist()]
            self.description = f"log p({self.target_texts[0]!r} | text), {how}"
        # Embeddings of the teacher-forced target tokens (all but each target's last token).
        with torch.no_grad():
            self._suffix = [self.embedding(t[:-1].unsqueeze(0)) for t in self.targets]

    def _labels(self) -> dict[int, str]:
        return dict(enumerate(label_names(self.loaded)))

    def label_index(self, label: str) -> int:
        return label_index(self.loaded, label)

    def _prepare_classifier(self, n: int) -> None:
        spec = self.spec
        labels = self._labels()
        with torch.no_grad():
            logits = self.loaded.model(input_ids=self.input_ids).logits[0]
        self.probabilities = torch.softmax(logits.float(), -1).cpu().numpy()
        chosen = self.tokenized.label_ids
        index = chosen[0] if chosen[0] is not None else int(logits.argmax())
        self.label_ids = [index, *chosen[1:]]
        if spec.contrast is not None:
            a, b = (labels[i] for i in self.label_ids)
            self.output_tokens = [f"{a} rather than {b}"]
            self.description = f"logit[{a}] - logit[{b}] (= log p({a}) - log p({b}))"
        else:
            name = labels[index]
            predicted = " (predicted)" if index == int(logits.argmax()) else ""
            self.output_tokens = [name]
            self.description = f"log p(label {name}{predicted})"
        self.target_texts = [labels[i] for i in self.label_ids]
        self._suffix = []

    # --- scoring ----------------------------------------------------------------------------

    @property
    def n_outputs(self) -> int:
        return len(self.output_tokens)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def input_embeds(self) -> torch.Tensor:
        """(1, n, d) embeddings of the input ids."""
        return self.embedding(self.input_ids)

    def free_embeds(self) -> torch.Tensor:
        """(1, k, d) embeddings of the free tokens (what attribution methods perturb)."""
        return self.input_embeds()[:, self.free_index].detach()

    def baseline_ids(self, baseline: str) -> torch.Tensor:
        """(1, n) ids with every free token replaced by the baseline token (pad or mask)."""
        with self.loaded.tokenizing() as tok:
            if baseline == "mask":
                token = tok.mask_token_id
                if token is None:
                    token = tok.unk_token_id if tok.unk_token_id is not None else tok.pad_token_id
            else:
                token = tok.pad_token_id
            if token is None:
                token = tok.eos_token_id or 0
        ids = self.input_ids.clone()
        ids[0, self.free_index] = int(token)
        return ids

    def baseline_free_embeds(self, baseline: str) -> torch.Tensor:
        """(1, k, d) baseline embeddings of the free tokens: pad / mask token, or zeros."""
        if baseline == "zero":
            return torch.zeros_like(self.free_embeds())
        with torch.no_grad():
            return self.embedding(self.baseline_ids(baseline))[:, self.free_index].detach()

    def full_embeds(self, free_embeds: torch.Tensor) -> torch.Tensor:
        """(B, n, d): the input embeddings with the free positions taken from ``free_embeds``."""
        batch = free_embeds.shape[0]
        with torch.no_grad():
            template = self.input_embeds()
        full = template.expand(batch, -1, -1).clone()
        full[:, self.free_index] = free_embeds.to(full.dtype)
        return full

    def forward(self, free_embeds: torch.Tensor) -> torch.Tensor:
        """(B, k, d) free-token embeddings -> (B, outputs) scores in nats."""
        full = self.full_embeds(free_embeds)
        if not self.is_lm:
            logits = self.loaded.model(inputs_embeds=full).logits.float()  # (B, labels)
            if len(self.label_ids) == 2:
                a, b = self.label_ids
                return (logits[:, a] - logits[:, b]).unsqueeze(-1)
            return torch.log_softmax(logits, -1)[:, self.label_ids[0]].unsqueeze(-1)
        columns = [self._continuation_logprobs(full, i) for i in range(len(self.targets))]
        if len(columns) == 2:
            return (columns[0].sum(-1) - columns[1].sum(-1)).unsqueeze(-1)
        return columns[0]

    def _continuation_logprobs(self, full: torch.Tensor, which: int) -> torch.Tensor:
        """(B, m) log p(t_j | prompt, t_<j) for target ``which``."""
        target = self.targets[which]
        suffix = self._suffix[which].expand(full.shape[0], -1, -1)
        embeds = torch.cat([full, suffix.to(full.dtype)], dim=1)
        m = len(target)
        logits = self.loaded.model(inputs_embeds=embeds, logits_to_keep=m, use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, -m:].float(), -1)  # (B, m, vocab)
        index = target.view(1, m, 1).expand(logits.shape[0], -1, -1)
        return logprobs.gather(-1, index).squeeze(-1)

    def score(self, free_embeds: torch.Tensor) -> torch.Tensor:
        """(B, k, d) -> (B,) the total score (sum over output columns)."""
        return self.forward(free_embeds).sum(-1)

    def direct_score(self, ids: torch.Tensor | None = None) -> float:
        """The score recomputed from token ids with plain forward passes (a cross-check)."""
        ids = self.input_ids if ids is None else ids
        model = self.loaded.model
        with torch.no_grad():
            if not self.is_lm:
                logits = model(input_ids=ids).logits[0].float()
                if len(self.label_ids) == 2:
                    return float(logits[self.label_ids[0]] - logits[self.label_ids[1]])
                return float(torch.log_softmax(logits, -1)[self.label_ids[0]])
            totals = []
            for target in self.targets:
                full = torch.cat([ids[0], target]).unsqueeze(0)
                logprobs = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
                n = ids.shape[1]
                totals.append(
                    float(sum(logprobs[n - 1 + j, t] for j, t in enumerate(target.tolist())))
                )
            return totals[0] - totals[1] if len(totals) == 2 else totals[0]

    def token_texts(self) -> list[str]:
        """Display text of each input token (the text span it covers; special tokens by name)."""
        with self.loaded.tokenizing() as tok:
            tokens = tok.convert_ids_to_tokens(self.input_ids[0].tolist())
        out = []
        for i, (start, end) in enumerate(self.offsets):
            out.append(self.text[start:end] if self.free[i] and end > start else tokens[i])
        return out

    def free_mask(self) -> np.ndarray:
        return self.free.cpu().numpy()


def label_names(loaded: LoadedModel) -> list[str]:
    """A classifier's label names in index order (empty for other kinds)."""
    if loaded.kind != "classifier":
        return []
    config = loaded.model.config
    names = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", 0) or len(names))
    return [str(names.get(i, names.get(str(i), f"LABEL_{i}"))) for i in range(n)]
