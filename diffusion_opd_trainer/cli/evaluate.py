"""
`diffusion-opd eval`: score a pipeline and LoRAs on tasks' test prompts and write a Table-1-style table, with the
evaluation harness ([`~diffusion_opd_trainer.evaluate`], [`~evaluation.format_table`]).

    diffusion-opd eval --toy --lora opd=./toy-opd --max_prompts 16        # offline, the bundled toy world
    diffusion-opd eval --model stabilityai/stable-diffusion-3.5-medium \\
        --lora geneval=user/teachers/geneval --lora opd=./sd35-opd \\
        --task geneval=geneval_test.jsonl --task ocr=ocr_test.txt --task pickscore=pick_test.txt \\
        --reward geneval=geneval --reward ocr=ocr --reward pickscore=pickscore,clip_score,aesthetic

One row per model: the pipeline alone (`base`, unless `--no_base`), then each LoRA, loaded alone by the harness. Each
row's per-image scores go to `<output_dir>/<row>/results.json`; the table to `<output_dir>/table.md` and `table.json`.
"""

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..evaluation import EvaluationResult, evaluate, format_table
from ._common import check_local_path, load_pipeline, parse_pairs, setup_logging


logger = logging.getLogger(__name__)

__all__ = [
    "EvaluationPlan",
    "load_tasks",
    "main",
    "make_parser",
    "plan_evaluation",
    "resolve_rewards",
    "run_evaluation",
    "write_table",
]

# The harness's (and the paper's) evaluation sampler: 40-step ODE, CFG 4.5.
DEFAULT_NUM_INFERENCE_STEPS = 40
DEFAULT_GUIDANCE_SCALE = 4.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The `eval` command's options."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="the base pipeline: a folder or a Hub id; `toy` is the bundled toy model")
    model.add_argument(
        "--toy",
        action="store_true",
        help="the toy world: its test prompts, rewards and sampler defaults, on the bundled toy model (or `--model`)",
    )
    model.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="a LoRA row (repeatable): a PEFT folder, a diffusers LoRA file or folder, or a Hub id "
        "owner/repo[/subfolder][@revision]",
    )
    model.add_argument("--lora_scale", type=float, default=1.0, help="the weight of each LoRA")
    model.add_argument("--no_base", action="store_true", help="leave out the row of the pipeline without LoRA")
    model.add_argument("--base_name", default="base", help="the name of the pipeline's own row")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the pipeline's dtype")
    model.add_argument("--device", default=None, help="where to run (default: cuda when available, else cpu)")

    tasks = parser.add_argument_group("tasks and rewards")
    tasks.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="TASK[=PROMPTS]",
        help="a task and its prompts (repeatable): a .txt/.json/.jsonl/.csv/.parquet file or a dataset id; with "
        "--toy, a bare toy task name (compositional, text, preference) selects it (default: all three)",
    )
    tasks.add_argument("--split", default="test", help="the split of dataset ids and of the toy world's prompts")
    tasks.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="[TASK=]REWARD[,REWARD...]",
        help="registered reward names, for one task or (without TASK=) for every task; with --toy, each toy task "
        "defaults to its own reward",
    )
    tasks.add_argument("--max_prompts", type=int, default=None, help="the first N prompts of each task only")

    sampler = parser.add_argument_group("sampler (the deterministic ODE of the harness)")
    sampler.add_argument("--num_inference_steps", type=int, default=None, help="default 40 (the toy: 10)")
    sampler.add_argument("--guidance_scale", type=float, default=None, help="default 4.5 (the toy: 3.0)")
    sampler.add_argument("--seed", type=int, default=0, help="image k of prompt i starts from seed + i * n + k")
    sampler.add_argument("--num_images_per_prompt", type=int, default=1, help="images per prompt")
    sampler.add_argument("--batch_size", type=int, default=8, help="images per sampling batch")
    sampler.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    sampler.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    sampler.add_argument("--negative_prompt", default="", help="CFG's negative prompt")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="eval", help="where each row's results and the table go")
    output.add_argument("--markdown", default=None, help="the table's Markdown path (default <output_dir>/table.md)")
    output.add_argument("--json", default=None, help="the table's JSON path (default <output_dir>/table.json)")
    output.add_argument("--save_images", action="store_true", help="also save every image under <output_dir>/<row>/")
    output.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def _is_toy(args: argparse.Namespace) -> bool:
    return args.toy or args.model == "toy"


def load_tasks(args: argparse.Namespace) -> dict[str, Any]:
    """task -> its prompts (a `datasets.Dataset`), from `--task` (and the toy world with `--toy`)."""
    from ..data import load_prompt_dataset

    toy_tasks = _toy_tasks() if _is_toy(args) else ()
    if not args.task and not toy_tasks:
        raise ValueError("Name the tasks with `--task TASK=PROMPTS` (or pass --toy for the toy world's tasks).")
    tasks = {}
    for value in args.task or toy_tasks:
        name, sep, source = (part.strip() for part in value.partition("="))
        if name in tasks:
            raise ValueError(f"`--task` names task {name!r} twice.")
        if sep and name and source:
            tasks[name] = load_prompt_dataset(source, args.split)
        elif not sep and name in toy_tasks:
            from .. import toy

            tasks[name] = toy.prompts(name, args.split)
        elif not sep and toy_tasks:
            raise ValueError(f"`--task {value}`: not a toy task ({', '.join(toy_tasks)}); give TASK=PROMPTS.")
        else:
            raise ValueError(f"`--task` must be `TASK=PROMPTS` (a prompt file or dataset id), got {value!r}.")
    return tasks


def _toy_tasks() -> tuple[str, ...]:
    from ..toy import TASKS

    return tuple(TASKS)


def resolve_rewards(args: argparse.Namespace, tasks: Sequence[str]) -> dict[str, list]:
    """
    task -> its reward callables, from `--reward` (registered names, each built once) or, with `--toy`, the toy
    task's own reward.

    Raises:
        `ValueError`: an unknown reward name, a task that `--reward` names but `--task` does not, or a task left
            without a reward.
    """
    from ..rewards import get_reward, list_rewards

    shared: list[str] = []
    per_task: dict[str, list[str]] = {}
    for value in args.reward:
        task, sep, names = value.rpartition("=")
        names = [name.strip() for name in names.split(",") if name.strip()]
        if not names or (sep and not task.strip()):
            raise ValueError(f"`--reward` must be `[TASK=]REWARD[,REWARD...]`, got {value!r}.")
        if sep and task.strip() not in tasks:
            raise ValueError(f"`--reward {value}` names task {task.strip()!r}, not one of --task {list(tasks)}.")
        (per_task.setdefault(task.strip(), []) if sep else shared).extend(names)
    unknown = sorted({name for names in [shared, *per_task.values()] for name in names} - set(list_rewards()))
    if unknown:
        raise ValueError(f"Unknown reward(s) {unknown} in `--reward`; registered: {', '.join(list_rewards())}.")
    toy_rewards = {}
    if _is_toy(args):
        from ..toy import reward_funcs

        toy_rewards = reward_funcs()
    built: dict[str, Any] = {}
    rewards = {}
    for task in tasks:
        names = per_task.get(task, []) + shared
        for name in names:
            if name not in built:
                built[name] = get_reward(name)
        rewards[task] = [built[name] for name in dict.fromkeys(names)]
        if not rewards[task] and task in toy_rewards:
            rewards[task] = [toy_rewards[task]]
        if not rewards[task]:
            raise ValueError(f"Task {task!r} has no reward: add `--reward {task}=REWARD` (or `--reward REWARD`).")
    return rewards


def _load_model(args: argparse.Namespace):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_toy(args):
        from .. import toy

        path = None if args.model in (None, "toy") else args.model
        return toy.load_pipeline(path, dtype=DTYPES[args.dtype], device=device)
    return load_pipeline(args.model, DTYPES[args.dtype], what="--model").to(device)


def _loras(args: argparse.Namespace) -> dict[str, str]:
    from ..teachers import is_local_source, resolve_source

    loras = parse_pairs(args.lora, "--lora", key="name")
    if not args.no_base and args.base_name in loras:
        raise ValueError(f"`--lora` row {args.base_name!r} clashes with the base row; rename it or set --base_name.")
    for name, source in loras.items():
        if is_local_source(source):  # Hub ids are fetched when their row is evaluated.
            resolve_source(source, f"`--lora {name}`")
    return loras


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


@dataclass
class EvaluationPlan:
    """
    What `eval` will run, checked before any model loads.

    Args:
        rows (`list[tuple[str, str | None]]`): each row's name and LoRA source (`None`: the pipeline alone).
        tasks (`dict[str, Dataset]`): task -> its prompts.
        rewards (`dict[str, list]`): task -> its reward callables.
        num_inference_steps (`int`), guidance_scale (`float`): the sampler, defaults filled in.
    """

    rows: list[tuple[str, Optional[str]]]
    tasks: dict[str, Any]
    rewards: dict[str, list]
    num_inference_steps: int
    guidance_scale: float


def plan_evaluation(args: argparse.Namespace) -> EvaluationPlan:
    """
    Checks the options and gathers the rows, tasks and rewards.

    Raises:
        `ValueError` or `OSError`: naming the bad option, task, reward or file.
    """
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"`--max_prompts` must be at least 1, got {args.max_prompts}.")
    if args.model is None and not _is_toy(args):
        raise ValueError("Set `--model` (a pipeline folder or Hub id), or pass --toy for the bundled toy model.")
    if args.model not in (None, "toy"):
        check_local_path(args.model, "--model")
    loras = _loras(args)
    rows: list[tuple[str, Optional[str]]] = ([] if args.no_base else [(args.base_name, None)]) + list(loras.items())
    if not rows:
        raise ValueError("Nothing to evaluate: `--no_base` and no `--lora`.")
    folders = [_slug(name) for name, _ in rows]
    if len(set(folders)) < len(folders):
        raise ValueError(f"Row names {[name for name, _ in rows]} share an output folder; rename a `--lora`.")
    tasks = load_tasks(args)
    rewards = resolve_rewards(args, list(tasks))
    if _is_toy(args):
        from .. import toy

        steps, guidance = toy.DEFAULT_NUM_INFERENCE_STEPS, toy.DEFAULT_GUIDANCE_SCALE
    else:
        steps, guidance = DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_GUIDANCE_SCALE
    return EvaluationPlan(
        rows=rows,
        tasks=tasks,
        rewards=rewards,
        num_inference_steps=steps if args.num_inference_steps is None else args.num_inference_steps,
        guidance_scale=guidance if args.guidance_scale is None else args.guidance_scale,
    )


def run_evaluation(args: argparse.Namespace, plan: EvaluationPlan) -> list[EvaluationResult]:
    """Evaluates every row of `plan` on every task, one result per row (each saved under `<output_dir>/<row>/`)."""
    pipeline = _load_model(args)
    results = []
    for name, lora in plan.rows:
        result = evaluate(
            pipeline,
            plan.tasks,
            plan.rewards,
            lora=lora,
            lora_scale=args.lora_scale,
            model_name=name,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            height=args.height,
            width=args.width,
            num_images_per_prompt=args.num_images_per_prompt,
            batch_size=args.batch_size,
            seed=args.seed,
            max_prompts=args.max_prompts,
            negative_prompt=args.negative_prompt,
            output_dir=os.path.join(args.output_dir, _slug(name)),
            save_images=args.save_images,
            show_progress=not args.no_progress,
        )
        results.append(result)
    return results


def write_table(results: Sequence[EvaluationResult], markdown_path: str, json_path: str) -> str:
    """
    Writes the rows as one Markdown table ([`~evaluation.format_table`]) and as JSON (each row's model name,
    aggregated metrics and settings; the per-image scores stay in each row's `results.json`). Returns the table.
    """
    table = format_table(results)
    for path in (markdown_path, json_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(markdown_path, "w") as file:
        file.write(table + "\n")
    rows = [{"model_name": r.model_name, "metrics": r.metrics, "settings": r.settings} for r in results]
    with open(json_path, "w") as file:
        json.dump({"models": rows}, file, indent=2, default=str)
    return table


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parses `argv` (the command line by default), evaluates every row, writes and prints the table."""
    parser = make_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging()
    if args.no_progress:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        plan = plan_evaluation(args)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    results = run_evaluation(args, plan)
    markdown_path = args.markdown or os.path.join(args.output_dir, "table.md")
    json_path = args.json or os.path.join(args.output_dir, "table.json")
    table = write_table(results, markdown_path, json_path)
    logger.info("Wrote %s and %s", markdown_path, json_path)
    print(table)
    return 0
