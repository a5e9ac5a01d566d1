"""What each trained step is pulled toward: GRPO's group advantages, the teachers' and the reference's means.

Computed without gradient, between the rollout (`rollout.py`) and the per-step losses (`losses.py`).
"""

import contextlib
import logging
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
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
    same_forwards: Optional[Callable[[Sequence[bool]], list[bool]]] = None,
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
        same_forwards (callable, *optional*): makes every process run the same denoiser forwards, as FSDP needs (each
            forward gathers the sharded weights from every process, so a process that skipped one would hang the
            others). Given this process's flags over forward groups listed alike on every process, it returns whether
            any process has each group; a group this process lacks runs on one row whose result is discarded, and
            whether the forwards are shared across tasks is decided from the teachers, not from this batch's tasks.

    Returns:
        `torch.Tensor` shaped like `x`, float32.
    """
    aligned = same_forwards is not None
    several_tasks = len(teachers) > 1 if aligned else len(set(tasks)) > 1
    if batched and several_tasks and family.denoiser not in _NO_MIXED_BATCHES:
        try:
            if aligned:  # checked on every process before any forward, so that all of them fall back together
                with mixed_adapters(family.denoiser, [teacher.adapter_name for teacher in teachers.values()]):
                    pass
        except MixedAdapterBatchError as error:
            _NO_MIXED_BATCHES.add(family.denoiser)
            logger.warning("The teachers run one forward per task: %s.", error)
        else:
            try:
                return _batched_teacher_means(
                    family, teachers, x, t, embeds, tasks, guidance_scales, noise_level, autocast, same_forwards
                )
            except MixedAdapterBatchError as error:
                if aligned:  # failed inside a forward that other processes may have finished: no way back
                    raise RuntimeError(
                        f"The teachers' shared forward failed ({error}) under FSDP, where every process must run the "
                        "same forwards: set `trainer.batch_teacher_forwards = False` (one forward per task)."
                    ) from error
                _NO_MIXED_BATCHES.add(family.denoiser)
                logger.warning("The teachers run one forward per task: %s.", error)
    means = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    order = list(teachers) if aligned else list(dict.fromkeys(tasks))
    here = [task in tasks for task in order]
    for task, needed, present in zip(order, same_forwards(here) if aligned else here, here):
        if not needed:
            continue
        rows = [i for i, name in enumerate(tasks) if name == task] if present else [0]
        index = torch.tensor(rows, device=x.device)
        with as_teacher(family.denoiser, teachers[task]):
            mean = _transition_mean(family, x[index], t, embeds[rows], guidance_scales[task], noise_level, autocast)
        if present:  # else the forward another process needed, on one row, discarded
            means[index] = mean
    return means


def _forward_group_key(family: PipelineFamily, scales: Sequence[float]) -> Callable[[float], Hashable]:
    """
    What decides which rows (of CFG scales among `scales`) can share one denoiser forward. Where a scale enters only
    after the forward (the family's `guidance_scale` is its CFG scale and it keeps the base `predict`), rows of any
    scales share it, split only into rows with CFG (a `2B` forward) and without (`B`): running the negative half for
    rows that do not need it would cost more than a second forward. Elsewhere (Flux.1-dev and FLUX.2 [dev] embed the
    scale in the forward, SDXL's guidance-distilled UNets too, Z-Image truncates CFG by it) rows share a forward only
    with rows of the same scale.
    """
    distinct = set(scales)
    after_forward = type(family).predict is PipelineFamily.predict and all(family.cfg_scale(s) == s for s in distinct)
    return (lambda scale: family.cfg_scale(scale) != 1.0) if after_forward else (lambda scale: scale)


def _forward_groups(family: PipelineFamily, scales: list[float]) -> list[list[int]]:
    """The rows (of per-row CFG scales `scales`) that can share one denoiser forward (see `_forward_group_key`)."""
    key = _forward_group_key(family, scales)
    groups: dict = {}
    for row, scale in enumerate(scales):
        groups.setdefault(key(scale), []).append(row)
    return list(groups.values())


def _aligned_forward_groups(family, teachers, tasks, guidance_scales, same_forwards) -> list[tuple[list[int], str]]:
    """
    The forward groups of every process (see `teacher_means`' `same_forwards`), in an order that is the same on each:
    `(rows, task)` pairs, `rows` empty where only another process has rows of the group (`task` is then a teacher of
    the group, whose forward this process runs on one row).
    """
    key = _forward_group_key(family, [guidance_scales[task] for task in teachers])
    # The groups any process can have, in the teachers' order, each with its first teacher.
    keys = dict.fromkeys(key(guidance_scales[task]) for task in teachers)
    first = {k: next(task for task in teachers if key(guidance_scales[task]) == k) for k in keys}
    rows = {k: [i for i, task in enumerate(tasks) if key(guidance_scales[task]) == k] for k in keys}
    needed = same_forwards([bool(rows[k]) for k in keys])
    return [(rows[k], first[k]) for k, run in zip(keys, needed) if run]


def _batched_teacher_means(
    family, teachers, x, t, embeds, tasks, guidance_scales, noise_level, autocast, same_forwards=None
):
    means = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if same_forwards is None:
        scales = [guidance_scales[task] for task in tasks]
        groups = [(rows, tasks[rows[0]]) for rows in _forward_groups(family, scales)]
    else:
        groups = _aligned_forward_groups(family, teachers, tasks, guidance_scales, same_forwards)
    for rows, first_task in groups:
        present = bool(rows)
        rows = rows or [0]  # another process's group: its forward here on one row, discarded
        index = torch.tensor(rows, device=x.device)
        group_tasks = [tasks[i] for i in rows] if present else [first_task]
        scales = [guidance_scales[task] for task in group_tasks]
        if len(set(group_tasks)) == 1:
            # One teacher: switched to as the only active adapter, as without batching (no gather per layer).
            context = as_teacher(family.denoiser, teachers[group_tasks[0]])
        else:
            context = mixed_adapters(family.denoiser, [teachers[task].adapter_name for task in group_tasks])
        with context, autocast():
            # One scale: `predict` as usual; several (rows that all run CFG, see `_forward_groups`): one per row.
            velocity = family.predict(x[index], t, embeds[rows], scales[0] if len(set(scales)) == 1 else scales)
        if present:
            means[index] = sde_step(
                family.scheduler, velocity, t, x[index], noise_level=noise_level, prev_sample=x[index]
            ).mean
    return means
