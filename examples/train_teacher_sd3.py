"""Train a GRPO teacher (one reward per task) on SD3.5-Medium, or any SD3-family pipeline.

    accelerate launch examples/train_teacher_sd3.py --config examples/configs/grpo_sd35_pickscore.yaml
    python examples/train_teacher_sd3.py --config examples/configs/grpo_tiny.yaml        # offline smoke run

Every `DiffusionGRPOConfig` field (a `transformers.TrainingArguments`) can be set in the YAML or on the command line.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import TrlParser

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_opd_trainer.data import load_prompt_dataset
from diffusion_opd_trainer.lora import DEFAULT_TARGET_MODULES


logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """
    Args:
        model_name_or_path (`str`): the base pipeline (Hub id or folder).
        reward_funcs (`list[str]`): registered reward names (`pickscore`, `ocr`, `geneval`, `jpeg_compressibility`...).
        dataset_name (`str`, *optional*): prompts: a Hub dataset id, a folder, or a .txt/.json/.jsonl/.csv file.
        dataset_split (`str`): the training split.
        eval_dataset_name (`str`, *optional*): evaluation prompts, same forms.
        lora_r (`int`), lora_alpha (`int`), lora_target_modules (`list[str]`): the LoRA (the paper: 32 / 64).
        tiny (`bool`): run offline on a tiny random SD3 pipeline with built-in prompts (smoke test, no download).
    """

    model_name_or_path: str = field(default="stabilityai/stable-diffusion-3.5-medium")
    reward_funcs: list[str] = field(default_factory=lambda: ["pickscore"])
    dataset_name: Optional[str] = field(default=None)
    dataset_split: str = field(default="train")
    eval_dataset_name: Optional[str] = field(default=None)
    lora_r: int = field(default=32)
    lora_alpha: int = field(default=64)
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES["transformer"]))
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


def main(script_args: ScriptArguments, training_args: DiffusionGRPOConfig) -> None:
    if script_args.tiny:
        from diffusion_opd_trainer.testing import tiny_sd3_pipeline

        model = tiny_sd3_pipeline()
        train_dataset = Dataset.from_dict({"prompt": TINY_PROMPTS})
        eval_dataset = Dataset.from_dict({"prompt": TINY_PROMPTS[:4]})
    else:
        dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        from diffusers import DiffusionPipeline

        model = DiffusionPipeline.from_pretrained(script_args.model_name_or_path, dtype=dtype)
        if script_args.dataset_name is None:
            raise ValueError("Set `dataset_name` (prompts for the task), or pass --tiny for an offline smoke run.")
        train_dataset = load_prompt_dataset(script_args.dataset_name, script_args.dataset_split)
        eval_dataset = load_prompt_dataset(script_args.eval_dataset_name) if script_args.eval_dataset_name else None

    trainer = DiffusionGRPOTrainer(
        model=model,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=script_args.lora_target_modules,
        ),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    # Every process waits for the main one to finish saving: a rank that tears gloo down early aborts the run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = TrlParser((ScriptArguments, DiffusionGRPOConfig))
    main(*parser.parse_args_and_config())
