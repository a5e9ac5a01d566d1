"""Distill several task teachers (LoRAs) into one student LoRA with on-policy distillation (DiffusionOPD).

    accelerate launch examples/distill_sd3.py --config examples/configs/opd_sd35.yaml
    python examples/distill_sd3.py --config examples/configs/opd_tiny.yaml        # offline smoke run

Teachers are `task=source` pairs: a PEFT folder, a diffusers LoRA file or folder, or a Hub id
`owner/repo[/subfolder][@revision]`. The prompts' `task` column routes each prompt to its teacher.
Every `DiffusionOPDConfig` field (a `transformers.TrainingArguments`) can be set in the YAML or on the command line.
"""

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
from datasets import Dataset, concatenate_datasets
from peft import LoraConfig
from trl import TrlParser

from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.data import load_prompt_dataset
from diffusion_opd_trainer.lora import DEFAULT_TARGET_MODULES


logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """
    Args:
        model_name_or_path (`str`): the base pipeline shared by teachers and student.
        teachers (`list[str]`): `task=source` pairs, e.g. `geneval=user/teachers/geneval`.
        datasets (`list[str]`): `task=dataset` pairs (prompt files or dataset ids), one per task; the `task` column
            is added. Alternatively `dataset_name` with a `task` column already in it.
        dataset_name (`str`, *optional*): one prompt dataset with `prompt` and `task` columns.
        eval_reward_funcs (`list[str]`, *optional*): registered reward names for monitoring only.
        lora_r (`int`), lora_alpha (`int`), lora_target_modules (`list[str]`): the student LoRA (the paper: 32 / 64).
        tiny (`bool`): run offline on a tiny random SD3 pipeline with two random teachers (smoke test, no download).
    """

    model_name_or_path: str = field(default="stabilityai/stable-diffusion-3.5-medium")
    teachers: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    dataset_name: Optional[str] = field(default=None)
    dataset_split: str = field(default="train")
    eval_reward_funcs: Optional[list[str]] = field(default=None)
    lora_r: int = field(default=32)
    lora_alpha: int = field(default=64)
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES["transformer"]))
    tiny: bool = field(default=False, metadata={"help": "Offline smoke run on a tiny random SD3 pipeline."})


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        task, sep, source = value.partition("=")
        if not sep or not task or not source:
            raise ValueError(f"Each of `{what}` must be `task=source`, got {value!r}.")
        pairs[task] = source
    return pairs


def main(script_args: ScriptArguments, training_args: DiffusionOPDConfig) -> None:
    workdir = None
    if script_args.tiny:
        from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline

        model = tiny_sd3_pipeline()
        workdir = tempfile.TemporaryDirectory()
        teachers = {
            "shapes": save_random_lora(model, f"{workdir.name}/shapes", "peft", seed=1, std=0.3),
            "text": save_random_lora(model, f"{workdir.name}/text", "diffusers", seed=2, std=0.3),
        }
        prompts = ["a red circle", "two blue squares", "a sign saying one", "text saying cat"]
        train_dataset = Dataset.from_dict({"prompt": prompts * 2, "task": ["shapes", "shapes", "text", "text"] * 2})
    else:
        from diffusers import DiffusionPipeline

        dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        model = DiffusionPipeline.from_pretrained(script_args.model_name_or_path, dtype=dtype)
        teachers = _pairs(script_args.teachers, "teachers")
        if script_args.dataset_name:
            train_dataset = load_prompt_dataset(script_args.dataset_name, script_args.dataset_split)
        else:
            parts = []
            for task, source in _pairs(script_args.datasets, "datasets").items():
                part = load_prompt_dataset(source, script_args.dataset_split).select_columns(["prompt"])
                parts.append(part.add_column("task", [task] * len(part)))
            if not parts:
                raise ValueError("Set `datasets` (task=prompts pairs) or `dataset_name`, or pass --tiny.")
            train_dataset = concatenate_datasets(parts)

    trainer = DiffusionOPDTrainer(
        model=model,
        teachers=teachers,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=script_args.lora_target_modules,
        ),
        eval_reward_funcs=script_args.eval_reward_funcs,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    # Every process waits for the main one to finish saving: a rank that tears gloo down early aborts the run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if workdir is not None:
        workdir.cleanup()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = TrlParser((ScriptArguments, DiffusionOPDConfig))
    main(*parser.parse_args_and_config())
