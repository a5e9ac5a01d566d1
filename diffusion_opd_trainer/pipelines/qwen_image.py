"""The Qwen-Image family (`QwenImagePipeline`): flow matching, a double-stream MMDiT on packed latents, Qwen2.5-VL."""

from typing import Optional

import torch

from .base import PipelineFamily


class QwenImageFamily(PipelineFamily):
    """
    [`PipelineFamily`] for `QwenImagePipeline` (Qwen-Image): a Qwen2.5-VL text encoder (its last hidden states, the
    prompt template's system part dropped, one token per prompt token: prompts have different lengths), a
    `QwenImageTransformer2DModel` predicting velocities on 2x2-packed latents, an `AutoencoderKLQwenImage` (video
    latents with one frame, normalised by per-channel `latents_mean` / `latents_std`) and a
    `FlowMatchEulerDiscreteScheduler` with resolution-dependent (dynamic) shifting.

    **Guidance.** `guidance_scale` (of [`~rollout.rollout`], [`predict`] and the trainers' configs) means the
    pipeline's `true_cfg_scale` with `negative_prompt=""`: `rollout(pipe, prompts, guidance_scale=g)` samples as
    `pipe(prompts, true_cfg_scale=g, negative_prompt="")`, including the pipeline's rescale of the guided velocity to
    the norm of the conditional one (per packed token). As in the pipeline, `g <= 1` disables CFG: one forward per
    step, no negative prompt. The pipeline's own `guidance_scale` argument (the embedded guidance of
    guidance-distilled variants) has no counterpart and is ignored, as the pipeline ignores it for the released
    Qwen-Image (`guidance_embeds=False`): diffusers 0.42.1's `QwenImageTransformer2DModel` has no guidance embedding
    at all (with `guidance_embeds=True`, its forward fails when given a guidance).

    Rollouts keep the latents *unpacked*, `(B, C, H / 8, W / 8)` as the VAE sees them (without its frame dimension),
    so that the kernels, trajectories and trainers are those of every other family; they are packed into the
    transformer's 2x2-patch sequence only around each forward.

    Args:
        pipeline (`QwenImagePipeline`): the pipeline to wrap.
    """

    denoiser_name = "transformer"
    # `max_sequence_length` caps the prompt's hidden states (after the dropped template part), as in the pipeline.
    t5_tokenizer_name = "tokenizer"
    default_max_sequence_length = 512  # the pipeline's own
    # The image and text streams' MLPs (the modulation layers `img_mod` / `txt_mod` are left out).
    lora_ffn_modules = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")

    @property
    def patch_size(self) -> int:
        return 2  # the 2x2 packing: image sides must be multiples of vae_scale_factor * 2

    @property
    def num_latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches of the VAE's channels

    def cfg_scale(self, guidance_scale: float) -> float:
        return guidance_scale if guidance_scale > 1 else 1.0  # the pipeline's `do_true_cfg = true_cfg_scale > 1`

    def text_length_limits(self, max_sequence_length: Optional[int]) -> dict[str, int]:
        # The pipeline keeps the first `max_sequence_length` hidden states after the template's system part: the
        # prompt's tokens, then the template's tail (`<|im_end|>`, a newline, `<|im_start|>assistant` and another).
        pipe = self.pipeline
        tail = len(pipe.tokenizer(pipe.prompt_template_encode.format(""))["input_ids"])
        tail -= pipe.prompt_template_encode_start_idx
        return {"tokenizer": self.effective_max_sequence_length(max_sequence_length) - tail}

    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            max_sequence_length=self.effective_max_sequence_length(max_sequence_length),
        )
        # `encode_prompt` drops an all-ones mask; it is kept here, as rows of different batches get padded together.
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def _forward(self, denoiser, latents, timestep, cond, guidance_scale):
        pipe = self.pipeline
        batch, channels, height, width = latents.shape
        packed = pipe._pack_latents(latents, batch, channels, height, width)
        mask = cond["encoder_hidden_states_mask"]
        # Padded text tokens are masked out of the joint attention and take RoPE positions after the real ones, so
        # padding changes nothing; without padding the mask is dropped, as the pipeline drops it.
        velocity = denoiser(
            hidden_states=packed,
            # The pipeline casts the scheduler's timestep to the latents' dtype, then divides by 1000.
            timestep=timestep.to(latents.dtype) / 1000,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        # `_unpack_latents` takes the image size in pixels and returns one frame: (B, C, 1, H, W).
        factor = self.vae_scale_factor
        return pipe._unpack_latents(velocity, height * factor, width * factor, factor)[:, :, 0]

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        # The pipeline rescales the guided velocity to the conditional one's norm per packed token: a 2x2 patch
        # of every channel.
        def per_token(x: torch.Tensor) -> torch.Tensor:
            batch, channels, height, width = x.shape
            return x.reshape(batch, channels, height // 2, 2, width // 2, 2)

        combined = per_token(uncond + cfg_scale * (cond - uncond))
        cond_norm = torch.linalg.vector_norm(per_token(cond), dim=(1, 3, 5), keepdim=True)
        combined_norm = torch.linalg.vector_norm(combined, dim=(1, 3, 5), keepdim=True)
        return (combined * (cond_norm / combined_norm)).reshape(cond.shape)

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps

        # As `QwenImagePipeline.__call__`: linear sigmas 1 -> 1/N and mu from the packed image sequence length.
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = self.shift_mu(height, width)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Decodes latents `(B, C, H, W)` into images `[B, 3, H, W]` in `[0, 1]` (float32) as the pipeline does: add the
        frame dimension, undo the per-channel normalisation (`latents * std + mean`), decode, take the frame.
        """
        vae = self.pipeline.vae
        latents = latents.unsqueeze(2).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        images = vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
