"""Tiny randomly initialised models built offline, for fast tests of every engine path.

Each builder writes a complete Hugging Face folder (config, safetensors, fast tokenizer) that
loads through the same code as a user's local folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

_VOCAB_TEXT = """
the a an of to and in is was it that this good bad great terrible movie film plot actor love hate
boring fun i you we they he she not very really capital france paris city hello world model
language text , . ! ?
"""
WORDS = tuple(_VOCAB_TEXT.split())


def tiny_tokenizer():
    """A fast word-level tokenizer (supports offsets, which captum's LLM API needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="<s>",
        eos_token="</s>",
    )


def _save(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 4-head Llama causal LM (about 30 k parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _save(LlamaForCausalLM(config), folder)


def tiny_bert(
    folder: Path, num_labels: int | None = None, seed: int = 0, **config_overrides
) -> Path:
    """A 2-layer, 4-head BERT encoder; with ``num_labels`` a sequence classifier.
    ``config_overrides`` replace ``BertConfig`` fields (e.g. ``num_attention_heads=12``)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    for name, value in config_overrides.items():
        setattr(config, name, value)
    if num_labels:
        config.num_labels = num_labels
        config.id2label = {
            i: name for i, name in enumerate(["negative", "positive", "neutral"][:num_labels])
        }
        config.label2id = {v: k for k, v in config.id2label.items()}
        config.architectures = ["BertForSequenceClassification"]
        return _save(BertForSequenceClassification(config), folder)
    config.architectures = ["BertModel"]
    return _save(BertModel(config), folder)


def tiny_t5(folder: Path, seed: int = 0) -> Path:
    """A 1+1-layer T5 encoder-decoder (translation/summarization path)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return _save(T5ForConditionalGeneration(config), folder)


@contextlib.contextmanager
def watching_forward(loaded, before: Callable[[int], None]) -> Iterator[None]:
    """Call ``before(batch_rows)`` ahead of every forward pass of a ``LoadedModel``, whatever
    its decode path (the model's own ``forward`` and ``LeanDecoder``'s); undone on exit.

    Tests use it to count forward passes or to slow them down (``time.sleep`` in ``before``).
    """
    from engine.generation.lean import LeanDecoder

    model = loaded.model
    original, lean_original = model.forward, LeanDecoder._forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        before(int(ids.shape[0]) if ids is not None else 1)
        return original(*args, **kwargs)

    def lean_forward(self, ids, *rest):
        if self.embed is model.get_input_embeddings().weight:
            before(int(ids.shape[0]))
        return lean_original(self, ids, *rest)

    model.forward, LeanDecoder._forward = forward, lean_forward
    try:
        yield
    finally:
        del model.forward
        LeanDecoder._forward = lean_original
