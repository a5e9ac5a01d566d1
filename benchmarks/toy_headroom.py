"""
What GRPO can learn on each toy task: the reward spread within groups and the best-of-n headroom of the base model.

RL sharpens what a model already does sometimes. For each task this samples `--groups` training prompts x `--samples`
images with the training sampler (SDE, optionally on a window of steps) and prints the mean reward, the mean of each
prompt's best image (best-of-n), the mean within-group std and the fraction of groups with no spread: a task whose
groups have no spread gives GRPO no signal, and one whose best-of-n is no better than its mean has no reachable
headroom.

    python benchmarks/toy_headroom.py --groups 16 --samples 8
"""

import argparse
import json

import torch

from diffusion_opd_trainer import toy
from diffusion_opd_trainer.rollout import rollout


def headroom(pipe, task: str, groups: int, samples: int, noise_level: float, sde_steps, seed: int) -> dict:
    rows = toy.prompts(task, "train").select(range(groups))
    prompts = [p for p in rows["prompt"] for _ in range(samples)]
    metadata = [m for m in rows["metadata"] for _ in range(samples)]
    generator = torch.Generator().manual_seed(seed)
    trajectory = rollout(
        pipe,
        prompts,
        num_inference_steps=toy.DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale=toy.DEFAULT_GUIDANCE_SCALE,
        noise_level=noise_level,
        sde_steps=sde_steps,
        generator=generator,
        decode=True,
    )
    rewards = torch.tensor(toy.reward_funcs()[task](prompts=prompts, images=trajectory.images, metadata=metadata))
    grouped = rewards.view(groups, samples)
    return {
        "task": task,
        "mean": round(grouped.mean().item(), 3),
        "best_of_n": round(grouped.max(1).values.mean().item(), 3),
        "group_std": round(grouped.std(1, unbiased=False).mean().item(), 3),
        "frac_zero_std": round((grouped.std(1) < 1e-6).float().mean().item(), 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=16, help="Training prompts per task.")
    parser.add_argument("--samples", type=int, default=8, help="Images per prompt (n of best-of-n).")
    parser.add_argument("--noise_level", type=float, default=0.7, help="SDE noise level of the sampler.")
    parser.add_argument("--sde_steps", type=int, nargs="*", default=None, help="SDE window (default: every step).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = toy.load_pipeline()
    for task in toy.TASKS:
        print(json.dumps(headroom(pipe, task, args.groups, args.samples, args.noise_level, args.sde_steps, args.seed)))


if __name__ == "__main__":
    main()
