"""The Stable Diffusion XL family (`StableDiffusionXLPipeline`): a UNet with pooled-text and size conditioning."""

from typing import Optional

import torch

from .base import PipelineFamily


class SDXLFamily(PipelineFamily):
    """
    [`PipelineFamily`] for `StableDiffusionXLPipeline`: two CLIP text encoders (token features of both, concatenated;
    the pooled embedding of the second), a `UNet2DConditionModel` conditioned also on that pooled embedding and on the
    image size (the pipeline's "added time ids": original size, crop corner (0, 0), target size), and the DDIM kernel
    with `eta` as the noise level (DDPO's).

    **Scheduler.** The released SDXL checkpoints ship an `EulerDiscreteScheduler`, which the kernels do not cover; the
    trainers and `rollout` raise a `TypeError` saying so. Swap it before training, as DDPO does for SD:
    `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` (the same noise schedule and timesteps; the
    trained LoRA then samples with any scheduler).

    **Guidance.** `guidance_scale` is the pipeline's: the classifier-free guidance scale (1 disables it), or, for an
    LCM-style UNet with a guidance embedding (`time_cond_proj_dim`), the embedded guidance with no CFG, as the pipeline
    does. The pipeline's `guidance_rescale` (default 0) is not applied.

    **Negative prompt.** The library's default negative prompt `""` is the pipeline's default: with
    `force_zeros_for_empty_prompt` (the released configs' setting) the negative conditioning is all zeros, as
    `pipe(prompt)` without a negative prompt uses; any other negative prompt is encoded.

    Decoding is the pipeline's (latents mean and std when the VAE config has them, a float16 VAE upcast when its
    `force_upcast` says so) without the invisible watermark.
    """

    denoiser_name = "unet"
    # The UNet's attention projections (self- and cross-attention) and its transformer FFNs, as SD 1.x.
    lora_attention_modules = ("to_q", "to_k", "to_v", "to_out.0")
    lora_ffn_modules = ("ff.net.0.proj", "ff.net.2")

    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled}

    def _encode_negative(self, negative_prompt: str, max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        encoded = self._encode([negative_prompt], max_sequence_length)
        if negative_prompt == "" and self.pipeline.config.force_zeros_for_empty_prompt:
            return {key: torch.zeros_like(value) for key, value in encoded.items()}
        return encoded

    def cfg_scale(self, guidance_scale: float) -> float:
        # A UNet with a guidance embedding takes the guidance as an input; the pipeline then runs no CFG.
        return 1.0 if self.denoiser.config.time_cond_proj_dim is not None else guidance_scale

    def _forward(self, denoiser, latents, timestep, cond, guidance_scale):
        pipe, batch = self.pipeline, latents.shape[0]
        height, width = latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor
        text_embeds = cond["text_embeds"].to(self.dtype)
        encoder_2 = getattr(pipe, "text_encoder_2", None)
        projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else text_embeds.shape[-1]
        # The pipeline's own helper (it also checks the UNet's expected width): original size, crop (0, 0), target.
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), self.dtype, projection_dim)
        timestep_cond = None
        if self.denoiser.config.time_cond_proj_dim is not None:
            guidance = torch.full((batch,), float(guidance_scale) - 1, device=latents.device)
            timestep_cond = pipe.get_guidance_scale_embedding(guidance, self.denoiser.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=latents.device, dtype=self.dtype)
        return denoiser(
            self.scheduler.scale_model_input(latents, timestep[0]),
            timestep,
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            timestep_cond=timestep_cond,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids.to(latents.device).expand(batch, -1)},
            return_dict=False,
        )[0]

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.scheduler.timesteps

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        config = vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        # As the pipeline: SDXL's VAE overflows in float16, so it decodes in float32 and goes back.
        upcast = vae.dtype == torch.float16 and config.get("force_upcast", False)
        dtype = vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype)
        return (images.float() / 2 + 0.5).clamp(0, 1)
