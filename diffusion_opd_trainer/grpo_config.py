"""Configuration of [`DiffusionGRPOTrainer`]."""

import math
from dataclasses import dataclass, field
from typing import Optional

from .diffusion_config import DiffusionTrainingConfig


SCALE_REWARDS = ("batch", "group", "none")


@dataclass
class DiffusionGRPOConfig(DiffusionTrainingConfig):
    r"""
    Configuration class for [`DiffusionGRPOTrainer`]: GRPO on a diffusion pipeline (Flow-GRPO, arXiv 2505.05470).

    Also takes every [`DiffusionTrainingConfig`] field (sampling, kernel, trained timesteps, EMA) and every
    `transformers.TrainingArguments` field.

    **Batches, groups and steps.** As in TRL, `per_device_train_batch_size` counts *images*, not prompts. Each training
    step, every process samples `per_device_train_batch_size` images; across the `W` processes the global batch of
    `per_device_train_batch_size * W` images is made of complete groups: `(per_device_train_batch_size * W) /
    num_generations` prompts with `num_generations` images each. A group may span processes: rewards are gathered
    before the advantages are computed. `gradient_accumulation_steps` rollouts are accumulated into one optimizer
    step, and each rollout is reused for `num_iterations` optimizer steps (1: strictly on-policy).

    Worked example: 4 GPUs, `per_device_train_batch_size=12`, `num_generations=24`,
    `gradient_accumulation_steps=12`: a step samples 48 images = 2 prompts x 24 images (each group spread over two
    GPUs); an optimizer step accumulates 12 such rollouts = 24 groups, 576 images. The paper's recipe (48 groups of 24
    per epoch) is `examples/configs/grpo_sd35_geneval.yaml`.

    Parameters:
        > GRPO

        num_generations (`int`, *optional*, defaults to `8`):
            Images per prompt (the group size). `per_device_train_batch_size * num_processes` must be a multiple.
        num_iterations (`int`, *optional*, defaults to `1`):
            Optimizer steps per rollout (PPO epochs); 1 is on-policy, and the policy ratio is then exactly 1.
        beta (`float`, *optional*, defaults to `0.04`):
            Weight of the KL to the base model (the same denoiser with the LoRA disabled). 0 skips the reference pass.
            Flow-GRPO uses 0.04 (0.01 for PickScore) with `kl_scaling="sigma"`.
        epsilon (`float`, *optional*, defaults to `1e-4`):
            Clip range of the policy ratio (tuned for log-probs averaged over latent dimensions, as Flow-GRPO's).
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-adv_clip_max, adv_clip_max]`.
        scale_rewards (`str`, *optional*, defaults to `"batch"`):
            Advantage normalisation: `"batch"` (group mean, std of the whole batch: Flow-GRPO's default), `"group"`
            (group mean and group std, as TRL), or `"none"` (group mean only).
        reward_weights (`list[float]`, *optional*):
            Weights of the reward functions when several are summed (joint multi-reward RL). Defaults to 1 each.
            Not used with a task -> reward dict (each prompt is scored by its own task's reward).
    """

    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Images (not prompts) per device per step; groups may span devices."}
    )
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (> 0: GRPO needs log-probs)."})
    kl_scaling: str = field(
        default="sigma", metadata={"help": "'sigma' (Flow-GRPO's, whose beta values it matches) or 'exact'."}
    )
    num_generations: int = field(default=8, metadata={"help": "Images per prompt (group size)."})
    num_iterations: int = field(default=1, metadata={"help": "Optimizer steps per rollout (1 = on-policy)."})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the base model; 0 skips the reference."})
    epsilon: float = field(default=1e-4, metadata={"help": "Clip range of the policy ratio."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantage clipping bound."})
    scale_rewards: str = field(default="batch", metadata={"help": "'batch', 'group' or 'none'."})
    reward_weights: Optional[list[float]] = field(default=None, metadata={"help": "Weights of summed rewards."})

    def __post_init__(self):
        super().__post_init__()
        if self.noise_level <= 0:
            raise ValueError(
                "`noise_level` must be > 0 for GRPO: the ODE (noise_level=0) is deterministic, so its transitions "
                "have no log-probability and the policy gradient is undefined. Flow-GRPO uses 0.7."
            )
        if self.num_generations < 2:
            raise ValueError(
                f"`num_generations` must be >= 2 (advantages compare images of a group), got {self.num_generations}."
            )
        global_batch = self.per_device_train_batch_size * self.world_size
        if global_batch % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) x num_processes "
                f"({self.world_size}) = {global_batch} images per step must be a multiple of num_generations "
                f"({self.num_generations}), so that every step holds complete groups. E.g. set "
                "per_device_train_batch_size to "
                f"{self.num_generations // math.gcd(self.num_generations, self.world_size)}."
            )
        if self.num_iterations < 1:
            raise ValueError(f"`num_iterations` must be >= 1, got {self.num_iterations}.")
        if self.beta < 0 or self.epsilon <= 0 or self.adv_clip_max <= 0:
            raise ValueError("`beta` must be >= 0, and `epsilon` and `adv_clip_max` must be > 0.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}.")
