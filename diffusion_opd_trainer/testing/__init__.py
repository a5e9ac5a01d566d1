"""Tiny offline pipelines for tests, demos and benchmarks.

Everything here is built from configs with random (seeded) weights and deterministic, locally made word-level
tokenizers: nothing is downloaded, and each pipeline builds in well under a second. The pipelines are the real
diffusers classes (`StableDiffusion3Pipeline`, `FluxPipeline`, `StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
and, in this package's submodules, `QwenImagePipeline`, `Flux2KleinPipeline` / `Flux2Pipeline` and `ZImagePipeline`),
so every code path that serves the real models runs on them unchanged.
"""

import contextlib
from collections.abc import Iterable
from typing import Optional

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from ..quiet import quiet_pipeline_imports


with quiet_pipeline_imports():  # the first import of diffusers' pipeline classes
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )


__all__ = [
    "DEFAULT_WORDS",
    "SD3_LORA_TARGET_MODULES",
    "TINY_TRAINING_ARGS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "save_random_lora",
    "seeded",
    "tiny_clip_text_config",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_sd3_pipeline",
    "tiny_sd3_transformer",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    # testing/tokenizers.py, flux2.py, qwen_image.py, z_image.py
    "QWEN3_CHAT_TEMPLATE",
    "QWEN_TEMPLATE_WORDS",
    "build_mistral3_tokenizer",
    "build_qwen2_tokenizer",
    "tiny_flux2_klein_pipeline",
    "tiny_flux2_pipeline",
    "tiny_flux2_transformer",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen_image_pipeline",
    "tiny_qwen_image_transformer",
    "tiny_z_image_pipeline",
]

# A seconds-long training run on the tiny pipelines (the tests' settings; add the method's own, e.g. batch sizes).
TINY_TRAINING_ARGS = dict(
    num_inference_steps=3,
    guidance_scale=1.0,
    max_steps=2,
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    seed=0,
)

# The attention projections of SD3's joint transformer blocks: the paper's LoRA targets.
SD3_LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

# Words of the tests' and demos' prompts; any other word still tokenizes, character by character.
DEFAULT_WORDS = (
    "a an the of and on in with to left right above below next photo image picture "
    "one two three four five six red green blue yellow purple orange white black "
    "circle circles square squares triangle triangles cat dog car apple text saying sign"
).split()

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def _unique(words: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for word in words:
        word = word.lower()
        if word and word not in seen:
            seen.add(word)
            out.append(word)
    return out


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16) -> CLIPTokenizer:
    """
    A deterministic CLIP BPE tokenizer whose merges spell out each of `words` as one token.

    `tokenizers`' BPE trainer is not deterministic, so the vocabulary and merges are written out here: every character
    (alone and word-final), every prefix of every word, and the merges that build each word left to right. A word
    outside `words` falls back to its characters.

    Args:
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the whole words of the vocabulary (lower case).
        model_max_length (`int`, defaults to 16): the padded length of the CLIP text sequence.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    for char in _ALPHABET + ".,!?'\"-":
        add(char)
        add(char + "</w>")
    # BPE applies the best-ranked merge anywhere in a word. To spell each word out whole, every merge that extends a
    # word's prefix (left side of two or more characters) outranks every merge of two single characters, and the
    # single-character merges are ordered so that each word's first merge outranks any pair met later in that word.
    spelled = [list(word[:-1]) + [word[-1] + "</w>"] for word in _unique(words) if len(word) > 1]
    first_merges = list(dict.fromkeys((pieces[0], pieces[1]) for pieces in spelled))
    must_follow: dict[tuple[str, str], set] = {merge: set() for merge in first_merges}
    for pieces in spelled:
        first = (pieces[0], pieces[1])
        for pair in zip(pieces[1:], pieces[2:]):
            if pair in must_follow and pair != first:
                must_follow[pair].add(first)
    ordered: list[tuple[str, str]] = []
    pending = list(first_merges)
    while pending:
        ready = [merge for merge in pending if not (must_follow[merge] - set(ordered))]
        ordered.extend(ready or pending[:1])  # a cycle (rare) only costs that word a split into pieces
        pending = [merge for merge in pending if merge not in ordered]
    prefix_merges = []
    for pieces in spelled:
        current = pieces[0] + pieces[1]
        add(current)
        for piece in pieces[2:]:
            prefix_merges.append((current, piece))
            current += piece
            add(current)
    merges = list(dict.fromkeys(prefix_merges)) + ordered
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16) -> T5Tokenizer:
    """
    A deterministic T5 (Unigram) tokenizer with one piece per word of `words` and a character fallback.

    Args:
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the whole words of the vocabulary (lower case).
        model_max_length (`int`, defaults to 16): the longest T5 sequence; pipelines built here cap their
            `max_sequence_length` to it.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    # Whole words score far better than their spelling, so the Viterbi segmentation picks them.
    vocab += [("\u2581" + word, -1.0) for word in _unique(words)]
    vocab += [(char, -10.0) for char in _ALPHABET + ".,!?'\"-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


@contextlib.contextmanager
def seeded(seed: int):
    """Seeds torch's global generator inside the block; the caller's random state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_clip_text_config(
    vocab_size: int, hidden_size: int = 16, projection_dim: int = 16, max_positions: int = 16
) -> CLIPTextConfig:
    """A 2-layer, 2-head CLIP text config (GELU), `2 * hidden_size` wide in its MLP."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=max_positions,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def tiny_t5_encoder_config(
    vocab_size: int, d_model: int = 32, d_kv: int = 8, d_ff: int = 64, num_layers: int = 1
) -> T5Config:
    """A 4-head T5 encoder config with 8 relative-position buckets (pad 0, eos 1, as the built T5 tokenizers)."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def tiny_vae(
    latent_channels: int,
    sample_size: int,
    block_out_channels: tuple[int, int] = (8, 8),
    norm_num_groups: int = 4,
    **kwargs,
) -> AutoencoderKL:
    """A two-level `AutoencoderKL` (2x downsampling, one layer per block); `kwargs` go to its constructor."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        **kwargs,
    )


def tiny_sd3_transformer(
    sample_size: int,
    num_layers: int,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
) -> SD3Transformer2DModel:
    """
    A small `SD3Transformer2DModel` on 4-channel latents, patch size 2, RMS-normalised queries and keys (as SD3.5).

    Args:
        sample_size (`int`): the latent width (also the largest positional-embedding grid).
        num_layers (`int`): joint transformer blocks.
        num_attention_heads (`int`, defaults to 4), attention_head_dim (`int`, defaults to 8): the attention shape;
            the caption projection has their product as width.
        joint_attention_dim (`int`, defaults to 32): the width of the text-encoder features (the T5 width).
        pooled_projection_dim (`int`, defaults to 32): the width of the pooled text embedding.
    """
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=sample_size,
        qk_norm="rms_norm",
    )


def _ready(pipe, dtype: Optional[torch.dtype]):
    """`pipe` as `from_pretrained` would return it: modules in eval mode, in `dtype`, without a progress bar."""
    # Modules built from configs start in training mode (dropout on); `from_pretrained` would return them in eval.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype in (None, torch.float32) else pipe.to(dtype=dtype)


def tiny_sd3_pipeline(
    seed: int = 0,
    resolution: int = 32,
    num_layers: int = 2,
    words: Iterable[str] = DEFAULT_WORDS,
    text_max_length: int = 8,
    dtype: torch.dtype = torch.float32,
    shift: float = 3.0,
) -> StableDiffusion3Pipeline:
    """
    A tiny, random `StableDiffusion3Pipeline` (two CLIP encoders, a T5 encoder, an SD3 transformer and a VAE).

    Args:
        seed (`int`, defaults to 0): seeds the random weights; the same seed gives the same pipeline.
        resolution (`int`, defaults to 32): the image size in pixels (latents are `resolution // 2` wide).
        num_layers (`int`, defaults to 2): transformer blocks.
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizers' whole-word vocabulary.
        text_max_length (`int`, defaults to 8): CLIP and T5 length (text tokens dominate compute here).
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
        shift (`float`, defaults to 3.0): the flow-matching scheduler's shift (SD3.5's value).
    """
    words = list(words)
    clip_tokenizer = build_clip_tokenizer(words, model_max_length=text_max_length)
    clip_tokenizer_2 = build_clip_tokenizer(words, model_max_length=text_max_length)
    t5_tokenizer = build_t5_tokenizer(words, model_max_length=text_max_length)
    with seeded(seed):
        clip_config = tiny_clip_text_config(len(clip_tokenizer), 16, 16, text_max_length)
        text_encoder = CLIPTextModelWithProjection(clip_config)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
        text_encoder_3 = T5EncoderModel(tiny_t5_encoder_config(len(t5_tokenizer)))
        # Text features: the T5 width (the two 16-wide CLIP features are zero-padded to it); pooled: both projections.
        transformer = tiny_sd3_transformer(
            resolution // 2, num_layers, joint_attention_dim=32, pooled_projection_dim=32
        )
        vae = tiny_vae(
            4, resolution, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    return _ready(pipe, dtype)


def tiny_flux_transformer(
    num_layers: int = 1,
    num_single_layers: int = 1,
    guidance_embeds: bool = True,
    latent_channels: int = 4,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 16,
) -> FluxTransformer2DModel:
    """
    A small `FluxTransformer2DModel`: double-stream and single-stream blocks on 2x2-packed latents, 16 wide (unlike
    the tiny SD3 transformer's 32, so that a LoRA of one does not fit the other).

    Args:
        num_layers (`int`, defaults to 1), num_single_layers (`int`, defaults to 1): double- and single-stream blocks.
        guidance_embeds (`bool`, defaults to `True`): a guidance embedding, as Flux.1-dev (`False`: as schnell).
        latent_channels (`int`, defaults to 4): the VAE's latent channels (the transformer sees 4x as many).
        num_attention_heads (`int`, defaults to 2), attention_head_dim (`int`, defaults to 8): the attention shape
            (the rotary axes split the head dimension 2 + 2 + 4, as Flux's 16 + 56 + 56).
        joint_attention_dim (`int`, defaults to 32): the T5 width. pooled_projection_dim (`int`, defaults to 16):
            the CLIP width.
    """
    quarter = attention_head_dim // 4
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(quarter, quarter, attention_head_dim - 2 * quarter),
    )


def tiny_flux_pipeline(
    seed: int = 0,
    resolution: int = 32,
    variant: str = "dev",
    words: Iterable[str] = DEFAULT_WORDS,
    text_max_length: int = 8,
    dtype: torch.dtype = torch.float32,
) -> FluxPipeline:
    """
    A tiny, random `FluxPipeline` (CLIP and T5 encoders, a Flux transformer and a 16x-packing VAE), Flux.1-dev-like
    or Flux.1-schnell-like.

    Args:
        seed (`int`, defaults to 0): seeds the random weights.
        resolution (`int`, defaults to 32): the pipeline's default image size in pixels (a multiple of 4: latents are
            `resolution // 2` wide and packed 2x2).
        variant (`str`, defaults to `"dev"`): `"dev"` (guidance embedding, dynamically shifted schedule, as
            Flux.1-dev's scheduler config) or `"schnell"` (no guidance embedding, unshifted schedule).
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizers' whole-word vocabulary.
        text_max_length (`int`, defaults to 8): CLIP and T5 length.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
    """
    if variant not in ("dev", "schnell"):
        raise ValueError(f"`variant` must be 'dev' or 'schnell', got {variant!r}.")
    words = list(words)
    clip_tokenizer = build_clip_tokenizer(words, model_max_length=text_max_length)
    t5_tokenizer = build_t5_tokenizer(words, model_max_length=text_max_length)
    with seeded(seed):
        text_encoder = CLIPTextModel(tiny_clip_text_config(len(clip_tokenizer), 16, 16, text_max_length))
        text_encoder_2 = T5EncoderModel(tiny_t5_encoder_config(len(t5_tokenizer)))
        transformer = tiny_flux_transformer(guidance_embeds=variant == "dev")
        vae = tiny_vae(
            4, resolution, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False
        )
    # The schedulers of the released checkpoints (their scheduler_config.json).
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    # FluxPipeline's default size is 1024 px whatever the model; a tiny one defaults to its own size.
    pipe.default_sample_size = resolution // pipe.vae_scale_factor
    return _ready(pipe, dtype)


def _sd_ddim_scheduler(**overrides) -> DDIMScheduler:
    """A `DDIMScheduler` with the noise schedule of SD 1.5 and SDXL (their `scheduler_config.json` values)."""
    settings = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DDIMScheduler(**{**settings, **overrides})


def tiny_sd_pipeline(
    seed: int = 0,
    resolution: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    text_max_length: int = 8,
    prediction_type: str = "epsilon",
    dtype: Optional[torch.dtype] = torch.float32,
) -> StableDiffusionPipeline:
    """
    A tiny, random SD 1.5-style `StableDiffusionPipeline` (CLIP text encoder, UNet, VAE) with a `DDIMScheduler`.

    Args:
        seed (`int`, defaults to 0): seeds the random weights.
        resolution (`int`, defaults to 32): the image size in pixels.
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizer's whole-word vocabulary.
        text_max_length (`int`, defaults to 8): the CLIP sequence length.
        prediction_type (`str`, defaults to `"epsilon"`): the scheduler's and UNet's parametrisation.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
    """
    tokenizer = build_clip_tokenizer(words, model_max_length=text_max_length)
    with seeded(seed):
        text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer), 16, 16, text_max_length))
        unet = UNet2DConditionModel(
            sample_size=resolution // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = tiny_vae(4, resolution)
    scheduler = _sd_ddim_scheduler(prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipe, dtype)


def tiny_sdxl_pipeline(
    seed: int = 0,
    resolution: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    text_max_length: int = 8,
    time_cond_proj_dim: Optional[int] = None,
    dtype: Optional[torch.dtype] = torch.float32,
) -> StableDiffusionXLPipeline:
    """
    A tiny, random `StableDiffusionXLPipeline` (two CLIP text encoders, the second with a projection; a UNet with
    SDXL's "text_time" added conditioning; a VAE) with a `DDIMScheduler` of SDXL's noise schedule, the scheduler the
    kernels cover (the released checkpoints ship an Euler one: see [`~pipelines.SDXLFamily`]).

    Args:
        seed (`int`, defaults to 0): seeds the random weights.
        resolution (`int`, defaults to 32): the image size in pixels.
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizers' whole-word vocabulary.
        text_max_length (`int`, defaults to 8): the CLIP sequence length.
        time_cond_proj_dim (`int`, *optional*): a guidance embedding of this width in the UNet (LCM-style SDXL).
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
    """
    words = list(words)
    tokenizer = build_clip_tokenizer(words, model_max_length=text_max_length)
    tokenizer_2 = build_clip_tokenizer(words, model_max_length=text_max_length)
    with seeded(seed):
        text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer), 16, 16, text_max_length))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(len(tokenizer_2), 16, 16, text_max_length))
        unet = UNet2DConditionModel(
            sample_size=resolution // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=4,
            # Both encoders' token features side by side (16 + 16), as SDXL's 768 + 1280.
            cross_attention_dim=32,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # Six size values of 8 each, plus the second encoder's 16-wide projection.
            projection_class_embeddings_input_dim=6 * 8 + 16,
            time_cond_proj_dim=time_cond_proj_dim,
        )
        vae = tiny_vae(4, resolution, scaling_factor=0.13025, force_upcast=True)
    # SDXL's noise schedule is SD 1.5's (its scheduler_config.json), in the DDIM scheduler.
    scheduler = _sd_ddim_scheduler(timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _ready(pipe, dtype)


def save_random_lora(
    pipeline,
    path,
    lora_format: str = "peft",
    r: int = 4,
    lora_alpha: int = 8,
    std: float = 0.1,
    seed: int = 0,
    target_modules: Optional[list[str]] = None,
) -> str:
    """
    Writes a LoRA with random (seeded) weights for `pipeline`'s denoiser, standing in for a trained teacher.

    Args:
        pipeline: the pipeline whose denoiser the LoRA fits (left unchanged).
        path (`str` or `os.PathLike`): the folder to write.
        lora_format (`str`, defaults to `"peft"`): `"peft"` (`adapter_config.json` + `adapter_model.safetensors`, as
            `PeftModel.save_pretrained` writes it: the format of the paper's released teachers) or `"diffusers"`
            (`pytorch_lora_weights.safetensors` with adapter metadata, as `save_lora_weights` writes it).
        r (`int`, defaults to 4), lora_alpha (`int`, defaults to 8): rank and alpha.
        std (`float`, defaults to 0.1): the weights' standard deviation (both A and B, so the LoRA changes outputs).
        seed (`int`, defaults to 0): seeds the weights.
        target_modules (`list[str]`, *optional*): defaults to the family's attention projections.

    Returns:
        `str`: `path`.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    from ..lora import DEFAULT_TARGET_MODULES, adapter_state_dict

    name = "transformer" if hasattr(pipeline, "transformer") else "unet"
    denoiser = copy.deepcopy(getattr(pipeline, name))
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or DEFAULT_TARGET_MODULES[name],
        init_lora_weights=False,
    )
    generator = torch.Generator().manual_seed(seed)
    if lora_format == "peft":
        model = get_peft_model(denoiser, config)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.save_pretrained(path)
        return str(path)
    if lora_format != "diffusers":
        raise ValueError(f"lora_format must be 'peft' or 'diffusers', got {lora_format!r}.")
    denoiser.add_adapter(config)
    with torch.no_grad():
        for param_name, param in denoiser.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    type(pipeline).save_lora_weights(
        path,
        **{f"{name}_lora_layers": adapter_state_dict(denoiser), f"{name}_lora_adapter_metadata": metadata},
    )
    return str(path)


# The families whose text encoders are language models, one module each (they use the helpers above).
from .flux2 import (  # noqa: E402
    build_mistral3_tokenizer,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux2_transformer,
)
from .qwen_image import (  # noqa: E402
    QWEN_TEMPLATE_WORDS,
    tiny_qwen2_5_vl_config,
    tiny_qwen_image_pipeline,
    tiny_qwen_image_transformer,
)
from .tokenizers import QWEN3_CHAT_TEMPLATE, build_qwen2_tokenizer  # noqa: E402
from .z_image import tiny_z_image_pipeline  # noqa: E402
