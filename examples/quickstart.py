"""Roll out a batch of SDE trajectories on the embedded model and print each step's std and log-probabilities.

python examples/quickstart.py [--steps 10] [--noise_level 0.7]
"""

import argparse
import logging

import torch

from diffusion_opd_trainer import rollout
from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.sde import sde_step


def load_default_pipeline():
    """The bundled toy base model when present, else a tiny random SD3 pipeline (both offline)."""
    try:
        from diffusion_opd_trainer import toy

        return toy.load_pipeline(), "toy base model"
    except (ImportError, AttributeError, OSError):
        from diffusion_opd_trainer.testing import tiny_sd3_pipeline

        return tiny_sd3_pipeline(), "tiny random SD3 pipeline"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--noise_level", type=float, default=0.7)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)

    pipe, name = load_default_pipeline()
    prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]
    trajectory = rollout(
        pipe,
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        noise_level=args.noise_level,
        generator=torch.Generator().manual_seed(args.seed),
    )
    scheduler = get_family(pipe).scheduler
    print(f"{name}: {len(prompts)} trajectories, {trajectory.num_steps} steps, noise level {args.noise_level}")
    print(f"{'step':>4} {'sigma':>7} {'std':>8}  log-prob per trajectory")
    for j, t in enumerate(trajectory.timesteps):
        # Recompute the stored transition to show its std; the log-probs are those kept by the rollout.
        x = trajectory.latents[:, j]
        v = get_family(pipe).predict(x, t, trajectory.prompt_embeds, args.guidance_scale)
        step = sde_step(scheduler, v, t, x, noise_level=args.noise_level, prev_sample=trajectory.latents[:, j + 1])
        std = "-" if step.std is None else f"{step.std.flatten()[0].item():.4f}"
        log_probs = "-" if trajectory.log_probs is None else " ".join(f"{v:8.3f}" for v in trajectory.log_probs[:, j])
        print(f"{j:>4} {scheduler.sigmas[j].item():7.3f} {std:>8}  {log_probs}")


if __name__ == "__main__":
    main()
