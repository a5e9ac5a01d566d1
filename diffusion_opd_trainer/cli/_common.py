"""What the commands share: `name=value` pairs, the `--config` check, loading a pipeline, finishing a training run."""

import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

import torch
from peft import LoraConfig


logger = logging.getLogger(__name__)

__all__ = [
    "check_config_argument",
    "check_local_path",
    "finish_training",
    "load_pipeline",
    "parse_pairs",
    "setup_logging",
]


def setup_logging(level: int = logging.INFO) -> None:
    """The commands' logging: `level` on the root logger (every process logs, as the example scripts did)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def parse_pairs(values: Sequence[str], what: str, key: str = "task") -> dict[str, str]:
    """
    `key=value` strings as a dict, in order.

    Args:
        values (`Sequence[str]`): e.g. `["geneval=user/teachers/geneval", "ocr=./ocr-teacher"]`.
        what (`str`): the field or option the values came from, named in errors (e.g. `"teachers"`).
        key (`str`, defaults to `"task"`): what the left-hand side is, named in errors.

    Raises:
        `ValueError`: a value without `=`, with an empty side, or a repeated key.
    """
    pairs = {}
    for value in values:
        name, sep, source = value.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ValueError(f"Each of `{what}` must be `{key}=source`, got {value!r}.")
        if name in pairs:
            raise ValueError(f"`{what}` names {key} {name!r} twice ({pairs[name]!r} and {source!r}).")
        pairs[name] = source
    return pairs


def check_config_argument(argv: Sequence[str]) -> Optional[str]:
    """
    The path after `--config` in `argv`, checked before `trl.TrlParser` opens it (it would raise a bare traceback).

    Raises:
        `FileNotFoundError`: `--config` names no file.
        `ValueError`: `--config` is the last argument.
    """
    if "--config" not in argv:
        return None
    index = list(argv).index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise ValueError("`--config` needs the path of a YAML recipe, e.g. `--config examples/configs/opd_tiny.yaml`.")
    path = argv[index + 1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} (from `--config`) does not exist.")
    return path


def load_pipeline(name_or_path: str, dtype: torch.dtype = torch.float32, what: str = "model_name_or_path"):
    """
    A diffusers pipeline from a folder or a Hub id; a local-looking path that does not exist is an error naming `what`.
    """
    from diffusers import DiffusionPipeline

    from ..quiet import quiet_pipeline_imports

    check_local_path(name_or_path, what)
    with quiet_pipeline_imports():
        return DiffusionPipeline.from_pretrained(name_or_path, dtype=dtype)


def check_local_path(name_or_path: str, what: str) -> None:
    """Raises `FileNotFoundError` naming `what` when `name_or_path` is a local path (not a Hub id) that is missing."""
    from ..teachers import is_local_source

    if is_local_source(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"`{what}`: the pipeline folder {name_or_path!r} does not exist.")


def run_job(parser, job, argv: Optional[Sequence[str]] = None) -> int:
    """
    Parses `argv` (the command line by default) with a job's `TrlParser`, after checking that its `--config` file
    exists (a usage error naming the file, not a traceback), then runs `job(script_args, training_args)`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_config_argument(argv)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    script_args, training_args = parser.parse_args_and_config(argv)
    setup_logging()
    job(script_args, training_args)
    return 0


def student_lora_config(script_args) -> LoraConfig:
    """The trained LoRA of a job: rank, alpha and targets from the script arguments, gaussian init (the paper's)."""
    return LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=script_args.lora_target_modules,
    )


def finish_training(trainer, training_args) -> None:
    """
    Trains (resuming as `resume_from_checkpoint` says), saves the LoRA to `output_dir`, pushes it when `push_to_hub`,
    and ends the run on every process.
    """
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    # Every process waits for the main one to finish saving: a rank that tears gloo down early aborts the run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
