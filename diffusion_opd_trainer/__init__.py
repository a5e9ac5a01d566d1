"""diffusion-opd-trainer: GRPO and multi-teacher on-policy distillation (DiffusionOPD) for diffusers pipelines."""

__version__ = "0.1.0.dev0"

from .grpo_config import DiffusionGRPOConfig
from .grpo_trainer import DiffusionGRPOTrainer
from .rollout import Trajectory, rollout
from .sde import TransitionOutput, sde_step, step_kl


__all__ = [
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "Trajectory",
    "TransitionOutput",
    "rollout",
    "sde_step",
    "step_kl",
]
