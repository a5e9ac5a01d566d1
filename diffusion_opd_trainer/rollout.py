"""Sampling denoising trajectories from a diffusers pipeline, with the SDE or ODE kernel of `sde.py`."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .pipelines import PipelineFamily, PromptEmbeddings, get_family
from .sde import sde_step


__all__ = ["Trajectory", "rollout"]


@dataclass
class Trajectory:
    """
    A batch of denoising trajectories x_0 (noise) -> x_N (clean latents).

    Args:
        latents (`torch.Tensor` of shape `(B, N + 1, C, H, W)`): every state, float32.
        log_probs (`torch.Tensor` of shape `(B, N)`, or `None`):
            log pi(x_{j+1} | x_j) of each sampled transition (mean over latent dims); `None` for the ODE.
        timesteps (`torch.Tensor` of shape `(N,)`): the scheduler's timesteps, shared by the batch.
        prompt_embeds ([`~pipelines.PromptEmbeddings`]): the conditioning the trajectories were sampled with.
        noise_level (`float`): the kernel's noise level (0 for the ODE).
        sde_steps (`list[int]`, *optional*):
            The steps that used the SDE kernel when only a window of them did (the others used the ODE and have a NaN
            log-prob); `None` when every step used the same kernel.
        guidance_scale (`float`): the sampler's `guidance_scale` (CFG, or Flux.1-dev's embedded guidance).
        images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`, *optional*): decoded final latents, on request.
    """

    latents: torch.Tensor
    log_probs: Optional[torch.Tensor]
    timesteps: torch.Tensor
    prompt_embeds: PromptEmbeddings
    noise_level: float
    guidance_scale: float
    images: Optional[torch.Tensor] = None
    sde_steps: Optional[list[int]] = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def __getitem__(self, index) -> "Trajectory":
        """The sub-batch `index` (an int, slice, list or index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(index, torch.Tensor):
            index = index.to(self.latents.device)
        return Trajectory(
            latents=self.latents[index],
            log_probs=None if self.log_probs is None else self.log_probs[index],
            timesteps=self.timesteps,
            prompt_embeds=self.prompt_embeds[index],
            noise_level=self.noise_level,
            guidance_scale=self.guidance_scale,
            images=None if self.images is None else self.images[index],
            sde_steps=self.sde_steps,
        )


@torch.no_grad()
def rollout(
    pipeline,
    prompts: Optional[list[str]] = None,
    *,
    prompt_embeds: Optional[PromptEmbeddings] = None,
    num_inference_steps: int = 10,
    guidance_scale: float = 4.5,
    noise_level: float = 0.7,
    sde_steps: Optional[Sequence[int]] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
    latents: Optional[torch.Tensor] = None,
    negative_prompt: str = "",
    max_sequence_length: Optional[int] = None,
    decode: bool = False,
    denoiser: Optional[torch.nn.Module] = None,
) -> Trajectory:
    """
    Samples a batch of trajectories, keeping every state and each transition's log-probability.

    With `noise_level=0` and the same initial noise, the final latents are those of the pipeline's own `__call__`
    (`output_type="latent"`).

    Args:
        pipeline (`DiffusionPipeline` or [`~pipelines.PipelineFamily`]): the model to sample.
        prompts (`list[str]`, *optional*): the prompts (one trajectory each); or pass `prompt_embeds`.
        prompt_embeds ([`~pipelines.PromptEmbeddings`], *optional*): precomputed conditioning, reused as is.
        num_inference_steps (`int`, defaults to 10): denoising steps N.
        guidance_scale (`float`, defaults to 4.5): the pipeline's own `guidance_scale`: the classifier-free guidance
            scale (1 disables CFG) for SD3 and SD, the embedded guidance for Flux.1-dev ([`~pipelines.FluxFamily`]).
        noise_level (`float`, defaults to 0.7): the SDE noise level (DDIM's eta); 0 samples the ODE.
        sde_steps (`list[int]`, *optional*):
            Only these steps (0 = the noisiest) use the SDE at `noise_level`; the others take the deterministic ODE
            step and get a NaN log-prob (Flow-GRPO-Fast / MixGRPO's SDE window). All steps when `None`.
        height (`int`, *optional*), width (`int`, *optional*): image size; the pipeline's default when omitted.
        generator (`torch.Generator` or list, *optional*): for the initial noise and the transition noise.
        latents (`torch.Tensor`, *optional*): initial noise x_0, instead of drawing it.
        negative_prompt (`str`, defaults to `""`): CFG's negative prompt.
        max_sequence_length (`int`, *optional*): T5 length (SD3: default 256; Flux: 512; capped by the tokenizer).
        decode (`bool`, defaults to `False`): also decode the final latents into images.
        denoiser (`torch.nn.Module`, *optional*): the module to call instead of the pipeline's own (e.g. DDP-wrapped).

    Returns:
        [`Trajectory`]
    """
    family: PipelineFamily = get_family(pipeline)
    if prompt_embeds is None:
        if prompts is None:
            raise ValueError("Pass `prompts` or `prompt_embeds`.")
        prompt_embeds = family.encode_prompts(
            prompts,
            # Only CFG needs the negative prompt (Flux.1-dev's `guidance_scale` is embedded, not CFG).
            negative_prompt=negative_prompt if family.cfg_scale(guidance_scale) != 1.0 else None,
            max_sequence_length=max_sequence_length,
        )
    batch_size = len(prompt_embeds)
    height = height or family.default_resolution
    width = width or family.default_resolution
    if latents is None:
        latents = family.prepare_latents(batch_size, height, width, generator)
    x = latents.to(device=family.device, dtype=torch.float32)
    timesteps = family.set_timesteps(num_inference_steps, height, width)

    windowed = sde_steps is not None and noise_level > 0
    if windowed:
        sde_steps = sorted(set(int(j) for j in sde_steps))
        if not sde_steps or sde_steps[0] < 0 or sde_steps[-1] >= len(timesteps):
            raise ValueError(f"`sde_steps` must be step indices in [0, {len(timesteps)}), got {sde_steps}.")
    states, log_probs = [x], []
    for j, t in enumerate(timesteps):
        model_output = family.predict(x, t, prompt_embeds, guidance_scale, denoiser=denoiser)
        level = noise_level if not windowed or j in sde_steps else 0.0
        step = sde_step(family.scheduler, model_output, t, x, noise_level=level, generator=generator)
        x = step.prev_sample
        states.append(x)
        if step.log_prob is not None:
            log_probs.append(step.log_prob)
        elif windowed:
            log_probs.append(torch.full((batch_size,), float("nan"), device=x.device))
    trajectory = Trajectory(
        latents=torch.stack(states, dim=1),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
        timesteps=timesteps.clone(),
        prompt_embeds=prompt_embeds,
        noise_level=noise_level,
        guidance_scale=guidance_scale,
        sde_steps=sde_steps if windowed else None,
    )
    if decode:
        trajectory.images = family.decode(x)
    return trajectory
