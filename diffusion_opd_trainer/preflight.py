"""
Checks of a teacher set-up made before the first training step, each said in one log line and each raising an error
that names what is wrong before any compute is spent:

- the sampling grid: a teacher whose folder records its scheduler (`scheduler_config.json`, which this library saves
  beside every LoRA) must give the student's timesteps and sigmas at the training resolution and step count, since
  the step KL compares two transitions of one grid;
- frozen teachers: no teacher weight in the optimizer or trainable, none among the weights a save writes, and their
  checksums recorded (then verified at every save);
- the first micro-batch's teacher targets: finite, and of the student's shape;
- the combination of options, checked when the config and the trainer were built, said in one line.
"""

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME  # what `save_config` writes

from .lora import STUDENT_ADAPTER, adapter_state_dict, lora_parameters
from .teachers import Teacher


logger = logging.getLogger(__name__)

__all__ = [
    "SCHEDULER_CONFIG_NAME",
    "report_options",
    "check_scheduler_grids",
    "check_teacher_targets",
    "check_teachers_frozen",
    "scheduler_grid",
]


def scheduler_grid(family, scheduler, num_inference_steps: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """
    The timesteps and sigmas that `scheduler` gives when the pipeline family sets it up for a rollout of
    `num_inference_steps` at `height` x `width` (with the resolution-dependent shift of dynamic-shifting schedulers).
    """
    saved = family.pipeline.scheduler
    family.pipeline.scheduler = scheduler
    try:
        timesteps = family.set_timesteps(num_inference_steps, height, width)
        grid = {"timesteps": timesteps.detach().float().cpu().clone()}
        if getattr(scheduler, "sigmas", None) is not None:
            grid["sigmas"] = scheduler.sigmas.detach().float().cpu().clone()
        return grid
    finally:
        family.pipeline.scheduler = saved


def _recorded_scheduler_config(teacher: Teacher) -> Optional[Path]:
    folder = teacher.path if teacher.path.is_dir() else teacher.path.parent
    path = folder / SCHEDULER_CONFIG_NAME
    return path if path.is_file() else None


def _short(values: torch.Tensor) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:6].tolist())
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"


def check_scheduler_grids(
    family, teachers: dict[str, Teacher], num_inference_steps: int, height: int, width: int
) -> None:
    """
    Raises `ValueError` when a teacher's recorded scheduler gives another grid than the student's at the training
    resolution and step count; teachers without a record run on the student's grid (they share its scheduler).
    """
    student = scheduler_grid(family, family.scheduler, num_inference_steps, height, width)
    recorded = []
    for task, teacher in teachers.items():
        path = _recorded_scheduler_config(teacher)
        if path is None:
            continue
        config = json.loads(path.read_text())
        scheduler_class = type(family.scheduler)
        if config.get("_class_name", scheduler_class.__name__) != scheduler_class.__name__:
            raise ValueError(
                f"Teacher for task {task!r} ({teacher.source!r}) was trained with a {config['_class_name']} "
                f"({path}), the student's pipeline samples with a {scheduler_class.__name__}: the step KL needs both "
                "on one sampling grid."
            )
        teacher_grid = scheduler_grid(family, scheduler_class.from_config(config), num_inference_steps, height, width)
        for name, values in student.items():
            theirs = teacher_grid.get(name)
            if theirs is None or theirs.shape != values.shape or not torch.allclose(theirs, values, atol=1e-6):
                raise ValueError(
                    f"Teacher for task {task!r} ({teacher.source!r}) was trained on another sampling grid: at "
                    f"{height}x{width} with {num_inference_steps} steps its scheduler ({path}) gives {name} "
                    f"{_short(theirs) if theirs is not None else 'none'}, the student's gives {_short(values)}. The "
                    "step KL compares transitions on one grid: use the teacher's scheduler settings (e.g. its "
                    "`shift`) in the student's pipeline."
                )
        recorded.append(task)
    unrecorded = sorted(set(teachers) - set(recorded))
    logger.info(
        "Preflight: sampling grid of %d steps at %dx%d is the student's for every teacher (%s)",
        num_inference_steps,
        height,
        width,
        "; ".join(
            part
            for part in (
                f"recorded and identical: {recorded}" if recorded else "",
                f"no scheduler recorded, run on the student's: {unrecorded}" if unrecorded else "",
            )
            if part
        ),
    )


def check_teachers_frozen(denoiser: torch.nn.Module, teachers: dict[str, Teacher], optimizer) -> None:
    """
    Raises `RuntimeError` when a teacher weight is trainable or in the optimizer, or when the weights a save writes
    are not exactly the student's.
    """
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]} if optimizer else set()
    for task, teacher in teachers.items():
        weights = lora_parameters(denoiser, teacher.adapter_name)
        wrong = [name for name, p in weights.items() if p.requires_grad or id(p) in optimized]
        if wrong:
            raise RuntimeError(
                f"Teacher for task {task!r} ({teacher.source!r}) is not frozen: {len(wrong)} of its weights are "
                f"trainable or in the optimizer, e.g. {wrong[:2]}. Teachers must never change."
            )
    student = {name.replace(f".{STUDENT_ADAPTER}.", ".") for name in lora_parameters(denoiser, STUDENT_ADAPTER)}
    saved = set(adapter_state_dict(denoiser, STUDENT_ADAPTER))
    if saved != student:
        raise RuntimeError(
            f"The weights a save would write are not the student's LoRA: {sorted(saved ^ student)[:3]} differ."
        )
    logger.info(
        "Preflight: %d teacher(s) frozen (none trainable, none in the optimizer, none in the saved files); their "
        "checksums are verified at every save",
        len(teachers),
    )


def check_teacher_targets(
    means: torch.Tensor, states: torch.Tensor, tasks: list[str], teachers: dict[str, Teacher]
) -> None:
    """
    Raises `ValueError` naming the teacher when its transition means (the first micro-batch's) are not finite, or
    when the means are not of the student's state shape.
    """
    if means.shape != states.shape:
        raise ValueError(
            f"The teachers' transition means have shape {tuple(means.shape)}, the student's states "
            f"{tuple(states.shape)}: a teacher of another architecture or latent size?"
        )
    for task in dict.fromkeys(tasks):
        rows = [i for i, name in enumerate(tasks) if name == task]
        if not bool(torch.isfinite(means[rows]).all()):
            teacher = teachers[task]
            raise ValueError(
                f"Teacher for task {task!r} ({teacher.source!r}) gives non-finite transition means on the first "
                "micro-batch: its LoRA weights or its CFG scale are broken."
            )
    logger.info("Preflight: the first micro-batch's teacher targets are finite and of the student's shape")


def report_options(args, teachers: dict[str, Teacher], guidance_scales: dict[str, float]) -> None:
    """
    Says the training set-up in one line (method, kernel, loss, schedule, teachers and their CFG scales): every
    combination was checked when the config (`__post_init__`) and the trainer were built, each unsupported one with
    an error naming it, so reaching this line means the combination is supported.
    """
    kernel = "ODE (mean matching)" if args.noise_level == 0 else f"SDE at noise level {args.noise_level} (exact KL)"
    if hasattr(args, "opd_coef"):  # GRPO, the hybrid
        method = f"GRPO plus {args.opd_coef} x the step KL to the teacher (hybrid), beta {args.beta}"
    else:
        schedule = "fused" if args.fused else "two-pass"
        method = (
            f"on-policy distillation, {args.loss_type} loss, {schedule} schedule, teacher rollouts "
            f"{args.teacher_rollout_fraction}"
        )
    cfg = ", ".join(f"{task} CFG {guidance_scales[task]}" for task in teachers)
    logger.info(
        "Preflight: options supported: %s; %s, %s KL scaling; teachers: %s", method, kernel, args.kl_scaling, cfg
    )
