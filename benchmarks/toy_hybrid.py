"""
Beyond the paper, on the toy world: one task, one budget of denoiser image-forwards, four ways to spend it from the
base model. Answers two questions: does a reward plus its own task's teacher (the hybrid, `opd_coef`) beat either
alone at equal compute, and does sampling some trajectories with the teacher (`teacher_rollout_fraction`) speed up
distillation?

    python benchmarks/toy_hybrid.py --seed 0 --task text --teacher_dir results/toy_table/seed-0/teacher-text-<key>/lora

- `GRPO`: the table's GRPO settings on the task's reward (what trained the teacher);
- `hybrid (opd_coef C)`: the same plus `C` times the step KL to the teacher (teacher forwards on the trained steps);
- `OPD-ODE`: on-policy distillation of the teacher (the table's settings, fused schedule);
- `OPD-ODE, teacher rollouts F`: the same with a fraction `F` of the trajectories sampled by the teacher (two-pass).

Each method gets as many optimizer steps as the budget (`--forwards`) allows at its own cost per step, and is
evaluated on the table's validation prompts (held-out train-split prompts, never the test prompts) at 4 points. The
teacher is a table seed's cached teacher (its folder is printed by `benchmarks/toy_table.py`); the base model is that
seed's snapshot. Results: `--output` (JSON) and the same name with `.md`.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.toy_stages import (  # noqa: E402
    ForwardCounter,
    TableConfig,
    _load_base,
    _lora_config,
    _run_trainer,
    _train_set,
    evaluate_model,
    grpo_args,
    opd_args,
    task_reward,
)
from diffusion_opd_trainer import DiffusionGRPOTrainer, DiffusionOPDTrainer  # noqa: E402
from diffusion_opd_trainer.toy import TASKS  # noqa: E402
from diffusion_opd_trainer.toy.rewards import reward_funcs  # noqa: E402


logger = logging.getLogger("benchmarks.toy_hybrid")


def step_forwards(config: TableConfig, method: str) -> int:
    """Denoiser image-forwards of one optimizer step of `method` (a CFG call on B latents counts 2B)."""
    cfg = 2 if config.guidance_scale > 1 else 1
    trained = max(1, int(config.opd_timestep_fraction * config.num_inference_steps))
    if method == "grpo":
        return config.grpo_step_forwards()
    if method == "hybrid":
        images = config.grpo_prompts_per_step * config.num_generations
        return config.grpo_step_forwards() + images * config.grpo_sde_window_size * cfg  # + a teacher call
    if method == "opd":
        return config.opd_step_forwards()
    if method == "mixing":  # two-pass: rollout, then teacher and student calls on every trained step
        return config.opd_batch_size * (config.num_inference_steps + 2 * trained) * cfg
    raise ValueError(method)


def run_method(config: TableConfig, method: str, task: str, teacher: str, steps: int, out: Path, **options) -> dict:
    """Trains `method` from the base model for `steps` optimizer steps; returns its curve and cost."""
    counter, curve = ForwardCounter(), []
    rewards = reward_funcs()
    if method in ("grpo", "hybrid"):
        args = grpo_args(config, str(out), steps, show_progress=False)
        args.opd_coef = options.get("opd_coef", 0.0)
        trainer = DiffusionGRPOTrainer(
            model=_load_base(config),
            reward_funcs={task: rewards[task]},
            args=args,
            train_dataset=_train_set(config, (task,)),
            peft_config=_lora_config(config),
            teachers={task: teacher} if method == "hybrid" else None,
        )
    else:
        args = opd_args(config, str(out), 0.0, show_progress=False)
        args.max_steps = steps
        args.teacher_rollout_fraction = options.get("teacher_rollout_fraction", 0.0)
        trainer = DiffusionOPDTrainer(
            model=_load_base(config),
            teachers={task: teacher},
            args=args,
            train_dataset=_train_set(config, (task,)),
            peft_config=_lora_config(config),
        )
    start = time.perf_counter()
    _run_trainer(trainer, counter, config, curve, method, steps)
    kl_name = "teacher_kl" if method == "hybrid" else "kl"
    kls = [entry[kl_name] for entry in trainer.state.log_history if kl_name in entry]
    return {
        "steps": trainer.state.global_step,
        "forwards": counter.forwards,
        "seconds": round(counter.seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "curve": [{"step": p["step"], "forwards": p["forwards"], "reward": p["rewards"][task]} for p in curve],
        "other_tasks_final": {name: curve[-1]["rewards"][name] for name in TASKS if name != task},
        # The step KL to the teacher, first and last step (GRPO: the KL to the base model, with beta).
        "kl_first_last": [kls[0], kls[-1]] if kls else None,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="text", choices=TASKS)
    parser.add_argument("--teacher_dir", required=True, help="the task's teacher LoRA (a table seed's cached one)")
    parser.add_argument("--base_model", default=None, help="the pipeline the teacher was trained on")
    parser.add_argument("--forwards", type=int, default=24000, help="image-forwards budget of every method")
    parser.add_argument("--opd_coef", type=float, nargs="+", default=[1.0], help="the hybrid's weights to try")
    parser.add_argument("--teacher_rollout_fraction", type=float, nargs="+", default=[0.5])
    parser.add_argument("--methods", nargs="+", default=["grpo", "hybrid", "opd", "mixing"])
    parser.add_argument("--output", default="results/toy_hybrid.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    config = TableConfig.full(seed=args.seed, base_model=args.base_model, output_dir="/tmp/toy_hybrid")
    runs = []
    for method in args.methods:
        variants = {"hybrid": [{"opd_coef": c} for c in args.opd_coef]}
        variants["mixing"] = [{"teacher_rollout_fraction": f} for f in args.teacher_rollout_fraction]
        for options in variants.get(method, [{}]):
            steps = max(1, math.floor(args.forwards / step_forwards(config, method)))
            name = method + "".join(f" ({k} {v})" for k, v in options.items())
            slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
            out = Path(config.output_dir) / f"seed-{args.seed}" / slug
            logger.info("%s: %d steps", name, steps)
            result = run_method(config, method, args.task, os.path.abspath(args.teacher_dir), steps, out, **options)
            runs.append({"method": name, **options, **result})
            logger.info("%s: %s", name, result["curve"][-1])
    base = task_reward(evaluate_model(config, "base", None, show_progress=False, split="validation"), args.task)
    report = {
        "description": __doc__.strip().splitlines()[0],
        "seed": args.seed,
        "task": args.task,
        "teacher_dir": args.teacher_dir,
        "forwards_budget": args.forwards,
        "split": "validation",
        "base_reward": base,
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    command = " ".join(["python benchmarks/toy_hybrid.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"`{command}`",
        "",
        f"Task {args.task}, seed {args.seed}, budget {args.forwards} image-forwards, validation prompts; base model "
        f"{base:.3f}.",
        "",
        "| method | steps | forwards | reward at each curve point | final |",
        "|---|---:|---:|---|---:|",
    ]
    for run in runs:
        points = " / ".join(f"{p['reward']:.3f}" for p in run["curve"])
        final = run["curve"][-1]["reward"]
        lines.append(f"| {run['method']} | {run['steps']} | {run['forwards']} | {points} | {final:.3f} |")
    Path(args.output).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
