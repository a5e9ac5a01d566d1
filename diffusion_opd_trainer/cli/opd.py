"""
`diffusion-opd opd`: distill several task teachers (LoRAs) into one student LoRA with [`DiffusionOPDTrainer`].

    diffusion-opd opd --config examples/configs/opd_sd35.yaml
    diffusion-opd opd --config examples/configs/opd_tiny.yaml --max_steps 1      # offline smoke run
    accelerate launch -m diffusion_opd_trainer opd --config examples/configs/opd_sd35.yaml

Teachers are `task=source` pairs: a PEFT folder, a diffusers LoRA file or folder, or a Hub id
`owner/repo[/subfolder][@revision]`. The prompts' `task` column routes each prompt to its teacher. Every field of
[`OPDScriptArguments`] and [`DiffusionOPDConfig`] can be set in the YAML recipe or on the command line; the command
line wins. `examples/distill_sd3.py` runs the same code.
"""

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from datasets import Dataset, concatenate_datasets
from trl import TrlParser

from ..data import load_prompt_dataset
from ..lora import DEFAULT_TARGET_MODULES
from ..opd_config import DiffusionOPDConfig
from ..opd_trainer import DiffusionOPDTrainer
from ._common import finish_training, load_pipeline, parse_pairs, run_job, student_lora_config


logger = logging.getLogger(__name__)

__all__ = ["OPDScriptArguments", "load_opd_inputs", "main", "make_parser", "train_opd"]


@dataclass
class OPDScriptArguments:
    """
    The model, teachers, prompts and student LoRA of a distillation (the training settings are
    [`DiffusionOPDConfig`]'s).

    Args:
        model_name_or_path (`str`, defaults to `"stabilityai/stable-diffusion-3.5-medium"`): the base pipeline shared
            by teachers and student.
        teachers (`list[str]`): `task=source` pairs, e.g. `geneval=user/teachers/geneval`.
        datasets (`list[str]`): `task=dataset` pairs (prompt files or dataset ids), one per task; the `task` column
            is added. Alternatively `dataset_name` with a `task` column already in it.
        dataset_name (`str`, *optional*): one prompt dataset with `prompt` and `task` columns.
        dataset_split (`str`, defaults to `"train"`): the split of each dataset id.
        eval_reward_funcs (`list[str]`, *optional*): registered reward names for monitoring only.
        lora_r (`int`, defaults to 32), lora_alpha (`int`, defaults to 64), lora_target_modules (`list[str]`): the
            student LoRA (the paper: 32 / 64, on the attention projections).
        tiny (`bool`, defaults to `False`): run offline on a tiny random SD3 pipeline with two random teachers (smoke
            test, no download).
    """

    model_name_or_path: str = field(
        default="stabilityai/stable-diffusion-3.5-medium",
        metadata={"help": "The base pipeline shared by teachers and student: a Hub id or a folder."},
    )
    teachers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Teachers as task=source pairs; a source is a PEFT folder, a diffusers LoRA file or folder, or a "
            "Hub id owner/repo[/subfolder][@revision]."
        },
    )
    datasets: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompts as task=dataset pairs (prompt files or dataset ids), one per task."},
    )
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "One prompt dataset with `prompt` and `task` columns (instead of `datasets`)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "The split of each dataset id."})
    eval_reward_funcs: Optional[list[str]] = field(
        default=None, metadata={"help": "Registered reward names scored for monitoring only (not trained on)."}
    )
    lora_r: int = field(default=32, metadata={"help": "Student LoRA rank (the paper: 32)."})
    lora_alpha: int = field(default=64, metadata={"help": "Student LoRA alpha (the paper: 64)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES["transformer"]),
        metadata={"help": "Denoiser modules that get the student LoRA (default: the attention projections)."},
    )
    tiny: bool = field(default=False, metadata={"help": "Offline smoke run on a tiny random SD3 pipeline."})


TINY_PROMPTS = ["a red circle", "two blue squares", "a sign saying one", "text saying cat"]
TINY_TASKS = ["shapes", "shapes", "text", "text"]


def _tiny_inputs(workdir: str):
    from ..testing import save_random_lora, tiny_sd3_pipeline

    model = tiny_sd3_pipeline()
    teachers = {
        "shapes": save_random_lora(model, f"{workdir}/shapes", "peft", seed=1, std=0.3),
        "text": save_random_lora(model, f"{workdir}/text", "diffusers", seed=2, std=0.3),
    }
    return model, teachers, Dataset.from_dict({"prompt": TINY_PROMPTS * 2, "task": TINY_TASKS * 2})


def _train_dataset(script_args: OPDScriptArguments) -> Dataset:
    if script_args.dataset_name:
        return load_prompt_dataset(script_args.dataset_name, script_args.dataset_split)
    parts = []
    for task, source in parse_pairs(script_args.datasets, "datasets").items():
        part = load_prompt_dataset(source, script_args.dataset_split).select_columns(["prompt"])
        parts.append(part.add_column("task", [task] * len(part)))
    if not parts:
        raise ValueError("Set `datasets` (task=prompts pairs) or `dataset_name`, or pass --tiny.")
    return concatenate_datasets(parts)


def load_opd_inputs(script_args: OPDScriptArguments, training_args: DiffusionOPDConfig, workdir: str):
    """
    The pipeline, teachers (task -> source) and training prompts that `script_args` names; `--tiny` writes its two
    random teachers under `workdir`.

    Returns:
        `tuple`: `(pipeline, teachers, train_dataset)`.
    """
    if script_args.tiny:
        return _tiny_inputs(workdir)
    teachers = parse_pairs(script_args.teachers, "teachers")
    train_dataset = _train_dataset(script_args)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    return load_pipeline(script_args.model_name_or_path, dtype), teachers, train_dataset


def train_opd(script_args: OPDScriptArguments, training_args: DiffusionOPDConfig) -> DiffusionOPDTrainer:
    """
    The distillation job: builds [`DiffusionOPDTrainer`] from the arguments, trains, saves the student LoRA to
    `output_dir` and pushes it to the Hub when `push_to_hub` is set.

    Args:
        script_args ([`OPDScriptArguments`]): the model, teachers, prompts and student LoRA.
        training_args ([`DiffusionOPDConfig`]): the training settings.

    Returns:
        [`DiffusionOPDTrainer`]: the trainer, after training.
    """
    with tempfile.TemporaryDirectory() as workdir:
        model, teachers, train_dataset = load_opd_inputs(script_args, training_args, workdir)
        trainer = DiffusionOPDTrainer(
            model=model,
            teachers=teachers,
            args=training_args,
            train_dataset=train_dataset,
            peft_config=student_lora_config(script_args),
            eval_reward_funcs=script_args.eval_reward_funcs,
        )
        finish_training(trainer, training_args)
    return trainer


def make_parser(prog: Optional[str] = None) -> TrlParser:
    """The `trl.TrlParser` of the distillation job: `--config recipe.yaml` plus every field as `--field value`."""
    return TrlParser(
        (OPDScriptArguments, DiffusionOPDConfig),
        prog=prog,
        description="Distill task teachers into one student LoRA. `--config recipe.yaml` sets any field below; "
        "command-line values win.",
    )


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parses `argv` (the command line by default) with [`make_parser`] and runs [`train_opd`]."""
    return run_job(make_parser(prog), train_opd, argv)
