"""The Stable Diffusion 3 / 3.5 family (`StableDiffusion3Pipeline`): flow matching, MMDiT transformer."""

from typing import Optional

import torch

from .base import PipelineFamily


class SD3Family(PipelineFamily):
    """
    [`PipelineFamily`] for `StableDiffusion3Pipeline`: three text encoders (two CLIP, one T5), an
    `SD3Transformer2DModel` predicting velocities, and a `FlowMatchEulerDiscreteScheduler`.
    """

    denoiser_name = "transformer"
    t5_tokenizer_name = "tokenizer_3"
    default_max_sequence_length = 256  # the pipeline's own

    @property
    def patch_size(self) -> int:
        return self.denoiser.config.patch_size

    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.effective_max_sequence_length(max_sequence_length),
        )
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def _forward(self, denoiser, latents, timestep, cond, guidance_scale):
        return denoiser(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            pooled_projections=cond["pooled_projections"].to(self.dtype),
            return_dict=False,
        )[0]

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler = self.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.shift_mu(height, width, self.patch_size, max_shift=1.16)
        scheduler.set_timesteps(num_inference_steps, device=self.device, **kwargs)
        return scheduler.timesteps
