"""A tiny offline `ZImagePipeline` (Qwen3 text encoder, Z-Image transformer, Flux-style VAE) for tests."""

from collections.abc import Iterable

import torch
from transformers import Qwen3Config, Qwen3Model

from ..quiet import quiet_pipeline_imports
from . import DEFAULT_WORDS, _ready, seeded, tiny_vae
from .tokenizers import build_qwen2_tokenizer


with quiet_pipeline_imports():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel


__all__ = ["tiny_z_image_pipeline"]


def tiny_z_image_pipeline(
    seed: int = 0,
    resolution: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    dtype: torch.dtype = torch.float32,
) -> ZImagePipeline:
    """
    A tiny, random `ZImagePipeline`: a 2-layer `Qwen3Model` text encoder (16 wide) with a byte-level BPE tokenizer
    and Qwen3's chat template, a `ZImageTransformer2DModel` (32 wide, one refiner layer per stream and one main layer)
    and a 4-channel VAE with Flux's latent scaling, scheduled as Z-Image-Turbo (`shift=3.0`, no dynamic shifting).

    `ZImagePipeline.__call__` renders 1024 px unless told a size: pass `height` and `width` (e.g. 32) to it. The
    pipeline gets a `default_sample_size`, which [`~pipelines.ZImageFamily.default_resolution`] reads, so that the
    library's rollouts and trainers default to `resolution`.

    Args:
        seed (`int`, defaults to 0): seeds the random weights; the same seed gives the same pipeline.
        resolution (`int`, defaults to 32): the library's default image size in pixels (a multiple of 4: latents are
            `resolution // 2` wide and the transformer patches them 2x2).
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizer's whole-word vocabulary.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
    """
    tokenizer = build_qwen2_tokenizer(words)
    with seeded(seed):
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=32,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=16,  # the text encoder's width
            axes_dims=[4, 6, 6],  # the head dimension, 16, split as Z-Image's 32 + 48 + 48 of 128
            axes_lens=[1024, 512, 512],
        )
        vae = tiny_vae(
            4, resolution, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False
        )
    # Z-Image-Turbo's scheduler_config.json.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.default_sample_size = resolution // pipe.vae_scale_factor
    return _ready(pipe, dtype)
