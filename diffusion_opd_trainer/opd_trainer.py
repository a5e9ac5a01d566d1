"""Multi-teacher on-policy distillation (DiffusionOPD, arXiv 2605.15055) as a `transformers.Trainer`."""

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import TrainerCallback

from .lora import adapter_checksum
from .models import PromptEmbeddings
from .opd_config import DiffusionOPDConfig
from .sampling import RolloutBuffer, RolloutSampler
from .scoring import RewardFuncs, RewardSet
from .sde import TransitionOutput, gaussian_log_prob, scale_kl, sde_step, step_kl
from .teachers import Teacher, TeacherSource, as_teacher, check_local_sources, load_teachers
from .trainer_base import DiffusionTrainerBase


logger = logging.getLogger(__name__)


@dataclass
class _CachedRollout:
    """A student rollout with the teachers' means at every trained step (the two-pass schedule)."""

    latents: torch.Tensor  # [B, N + 1, C, H, W]
    log_probs: Optional[torch.Tensor]  # [B, N], None for the ODE
    timesteps: torch.Tensor  # [N]
    prompt_embeds: PromptEmbeddings
    tasks: list[str]
    teacher_means: dict[int, torch.Tensor]  # step index -> [B, C, H, W]

    def __getitem__(self, rows: slice) -> "_CachedRollout":
        return _CachedRollout(
            latents=self.latents[rows],
            log_probs=None if self.log_probs is None else self.log_probs[rows],
            timesteps=self.timesteps,
            prompt_embeds=self.prompt_embeds[rows],
            tasks=self.tasks[rows],
            teacher_means={j: mean[rows] for j, mean in self.teacher_means.items()},
        )


class DiffusionOPDTrainer(DiffusionTrainerBase):
    """
    Trainer for multi-teacher on-policy distillation: one student LoRA pulled toward each task's teacher LoRA on the
    student's own denoising trajectories.

    Each step the student rolls out its prompts (SDE with `noise_level`, or the ODE at 0); at every trained step `j`
    each prompt's teacher computes its transition mean from the same state with the same scheduler, sigmas and
    noise level, and the student minimises the closed-form step KL `||mu_S - mu_T||^2 / (2 s_j^2)` (SDE) or the mean
    matching `0.5 ||mu_S - mu_T||^2` (ODE), one backward per step. No reward model is involved.

    All teachers are frozen adapters on the student's own denoiser: one base model in memory whatever their number.

    Args:
        model (`DiffusionPipeline` or `str`):
            The base pipeline (the teachers' base), or a model id/path for `DiffusionPipeline.from_pretrained`.
        teachers (`dict[str, source]`):
            Task name -> teacher LoRA: a PEFT folder, a diffusers LoRA folder or `.safetensors` file, a Hub id
            `owner/repo[/subfolder][@revision]`, or a [`TeacherConfig`] (source + its own guidance scale). Paths that
            are absolute, start with `./`, `../` or `~`, or exist are local; a missing one raises `FileNotFoundError`.
        args ([`DiffusionOPDConfig`], *optional*):
            Configuration; defaults to `DiffusionOPDConfig("<pipeline name>-OPD")`.
        train_dataset (`datasets.Dataset`):
            Prompts in a `prompt` column and, with more than one teacher, their task in a `task` column.
        eval_dataset (`datasets.Dataset`, *optional*):
            Prompts for `evaluate`, scored with `eval_reward_funcs`.
        peft_config (`peft.LoraConfig`, *optional*):
            The student LoRA. Defaults to rank 32, alpha 64, gaussian init on the attention projections.
        callbacks (`list[TrainerCallback]`, *optional*), optimizers (`tuple`, *optional*):
            As for `transformers.Trainer`.
        eval_reward_funcs (reward functions, *optional*):
            Only for monitoring (`evaluate`); same forms as `DiffusionGRPOTrainer`'s `reward_funcs`.
    """

    _tag_names = ["diffusion-opd", "on-policy-distillation", "distillation"]
    _method_name = "multi-teacher on-policy distillation (DiffusionOPD, arXiv 2605.15055)"

    def __init__(
        self,
        model: Union[str, os.PathLike, DiffusionPipeline],
        teachers: dict[str, TeacherSource],
        args: Optional[DiffusionOPDConfig] = None,
        train_dataset=None,
        eval_dataset=None,
        peft_config: Optional[LoraConfig] = None,
        callbacks: Optional[list[TrainerCallback]] = None,
        optimizers: tuple = (None, None),
        eval_reward_funcs: Optional[RewardFuncs] = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = DiffusionOPDConfig(f"{str(name).split('/')[-1]}-OPD")
        if not isinstance(args, DiffusionOPDConfig):
            raise TypeError(f"`args` must be a DiffusionOPDConfig, got {type(args).__name__}.")
        if not isinstance(teachers, dict) or not teachers:
            raise ValueError("`teachers` must be a non-empty dict mapping each task to its teacher LoRA.")
        # Cheap checks first, before any model is loaded: missing local paths and tasks without a teacher.
        check_local_sources(teachers)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            self._check_tasks(dataset, teachers, name)
        self.teacher_sources = teachers
        self.eval_reward_set = RewardSet(eval_reward_funcs) if eval_reward_funcs is not None else None
        super().__init__(model, args, train_dataset, eval_dataset, peft_config, callbacks, optimizers)
        self._buffer = RolloutBuffer(args.gradient_accumulation_steps, args.num_iterations)

    @staticmethod
    def _check_tasks(dataset, teachers: dict, name: str) -> None:
        if dataset is None:
            return
        if "task" in dataset.column_names:
            missing = sorted(set(dataset["task"]) - set(teachers))
            if missing:
                raise ValueError(
                    f"`{name}` has task(s) {missing} with no teacher; teachers are given for {sorted(teachers)}."
                )
        elif len(teachers) > 1:
            raise ValueError(
                f"`{name}` needs a `task` column to route each prompt to one of the {len(teachers)} teachers "
                f"{sorted(teachers)}."
            )

    def _prepare_before_trainer_init(self, args: DiffusionOPDConfig) -> None:
        self.teachers: dict[str, Teacher] = load_teachers(
            self.adapter.denoiser,
            self.teacher_sources,
            self.adapter.denoiser_name,
            base_model=self._base_model_id(),
            guidance_overrides=args.teacher_guidance_scales,
            token=args.hub_token,
        )
        self._single_task = next(iter(self.teachers)) if len(self.teachers) == 1 else None

    # ----- data ------------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None) -> RolloutSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        tasks = dataset["task"] if "task" in dataset.column_names else None
        return RolloutSampler(
            len(dataset),
            micro_batch_size=args.per_device_train_batch_size * self.accelerator.num_processes,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_iterations=args.num_iterations,
            tasks=tasks,
            round_robin=args.task_mixing == "round_robin",
            seed=args.seed,
        )

    def _eval_reward_set(self) -> Optional[RewardSet]:
        return self.eval_reward_set

    def _tasks_of(self, columns: dict, batch_size: int) -> list[str]:
        if "task" in columns:
            return list(columns["task"])
        return [self._single_task] * batch_size

    # ----- teachers and the per-step loss ----------------------------------------------------------------------------
    def teacher_guidance_scale(self, teacher: Teacher) -> float:
        return teacher.guidance_scale if teacher.guidance_scale is not None else self.args.guidance_scale

    @torch.no_grad()
    def teacher_means(self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeddings, tasks: list[str]):
        """Each sample's teacher transition mean from state `x` at timestep `t`, with the student's kernel."""
        means = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        scheduler = self.adapter.scheduler
        for task, teacher in self.teachers.items():
            rows = [i for i, name in enumerate(tasks) if name == task]
            if not rows:
                continue
            index = torch.tensor(rows, device=x.device)
            x_task = x[index]
            with as_teacher(self.unwrapped_denoiser, teacher), self.compute_loss_context_manager():
                velocity = self.adapter.predict(x_task, t, embeds[rows], self.teacher_guidance_scale(teacher))
            # Only the mean is needed: pass a state to score so that no noise is drawn from the rollout generator.
            means[index] = sde_step(
                scheduler, velocity, t, x_task, noise_level=self.args.noise_level, prev_sample=x_task
            ).mean
        return means

    def step_loss(
        self, step: TransitionOutput, teacher_mean: torch.Tensor, old_log_prob: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The loss of one trained step (a scalar to backpropagate) and the per-sample step KL (detached, for logging).

        `analytic`: the (scaled) step KL. `policy_gradient`: `max(-A rho, -A clip(rho))` with `A = -KL` kept
        differentiable. `score_function`: `stopgrad(D * (log pi_S - log pi_T)) * log pi_S`, `D` the latent size, which
        turns the per-dimension-averaged log-probs back into the summed log-ratio so that its expected gradient is
        the analytic loss's.
        """
        args = self.args
        kl = scale_kl(step_kl(step.mean, teacher_mean, step.std), step, args.kl_scaling)
        if args.loss_type == "analytic":
            per_sample = kl
        elif args.loss_type == "policy_gradient":
            old = step.log_prob.detach() if old_log_prob is None else old_log_prob
            ratio = torch.exp(step.log_prob - old)
            advantage = -kl
            clipped = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon)
            per_sample = torch.maximum(-advantage * ratio, -advantage * clipped)
        else:
            dims = step.mean[0].numel()
            teacher_log_prob = gaussian_log_prob(step.prev_sample, teacher_mean, step.std)
            cost = (step.log_prob - teacher_log_prob).detach() * dims
            if args.kl_scaling == "sigma":
                cost = cost * step.dt.abs().reshape(-1)
            per_sample = cost * step.log_prob
        return per_sample.mean(), kl.detach()

    # ----- training --------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        start = time.perf_counter()
        model.train()
        prompts, columns = self._split_batch(inputs)
        tasks = self._tasks_of(columns, len(prompts))
        if self.args.fused:
            embeds = self.encode(prompts)
            parts = self._backward_in_halves(
                lambda rows, weight: self._fused_step(model, embeds[rows], tasks[rows], weight), len(prompts)
            )
            final_latents = torch.cat([part[2] for part in parts])
        else:
            cached, fresh = self._buffer.get(
                lambda: self._rollout_with_teachers(prompts, tasks), self.state.global_step
            )
            parts = self._backward_in_halves(
                lambda rows, weight: self._train_on_rollout(model, cached[rows], weight), len(prompts)
            )
            final_latents = cached.latents[:, -1] if fresh else None
        # The halves' losses add up; their per-sample step KLs join back into the batch's.
        loss = sum(part[0] for part in parts)
        kls = {j: torch.cat([part[1][j] for part in parts]) for j in parts[0][1]}
        self._record_kl(kls, tasks)
        if self.eval_reward_set is not None and final_latents is not None:
            self._record_proxy_rewards(final_latents, prompts, columns)
        self._record("train", step_time=time.perf_counter() - start)
        return loss

    @torch.no_grad()
    def _record_proxy_rewards(self, final_latents: torch.Tensor, prompts: list[str], columns: dict) -> None:
        """Scores the rollout's images with `eval_reward_funcs` (monitoring only: they never enter the loss)."""
        images = self.adapter.decode(final_latents)
        rewards = self.eval_reward_set(prompts, images, columns)
        self._record("train", **self.eval_reward_set.metrics(rewards))

    def _fused_step(self, model, embeds: PromptEmbeddings, tasks: list[str], weight: float = 1.0):
        """Roll out and train in one pass: the student's rollout forward carries the gradient (loss x `weight`)."""
        args = self.args
        height, width = self.image_size
        x = self.adapter.prepare_latents(len(tasks), height, width, self.rollout_generator)
        timesteps = self.adapter.set_timesteps(args.num_inference_steps, height, width)
        trained = args.trained_step_indices
        scale = self.loss_scale() * weight
        total = torch.zeros((), device=x.device)
        kls = {}
        for j, t in enumerate(timesteps):
            if j not in trained:
                with torch.no_grad(), self.compute_loss_context_manager():
                    velocity = self.adapter.predict(x, t, embeds, args.guidance_scale)
                x = sde_step(
                    self.adapter.scheduler,
                    velocity,
                    t,
                    x,
                    noise_level=args.noise_level,
                    generator=self.rollout_generator,
                ).prev_sample
                continue
            teacher_mean = self.teacher_means(x, t, embeds, tasks)
            sync = j == trained[-1]
            with self.accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                with self.compute_loss_context_manager():
                    velocity = self.adapter.predict(x, t, embeds, args.guidance_scale, denoiser=model)
                step = sde_step(
                    self.adapter.scheduler,
                    velocity,
                    t,
                    x,
                    noise_level=args.noise_level,
                    generator=self.rollout_generator,
                )
                loss, kls[j] = self.step_loss(step, teacher_mean)
                self.accelerator.backward(loss * scale)
            total += loss.detach() * scale
            x = step.prev_sample.detach()
        return total, kls, x

    @torch.no_grad()
    def _rollout_with_teachers(self, prompts: list[str], tasks: list[str]) -> _CachedRollout:
        args = self.args
        embeds = self.encode(prompts)
        trajectory = self.sample_trajectories(embeds)
        means = {
            j: self.teacher_means(trajectory.latents[:, j], trajectory.timesteps[j], embeds, tasks)
            for j in args.trained_step_indices
        }
        return _CachedRollout(trajectory.latents, trajectory.log_probs, trajectory.timesteps, embeds, tasks, means)

    def _train_on_rollout(self, model, cached: _CachedRollout, weight: float = 1.0):
        """The second pass: the student's gradient at the stored states, against the cached teacher means."""
        args = self.args
        trained = args.trained_step_indices
        scale = self.loss_scale() * weight
        total = torch.zeros((), device=cached.latents.device)
        kls = {}
        for j in trained:
            x, x_next, t = cached.latents[:, j], cached.latents[:, j + 1], cached.timesteps[j]
            sync = j == trained[-1]
            with self.accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                with self.compute_loss_context_manager():
                    velocity = self.adapter.predict(x, t, cached.prompt_embeds, args.guidance_scale, denoiser=model)
                step = sde_step(
                    self.adapter.scheduler, velocity, t, x, noise_level=args.noise_level, prev_sample=x_next
                )
                old = cached.log_probs[:, j] if cached.log_probs is not None else None
                loss, kls[j] = self.step_loss(step, cached.teacher_means[j], old_log_prob=old)
                self.accelerator.backward(loss * scale)
            total += loss.detach() * scale
        return total, kls

    def _record_kl(self, kls: dict[int, torch.Tensor], tasks: list[str]) -> None:
        per_sample = torch.stack(list(kls.values())).mean(dim=0).cpu()  # [B]: mean over trained steps
        values = {"kl": per_sample.mean().item()}
        for task in dict.fromkeys(tasks):
            rows = [i for i, name in enumerate(tasks) if name == task]
            values[f"kl/{task}"] = per_sample[rows].mean().item()
        if self.args.log_per_step_kl:
            values.update({f"kl/step_{j}": kl.mean().item() for j, kl in kls.items()})
        self._record("train", **values)

    # ----- checks and model card -------------------------------------------------------------------------------------
    def teachers_unchanged(self) -> dict[str, bool]:
        """Whether each teacher's weights still match their checksum at load time."""
        return {
            task: adapter_checksum(self.unwrapped_denoiser, teacher.adapter_name) == teacher.checksum
            for task, teacher in self.teachers.items()
        }

    def _model_card_sections(self) -> list[str]:
        args = self.args
        rows = ["| task | teacher | teacher CFG |", "|---|---|---|"]
        for task, teacher in self.teachers.items():
            rows.append(f"| {task} | `{teacher.source}` | {self.teacher_guidance_scale(teacher)} |")
        kernel = "ODE, mean matching" if args.noise_level == 0 else f"SDE at noise level {args.noise_level}, exact KL"
        return [
            "## Teachers",
            "\n".join(rows),
            "## Training",
            f"Student rollouts of {args.num_inference_steps} steps ({kernel}, {args.kl_scaling} scaling, loss "
            f"`{args.loss_type}`), trained on steps {args.trained_step_indices}, CFG {args.guidance_scale}, "
            f"learning rate {args.learning_rate}.",
        ]
