"""The Z-Image family (`ZImagePipeline`): flow matching, a single-stream transformer with a Qwen3 text encoder."""

from typing import Optional, Union

import torch

from .base import PipelineFamily


class ZImageFamily(PipelineFamily):
    """
    [`PipelineFamily`] for `ZImagePipeline` (Z-Image-Turbo, the few-step distilled model sampled without guidance,
    and Z-Image, the base model sampled with CFG): a Qwen3 text encoder (the second-to-last hidden states of the
    chat-templated prompt, unpadded), a `ZImageTransformer2DModel` (refiner blocks for the image and the text tokens,
    then single-stream blocks on both) and a `FlowMatchEulerDiscreteScheduler`.

    **Guidance.** `guidance_scale` means what it means in `ZImagePipeline.__call__`: CFG as `pos + g * (pos - neg)`
    with the negative prompt, i.e. the usual CFG scale is `1 + g` ([`cfg_scale`]); any `g <= 0` disables it (one
    forward, no negative prompt), as the pipeline's `guidance_scale > 0` test does. Z-Image-Turbo is sampled with
    `guidance_scale=0` (set it: the trainers' configs default to 4.5); Z-Image base with e.g. 4. The pipeline's
    `cfg_normalization` and `cfg_truncation` are given to the family, with the pipeline's defaults (off):
    `rollout(ZImageFamily(pipe, cfg_normalization=1.0, cfg_truncation=0.9), ...)` samples as
    `pipe(..., cfg_normalization=1.0, cfg_truncation=0.9)` (the trainers wrap the pipeline with the defaults).

    The transformer takes per-sample lists (latents with a frame axis, text embeddings of each prompt's own length)
    and the time `1 - t / 1000` (0 at pure noise), and predicts the negated velocity; `_forward` converts to and from
    this, so the kernels see the scheduler's velocity on latents `(B, C, H / 8, W / 8)`, patched 2x2 inside the
    transformer. Prompt embeddings are stored right-padded with an attention mask and unpadded before each forward.
    `max_sequence_length` (default 512, the pipeline's) counts the chat template's tokens too. Decoding casts to the
    VAE's dtype before unscaling, as the pipeline does. Images default to the pipeline's 1024 px (or to a
    `default_sample_size` set on the pipeline, as the tiny test pipelines do).

    Args:
        pipeline (`ZImagePipeline`): the pipeline to wrap.
        cfg_normalization (`float` or `bool`, defaults to `False`): the pipeline's `cfg_normalization`; above 0, each
            sample's guided prediction is rescaled to at most this many times the norm of its positive prediction.
        cfg_truncation (`float`, *optional*, defaults to 1.0): the pipeline's `cfg_truncation`; guidance is dropped
            (one forward) at steps whose normalised time `1 - t / 1000` exceeds it (1.0 or `None`: never).
    """

    denoiser_name = "transformer"
    t5_tokenizer_name = "tokenizer"  # Qwen's: `max_sequence_length` truncates the chat-templated prompt
    default_max_sequence_length = 512  # the pipeline's own
    # Every block (the image and text refiners and the main single-stream layers) has one `attention` and one
    # SwiGLU `feed_forward`: these names cover all three streams.
    lora_attention_modules = ("to_q", "to_k", "to_v", "to_out.0")
    lora_ffn_modules = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")

    def __init__(self, pipeline, cfg_normalization: Union[bool, float] = False, cfg_truncation: Optional[float] = 1.0):
        super().__init__(pipeline)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = cfg_truncation

    @property
    def patch_size(self) -> int:
        return 2  # the pipeline's: image sides must be multiples of vae_scale_factor * 2

    @property
    def default_resolution(self) -> int:
        # `ZImagePipeline.__call__` renders 1024 px when no size is given; the tiny test pipelines set their own.
        sample_size = getattr(self.pipeline, "default_sample_size", None)
        return 1024 if sample_size is None else sample_size * self.vae_scale_factor

    def cfg_scale(self, guidance_scale: float) -> float:
        return 1.0 + guidance_scale if guidance_scale > 0 else 1.0

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        # The pipeline's formula, per sample, with its optional renormalisation (norms are sign-independent).
        guided = cond + (cfg_scale - 1.0) * (cond - uncond)
        if self.cfg_normalization > 0:
            dims = tuple(range(1, cond.dim()))
            max_norm = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * self.cfg_normalization
            norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
            guided = torch.where(norm > max_norm, guided * (max_norm / norm), guided)
        return guided

    def predict(self, latents, timestep, embeddings, guidance_scale=1.0, denoiser=None):
        if self.cfg_scale(guidance_scale) == 1.0 or self.cfg_truncation is None or float(self.cfg_truncation) > 1:
            return super().predict(latents, timestep, embeddings, guidance_scale, denoiser)
        # `cfg_truncation`: no guidance where the normalised time (in float32, compared as a Python float, as the
        # pipeline does) exceeds it. Rollouts and trainers give one timestep per batch; mixed ones take both paths.
        times = ((1000 - torch.as_tensor(timestep).float().reshape(-1)) / 1000).expand(latents.shape[0])
        truncated = torch.tensor([t > float(self.cfg_truncation) for t in times.tolist()])
        if not truncated.any():
            return super().predict(latents, timestep, embeddings, guidance_scale, denoiser)
        unguided = super().predict(latents, timestep, embeddings, 0.0, denoiser)
        if truncated.all():
            return unguided
        guided = super().predict(latents, timestep, embeddings, guidance_scale, denoiser)
        return torch.where(truncated.to(guided.device).reshape(-1, *[1] * (guided.dim() - 1)), unguided, guided)

    def _encode(self, prompts: list[str], max_sequence_length: Optional[int]) -> dict[str, torch.Tensor]:
        # A copy: `_encode_prompt` writes the chat-templated prompts into the list it is given.
        embeds = self.pipeline._encode_prompt(
            list(prompts),
            device=self.device,
            max_sequence_length=self.effective_max_sequence_length(max_sequence_length),
        )
        lengths = torch.tensor([len(e) for e in embeds], device=self.device)
        mask = (torch.arange(int(lengths.max()), device=self.device)[None] < lengths[:, None]).long()
        return {"prompt_embeds": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True), "prompt_mask": mask}

    def _forward(self, denoiser, latents, timestep, cond, guidance_scale):
        mask = cond["prompt_mask"].bool()
        embeds = cond["prompt_embeds"].to(self.dtype)
        output = denoiser(
            list(latents.unsqueeze(2).unbind(dim=0)),  # one (C, 1, H, W) image per sample
            (1000 - timestep) / 1000,  # the pipeline's time: 0 at pure noise
            [embeds[i][mask[i]] for i in range(len(embeds))],
            return_dict=False,
        )[0]
        return -torch.stack(output).squeeze(2)  # the scheduler's velocity is the negated prediction

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # As the pipeline: cast to the VAE's dtype *before* unscaling (the same in float32, not in bfloat16).
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

        # As `ZImagePipeline.__call__`: its linear sigmas 1 -> 1/N and mu from the 2x2-patched sequence length (used
        # by a scheduler with dynamic shifting, ignored by Z-Image-Turbo's fixed shift).
        mu = self.shift_mu(height, width)
        sigmas = get_default_z_image_sigmas(num_inference_steps)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps
