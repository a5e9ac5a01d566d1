"""Configuration of [`DiffusionOPDTrainer`]."""

from dataclasses import dataclass, field
from typing import Optional, Union

from .diffusion_config import DiffusionTrainingConfig, check_number, parse_teacher_guidance_scales
from .losses import LOSS_TYPES


TASK_MIXING = ("mixed", "round_robin")
SCHEDULES = ("auto", "fused", "two_pass")


@dataclass
class DiffusionOPDConfig(DiffusionTrainingConfig):
    r"""
    Configuration class for [`DiffusionOPDTrainer`]: multi-teacher on-policy distillation (DiffusionOPD,
    arXiv 2605.15055).

    Also takes every [`DiffusionTrainingConfig`] field (sampling, kernel, trained timesteps, EMA) and every
    `transformers.TrainingArguments` field. There are no groups: one image per prompt, so
    `per_device_train_batch_size` counts prompts and images alike.

    Parameters:
        > Distillation

        noise_level (`float`, *optional*, defaults to `0.0`):
            Noise level of the student's rollouts and of the teachers' transitions (they always share it: the KL is
            exact only because both Gaussians have the same covariance). 0 (the paper's default) is the ODE with the
            mean-matching loss `0.5 ||mu_S - mu_T||^2`; > 0 the SDE with the exact KL `||mu_S - mu_T||^2 / (2 s^2)`.
        loss_type (`str`, *optional*, defaults to `"analytic"`):
            `"analytic"`: the closed-form step KL (or mean matching at noise 0), differentiated directly.
            `"policy_gradient"`: the paper's Sec. 3.3 surrogate, advantage `A_j = -KL_j` kept differentiable inside
            `min(rho A, clip(rho) A)`: gradient = analytic gradient + a zero-mean score-function term.
            `"score_function"`: the detached sampled log-ratio `log pi_S(x_{j+1}|x_j) - log pi_T(x_{j+1}|x_j)` as a
            per-step cost with the score function alone (LLM on-policy distillation's estimator), scaled to the same
            expected gradient as the analytic loss. Both estimators need a stochastic kernel (`noise_level > 0`).
        teacher_guidance_scales (`dict[str, float]` or JSON `str`, *optional*):
            CFG scale of each task's teacher (e.g. `{"ocr": 1.0}` for a CFG-free teacher). Teachers not listed use
            their source's own scale, else `guidance_scale`.
        task_mixing (`str`, *optional*, defaults to `"mixed"`):
            `"mixed"`: each batch mixes tasks, every prompt routed to its task's teacher. `"round_robin"`: each step's
            batch holds one task's prompts, tasks taking turns.
        rollout_schedule (`str`, *optional*, defaults to `"auto"`):
            `"fused"`: one pass per step, the student's rollout forward also carrying the gradient (student forward
            with grad, teacher forward without, backward, advance with the detached next state), so no separate no-grad
            rollout is paid. `"two_pass"`: roll out without grad, cache the teachers' means, then train on the cached
            states (needed when a rollout is reused, `num_iterations > 1`, or with `teacher_rollout_fraction`).
            `"auto"`: fused when on-policy and the student samples every trajectory.
        teacher_rollout_fraction (`float`, *optional*, defaults to `0.0`):
            Fraction of each micro-batch's trajectories sampled by the prompt's teacher (with its CFG scale) instead
            of the student, as GKD mixes rollout sources for language models; the student is trained on those
            states with the same per-step loss. Each trajectory is the teacher's with this probability (drawn from the
            seed and the rollout index). 0 is on-policy distillation; 1 trains on teacher states only. Needs the
            two-pass schedule and the `analytic` loss (the policy-gradient estimators assume the student sampled).
        log_per_step_kl (`bool`, *optional*, defaults to `False`):
            Also log the KL of every trained step as `kl/step_<j>`.
    """

    per_device_train_batch_size: int = field(default=8, metadata={"help": "Prompts (= images) per device per step."})
    noise_level: float = field(default=0.0, metadata={"help": "Shared noise level of student and teachers; 0 = ODE."})
    loss_type: str = field(default="analytic", metadata={"help": "'analytic', 'policy_gradient' or 'score_function'."})
    teacher_guidance_scales: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Per-task teacher CFG scale, e.g. '{\"ocr\": 1.0}'."}
    )
    task_mixing: str = field(default="mixed", metadata={"help": "'mixed' batches or 'round_robin' by task."})
    rollout_schedule: str = field(default="auto", metadata={"help": "'auto', 'fused' or 'two_pass'."})
    teacher_rollout_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of trajectories sampled by the prompt's teacher (0: on-policy)."}
    )
    log_per_step_kl: bool = field(default=False, metadata={"help": "Log the KL of each trained step."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.task_mixing not in TASK_MIXING:
            raise ValueError(f"`task_mixing` must be one of {TASK_MIXING}, got {self.task_mixing!r}.")
        if self.rollout_schedule not in SCHEDULES:
            raise ValueError(f"`rollout_schedule` must be one of {SCHEDULES}, got {self.rollout_schedule!r}.")
        if self.rollout_schedule == "fused" and self.num_iterations > 1:
            raise ValueError(
                "`rollout_schedule='fused'` trains while rolling out, so a rollout cannot be reused: it needs "
                f"num_iterations=1 (got {self.num_iterations}). Use 'two_pass' or 'auto'."
            )
        self.teacher_guidance_scales = parse_teacher_guidance_scales(self.teacher_guidance_scales)
        check_number("teacher_rollout_fraction", self.teacher_rollout_fraction, 0)
        if self.teacher_rollout_fraction > 1:
            raise ValueError(f"`teacher_rollout_fraction` must be <= 1, got {self.teacher_rollout_fraction}.")
        if self.teacher_rollout_fraction > 0:
            if self.loss_type != "analytic":
                raise ValueError(
                    f"`teacher_rollout_fraction` > 0 needs `loss_type='analytic'` (got {self.loss_type!r}): the "
                    "policy-gradient estimators assume the student sampled every trajectory."
                )
            if self.rollout_schedule == "fused":
                raise ValueError(
                    "`teacher_rollout_fraction` > 0 needs the two-pass schedule (the teacher's trajectories are "
                    "sampled before training): set `rollout_schedule` to 'two_pass' or 'auto'."
                )

    def _stochastic_loss(self) -> Optional[str]:
        if self.loss_type in ("policy_gradient", "score_function"):
            return (
                f"`loss_type={self.loss_type!r}` (a policy-gradient estimator; 'analytic' is mean matching at noise 0)"
            )
        return None

    @property
    def fused(self) -> bool:
        """Whether rollout and loss run in one pass."""
        if self.rollout_schedule == "auto":
            return self.num_iterations == 1 and self.teacher_rollout_fraction == 0
        return self.rollout_schedule == "fused"
