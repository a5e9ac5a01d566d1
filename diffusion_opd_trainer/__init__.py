"""diffusion-opd-trainer: GRPO and multi-teacher on-policy distillation (DiffusionOPD) for diffusers pipelines."""

__version__ = "0.1.0.dev0"

from .quiet import import_bitsandbytes_quietly


import_bitsandbytes_quietly()  # before peft imports it: see the function

from .evaluation import EvaluationCallback, EvaluationResult, evaluate
from .grpo_config import DiffusionGRPOConfig
from .grpo_trainer import DiffusionGRPOTrainer
from .opd_config import DiffusionOPDConfig
from .opd_trainer import DiffusionOPDTrainer
from .rollout import Trajectory, rollout
from .sde import TransitionOutput, sde_step, step_kl
from .teachers import TeacherConfig


__all__ = [
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "DiffusionOPDConfig",
    "DiffusionOPDTrainer",
    "EvaluationCallback",
    "EvaluationResult",
    "TeacherConfig",
    "Trajectory",
    "TransitionOutput",
    "evaluate",
    "rollout",
    "sde_step",
    "step_kl",
]
