"""
`diffusion-opd grpo`: train a GRPO teacher (one reward per task, or several) with [`DiffusionGRPOTrainer`].

    diffusion-opd grpo --config examples/configs/grpo_sd35_pickscore.yaml
    diffusion-opd grpo --config examples/configs/grpo_tiny.yaml --max_steps 1      # offline smoke run
    accelerate launch -m diffusion_opd_trainer grpo --config examples/configs/grpo_sd35_pickscore.yaml

Every field of [`GRPOScriptArguments`] and [`DiffusionGRPOConfig`] (a `transformers.TrainingArguments`) can be set in
the YAML recipe or on the command line; the command line wins. `examples/train_teacher_sd3.py` runs the same code.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from datasets import Dataset
from trl import TrlParser

from ..data import load_prompt_dataset
from ..grpo_config import DiffusionGRPOConfig
from ..grpo_trainer import DiffusionGRPOTrainer
from ..lora import DEFAULT_TARGET_MODULES
from ._common import finish_training, load_pipeline, parse_pairs, run_job, student_lora_config


logger = logging.getLogger(__name__)

__all__ = ["TINY_PROMPTS", "GRPOScriptArguments", "load_grpo_inputs", "main", "make_parser", "train_grpo"]


@dataclass
class GRPOScriptArguments:
    """
    The model, rewards, prompts and LoRA of a GRPO run (the training settings are [`DiffusionGRPOConfig`]'s).

    Args:
        model_name_or_path (`str`, defaults to `"stabilityai/stable-diffusion-3.5-medium"`): the base pipeline (Hub id
            or folder).
        reward_funcs (`list[str]`, defaults to `["pickscore"]`): registered reward names (`pickscore`, `ocr`,
            `geneval`, `jpeg_compressibility`...).
        dataset_name (`str`, *optional*): prompts: a Hub dataset id, a folder, or a .txt/.json/.jsonl/.csv file.
        dataset_split (`str`, defaults to `"train"`): the training split.
        eval_dataset_name (`str`, *optional*): evaluation prompts, same forms.
        lora_r (`int`, defaults to 32), lora_alpha (`int`, defaults to 64), lora_target_modules (`list[str]`): the LoRA
            (the paper: 32 / 64, on the attention projections).
        teachers (`list[str]`, *optional*): the hybrid's teachers (with `opd_coef` > 0) as `task=source` pairs,
            as `diffusion-opd opd` takes them.
        tiny (`bool`, defaults to `False`): run offline on a tiny random SD3 pipeline with built-in prompts (smoke
            test, no download).
    """

    model_name_or_path: str = field(
        default="stabilityai/stable-diffusion-3.5-medium",
        metadata={"help": "The base pipeline: a Hub id or a folder."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["pickscore"],
        metadata={"help": "Registered reward names (pickscore, ocr, geneval, jpeg_compressibility, ...)."},
    )
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Training prompts: a Hub dataset id, a folder, or a .txt/.json/.jsonl/.csv/.parquet file."},
    )
    dataset_split: str = field(default="train", metadata={"help": "The split of `dataset_name` to train on."})
    eval_dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Evaluation prompts, in the same forms as `dataset_name`."}
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (the paper: 32)."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (the paper: 64)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES["transformer"]),
        metadata={"help": "Denoiser modules that get the LoRA (default: the attention projections)."},
    )
    teachers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "The hybrid's teachers (used with `opd_coef` > 0) as task=source pairs, in the forms of "
            "`diffusion-opd opd --teachers`."
        },
    )
    tiny: bool = field(default=False, metadata={"help": "Offline smoke run on a tiny random SD3 pipeline."})


TINY_PROMPTS = [
    "a red circle",
    "two blue squares",
    "a photo of a cat",
    "a dog next to a car",
    "a green apple",
    "three yellow triangles",
    "a sign saying one",
    "a black cat left of a white dog",
]


def load_grpo_inputs(script_args: GRPOScriptArguments, training_args: DiffusionGRPOConfig):
    """
    The pipeline, training prompts and evaluation prompts (or `None`) that `script_args` names.

    Returns:
        `tuple`: `(pipeline, train_dataset, eval_dataset)`.
    """
    if script_args.tiny:
        from ..testing import tiny_sd3_pipeline

        model = tiny_sd3_pipeline()
        return model, Dataset.from_dict({"prompt": TINY_PROMPTS}), Dataset.from_dict({"prompt": TINY_PROMPTS[:4]})
    if script_args.dataset_name is None:
        raise ValueError("Set `dataset_name` (prompts for the task), or pass --tiny for an offline smoke run.")
    model = load_pipeline(script_args.model_name_or_path, torch.bfloat16 if training_args.bf16 else torch.float32)
    train_dataset = load_prompt_dataset(script_args.dataset_name, script_args.dataset_split)
    eval_dataset = load_prompt_dataset(script_args.eval_dataset_name) if script_args.eval_dataset_name else None
    return model, train_dataset, eval_dataset


def train_grpo(script_args: GRPOScriptArguments, training_args: DiffusionGRPOConfig) -> DiffusionGRPOTrainer:
    """
    The GRPO job: builds [`DiffusionGRPOTrainer`] from the arguments, trains, saves the LoRA to `output_dir` and
    pushes it to the Hub when `push_to_hub` is set.

    Args:
        script_args ([`GRPOScriptArguments`]): the model, rewards, prompts and LoRA.
        training_args ([`DiffusionGRPOConfig`]): the training settings.

    Returns:
        [`DiffusionGRPOTrainer`]: the trainer, after training.
    """
    model, train_dataset, eval_dataset = load_grpo_inputs(script_args, training_args)
    trainer = DiffusionGRPOTrainer(
        model=model,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=student_lora_config(script_args),
        teachers=parse_pairs(script_args.teachers, "teachers") or None,
    )
    finish_training(trainer, training_args)
    return trainer


def make_parser(prog: Optional[str] = None) -> TrlParser:
    """The `trl.TrlParser` of the GRPO job: `--config recipe.yaml` plus every field as `--field value`."""
    return TrlParser(
        (GRPOScriptArguments, DiffusionGRPOConfig),
        prog=prog,
        description="Train a GRPO teacher. `--config recipe.yaml` sets any field below; command-line values win.",
    )


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parses `argv` (the command line by default) with [`make_parser`] and runs [`train_grpo`]."""
    return run_job(make_parser(prog), train_grpo, argv)
