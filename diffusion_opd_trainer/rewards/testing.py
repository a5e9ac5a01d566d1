"""
Tiny random reward models for tests and benchmarks: the real classes (`CLIPModel`,
`Mask2FormerForUniversalSegmentation`, TrOCR's `VisionEncoderDecoderModel`) built from small configs with seeded
weights, and processors made in code. Nothing is downloaded.
"""

from collections.abc import Iterable
from typing import Optional

from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    RobertaTokenizer,
    SwinConfig,
    TrOCRConfig,
    TrOCRProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

from ..testing import DEFAULT_WORDS, build_clip_tokenizer, seeded, tiny_clip_text_config
from .geneval import COLORS, GENEVAL_CLASSES


__all__ = ["build_byte_level_tokenizer", "tiny_clip", "tiny_mask2former", "tiny_trocr"]


def tiny_clip(
    seed: int = 0, image_size: int = 32, words: Optional[Iterable[str]] = None, text_max_length: int = 16
) -> tuple[CLIPModel, CLIPProcessor]:
    """
    A tiny random `CLIPModel` (16-wide towers, 2 layers) and its `CLIPProcessor` (a word-level CLIP tokenizer and a
    PIL `CLIPImageProcessor` resizing and cropping to `image_size`).

    Args:
        seed (`int`, defaults to 0): seeds the weights.
        image_size (`int`, defaults to 32): the vision tower's input size.
        words (`Iterable[str]`, *optional*): the tokenizer's whole words; the test prompts' words, the GenEval colours
            and class names by default.
        text_max_length (`int`, defaults to 16): the text tower's length.
    """
    if words is None:
        words = list(DEFAULT_WORDS) + list(COLORS) + [w for name in GENEVAL_CLASSES for w in name.split()] + ["object"]
    tokenizer = build_clip_tokenizer(words, model_max_length=text_max_length)
    text_config = tiny_clip_text_config(len(tokenizer), max_positions=text_max_length)
    vision_config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16)
    with seeded(seed):
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_mask2former(
    seed: int = 0, image_size: int = 64, num_queries: int = 10
) -> tuple[Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil]:
    """
    A tiny random `Mask2FormerForUniversalSegmentation` on a tiny Swin backbone, with the 80 COCO labels, and a PIL
    `Mask2FormerImageProcessor` resizing to `image_size`. Building it needs `scipy` (transformers' Mask2Former loss).

    Args:
        seed (`int`, defaults to 0): seeds the weights.
        image_size (`int`, defaults to 64): the input size (a multiple of 32).
        num_queries (`int`, defaults to 10): object queries.
    """
    backbone = SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    coco_names = [name.replace("tv remote", "remote").replace("computer ", "") for name in GENEVAL_CLASSES]
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,  # GroupNorm(32, .) in the pixel decoder: widths are multiples of 32
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=num_queries,
        id2label=dict(enumerate(coco_names)),
        label2id={name: i for i, name in enumerate(coco_names)},
    )
    with seeded(seed):
        model = Mask2FormerForUniversalSegmentation(config).eval()
    processor = Mask2FormerImageProcessorPil(
        size={"shortest_edge": image_size, "longest_edge": image_size}, size_divisor=32
    )
    return model, processor


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (byte-level BPE's alphabet).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_byte_level_tokenizer(model_max_length: int = 64) -> RobertaTokenizer:
    """A RoBERTa (byte-level BPE) tokenizer with one token per byte and no merges: TrOCR's tokenizer class."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in _bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_trocr(seed: int = 0, image_size: int = 32) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """
    A tiny random TrOCR (`VisionEncoderDecoderModel`: ViT encoder, TrOCR decoder) and its `TrOCRProcessor`.

    Args:
        seed (`int`, defaults to 0): seeds the weights.
        image_size (`int`, defaults to 32): the encoder's input size.
    """
    tokenizer = build_byte_level_tokenizer()
    encoder = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    decoder = TrOCRConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        cross_attention_hidden_size=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # TrOCR starts decoding from </s>, as BART does
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    with seeded(seed):
        model = VisionEncoderDecoderModel(config=config).eval()
    image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    return model, TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer)
