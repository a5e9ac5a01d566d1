"""
Probe one GRPO teacher of the toy table: train it with any `TableConfig` settings and print its validation curve
(held-out train-split prompts, never the test prompts) against the base model, and its training rewards.

Tuning happens here, on validation prompts, before a setting goes into the table:

    python benchmarks/toy_teacher_probe.py --task text --set teacher_steps=20 grpo_beta=0.04
    python benchmarks/toy_teacher_probe.py --task compositional --set grpo_share_initial_noise=true --output_dir /tmp/p

Every run is cached by its settings under `--output_dir` (as the table's stages are), so a probe reruns nothing.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.toy_stages import TableConfig, evaluate_model, task_reward, train_teacher  # noqa: E402
from diffusion_opd_trainer.toy import TASKS  # noqa: E402


def parse_settings(pairs: list[str]) -> dict:
    """`name=value` pairs into `TableConfig` overrides, each value parsed as JSON when it can be (else a string)."""
    fields = {field.name for field in dataclasses.fields(TableConfig)}
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set takes name=value with a TableConfig field; got {pair!r}.")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    return settings


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="TableConfig overrides")
    parser.add_argument("--output_dir", default="results/toy_probes", help="stage cache (not committed)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    config = TableConfig(output_dir=args.output_dir, **parse_settings(args.set))
    base = evaluate_model(config, "base", None, show_progress=False, split="validation")
    stage = train_teacher(config, args.task, show_progress=False)
    rewards = [entry["reward"] for entry in stage.log_history if "reward" in entry]
    result = {
        "task": args.task,
        "settings": parse_settings(args.set),
        "base": {task: round(task_reward(base, task), 3) for task in TASKS},
        "curve": [{"step": p["step"], "forwards": p["forwards"], **p["rewards"]} for p in stage.curve],
        "train_reward": [round(value, 3) for value in rewards],
        "seconds": stage.seconds,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
