"""A tiny offline `QwenImagePipeline` for tests: a hand-made Qwen2 BPE tokenizer and random, seeded weights."""

from collections.abc import Iterable

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..quiet import quiet_pipeline_imports
from . import DEFAULT_WORDS, _ready, seeded
from .tokenizers import build_qwen2_tokenizer


with quiet_pipeline_imports():  # the first import of diffusers' pipeline classes
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )


__all__ = ["QWEN_TEMPLATE_WORDS", "tiny_qwen2_5_vl_config", "tiny_qwen_image_pipeline", "tiny_qwen_image_transformer"]

# The words of `QwenImagePipeline`'s prompt template. With one token each (and one per special token, newline and
# punctuation mark), the template's system part is 34 tokens, as with the real Qwen2.5-VL tokenizer: the pipeline
# drops exactly those (`prompt_template_encode_start_idx = 34`).
QWEN_TEMPLATE_WORDS = (
    "system Describe the image by detailing the color shape size texture quantity text spatial relationships of the "
    "objects and background user assistant"
).split()


def tiny_qwen2_5_vl_config(vocab_size: int, hidden_size: int = 16) -> Qwen2_5_VLConfig:
    """
    A 1-layer Qwen2.5-VL text model (2 query heads of 8, one key-value head, multimodal RoPE sections 2 + 1 + 1 as
    Qwen2.5-VL's 16 + 24 + 24) with a 1-block, 16-wide vision tower (unused by text-to-image, but part of the model).
    """
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 128,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1000000.0},
            "bos_token_id": vocab_size - 3,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 3,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
        },
    )


def tiny_qwen_image_transformer(
    num_layers: int = 2,
    latent_channels: int = 4,
    num_attention_heads: int = 3,
    attention_head_dim: int = 8,
    joint_attention_dim: int = 16,
) -> QwenImageTransformer2DModel:
    """
    A small `QwenImageTransformer2DModel` on 2x2-packed latents, 24 wide (unlike the tiny SD3 and Flux transformers,
    32 and 16, so that a LoRA of one does not fit another); the rotary axes split the head dimension 2 + 2 + 4, as
    Qwen-Image's 16 + 56 + 56.

    Args:
        num_layers (`int`, defaults to 2): double-stream blocks.
        latent_channels (`int`, defaults to 4): the VAE's latent channels (the transformer sees 4x as many).
        num_attention_heads (`int`, defaults to 3), attention_head_dim (`int`, defaults to 8): the attention shape.
        joint_attention_dim (`int`, defaults to 16): the text encoder's width.
    """
    quarter = attention_head_dim // 4
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        guidance_embeds=False,
        axes_dims_rope=(quarter, quarter, attention_head_dim - 2 * quarter),
    )


def tiny_qwen_image_pipeline(
    seed: int = 0,
    resolution: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    dtype: torch.dtype = torch.float32,
) -> QwenImagePipeline:
    """
    A tiny, random `QwenImagePipeline`: a Qwen2.5-VL text encoder with a hand-made Qwen2 tokenizer, a Qwen-Image
    transformer, a two-level `AutoencoderKLQwenImage` (4x downsampling, non-trivial `latents_mean`/`latents_std`) and
    the released checkpoint's scheduler config (dynamic, exponential shifting with a terminal sigma).

    Args:
        seed (`int`, defaults to 0): seeds the random weights; the same seed gives the same pipeline.
        resolution (`int`, defaults to 32): the pipeline's default image size in pixels (a multiple of 8: latents are
            `resolution // 4` wide and packed 2x2).
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizer's whole-word vocabulary.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
    """
    tokenizer = build_qwen2_tokenizer(list(words) + QWEN_TEMPLATE_WORDS)  # case kept: "Describe"
    with seeded(seed):
        text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(len(tokenizer), 16))
        transformer = tiny_qwen_image_transformer(joint_attention_dim=16)
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.3, -0.1],
            latents_std=[1.5, 0.8, 1.2, 2.0],
        )
    # The released checkpoint's scheduler_config.json (Qwen/Qwen-Image).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    # QwenImagePipeline's default size is 1024 px whatever the model; a tiny one defaults to its own size.
    pipe.default_sample_size = resolution // pipe.vae_scale_factor
    return _ready(pipe, dtype)
