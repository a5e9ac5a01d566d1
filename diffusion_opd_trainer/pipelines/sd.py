"""The Stable Diffusion 1.x / 2.x family (`StableDiffusionPipeline`): a UNet with a DDIM-type scheduler."""

from typing import Optional

import torch

from .base import PipelineFamily


class SDFamily(PipelineFamily):
    """
    [`PipelineFamily`] for `StableDiffusionPipeline`: one CLIP text encoder, a `UNet2DConditionModel` and (for the
    SDE kernel) a `DDIMScheduler`, whose `eta` is the noise level (DDPO's setting).
    """

    denoiser_name = "unet"
    # The UNet's attention projections (self- and cross-attention; DDPO's targets) and its transformer FFNs.
    lora_attention_modules = ("to_q", "to_k", "to_v", "to_out.0")
    lora_ffn_modules = ("ff.net.0.proj", "ff.net.2")

    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": prompt_embeds}

    def _forward(self, denoiser, latents, timestep, cond, guidance_scale):
        latents = self.scheduler.scale_model_input(latents, timestep[0])
        return denoiser(
            latents, timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype), return_dict=False
        )[0]

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.scheduler.timesteps
