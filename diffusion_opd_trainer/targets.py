"""What each trained step is pulled toward: GRPO's group advantages, the teachers' and the reference's means.

Computed without gradient, between the rollout (`rollout.py`) and the per-step losses (`losses.py`).
"""

import contextlib
import logging
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Optional

import torch
from trl.trainer.utils import nanstd

from .lora import MixedAdapterBatchError, active_adapter, mixed_adapters
from .pipelines import PipelineFamily, PromptEmbeddings
from .sde import sde_step
from .stat_tracking import PerPromptStatTracker
from .teachers import Teacher, as_teacher


logger = logging.getLogger(__name__)

__all__ = ["group_advantages", "reference_means", "teacher_means"]

# Denoisers whose LoRA layers cannot run mixed-adapter batches (found at their first batched teacher pass): their
# teachers run one forward per task from then on.
_NO_MIXED_BATCHES: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


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
    batched: bool = True,
) -> torch.Tensor:
    """
    Each sample's teacher transition mean from state `x` at timestep `t`, with the student's kernel (the KL between
    the two transitions is exact only when they share it), each row run as its own task's teacher.

    With several tasks in the batch, their teachers share one denoiser forward: each row runs its own teacher's
    adapter (PEFT's mixed-adapter batches, [`~lora.mixed_adapters`]), and rows with different CFG scales share it too
    where the scale only enters the guidance combination after the forward (see `_forward_groups`). The result
    equals one forward per task up to float rounding.

    Args:
        family ([`~pipelines.PipelineFamily`]): the pipeline family; its denoiser carries the teachers' adapters.
        teachers (`dict[str, Teacher]`): task -> loaded teacher.
        x (`torch.Tensor`), t (`torch.Tensor`): the states and the timestep.
        embeds ([`~pipelines.PromptEmbeddings`]): the batch's conditioning.
        tasks (`list[str]`): the task of each row.
        guidance_scales (`dict[str, float]`): task -> the teacher's CFG scale.
        noise_level (`float`): the student's noise level.
        autocast (callable, *optional*): returns the context of the denoiser's forward (the trainer's autocast).
        batched (`bool`, defaults to `True`): share forwards across tasks; `False` runs one forward per task.

    Returns:
        `torch.Tensor` shaped like `x`, float32.
    """
    if batched and len(set(tasks)) > 1 and family.denoiser not in _NO_MIXED_BATCHES:
        try:
            return _batched_teacher_means(
                family, teachers, x, t, embeds, tasks, guidance_scales, noise_level, autocast
            )
        except MixedAdapterBatchError as error:
            _NO_MIXED_BATCHES.add(family.denoiser)
            logger.warning("The teachers run one forward per task: %s.", error)
    means = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for task in dict.fromkeys(tasks):
        rows = [i for i, name in enumerate(tasks) if name == task]
        index = torch.tensor(rows, device=x.device)
        with as_teacher(family.denoiser, teachers[task]):
            means[index] = _transition_mean(
                family, x[index], t, embeds[rows], guidance_scales[task], noise_level, autocast
            )
    return means


def _forward_groups(family: PipelineFamily, scales: list[float]) -> list[list[int]]:
    """
    The rows (of per-row CFG scales `scales`) that can share one denoiser forward. Where a scale enters only after
    the forward (the family's `guidance_scale` is its CFG scale and it keeps the base `predict`), rows of any scales
    share it, split only into rows with CFG (a `2B` forward) and without (`B`): running the negative half for rows
    that do not need it would cost more than a second forward. Elsewhere (Flux.1-dev and FLUX.2 [dev] embed the scale
    in the forward, SDXL's guidance-distilled UNets too, Z-Image truncates CFG by it) rows share a forward only with
    rows of the same scale.
    """
    distinct = set(scales)
    after_forward = type(family).predict is PipelineFamily.predict and all(family.cfg_scale(s) == s for s in distinct)
    groups: dict = {}
    for row, scale in enumerate(scales):
        key = family.cfg_scale(scale) != 1.0 if after_forward else scale
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def _batched_teacher_means(family, teachers, x, t, embeds, tasks, guidance_scales, noise_level, autocast):
    means = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for rows in _forward_groups(family, [guidance_scales[task] for task in tasks]):
        index = torch.tensor(rows, device=x.device)
        group_tasks = [tasks[i] for i in rows]
        scales = [guidance_scales[task] for task in group_tasks]
        if len(set(group_tasks)) == 1:
            # One teacher: switched to as the only active adapter, as without batching (no gather per layer).
            context = as_teacher(family.denoiser, teachers[group_tasks[0]])
        else:
            context = mixed_adapters(family.denoiser, [teachers[task].adapter_name for task in group_tasks])
        with context, autocast():
            # One scale: `predict` as usual; several (rows that all run CFG, see `_forward_groups`): one per row.
            velocity = family.predict(x[index], t, embeds[rows], scales[0] if len(set(scales)) == 1 else scales)
        means[index] = sde_step(
            family.scheduler, velocity, t, x[index], noise_level=noise_level, prev_sample=x[index]
        ).mean
    return means
