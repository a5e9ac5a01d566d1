"""Multi-teacher on-policy distillation (DiffusionOPD, arXiv 2605.15055) as a `transformers.Trainer`."""

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import TrainerCallback

from .hub import DIFFUSION_OPD_CITATION, FLOW_GRPO_CITATION
from .image_logging import caption
from .losses import distillation_loss
from .opd_config import DiffusionOPDConfig
from .pipelines import PromptEmbeddings
from .prompt_sampler import TEACHER_ROWS_STREAM, rollout_draw_generator
from .rollout import Trajectory
from .scoring import RewardFuncs, RewardSet
from .sde import TransitionOutput, sde_step
from .teacher_support import TeacherSupport
from .teachers import TeacherSource, as_teacher
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


class DiffusionOPDTrainer(TeacherSupport, DiffusionTrainerBase):
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
    _citations = (DIFFUSION_OPD_CITATION, FLOW_GRPO_CITATION)
    _config_class = DiffusionOPDConfig
    _name_suffix = "OPD"

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
        args = self._resolve_args(model, args)
        self._check_datasets(train_dataset, eval_dataset)
        # Cheap checks first, before any model is loaded: missing local paths and tasks without a teacher.
        self.accept_teacher_sources(teachers, {"train_dataset": train_dataset, "eval_dataset": eval_dataset})
        self.eval_reward_set = RewardSet(eval_reward_funcs) if eval_reward_funcs is not None else None
        super().__init__(model, args, train_dataset, eval_dataset, peft_config, callbacks, optimizers)

    def _prepare_before_trainer_init(self, args: DiffusionOPDConfig) -> None:
        self.load_teacher_adapters(args)

    # ----- data ------------------------------------------------------------------------------------------------------
    def _sampler_options(self, dataset) -> dict[str, Any]:
        tasks = dataset["task"] if "task" in dataset.column_names else None
        return {"tasks": tasks, "round_robin": self.args.task_mixing == "round_robin"}

    def _eval_reward_set(self) -> Optional[RewardSet]:
        return self.eval_reward_set

    def _decodes_during_training(self) -> bool:
        # The loss needs no image: rollouts are decoded only for the monitoring rewards or to log them.
        return self.eval_reward_set is not None or bool(self.args.log_images_steps)

    # ----- the per-step loss -----------------------------------------------------------------------------------------
    def step_loss(
        self, step: TransitionOutput, teacher_mean: torch.Tensor, old_log_prob: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one trained step and its per-sample step KL (see [`~losses.distillation_loss`])."""
        args = self.args
        return distillation_loss(
            step,
            teacher_mean,
            loss_type=args.loss_type,
            kl_scaling=args.kl_scaling,
            epsilon=args.epsilon,
            old_log_prob=old_log_prob,
        )

    # ----- training --------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        start = time.perf_counter()
        model.train()
        prompts, columns = self._split_batch(inputs)
        tasks = self.teacher_tasks(columns, len(prompts))
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
            if not fresh:
                self._restore_training_schedule()
            parts = self._backward_in_halves(
                lambda rows, weight: self._train_on_rollout(model, cached[rows], weight), len(prompts)
            )
            final_latents = cached.latents[:, -1] if fresh else None
        # The halves' losses add up; their per-sample step KLs join back into the batch's.
        loss = sum(part[0] for part in parts)
        kls = {j: torch.cat([part[1][j] for part in parts]) for j in parts[0][1]}
        self._note_nonfinite_tasks(kls, tasks)
        self._record_kl(kls, tasks)
        # The rollout's images: decoded only to score them with the monitoring rewards or to log them.
        images_due = final_latents is not None and self._images_due()
        if final_latents is not None and (self.eval_reward_set is not None or images_due):
            with torch.no_grad():
                images = self.family.decode(final_latents)
            rewards = None
            if self.eval_reward_set is not None:
                rewards = self._record_proxy_rewards(images, prompts, columns)
            if images_due:
                self._log_rollout_images(images, self._captions(prompts, tasks, kls, rewards))
        self._record("train", step_time=time.perf_counter() - start)
        return loss

    @torch.no_grad()
    def _record_proxy_rewards(self, images: torch.Tensor, prompts: list[str], columns: dict) -> torch.Tensor:
        """
        Scores the rollout's images with `eval_reward_funcs` (monitoring only: they never enter the loss); returns
        this process's `[B]` weighted rewards.
        """
        self.report_phase("reward")
        local = self.score(self.eval_reward_set, prompts, images, columns)
        rewards = self.accelerator.gather(local.to(self.accelerator.device)).cpu()
        self._record("train", **self.eval_reward_set.metrics(rewards))
        return self.eval_reward_set.total(local)

    def _captions(
        self, prompts: list[str], tasks: list[str], kls: dict[int, torch.Tensor], rewards: Optional[torch.Tensor]
    ) -> list[str]:
        """Each image's prompt, its task and step KL (the mean over trained steps), and its monitoring reward."""
        per_sample_kl = torch.stack(list(kls.values())).mean(dim=0).tolist()
        return [
            caption(
                prompt,
                f"task {task}, step KL {kl:.4g}",
                f"reward {rewards[i].item():.3f}" if rewards is not None else "",
            )
            for i, (prompt, task, kl) in enumerate(zip(prompts, tasks, per_sample_kl))
        ]

    def _fused_step(self, model, embeds: PromptEmbeddings, tasks: list[str], weight: float = 1.0):
        """Roll out and train in one pass: the student's rollout forward carries the gradient (loss x `weight`)."""
        args = self.args
        height, width = self.image_size
        scheduler = self.family.scheduler
        x = self.family.prepare_latents(len(tasks), height, width, self.rollout_generator)
        timesteps = self.family.set_timesteps(args.num_inference_steps, height, width)
        trained = args.trained_step_indices
        state = {"x": x, "j": 0}

        def advance_without_grad(until: int) -> None:
            # The untrained steps before `until`: plain rollout steps, without gradient.
            while state["j"] < until:
                t = timesteps[state["j"]]
                with torch.no_grad(), self.compute_loss_context_manager():
                    velocity = self.family.predict(state["x"], t, embeds, args.guidance_scale)
                state["x"] = sde_step(
                    scheduler,
                    velocity,
                    t,
                    state["x"],
                    noise_level=args.noise_level,
                    generator=self.rollout_generator,
                ).prev_sample
                state["j"] += 1

        def step_loss(j: int):
            advance_without_grad(j)
            x, t = state["x"], timesteps[j]
            teacher_mean = self.teacher_means(x, t, embeds, tasks)
            with self.compute_loss_context_manager():
                velocity = self.family.predict(x, t, embeds, args.guidance_scale, denoiser=model)
            step = sde_step(scheduler, velocity, t, x, noise_level=args.noise_level, generator=self.rollout_generator)
            state["x"], state["j"] = step.prev_sample.detach(), j + 1
            return self.step_loss(step, teacher_mean)

        loss, kls = self.train_on_steps(model, trained, step_loss, weight)
        advance_without_grad(len(timesteps))
        return loss, kls, state["x"]

    @torch.no_grad()
    def _rollout_with_teachers(self, prompts: list[str], tasks: list[str]) -> _CachedRollout:
        args = self.args
        self.report_phase("rollout")
        embeds = self.encode(prompts)
        trajectory = self._mixed_rollout(embeds, tasks) if args.teacher_rollout_fraction > 0 else None
        if trajectory is None:
            trajectory = self.sample_trajectories(embeds)
        self.report_phase("teachers")
        means = {
            j: self.teacher_means(trajectory.latents[:, j], trajectory.timesteps[j], embeds, tasks)
            for j in args.trained_step_indices
        }
        return _CachedRollout(trajectory.latents, trajectory.log_probs, trajectory.timesteps, embeds, tasks, means)

    def teacher_rollout_rows(self, batch_size: int) -> list[int]:
        """
        The rows of this rollout that the prompt's teacher samples: each with probability `teacher_rollout_fraction`,
        drawn from a generator of the seed and the rollout index (the rollout generator's stream is left alone).
        """
        rollout_index = self._buffer.micro_step - 1  # the buffer has already counted this rollout
        generator = rollout_draw_generator(self.args.seed, rollout_index, TEACHER_ROWS_STREAM)
        draws = torch.rand(batch_size, generator=generator)
        return [i for i in range(batch_size) if draws[i].item() < self.args.teacher_rollout_fraction]

    def _mixed_rollout(self, embeds: PromptEmbeddings, tasks: list[str]) -> Optional[Trajectory]:
        """
        The rollout with some trajectories sampled by their prompt's teacher (with the teacher's CFG scale), the
        others by the student; `None` when the draw gave the student every row. Rows keep their order.
        """
        teacher_rows = self.teacher_rollout_rows(len(tasks))
        self._record("train", teacher_rollouts=len(teacher_rows) / len(tasks))
        if not teacher_rows:
            return None
        student_rows = [i for i in range(len(tasks)) if i not in teacher_rows]
        parts = []
        if student_rows:
            parts.append((student_rows, self.sample_trajectories(embeds[student_rows])))
        teacher_tasks = list(dict.fromkeys(tasks[i] for i in teacher_rows))
        same_forwards = self.same_forwards_across_processes()
        if same_forwards is not None:  # FSDP: every teacher that samples on any process samples here too
            names = list(self.teachers)
            needed = same_forwards([task in teacher_tasks for task in names])
            teacher_tasks = [task for task, run in zip(names, needed) if run]
        for task in teacher_tasks:
            rows = [i for i in teacher_rows if tasks[i] == task]
            teacher = self.teachers[task]
            with as_teacher(self.family.denoiser, teacher):
                if not rows:  # another process's teacher: the same forwards on one row, discarded, noise untouched
                    noise = self.rollout_generator.get_state()
                    self.sample_trajectories(embeds[[0]], guidance_scale=self.teacher_guidance_scale(teacher))
                    self.rollout_generator.set_state(noise)
                    continue
                trajectory = self.sample_trajectories(
                    embeds[rows], guidance_scale=self.teacher_guidance_scale(teacher)
                )
            parts.append((rows, trajectory))
        first = parts[0][1]
        latents = torch.empty(
            (len(tasks), *first.latents.shape[1:]), dtype=first.latents.dtype, device=first.latents.device
        )
        log_probs = None
        if first.log_probs is not None:
            log_probs = torch.empty((len(tasks), first.log_probs.shape[1]), device=first.log_probs.device)
        for rows, part in parts:
            index = torch.tensor(rows, device=latents.device)
            latents[index] = part.latents
            if log_probs is not None:
                log_probs[index] = part.log_probs  # the sampler's own log-probs (unused by the analytic loss)
        return dataclasses.replace(first, latents=latents, log_probs=log_probs, prompt_embeds=embeds)

    def _train_on_rollout(self, model, cached: _CachedRollout, weight: float = 1.0):
        """The second pass: the student's gradient at the stored states, against the cached teacher means."""
        args = self.args

        def step_loss(j: int):
            x, x_next, t = cached.latents[:, j], cached.latents[:, j + 1], cached.timesteps[j]
            with self.compute_loss_context_manager():
                velocity = self.family.predict(x, t, cached.prompt_embeds, args.guidance_scale, denoiser=model)
            step = sde_step(self.family.scheduler, velocity, t, x, noise_level=args.noise_level, prev_sample=x_next)
            old = cached.log_probs[:, j] if cached.log_probs is not None else None
            return self.step_loss(step, cached.teacher_means[j], old_log_prob=old)

        return self.train_on_steps(model, args.trained_step_indices, step_loss, weight)

    def _note_nonfinite_tasks(self, kls: dict[int, torch.Tensor], tasks: list[str]) -> None:
        """Names, for the non-finite guard's warning, the tasks (and teachers) whose step KL was not finite."""
        finite = torch.stack(list(kls.values())).isfinite().all(dim=0).tolist()
        for task in dict.fromkeys(task for task, ok in zip(tasks, finite) if not ok):
            self.note_nonfinite(f"task {task!r} (teacher {self.teachers[task].source!r})")

    def _record_kl(self, kls: dict[int, torch.Tensor], tasks: list[str]) -> None:
        """Logs the step KL of the global batch (gathered over processes): `kl`, `kl/<task>`, `kl/step_<j>`."""
        names = list(self.teachers)
        per_sample = torch.stack(list(kls.values())).mean(dim=0)  # [B]: mean over trained steps
        task_ids = torch.tensor([names.index(task) for task in tasks], device=per_sample.device)
        per_sample = self.accelerator.gather(per_sample).cpu()
        task_ids = self.accelerator.gather(task_ids).cpu()
        values = {"kl": per_sample.nanmean().item()}
        for i, task in enumerate(names):
            if bool((task_ids == i).any()):
                values[f"kl/{task}"] = per_sample[task_ids == i].nanmean().item()
        self._record("train", **values)
        if self.args.log_per_step_kl:
            self._record_across_processes("train", **{f"kl/step_{j}": kl.mean() for j, kl in kls.items()})

    # ----- model card ------------------------------------------------------------------------------------------------
    def _model_card_sections(self) -> list[str]:
        args = self.args
        kernel = "ODE, mean matching" if args.noise_level == 0 else f"SDE at noise level {args.noise_level}, exact KL"
        return [
            "## Teachers",
            self.teacher_table(),
            "## Training",
            f"Student rollouts of {args.num_inference_steps} steps ({kernel}, {args.kl_scaling} scaling, loss "
            f"`{args.loss_type}`), trained on steps {args.trained_step_indices}, CFG {args.guidance_scale}, "
            f"learning rate {args.learning_rate}.",
        ]
