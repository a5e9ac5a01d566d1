"""GRPO for diffusion pipelines (Flow-GRPO, arXiv 2505.05470) as a `transformers.Trainer`."""

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from accelerate.utils import gather_object
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import TrainerCallback

from .grpo_config import DiffusionGRPOConfig
from .hub import FLOW_GRPO_CITATION
from .image_logging import caption
from .losses import grpo_loss
from .pipelines import PromptEmbeddings
from .prompt_sampler import GROUP_NOISE_STREAM, rollout_draw_generator
from .scoring import RewardFuncs, RewardSet
from .sde import sde_step
from .stat_tracking import PerPromptStatTracker
from .targets import group_advantages, reference_means
from .teacher_support import TeacherSupport
from .teachers import TeacherSource
from .trainer_base import DiffusionTrainerBase


logger = logging.getLogger(__name__)


@dataclass
class _ScoredRollout:
    """One process's share of a scored rollout: what the policy update needs."""

    latents: torch.Tensor  # [B, N + 1, C, H, W]
    log_probs: torch.Tensor  # [B, N]
    timesteps: torch.Tensor  # [N]
    prompt_embeds: PromptEmbeddings
    advantages: torch.Tensor  # [B]
    trained_steps: list[int]  # the trained steps that used the SDE (all trained steps without a window)
    tasks: list[Optional[str]]  # each row's teacher (the hybrid; None without teachers)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, rows: slice) -> "_ScoredRollout":
        return _ScoredRollout(
            latents=self.latents[rows],
            log_probs=self.log_probs[rows],
            timesteps=self.timesteps,
            prompt_embeds=self.prompt_embeds[rows],
            advantages=self.advantages[rows],
            trained_steps=self.trained_steps,
            tasks=self.tasks[rows],
        )


class DiffusionGRPOTrainer(TeacherSupport, DiffusionTrainerBase):
    """
    Trainer for Group Relative Policy Optimization on a diffusion pipeline, with Flow-GRPO's SDE sampler.

    Each step: sample `num_generations` images per prompt with the SDE kernel (no grad), score them, form group
    advantages `A = (r - mean_group(r)) / (std + 1e-4)` (clipped to `adv_clip_max`), then for every trained timestep
    recompute the log-probability of the stored transition under the current policy and minimise the clipped
    surrogate `max(-A * ratio, -A * clip(ratio, 1 - epsilon, 1 + epsilon))` plus `beta` times the KL to the base
    model (the same denoiser with its LoRA disabled), one backward per timestep.

    With `teachers` and `args.opd_coef > 0` (the hybrid), each trained step's loss also has `opd_coef` times the step
    KL between the policy's transition and the prompt's teacher's from the same state (on-policy distillation's
    loss, beside the reward).

    Args:
        model (`DiffusionPipeline` or `str`):
            The pipeline (`StableDiffusion3Pipeline` or `StableDiffusionPipeline`), or a model id/path loaded with
            `DiffusionPipeline.from_pretrained`.
        reward_funcs (callable, registry name, list of them, or `dict[str, callable or name]`):
            Reward functions `f(prompts=list[str], images=Tensor[B, 3, H, W] in [0, 1], **columns) -> list[float]`.
            A list is summed with `args.reward_weights` (joint multi-reward RL); a dict maps each task of the
            dataset's `task` column to its own reward (multi-task RL: each prompt scored by its task's reward).
        args ([`DiffusionGRPOConfig`], *optional*):
            Configuration; defaults to `DiffusionGRPOConfig("<pipeline name>-GRPO")`.
        train_dataset (`datasets.Dataset`):
            Prompts in a `prompt` column; other columns reach the reward functions as keyword arguments.
        eval_dataset (`datasets.Dataset`, *optional*):
            Prompts for `evaluate` (deterministic ODE samples, scored with the same rewards).
        peft_config (`peft.LoraConfig`, *optional*):
            The LoRA to train. Defaults to rank 32, alpha 64, gaussian init on the attention projections.
        callbacks (`list[TrainerCallback]`, *optional*), optimizers (`tuple`, *optional*):
            As for `transformers.Trainer`.
        teachers (`dict[str, source]`, *optional*):
            The hybrid's teachers: task -> teacher LoRA, in the same forms as [`DiffusionOPDTrainer`]'s (with more
            than one, the datasets need a `task` column). Used when `args.opd_coef > 0`.
    """

    _tag_names = ["grpo", "flow-grpo", "reinforcement-learning"]
    _method_name = "GRPO on flow matching (Flow-GRPO, arXiv 2505.05470)"
    _citations = (FLOW_GRPO_CITATION,)
    _config_class = DiffusionGRPOConfig
    _name_suffix = "GRPO"

    def __init__(
        self,
        model: Union[str, os.PathLike, DiffusionPipeline],
        reward_funcs: RewardFuncs,
        args: Optional[DiffusionGRPOConfig] = None,
        train_dataset=None,
        eval_dataset=None,
        peft_config: Optional[LoraConfig] = None,
        callbacks: Optional[list[TrainerCallback]] = None,
        optimizers: tuple = (None, None),
        teachers: Optional[dict[str, TeacherSource]] = None,
    ):
        args = self._resolve_args(model, args)
        self._check_datasets(train_dataset, eval_dataset)
        self._check_hybrid(args, teachers, train_dataset, eval_dataset)
        self.reward_set = RewardSet(reward_funcs, args.reward_weights)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if self.reward_set.routed and dataset is not None:
                if "task" not in dataset.column_names:
                    raise ValueError(f"Per-task rewards need a `task` column in `{name}`.")
                self.reward_set.check_tasks(set(dataset["task"]), f"`{name}`")
        super().__init__(model, args, train_dataset, eval_dataset, peft_config, callbacks, optimizers)
        self.stat_tracker = PerPromptStatTracker(args.stat_tracking_buffer_size)

    def _check_hybrid(self, args: DiffusionGRPOConfig, teachers, train_dataset, eval_dataset) -> None:
        """The hybrid's settings: teachers exactly when `opd_coef > 0` (a warning for unused teachers)."""
        if teachers is None:
            if args.opd_coef > 0:
                raise ValueError(
                    f"`opd_coef` is {args.opd_coef} but no `teachers` were given: pass "
                    "`teachers={task: teacher LoRA}` to the trainer, or set `opd_coef=0` for plain GRPO."
                )
            if args.teacher_guidance_scales:
                raise ValueError("`teacher_guidance_scales` is set but no `teachers` were given to the trainer.")
            return
        if args.opd_coef == 0:
            logger.warning(
                "`teachers` were given but `opd_coef=0`: they are loaded and checked but never run; the loss is plain "
                "GRPO. Set `opd_coef` > 0 to add the KL to each prompt's teacher."
            )
        self.accept_teacher_sources(teachers, {"train_dataset": train_dataset, "eval_dataset": eval_dataset})

    def _prepare_before_trainer_init(self, args: DiffusionGRPOConfig) -> None:
        self.load_teacher_adapters(args)

    # ----- data ------------------------------------------------------------------------------------------------------
    def _sampler_options(self, dataset) -> dict[str, Any]:
        return {"group_size": self.args.num_generations}

    def _eval_reward_set(self) -> RewardSet:
        return self.reward_set

    # ----- rollout and advantages ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_and_score(self, inputs: list[dict[str, Any]]) -> _ScoredRollout:
        prompts, columns = self._split_batch(inputs)
        start = time.perf_counter()
        self.report_phase("rollout")
        embeds = self.encode(prompts)
        # The buffer has already counted this rollout: its index is the same on every process.
        rollout_index = self._buffer.micro_step - 1
        window = self.args.sde_window(rollout_index)
        latents = self._group_initial_noise(rollout_index, len(prompts)) if self.args.share_initial_noise else None
        trajectory = self.sample_trajectories(embeds, decode=True, sde_steps=window, latents=latents)
        rollout_time = time.perf_counter() - start
        self.report_phase("reward")
        local_rewards = self.score(self.reward_set, prompts, trajectory.images, columns)
        reward_time = time.perf_counter() - start - rollout_time

        # A group may span processes: normalise over the gathered global batch, then keep this process's slice.
        rewards = self.accelerator.gather(local_rewards.to(self.accelerator.device)).cpu()
        total = self.reward_set.total(rewards)
        all_prompts = prompts
        if self.args.per_prompt_stat_tracking and self.accelerator.num_processes > 1:
            all_prompts = gather_object(prompts)  # the tracker keys its history by prompt
        advantages, group_std = self._advantages(total, all_prompts)
        rank, size = self.accelerator.process_index, len(prompts)
        local_advantages = advantages[rank * size : (rank + 1) * size]

        self._record(
            "train",
            reward=torch.nanmean(total).item(),
            reward_std=torch.nanmean(group_std).item(),
            frac_reward_zero_std=(group_std < 1e-6).float().mean().item(),
            **self.reward_set.metrics(rewards),
            **{"timing/rollout": rollout_time, "timing/reward": reward_time},
        )
        if self._images_due():
            self._log_rollout_images(
                trajectory.images, self._captions(prompts, local_rewards, local_advantages, columns)
            )
        return _ScoredRollout(
            latents=trajectory.latents,
            log_probs=trajectory.log_probs,
            timesteps=trajectory.timesteps,
            prompt_embeds=embeds,
            advantages=local_advantages.to(self.accelerator.device),
            trained_steps=[j for j in self.args.trained_step_indices if window is None or j in window],
            tasks=self.teacher_tasks(columns, len(prompts)) if self.teachers else [None] * len(prompts),
        )

    def _captions(
        self, prompts: list[str], rewards: torch.Tensor, advantages: torch.Tensor, columns: dict
    ) -> list[str]:
        """Each image's prompt, its (weighted) reward and advantage, and each reward's score when there are several."""
        total = self.reward_set.total(rewards)
        captions = []
        for i, prompt in enumerate(prompts):
            details = [f"reward {total[i].item():.3f}, advantage {advantages[i].item():+.2f}"]
            if self.reward_set.routed:
                details.append(f"task {columns['task'][i]}")
            elif len(self.reward_set) > 1:
                details.append(", ".join(f"{n} {r:.3f}" for n, r in zip(self.reward_set.names, rewards[i].tolist())))
            captions.append(caption(prompt, *details))
        return captions

    def _group_initial_noise(self, rollout_index: int, local_size: int) -> torch.Tensor:
        """
        This process's rows of the global batch's initial noise, one draw per group repeated `num_generations` times.
        Drawn from a generator seeded by the seed and the rollout index, so that every process (and a resumed run)
        draws the same, and a group spread over processes shares its noise.
        """
        args = self.args
        height, width = self.image_size
        num_groups = local_size * self.accelerator.num_processes // args.num_generations
        generator = rollout_draw_generator(args.seed, rollout_index, GROUP_NOISE_STREAM)
        noise = self.family.prepare_latents(num_groups, height, width, generator)
        noise = noise.repeat_interleave(args.num_generations, dim=0)
        rank = self.accelerator.process_index
        return noise[rank * local_size : (rank + 1) * local_size]

    def _advantages(
        self, total: torch.Tensor, prompts: Optional[list[str]] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The group advantages of the global batch and each group's reward std (see [`~targets.group_advantages`])."""
        args = self.args
        return group_advantages(
            total,
            args.num_generations,
            scale_rewards=args.scale_rewards,
            adv_clip_max=args.adv_clip_max,
            stat_tracker=self.stat_tracker if args.per_prompt_stat_tracking else None,
            prompts=prompts,
        )

    # ----- policy update ---------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        start = time.perf_counter()
        model.train()
        batch, fresh = self._buffer.get(lambda: self._generate_and_score(inputs), self.state.global_step)
        if not fresh:
            self._restore_training_schedule()
        train_start = time.perf_counter()
        update = lambda rows, weight: self._policy_update(model, batch[rows], weight)  # noqa: E731
        loss = sum(self._backward_in_halves(update, len(batch)))
        self._record("train", **{"timing/train": time.perf_counter() - train_start})
        self._record("train", step_time=time.perf_counter() - start)
        return loss

    def _policy_update(self, model, batch: _ScoredRollout, weight: float = 1.0) -> torch.Tensor:
        """
        Backpropagates the clipped surrogate (plus `beta` times the KL to the base model, plus `opd_coef` times the KL
        to the teacher) of each trained step, scaled by `weight`.
        """
        args = self.args
        hybrid = bool(self.teachers) and args.opd_coef > 0

        def step_loss(j: int):
            x, x_next, t = batch.latents[:, j], batch.latents[:, j + 1], batch.timesteps[j]
            reference_mean = None
            if args.beta > 0:
                reference_mean = reference_means(
                    self.family,
                    x,
                    t,
                    batch.prompt_embeds,
                    guidance_scale=args.guidance_scale,
                    noise_level=args.noise_level,
                    autocast=self.compute_loss_context_manager,
                )
            teacher_mean = self.teacher_means(x, t, batch.prompt_embeds, batch.tasks) if hybrid else None
            with self.compute_loss_context_manager():
                v = self.family.predict(x, t, batch.prompt_embeds, args.guidance_scale, denoiser=model)
            step = sde_step(self.family.scheduler, v, t, x, noise_level=args.noise_level, prev_sample=x_next)
            return grpo_loss(
                step,
                batch.log_probs[:, j],
                batch.advantages,
                epsilon=args.epsilon,
                beta=args.beta,
                reference_mean=reference_mean,
                kl_scaling=args.kl_scaling,
                opd_coef=args.opd_coef,
                teacher_mean=teacher_mean,
            )

        loss, stats = self.train_on_steps(model, batch.trained_steps, step_loss, weight)
        self._record_across_processes(
            "train",
            **{key: torch.stack([s[key] for s in stats.values()]).mean() for key in stats[batch.trained_steps[0]]},
        )
        return loss

    def _model_card_sections(self) -> list[str]:
        args = self.args
        sections = [
            "## Training",
            f"Rewards: {', '.join(self.reward_set.names)}"
            + (" (each prompt scored by its task's reward)" if self.reward_set.routed else "")
            + f". Group size {args.num_generations}, {args.num_inference_steps} SDE steps at noise level "
            f"{args.noise_level}, CFG {args.guidance_scale}, beta {args.beta} ({args.kl_scaling} KL scaling), clip "
            f"range {args.epsilon}, learning rate {args.learning_rate}.",
        ]
        if self.teachers and args.opd_coef > 0:
            sections += [
                "## Teachers (hybrid GRPO + on-policy distillation)",
                f"Each trained step also minimised `opd_coef` ({args.opd_coef}) times the step KL to its prompt's "
                "teacher, from the same state with the same kernel:",
                self.teacher_table(),
            ]
        return sections
