"""Train a GRPO teacher (one reward per task) on SD3.5-Medium, or any SD3-family pipeline.

    accelerate launch examples/train_teacher_sd3.py --config examples/configs/grpo_sd35_pickscore.yaml
    python examples/train_teacher_sd3.py --config examples/configs/grpo_tiny.yaml        # offline smoke run

Every `DiffusionGRPOConfig` field (a `transformers.TrainingArguments`) can be set in the YAML or on the command line.
The job (`train_grpo`) lives in `diffusion_opd_trainer/cli/grpo.py`; `diffusion-opd grpo --config ...` runs it too.
"""

import logging

from trl import TrlParser

from diffusion_opd_trainer import DiffusionGRPOConfig
from diffusion_opd_trainer.cli.grpo import GRPOScriptArguments, train_grpo


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = TrlParser((GRPOScriptArguments, DiffusionGRPOConfig))
    script_args, training_args = parser.parse_args_and_config()
    train_grpo(script_args, training_args)
