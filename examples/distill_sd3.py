"""Distill several task teachers (LoRAs) into one student LoRA with on-policy distillation (DiffusionOPD).

    accelerate launch examples/distill_sd3.py --config examples/configs/opd_sd35.yaml
    python examples/distill_sd3.py --config examples/configs/opd_tiny.yaml        # offline smoke run

Teachers are `task=source` pairs: a PEFT folder, a diffusers LoRA file or folder, or a Hub id
`owner/repo[/subfolder][@revision]`. The prompts' `task` column routes each prompt to its teacher.
Every `DiffusionOPDConfig` field (a `transformers.TrainingArguments`) can be set in the YAML or on the command line.
The job (`train_opd`) lives in `diffusion_opd_trainer/cli/opd.py`; `diffusion-opd opd --config ...` runs it too.
"""

import logging

from trl import TrlParser

from diffusion_opd_trainer import DiffusionOPDConfig
from diffusion_opd_trainer.cli.opd import OPDScriptArguments, train_opd


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = TrlParser((OPDScriptArguments, DiffusionOPDConfig))
    script_args, training_args = parser.parse_args_and_config()
    train_opd(script_args, training_args)
