"""
Run under `accelerate launch --num_processes 2` by tests/test_examples.py: a tiny GRPO run whose reward depends on the
process (0 on rank 0, 1 on rank 1) and a tiny two-teacher OPD run; each process writes its `log_history` to
`<output_dir>/<method>-rank<r>.json`, so the test can check that every logged figure is the whole batch's.
"""

import json
import os
import sys

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig

# The checksum test's tiny settings (run as a script, this file's folder is on the path).
from test_refactor_checksums import COMMON, LORA, PROMPTS

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline


def rank_reward(prompts, images, **kwargs):
    """The process index, plus a tiny image-dependent term so that groups have a spread."""
    rank = PartialState().process_index
    return (rank + 1e-3 * images.mean(dim=(1, 2, 3))).tolist()


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    grpo = DiffusionGRPOTrainer(
        tiny_sd3_pipeline(),
        reward_funcs=rank_reward,
        args=DiffusionGRPOConfig(
            output_dir=os.path.join(output_dir, "grpo"),
            per_device_train_batch_size=2,
            num_generations=2,
            beta=0.04,
            **COMMON,
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
    )
    rank = grpo.accelerator.process_index  # after the Trainer set up the processes
    grpo.train()
    with open(os.path.join(output_dir, f"grpo-rank{rank}.json"), "w") as file:
        json.dump(grpo.state.log_history, file)

    teachers = {
        task: save_random_lora(
            tiny_sd3_pipeline(), os.path.join(output_dir, f"teacher-{task}-rank{rank}"), "peft", seed=i
        )
        for i, task in enumerate(("a", "b"), start=1)
    }
    opd = DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers={task: str(path) for task, path in teachers.items()},
        args=DiffusionOPDConfig(
            output_dir=os.path.join(output_dir, "opd"), per_device_train_batch_size=2, log_per_step_kl=True, **COMMON
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2, "task": ["a", "b"] * 4}),
        peft_config=LoraConfig(**LORA),
    )
    opd.train()
    with open(os.path.join(output_dir, f"opd-rank{rank}.json"), "w") as file:
        json.dump(opd.state.log_history, file)
    opd.accelerator.wait_for_everyone()
    opd.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
