"""Tiny offline FLUX.2 pipelines (`Flux2KleinPipeline`, `Flux2Pipeline`) for tests: random weights, local tokenizers.

The text encoders are real `Qwen3ForCausalLM` (Klein) and `Mistral3ForConditionalGeneration` (dev) models, only
narrow: they keep the depth the pipelines read their hidden states at (layers 9, 18, 27 for Klein; 10, 20, 30 for
dev), so that the pipelines' own defaults run unchanged. The tokenizers are byte-level BPE tokenizers written out by
hand (whole words of a small vocabulary, every other word byte by byte) with the chat templates the pipelines apply.
"""

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from transformers import (
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.mistral3 import Mistral3Config, Mistral3ForConditionalGeneration

from ..quiet import quiet_pipeline_imports
from . import DEFAULT_WORDS, _ready, seeded
from .tokenizers import build_qwen2_tokenizer, byte_level_vocab, whole_word_bpe


with quiet_pipeline_imports():
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )


__all__ = [
    "build_mistral3_tokenizer",
    "tiny_flux2_klein_pipeline",
    "tiny_flux2_pipeline",
    "tiny_flux2_transformer",
]

# Mistral-Small-3.1's chat template, for the messages `Flux2Pipeline` builds: a system message and a user message,
# each a list of content blocks (text, or an image placeholder).
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = namespace(value='') %}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{%- set text.value = text.value + block['text'] %}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{%- set text.value = text.value + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- set text = text.value %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def build_mistral3_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """
    A deterministic byte-level BPE tokenizer with Mistral's special tokens and Mistral-Small-3.1's chat template,
    whose vocabulary holds each of `words` (and the words of `Flux2Pipeline`'s system message) as one token.

    It stands in for the `PixtralProcessor` that `Flux2Pipeline` loads as its `tokenizer`: the pipeline only calls its
    `apply_chat_template` on text messages, which a processor hands to its tokenizer (building the processor itself
    needs torchvision, for its image processor).

    Args:
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the whole words of the vocabulary (lower case).
    """
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    # The system message every prompt is encoded with: its words as tokens keep the sequence short.
    system_words = "".join(c if c.isalpha() else " " for c in SYSTEM_MESSAGE).split()
    vocab = byte_level_vocab(list(words) + system_words, specials)
    backend = Tokenizer(whole_word_bpe(vocab))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
        model_max_length=131072,
    )
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tokenizer


def tiny_flux2_transformer(
    in_channels: int = 16,
    joint_attention_dim: int = 48,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    guidance_embeds: bool = False,
) -> Flux2Transformer2DModel:
    """
    A small `Flux2Transformer2DModel` (double- and single-stream blocks on 2x2-patchified latents), 16 wide.

    Args:
        in_channels (`int`, defaults to 16): the patchified latent channels (4x the VAE's).
        joint_attention_dim (`int`, defaults to 48): the text features' width: 3 stacked hidden states of the encoder.
        num_layers (`int`, defaults to 1), num_single_layers (`int`, defaults to 1): double- and single-stream blocks.
        num_attention_heads (`int`, defaults to 2), attention_head_dim (`int`, defaults to 8): the attention shape
            (the four rotary axes t, h, w, l split the head dimension evenly, as FLUX.2's 32 x 4).
        guidance_embeds (`bool`, defaults to `False`): a guidance embedding, as FLUX.2 [dev]; Klein has none.
    """
    quarter = attention_head_dim // 4
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=16,
        axes_dims_rope=(quarter,) * 4,
        guidance_embeds=guidance_embeds,
    )


def tiny_flux2_vae(latent_channels: int = 4, sample_size: int = 32) -> AutoencoderKLFlux2:
    """
    A two-level `AutoencoderKLFlux2` (2x downsampling) whose latent batch norm has random (seeded by the caller)
    running statistics, so that the pipelines' normalisation of the patchified latents is not the identity.
    """
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
    )
    vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
    vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def _flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2's scheduler_config.json (dev and klein); the pipelines pass their own sigmas and mu to it.
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def tiny_flux2_klein_pipeline(
    seed: int = 0,
    resolution: int = 32,
    is_distilled: bool = False,
    words: Iterable[str] = DEFAULT_WORDS,
    dtype: torch.dtype = torch.float32,
) -> Flux2KleinPipeline:
    """
    A tiny, random `Flux2KleinPipeline`: a 27-layer, 16-wide `Qwen3ForCausalLM` text encoder (the pipeline stacks its
    hidden states 9, 18 and 27), a FLUX.2 transformer without guidance embedding, and an `AutoencoderKLFlux2`.

    Args:
        seed (`int`, defaults to 0): seeds the random weights; the same seed gives the same pipeline.
        resolution (`int`, defaults to 32): the pipeline's default image size in pixels (a multiple of 4: latents are
            `resolution // 2` wide, patchified 2x2 into `resolution // 4`).
        is_distilled (`bool`, defaults to `False`): the pipeline's `is_distilled` (the step-distilled FLUX.2 [klein]
            4B/9B: no CFG whatever the `guidance_scale`); `False` as the base models (CFG with an empty negative).
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizer's whole-word vocabulary.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
    """
    tokenizer = build_qwen2_tokenizer(words)
    with seeded(seed):
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=27,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
            )
        )
        transformer = tiny_flux2_transformer(joint_attention_dim=3 * 16, guidance_embeds=False)
        vae = tiny_flux2_vae(4, resolution)
    pipe = Flux2KleinPipeline(
        scheduler=_flux2_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    # The pipeline's default size is 1024 px whatever the model; a tiny one defaults to its own size.
    pipe.default_sample_size = resolution // pipe.vae_scale_factor
    return _ready(pipe, dtype)


def tiny_flux2_pipeline(
    seed: int = 0,
    resolution: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    dtype: torch.dtype = torch.float32,
) -> Flux2Pipeline:
    """
    A tiny, random `Flux2Pipeline` (FLUX.2 [dev]): a `Mistral3ForConditionalGeneration` text encoder (a one-layer
    Pixtral vision tower and a 30-layer, 16-wide Mistral language model: the pipeline stacks its hidden states 10, 20
    and 30), a FLUX.2 transformer with a guidance embedding, and an `AutoencoderKLFlux2`. Its `tokenizer` is the
    tokenizer of [`build_mistral3_tokenizer`] in place of the released model's `PixtralProcessor` (which needs
    torchvision): the pipeline only applies its chat template to text, which a processor hands to its tokenizer.

    Args:
        seed (`int`, defaults to 0): seeds the random weights; the same seed gives the same pipeline.
        resolution (`int`, defaults to 32): the pipeline's default image size in pixels (a multiple of 4).
        words (`Iterable[str]`, defaults to `DEFAULT_WORDS`): the tokenizer's whole-word vocabulary.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
    """
    tokenizer = build_mistral3_tokenizer(words)
    with seeded(seed):
        config = Mistral3Config(
            vision_config=PixtralVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                head_dim=8,
                image_size=64,
                patch_size=8,
            ),
            text_config=MistralConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=30,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=2,
        )
        text_encoder = Mistral3ForConditionalGeneration(config)
        transformer = tiny_flux2_transformer(joint_attention_dim=3 * 16, guidance_embeds=True)
        vae = tiny_flux2_vae(4, resolution)
    pipe = Flux2Pipeline(
        scheduler=_flux2_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = resolution // pipe.vae_scale_factor
    return _ready(pipe, dtype)
