"""
Teacher LoRAs inside a trainer: the checks made before any model loads, loading them as frozen adapters on the
student's denoiser, and their transition means from the student's states.

Shared by [`DiffusionOPDTrainer`] (the teachers are its only target) and [`DiffusionGRPOTrainer`] (the hybrid: the
step KL to each prompt's teacher beside the reward, weighted by `opd_coef`).
"""

import logging
from typing import Optional

import torch

from .lora import adapter_checksum
from .pipelines import PromptEmbeddings
from .preflight import check_scheduler_grids, check_teacher_targets, check_teachers_frozen, report_options
from .targets import teacher_means
from .teachers import Teacher, TeacherSource, check_local_sources, load_teachers


logger = logging.getLogger(__name__)

__all__ = ["TeacherSupport", "check_teacher_tasks"]


def check_teacher_tasks(dataset, teachers: dict, name: str) -> None:
    """
    Raises `ValueError` when `dataset` (named `name` in the message) has a task without a teacher, or has no `task`
    column while there is more than one teacher to route its prompts to.
    """
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


class TeacherSupport:
    """
    Mixin of the trainers that run teachers. The trainer calls [`accept_teacher_sources`] before
    `DiffusionTrainerBase.__init__` (cheap checks, nothing loaded) and [`load_teacher_adapters`] from its
    `_prepare_before_trainer_init` hook (after the student adapter exists, before the optimizer is built); its
    config provides `noise_level`, `guidance_scale`, `teacher_guidance_scales` and `hub_token`.

    Before the first step (when the optimizer is built) the preflight checks run: the teachers' sampling grid and
    their frozen state; the first micro-batch's teacher means are checked when computed; and every save first
    verifies that no teacher changed (see [`~preflight`]).
    """

    teacher_sources: Optional[dict[str, TeacherSource]] = None  # set by `accept_teacher_sources`
    # One teacher forward for the rows of every task ([`~targets.teacher_means`]); `False`, one per task (the
    # benchmark's comparison).
    batch_teacher_forwards = True
    teachers: dict[str, Teacher]  # set by `load_teacher_adapters` (empty without teachers)
    _teacher_targets_checked = False

    def accept_teacher_sources(self, teachers: dict[str, TeacherSource], datasets: dict) -> None:
        """
        Checks `teachers` (a non-empty dict, every local path present) and that every dataset of `datasets` (name ->
        dataset or `None`) routes each prompt to one of them, before any model is loaded.
        """
        if not isinstance(teachers, dict) or not teachers:
            raise ValueError("`teachers` must be a non-empty dict mapping each task to its teacher LoRA.")
        check_local_sources(teachers)
        for name, dataset in datasets.items():
            check_teacher_tasks(dataset, teachers, name)
        self.teacher_sources = teachers

    def load_teacher_adapters(self, args) -> None:
        """Loads the accepted teachers as frozen adapters on the student's denoiser (none when there are none)."""
        if not self.teacher_sources:
            self.teachers = {}
            return
        self.teachers = load_teachers(
            self.family.denoiser,
            self.teacher_sources,
            self.family.denoiser_name,
            base_model=self._base_model_id(),
            guidance_overrides=args.teacher_guidance_scales,
            token=args.hub_token,
        )

    def teacher_tasks(self, columns: dict, batch_size: int) -> list[str]:
        """The task (teacher) of each row of a batch: its `task` column, or the only teacher's task."""
        if "task" in columns:
            return list(columns["task"])
        return [next(iter(self.teachers))] * batch_size  # one teacher (a dataset without tasks has only one)

    def teacher_guidance_scale(self, teacher: Teacher) -> float:
        """The teacher's own CFG scale, else the student's `guidance_scale`."""
        return teacher.guidance_scale if teacher.guidance_scale is not None else self.args.guidance_scale

    def teacher_guidance_scales(self) -> dict[str, float]:
        """Each task's teacher CFG scale ([`teacher_guidance_scale`])."""
        return {task: self.teacher_guidance_scale(teacher) for task, teacher in self.teachers.items()}

    def teacher_means(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeddings, tasks: list[str]
    ) -> torch.Tensor:
        """
        Each sample's teacher transition mean from state `x` at timestep `t`, with the student's kernel: one denoiser
        forward for the rows of every task (see [`~targets.teacher_means`]).
        """
        means = teacher_means(
            self.family,
            self.teachers,
            x,
            t,
            embeds,
            tasks,
            guidance_scales=self.teacher_guidance_scales(),
            noise_level=self.args.noise_level,
            autocast=self.compute_loss_context_manager,
            batched=self.batch_teacher_forwards,
            same_forwards=self.same_forwards_across_processes(),
        )
        if not self._teacher_targets_checked:
            check_teacher_targets(means, x, tasks, self.teachers)
            self._teacher_targets_checked = True
        return means

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.teachers:
            args = self.args
            report_options(args, self.teachers, self.teacher_guidance_scales())
            check_scheduler_grids(self.family, self.teachers, args.num_inference_steps, *self.image_size)
            check_teachers_frozen(self.unwrapped_denoiser, self.teachers, optimizer)
        return optimizer

    def _check_before_save(self) -> None:
        changed = sorted(task for task, same in self.teachers_unchanged().items() if not same)
        if changed:
            raise RuntimeError(
                f"Teacher(s) {changed} changed since they were loaded (their weights' checksum differs): refusing to "
                "save a student trained against moving targets. Earlier checkpoints are left as they were."
            )

    def teachers_unchanged(self) -> dict[str, bool]:
        """Whether each teacher's weights still match their checksum at load time."""
        return {
            task: adapter_checksum(self.unwrapped_denoiser, teacher.adapter_name) == teacher.checksum
            for task, teacher in self.teachers.items()
        }

    def teacher_table(self) -> str:
        """The model card's Markdown table of the teachers (task, source, CFG scale)."""
        rows = ["| task | teacher | teacher CFG |", "|---|---|---|"]
        for task, scale in self.teacher_guidance_scales().items():
            rows.append(f"| {task} | `{self.teachers[task].source}` | {scale} |")
        return "\n".join(rows)
