"""The Flux.1 family (`FluxPipeline`): flow matching, a double- and single-stream transformer on packed latents."""

from typing import Optional

import torch

from .base import PipelineFamily


class FluxFamily(PipelineFamily):
    """
    [`PipelineFamily`] for `FluxPipeline` (Flux.1-dev, Flux.1-schnell): a CLIP text encoder (pooled embedding) and a
    T5 encoder (token embeddings), a `FluxTransformer2DModel` predicting velocities on 2x2-packed latents, and a
    `FlowMatchEulerDiscreteScheduler` with resolution-dependent (dynamic) shifting for dev.

    **Guidance.** `guidance_scale` (of [`~rollout.rollout`], [`predict`] and the trainers' configs) means what it
    means in `FluxPipeline.__call__`: the *embedded* guidance of the guidance-distilled Flux.1-dev, fed to the
    transformer's guidance embedding, with one forward per step and no negative prompt (the pipeline's default is
    3.5; the trainers' configs default to SD3.5's 4.5, so set `guidance_scale=3.5` for dev). Flux.1-schnell has no
    guidance embedding (`guidance_embeds=False`) and ignores it, as the pipeline does. True classifier-free guidance
    with a negative prompt is the pipeline's `true_cfg_scale`, given here to the family:
    `rollout(FluxFamily(pipe, true_cfg_scale=4.0), prompts, negative_prompt="...")` samples as
    `pipe(prompts, true_cfg_scale=4.0, negative_prompt="...")`; the trainers take it as their config's
    `true_cfg_scale` (default 1: off).

    Rollouts keep the latents *unpacked*, `(B, C, H / 8, W / 8)` as the VAE sees them, so that the kernels, the
    trajectories and the trainers are the same as for every other family; they are packed into the transformer's
    2x2-patch sequence (with the pipeline's own image ids) only around each forward. The transition kernels act
    element-wise, so packing commutes with them.

    Args:
        pipeline (`FluxPipeline`): the pipeline to wrap.
        true_cfg_scale (`float`, defaults to 1.0): the pipeline's `true_cfg_scale`; above 1, each step also runs the
            negative prompt (as one batch of `2B` with the prompts) and mixes the two velocities.
    """

    denoiser_name = "transformer"
    t5_tokenizer_name = "tokenizer_2"
    default_max_sequence_length = 512  # the pipeline's own
    # The default targets (the base class's attention names) hit both streams of the double-stream blocks (to_* for
    # the image tokens, add_* / to_add_out for the text tokens) and the q, k, v of the single-stream blocks, whose
    # attention output goes through `proj_out` together with the MLP: that one is in the FFN option.
    lora_ffn_modules = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")

    def __init__(self, pipeline, true_cfg_scale: float = 1.0):
        super().__init__(pipeline)
        self.true_cfg_scale = float(true_cfg_scale)

    @property
    def patch_size(self) -> int:
        return 2  # the 2x2 packing: image sides must be multiples of vae_scale_factor * 2

    @property
    def num_latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches of the VAE's channels

    def lora_target_modules(self, ffn: bool = False) -> list[str]:
        targets = super().lora_target_modules(ffn)
        if ffn:
            # Named one by one: PEFT matches suffixes, and a bare `proj_out` would catch the final output layer too.
            num_single = self.denoiser.config.num_single_layers
            targets += [f"single_transformer_blocks.{i}.proj_out" for i in range(num_single)]
        return targets

    def cfg_scale(self, guidance_scale: float) -> float:
        # `guidance_scale` is embedded, not CFG. The pipeline runs true CFG only above 1.
        return self.true_cfg_scale if self.true_cfg_scale > 1 else 1.0

    def set_true_cfg_scale(self, scale: float) -> None:
        self.true_cfg_scale = float(scale)

    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.effective_max_sequence_length(max_sequence_length),
        )
        # The text ids are zeros of the T5 length (`encode_prompt`'s): rebuilt in `_forward`, not cached per prompt.
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def _forward(self, denoiser, latents, timestep, cond, guidance_scale):
        pipe = self.pipeline
        batch, channels, height, width = latents.shape
        packed = pipe._pack_latents(latents, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        text = cond["encoder_hidden_states"].to(self.dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:  # Flux.1-dev; schnell has no guidance embedding
            guidance = torch.full((batch,), float(guidance_scale), device=latents.device, dtype=torch.float32)
        velocity = denoiser(
            hidden_states=packed,
            # The pipeline casts the scheduler's timestep to the latents' dtype, then divides by 1000.
            timestep=timestep.to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(self.dtype),
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        # `_unpack_latents` takes the image size in pixels.
        factor = self.vae_scale_factor
        return pipe._unpack_latents(velocity, height * factor, width * factor, factor)

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        # As `FluxPipeline.__call__`: linear sigmas 1 -> 1/N (unless the scheduler makes its own flow sigmas) and mu
        # from the packed image sequence length, whether or not the scheduler shifts dynamically.
        config = self.scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas"):
            sigmas = None
        mu = self.shift_mu(height, width)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps
