"""diffusion-opd-trainer: GRPO and multi-teacher on-policy distillation (DiffusionOPD) for diffusers pipelines."""

__version__ = "0.1.0.dev0"

from .rollout import Trajectory, rollout
from .sde import TransitionOutput, sde_step, step_kl


__all__ = ["Trajectory", "TransitionOutput", "rollout", "sde_step", "step_kl"]
