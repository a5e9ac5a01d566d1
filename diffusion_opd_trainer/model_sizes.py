"""Real-scale denoisers on the meta device: parameter counts of the base models and of their default LoRAs.

No weights are downloaded or allocated: each denoiser is built from its public `transformer/config.json` values
(SDXL's `unet/config.json`; written out here, source noted) under `accelerate.init_empty_weights`, and the family's
default LoRA is attached to it there too, so the counts are exact and the whole table takes seconds and no memory.
"""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional


__all__ = ["REAL_SCALE_DENOISERS", "DenoiserSize", "denoiser_size", "size_table"]

# What the FLUX.2 transformers share (the diffusers class defaults, as the released configs).
_FLUX2_SHARED = dict(
    patch_size=1,
    in_channels=128,
    attention_head_dim=128,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    timestep_guidance_channels=256,
)

# The `transformer/config.json` of each checkpoint on the Hugging Face Hub (the `source` of each entry).
REAL_SCALE_DENOISERS = {
    "SD3.5-Medium": dict(
        source="stabilityai/stable-diffusion-3.5-medium/transformer/config.json",
        class_name="SD3Transformer2DModel",
        family="SD3Family",
        config=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
    ),
    "SD3.5-Large": dict(
        source="stabilityai/stable-diffusion-3.5-large/transformer/config.json",
        class_name="SD3Transformer2DModel",
        family="SD3Family",
        config=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
    ),
    "Flux.1-dev": dict(
        source="black-forest-labs/FLUX.1-dev/transformer/config.json",
        class_name="FluxTransformer2DModel",
        family="FluxFamily",
        config=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
    "FLUX.2-dev": dict(
        source="black-forest-labs/FLUX.2-dev/transformer/config.json",
        class_name="Flux2Transformer2DModel",
        family="Flux2Family",
        config=dict(
            _FLUX2_SHARED,
            num_layers=8,
            num_single_layers=48,
            num_attention_heads=48,
            joint_attention_dim=15360,
            guidance_embeds=True,
        ),
    ),
    "FLUX.2-klein-4B": dict(
        source="black-forest-labs/FLUX.2-klein-4B/transformer/config.json",
        class_name="Flux2Transformer2DModel",
        family="Flux2Family",
        config=dict(
            _FLUX2_SHARED,
            num_layers=5,
            num_single_layers=20,
            num_attention_heads=24,
            joint_attention_dim=7680,
            guidance_embeds=False,
        ),
    ),
    "Qwen-Image": dict(
        source="Qwen/Qwen-Image/transformer/config.json",
        class_name="QwenImageTransformer2DModel",
        family="QwenImageFamily",
        config=dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
    "Z-Image-Turbo": dict(
        source="Tongyi-MAI/Z-Image-Turbo/transformer/config.json",
        class_name="ZImageTransformer2DModel",
        family="ZImageFamily",
        config=dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=3840,
            n_layers=30,
            n_refiner_layers=2,
            n_heads=30,
            n_kv_heads=30,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=2560,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=(32, 48, 48),
            axes_lens=(1536, 512, 512),
        ),
    ),
    "SDXL": dict(
        source="stabilityai/stable-diffusion-xl-base-1.0/unet/config.json",
        class_name="UNet2DConditionModel",
        family="SDXLFamily",
        config=dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    ),
}


@dataclass
class DenoiserSize:
    """Sizes of one real-scale denoiser and of its default LoRA (rank `r`)."""

    name: str
    base_params: int  # parameters only: SD3.5's persistent `pos_embed` buffer (226 M values) is not counted
    lora_params: int
    lora_layers: int
    r: int
    devices: list[str]  # where the denoiser's tensors live: only "meta", nothing allocated

    @property
    def base_bf16_gib(self) -> float:
        return self.base_params * 2 / 2**30

    @property
    def teacher_bf16_mib(self) -> float:
        """One teacher LoRA in bf16: its file size, and its memory on the shared denoiser."""
        return self.lora_params * 2 / 2**20


def denoiser_size(name: str, r: int = 32, ffn: bool = False) -> DenoiserSize:
    """Builds `REAL_SCALE_DENOISERS[name]` on the meta device with the family's default LoRA (rank `r`) and counts."""
    import diffusers
    from accelerate import init_empty_weights
    from peft import LoraConfig

    from . import pipelines

    spec = REAL_SCALE_DENOISERS[name]
    # Buffers too: SD3.5's positional-embedding table alone is 226 M values (0.9 GB in float32).
    with init_empty_weights(include_buffers=True):
        denoiser = getattr(diffusers, spec["class_name"])(**spec["config"])
        base_params = sum(p.numel() for p in denoiser.parameters())
        # The family's LoRA targets read only the denoiser (its config): a stand-in pipeline holding it will do.
        family_class = pipelines.family_class(spec["family"])
        family = family_class(SimpleNamespace(**{family_class.denoiser_name: denoiser}))
        targets = family.lora_target_modules(ffn=ffn)
        denoiser.add_adapter(LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights="gaussian", target_modules=targets))
    lora = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    return DenoiserSize(
        name=name,
        base_params=base_params,
        lora_params=sum(p.numel() for p in lora.values()),
        lora_layers=sum(1 for n in lora if ".lora_A." in n),
        r=r,
        devices=sorted({str(p.device) for p in denoiser.parameters()} | {str(b.device) for b in denoiser.buffers()}),
    )


def size_table(r: int = 32, sizes: Optional[list[DenoiserSize]] = None) -> str:
    """
    A markdown table of base and LoRA parameters and bf16 sizes: of `sizes`, or of every `REAL_SCALE_DENOISERS` entry
    with the default LoRA of rank `r`.
    """
    sizes = sizes if sizes is not None else [denoiser_size(name, r) for name in REAL_SCALE_DENOISERS]
    r = sizes[0].r if sizes else r
    rows = [
        f"| denoiser | base parameters | in bf16 | LoRA r{r} layers | LoRA r{r} parameters | one teacher in bf16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        rows.append(
            f"| {size.name} | {size.base_params / 1e9:.3f} B | {size.base_bf16_gib:.2f} GiB | {size.lora_layers} | "
            f"{size.lora_params / 1e6:.2f} M | {size.teacher_bf16_mib:.1f} MiB |"
        )
    return "\n".join(rows)
