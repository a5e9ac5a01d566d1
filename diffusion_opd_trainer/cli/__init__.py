"""
The `diffusion-opd` command line (also `python -m diffusion_opd_trainer`, and `accelerate launch -m
diffusion_opd_trainer ...` for several processes):

    diffusion-opd grpo --config recipe.yaml [--field value ...]    # train a GRPO teacher
    diffusion-opd opd --config recipe.yaml [--field value ...]     # distill teachers into one student
    diffusion-opd eval --toy --lora opd=./toy-opd                  # a Table-1-style evaluation
    diffusion-opd toy --quick                                      # the miniature Table 1 (repository checkout)

Each command is a module of this package with a `main(argv, prog)`; the training jobs are also importable
(`cli.grpo.train_grpo`, `cli.opd.train_opd`), and `examples/` runs the same code.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional


__all__ = ["COMMANDS", "main"]

# command -> (module of this package, one-line help)
COMMANDS = {
    "grpo": ("grpo", "train a GRPO teacher (TRL-style YAML recipe plus --field overrides)"),
    "opd": ("opd", "distill task teachers into one student LoRA (on-policy distillation)"),
    "eval": ("evaluate", "score a pipeline and LoRAs on tasks' prompts: a Table-1-style Markdown/JSON table"),
    "toy": ("toy", "the miniature Table 1 on the toy world (benchmarks/toy_table.py of the repository)"),
}


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="diffusion-opd",
        usage="%(prog)s [-h] [--version] command [arguments ...]",
        description="GRPO and on-policy distillation (DiffusionOPD) for diffusers text-to-image pipelines.",
        epilog="commands:\n"
        + "\n".join(f"  {name:<6}{text}" for name, (_, text) in COMMANDS.items())
        + "\n\nRun `diffusion-opd <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="command", help=", ".join(COMMANDS))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Runs `diffusion-opd <command> [arguments]`.

    Args:
        argv (`Sequence[str]`, *optional*): the arguments after the program name; `sys.argv[1:]` by default.

    Returns:
        `int`: the exit status (argparse exits on `--help` and on usage errors).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Only the command is parsed here: its own parser takes the rest (and its own --help).
    command = parser.parse_args(argv[:1]).command
    module = importlib.import_module(f".{COMMANDS[command][0]}", __name__)
    return module.main(argv[1:], prog=f"diffusion-opd {command}")
