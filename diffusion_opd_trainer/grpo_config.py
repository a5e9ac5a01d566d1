"""Configuration of [`DiffusionGRPOTrainer`]."""

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .diffusion_config import DiffusionTrainingConfig, check_number, parse_teacher_guidance_scales
from .prompt_sampler import SDE_WINDOW_STREAM, rollout_draw_generator


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
    GPUs); an optimizer step accumulates 12 such rollouts = 24 groups, 576 images. A full-size recipe:
    `examples/configs/grpo_sd35_pickscore.yaml`.

    Parameters:
        > GRPO

        num_generations (`int`, *optional*, defaults to `8`):
            Images per prompt (the group size). `per_device_train_batch_size * num_processes` must be a multiple.
        beta (`float`, *optional*, defaults to `0.04`):
            Weight of the KL to the base model (the same denoiser with the LoRA disabled). 0 skips the reference pass.
            Flow-GRPO uses 0.04 (0.01 for PickScore) with `kl_scaling="sigma"` (this config's default; on DDIM
            pipelines, which have no `dt`, it is the exact KL).
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-adv_clip_max, adv_clip_max]`.
        scale_rewards (`str`, *optional*, defaults to `"batch"`):
            Advantage normalisation: `"batch"` (group mean, std of the whole batch: Flow-GRPO's default), `"group"`
            (group mean and group std, as TRL), or `"none"` (group mean only).
        reward_weights (`list[float]`, *optional*):
            Weights of the reward functions when several are summed (joint multi-reward RL). Defaults to 1 each.
            Not used with a task -> reward dict (each prompt is scored by its own task's reward).
        per_prompt_stat_tracking (`bool`, *optional*, defaults to `False`):
            Flow-GRPO's per-prompt stat tracking: the advantage of an image is its reward minus the mean of every
            reward its prompt received over the last `stat_tracking_buffer_size` samples (this step's group
            included), divided by that history's std (`scale_rewards="group"`), the batch std (`"batch"`), or 1
            (`"none"`). With prompts that recur, the baseline averages over more samples than one group.
        stat_tracking_buffer_size (`int`, *optional*, defaults to `64`):
            Rewards kept per prompt by the tracker (the newest ones).
        share_initial_noise (`bool`, *optional*, defaults to `False`):
            Start every image of a group from the same initial noise (as DanceGRPO does), drawn from the seed and the
            rollout index so that a group spread over processes shares it too. The images of a group then differ only
            through the noise of the SDE steps, which the policy gradient credits; with different initial noises, much
            of a group's reward spread comes from the starting point, which no trained transition chose, and enters
            the advantages as noise. Strongest with `sde_window_size`.

        > Distillation beside the reward (hybrid GRPO + OPD)

        opd_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the step KL to each prompt's teacher (the trainer's `teachers`, in the same forms as
            [`DiffusionOPDTrainer`]'s) added to the GRPO loss of every trained step: `loss = GRPO + beta * KL(policy ||
            base) + opd_coef * KL(policy || teacher)`, both KLs between the Gaussian transitions of the same kernel
            (the rollout's `noise_level`) from the stored state, scaled by `kl_scaling`. The reward says what to
            reach; the teacher's KL gives a dense per-step direction toward a policy that already reaches it. 0 is
            plain GRPO to the bit (the teachers are then loaded but never run).
        teacher_guidance_scales (`dict[str, float]` or JSON `str`, *optional*):
            CFG scale of each task's teacher, as in [`DiffusionOPDConfig`]. Teachers not listed use their source's own
            scale, else `guidance_scale`.

        > SDE window (Flow-GRPO-Fast / MixGRPO)

        sde_window_size (`int`, *optional*):
            When set, only `sde_window_size` consecutive rollout steps use the SDE (and are trained); every other step
            takes the deterministic ODE step. All the randomness of an image then comes from the window, so the
            reward differences within a group are credited to fewer, better-identified transitions, and a step
            trains on `sde_window_size` timesteps instead of all of them. `None` (default): every step is SDE.
        sde_window_start (`int`, *optional*):
            First step of the window. `None` (default): drawn at random for each rollout, uniformly among the starts
            that keep the window inside the trained steps (`train_timestep_indices` / `timestep_fraction`). The draw
            depends on the seed and the rollout index only, so every process uses the same window.
    """

    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Images (not prompts) per device per step; groups may span devices."}
    )
    kl_scaling: str = field(
        default="sigma", metadata={"help": "'sigma' (Flow-GRPO's, whose beta values it matches) or 'exact'."}
    )
    num_generations: int = field(default=8, metadata={"help": "Images per prompt (group size)."})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the base model; 0 skips the reference."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantage clipping bound."})
    scale_rewards: str = field(default="batch", metadata={"help": "'batch', 'group' or 'none'."})
    reward_weights: Optional[list[float]] = field(default=None, metadata={"help": "Weights of summed rewards."})
    per_prompt_stat_tracking: bool = field(
        default=False, metadata={"help": "Advantages from a per-prompt history of rewards (Flow-GRPO's tracker)."}
    )
    stat_tracking_buffer_size: int = field(default=64, metadata={"help": "Rewards kept per prompt by the tracker."})
    share_initial_noise: bool = field(
        default=False, metadata={"help": "Every image of a group starts from the same initial noise (DanceGRPO)."}
    )
    opd_coef: float = field(
        default=0.0, metadata={"help": "Weight of the step KL to each prompt's teacher (needs `teachers`); 0: GRPO."}
    )
    teacher_guidance_scales: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Per-task teacher CFG scale, e.g. '{\"ocr\": 1.0}'."}
    )
    sde_window_size: Optional[int] = field(
        default=None, metadata={"help": "Consecutive SDE (and trained) steps; the ODE elsewhere. None: all SDE."}
    )
    sde_window_start: Optional[int] = field(
        default=None, metadata={"help": "First step of the SDE window; None: random per rollout."}
    )

    def __post_init__(self):
        super().__post_init__()
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
        check_number("beta", self.beta, 0)
        check_number("opd_coef", self.opd_coef, 0)
        self.teacher_guidance_scales = parse_teacher_guidance_scales(self.teacher_guidance_scales)
        check_number("adv_clip_max", self.adv_clip_max, 0, strict=True)
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}.")
        if self.stat_tracking_buffer_size < 1:
            raise ValueError(f"`stat_tracking_buffer_size` must be >= 1, got {self.stat_tracking_buffer_size}.")
        if self.sde_window_size is not None:
            trained = self.trained_step_indices
            if self.sde_window_start is None and not 1 <= self.sde_window_size <= trained[-1] + 1:
                raise ValueError(
                    f"`sde_window_size` must be between 1 and the last trained step + 1 ({trained[-1] + 1}) for a "
                    f"random window inside the trained steps, got {self.sde_window_size}."
                )
            if self.sde_window_start is not None:
                window = range(self.sde_window_start, self.sde_window_start + self.sde_window_size)
                if self.sde_window_size < 1 or self.sde_window_start < 0 or window[-1] >= self.num_inference_steps:
                    raise ValueError(
                        f"The SDE window (`sde_window_start`={self.sde_window_start}, `sde_window_size`="
                        f"{self.sde_window_size}) must lie within the {self.num_inference_steps} rollout steps."
                    )
                if not set(window) & set(trained):
                    raise ValueError(
                        f"The SDE window {list(window)} contains no trained step ({trained}): nothing would train."
                    )
        elif self.sde_window_start is not None:
            raise ValueError("`sde_window_start` needs `sde_window_size`.")

    def _stochastic_loss(self) -> str:
        return "GRPO"

    def sde_window(self, rollout_index: int) -> Optional[list[int]]:
        """
        The SDE steps of rollout number `rollout_index` (`None` when every step is SDE): the fixed window, or one
        drawn from the seed and the rollout index, so that every process draws the same.
        """
        if self.sde_window_size is None:
            return None
        start = self.sde_window_start
        if start is None:
            last_start = self.trained_step_indices[-1] - self.sde_window_size + 1
            generator = rollout_draw_generator(self.seed, rollout_index, SDE_WINDOW_STREAM)
            start = int(torch.randint(0, last_start + 1, (1,), generator=generator))
        return list(range(start, start + self.sde_window_size))
