"""Deterministic byte-level BPE tokenizers for the tiny pipelines whose text encoders are language models."""

from collections.abc import Iterable

from tokenizers import pre_tokenizers
from tokenizers.models import BPE
from transformers import Qwen2Tokenizer


__all__ = ["QWEN3_CHAT_TEMPLATE", "build_qwen2_tokenizer", "byte_level_vocab", "whole_word_bpe"]

# What Qwen3's chat template renders for the messages the pipelines send (one user turn and a generation prompt):
# `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n`, plus Qwen3's empty think block when thinking is
# disabled, as the released template does (`Flux2KleinPipeline` disables it, `ZImagePipeline` does not).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def byte_level_vocab(words: Iterable[str], specials: Iterable[str] = ()) -> dict[str, int]:
    """`specials`, the 256 byte-level characters, then each word alone and after a space (`Ġword`)."""
    vocab: dict[str, int] = {}
    for token in list(specials) + sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(token, len(vocab))
    for word in dict.fromkeys(words):
        vocab.setdefault(word, len(vocab))
        vocab.setdefault("\u0120" + word, len(vocab))
    return vocab


def whole_word_bpe(vocab: dict[str, int]) -> BPE:
    """
    A BPE model without merges that keeps every pre-tokenized word found in `vocab` whole (`ignore_merges`, as Llama
    3's tokenizer) and spells any other by its bytes: nothing to write out, and nothing trained (`tokenizers`' BPE
    trainer is not deterministic).
    """
    return BPE(vocab=vocab, merges=[], ignore_merges=True, fuse_unk=False, byte_fallback=False)


def build_qwen2_tokenizer(
    words: Iterable[str],
    chat_template: str = QWEN3_CHAT_TEMPLATE,
    model_max_length: int = 32768,
) -> Qwen2Tokenizer:
    """
    A deterministic `Qwen2Tokenizer` (Qwen's byte-level pre-tokenizer; `<|endoftext|>` for padding, `<|im_start|>`
    and `<|im_end|>` as special tokens, `<think>` and `</think>` added) whose vocabulary holds each of `words` (and the
    chat roles) as one token, alone and after a space: the tokenizer of the tiny Qwen-Image, Z-Image and FLUX.2
    [klein] pipelines.

    Args:
        words (`Iterable[str]`): the whole words of the vocabulary (case is kept).
        chat_template (`str`, defaults to `QWEN3_CHAT_TEMPLATE`): the template `apply_chat_template` renders.
        model_max_length (`int`, defaults to 32768): the tokenizer's length limit.
    """
    words = list(words) + ["system", "user", "assistant"]
    vocab = byte_level_vocab(words, ["<|endoftext|>"])
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=[], model_max_length=model_max_length)
    tokenizer._tokenizer.model = whole_word_bpe(vocab)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = chat_template
    return tokenizer
