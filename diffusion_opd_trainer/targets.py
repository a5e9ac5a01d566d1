"""What each trained step is pulled toward: GRPO's group advantages, the teachers' and the reference's means.

Computed without gradient, between the rollout (`rollout.py`) and the per-step losses (`losses.py`).
"""

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Optional

import torch
from trl.trainer.utils import nanstd

from .lora import active_adapter
from .pipelines import PipelineFamily, PromptEmbeddings
from .sde import sde_step
from .stat_tracking import PerPromptStatTracker
from .teachers import Teacher, as_teacher


__all__ = ["group_advantages", "reference_means", "teacher_means"]


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    scale_rewards: str = "batch",
    adv_clip_max: float = 5.0,
    stat_tracker: Optional[PerPromptStatTracker] = None,
    prompts: Optional[list[str]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Group-relative advantages of a global batch, `A = (r - mean_group(r)) / (std + 1e-4)` clipped to
    `[-adv_clip_max, adv_clip_max]`, with Flow-GRPO's per-prompt history as the baseline when a tracker is given.

    Args:
        rewards (`torch.Tensor` of shape `(B,)`): the total reward of each image (NaN: not scored); consecutive
            `num_generations` rows form a group.
        num_generations (`int`): the group size.
        scale_rewards (`str`, defaults to `"batch"`): divide by the std of the whole batch (`"batch"`, Flow-GRPO's
            default), of the group or the prompt's history (`"group"`), or not at all (`"none"`).
        adv_clip_max (`float`, defaults to 5.0): the clipping bound.
        stat_tracker ([`~stat_tracking.PerPromptStatTracker`], *optional*): per-prompt stat tracking: the baseline is
            the mean of every reward the prompt has received (this group's included).
        prompts (`list[str]`, *optional*): the prompt of each row; needed with a tracker.

    Returns:
        `(advantages, group_std)`: the advantages `(B,)` (0 where no reward scored an image) and each group's reward
        std `(B / num_generations,)`.
    """
    grouped = rewards.view(-1, num_generations)
    group_std = nanstd(grouped, dim=1)
    if stat_tracker is not None:
        if prompts is None:
            raise ValueError("Per-prompt stat tracking needs the prompts of the rewards.")
        mean, std = stat_tracker.update(prompts, rewards)
        centred = rewards - mean
        if scale_rewards == "group":
            centred = centred / (std + 1e-4)
    else:
        centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).flatten()
        if scale_rewards == "group":
            centred = centred / (group_std.repeat_interleave(num_generations) + 1e-4)
    if scale_rewards == "batch":
        centred = centred / (nanstd(rewards) + 1e-4)
    # An image no reward scored contributes no gradient.
    advantages = torch.nan_to_num(centred.float(), nan=0.0)
    return advantages.clamp(-adv_clip_max, adv_clip_max), group_std


def _transition_mean(family, x, t, embeds, guidance_scale, noise_level, autocast) -> torch.Tensor:
    with autocast():
        velocity = family.predict(x, t, embeds, guidance_scale)
    # Only the mean is needed: pass a state to score so that no noise is drawn from any generator.
    return sde_step(family.scheduler, velocity, t, x, noise_level=noise_level, prev_sample=x).mean


@torch.no_grad()
def reference_means(
    family: PipelineFamily,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    guidance_scale: float,
    noise_level: float,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """
    The reference model's transition mean from state `x` at timestep `t`: the same denoiser with every LoRA adapter
    disabled (the base model), with the policy's kernel.

    Args:
        family ([`~pipelines.PipelineFamily`]): the pipeline family; its denoiser carries the adapters.
        x (`torch.Tensor`), t (`torch.Tensor`): the states and the timestep.
        embeds ([`~pipelines.PromptEmbeddings`]): the batch's conditioning.
        guidance_scale (`float`), noise_level (`float`): the policy's CFG scale and kernel.
        autocast (callable, *optional*): returns the context of the denoiser's forward (the trainer's autocast).
    """
    with active_adapter(family.denoiser, None):
        return _transition_mean(family, x, t, embeds, guidance_scale, noise_level, autocast)


@torch.no_grad()
def teacher_means(
    family: PipelineFamily,
    teachers: Mapping[str, Teacher],
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: PromptEmbeddings,
    tasks: list[str],
    *,
    guidance_scales: Mapping[str, float],
    noise_level: float,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """
    Each sample's teacher transition mean from state `x` at timestep `t`, with the student's kernel (the KL between
    the two transitions is exact only when they share it), each row run as its own task's teacher.

    Args:
        family ([`~pipelines.PipelineFamily`]): the pipeline family; its denoiser carries the teachers' adapters.
        teachers (`dict[str, Teacher]`): task -> loaded teacher.
        x (`torch.Tensor`), t (`torch.Tensor`): the states and the timestep.
        embeds ([`~pipelines.PromptEmbeddings`]): the batch's conditioning.
        tasks (`list[str]`): the task of each row.
        guidance_scales (`dict[str, float]`): task -> the teacher's CFG scale.
        noise_level (`float`): the student's noise level.
        autocast (callable, *optional*): returns the context of the denoiser's forward (the trainer's autocast).

    Returns:
        `torch.Tensor` shaped like `x`, float32.
    """
    means = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for task, teacher in teachers.items():
        rows = [i for i, name in enumerate(tasks) if name == task]
        if not rows:
            continue
        index = torch.tensor(rows, device=x.device)
        with as_teacher(family.denoiser, teacher):
            means[index] = _transition_mean(
                family, x[index], t, embeds[rows], guidance_scales[task], noise_level, autocast
            )
    return means
