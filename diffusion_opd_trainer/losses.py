"""The per-step losses: GRPO's clipped surrogate and the step-KL losses of on-policy distillation.

Each function takes one trained step's transition under the current policy ([`~sde.TransitionOutput`], from
[`~sde.sde_step`] with the gradient on) and its targets (advantages, or the teacher's mean), and returns the scalar
loss to backpropagate with per-sample figures to log. No model and no state: the trainers compute the targets
(`targets.py`) and run the backward passes (`DiffusionTrainerBase.train_on_steps`).
"""

from typing import Optional

import torch

from .sde import TransitionOutput, gaussian_log_prob, step_kl


__all__ = ["KL_SCALINGS", "LOSS_TYPES", "clipped_surrogate", "distillation_loss", "grpo_loss", "scale_kl"]

KL_SCALINGS = ("exact", "sigma")
LOSS_TYPES = ("analytic", "policy_gradient", "score_function")


def scale_kl(kl: torch.Tensor, transition: TransitionOutput, kl_scaling: str) -> torch.Tensor:
    """
    Applies a KL scaling convention to a per-sample step KL from [`~sde.step_kl`] (or to any per-sample quantity on
    the step KL's scale, such as a sampled log-ratio).

    Args:
        kl (`torch.Tensor` of shape `(batch_size,)`): the exact step KL.
        transition ([`~sde.TransitionOutput`]): the step it belongs to (for `dt`).
        kl_scaling (`str`):
            `"exact"`: the KL itself. `"sigma"`: divide by `2 sigma_t^2` instead of `2 std^2`, `sigma_t` the kernel's
            noise coefficient: for the flow SDE `std = sigma_t * sqrt(|dt|)`, so this is `KL * |dt|`, the convention
            of Flow-GRPO and the public DiffusionOPD code, whose `beta` and learning rates are tuned to it. DDIM's
            discrete kernel has no time step: its `sigma_t` (eta times DDIM's sigma) is the std itself, and `"sigma"`
            is the exact KL there. For a deterministic step both conventions are the plain mean matching.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`.
    """
    if kl_scaling not in KL_SCALINGS:
        raise ValueError(f"`kl_scaling` must be one of {KL_SCALINGS}, got {kl_scaling!r}.")
    if kl_scaling == "exact" or transition.std is None or transition.dt is None:
        # `dt is None`: a DDIM step, whose std is its sigma_t (no time step to scale by).
        return kl
    return kl * transition.dt.abs().reshape(-1)


def clipped_surrogate(advantages: torch.Tensor, ratio: torch.Tensor, epsilon: float) -> torch.Tensor:
    """
    PPO's clipped surrogate `max(-A * ratio, -A * clip(ratio, 1 - epsilon, 1 + epsilon))`, per sample.

    Args:
        advantages (`torch.Tensor` of shape `(batch_size,)`): the advantages `A` (may carry gradient).
        ratio (`torch.Tensor` of shape `(batch_size,)`): the policy ratio `pi / pi_old` of each sampled transition.
        epsilon (`float`): the clip range.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`: the loss of each sample (to be averaged).
    """
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    return torch.maximum(-advantages * ratio, -advantages * clipped)


def grpo_loss(
    transition: TransitionOutput,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon: float,
    beta: float = 0.0,
    reference_mean: Optional[torch.Tensor] = None,
    kl_scaling: str = "sigma",
    opd_coef: float = 0.0,
    teacher_mean: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    GRPO's loss of one trained step: the clipped surrogate of the recomputed policy ratio, plus `beta` times the step
    KL to the reference model when its mean is given, plus `opd_coef` times the step KL to the teacher when its mean
    is given (the hybrid: the same term as on-policy distillation's `analytic` loss).

    Args:
        transition ([`~sde.TransitionOutput`]): the step under the current policy, scoring the stored next state.
        old_log_prob (`torch.Tensor` of shape `(batch_size,)`): the stored transition's log-prob at sampling time.
        advantages (`torch.Tensor` of shape `(batch_size,)`): the group advantages.
        epsilon (`float`): the clip range of the ratio.
        beta (`float`, defaults to 0): the KL coefficient.
        reference_mean (`torch.Tensor`, *optional*): the reference model's transition mean from the same state.
        kl_scaling (`str`, defaults to `"sigma"`): see [`scale_kl`]; applies to both KLs.
        opd_coef (`float`, defaults to 0): the weight of the KL to the teacher.
        teacher_mean (`torch.Tensor`, *optional*): each sample's teacher transition mean from the same state.

    Returns:
        `(loss, stats)`: the scalar loss and detached statistics: `policy_loss`, `ratio` and `clip_ratio` (scalars),
        `kl` (the batch mean) when a reference mean is given and `teacher_kl` when a teacher mean is given.
    """
    ratio = torch.exp(transition.log_prob - old_log_prob)
    policy_loss = clipped_surrogate(advantages, ratio, epsilon).mean()
    loss = policy_loss
    stats = {
        "policy_loss": policy_loss.detach(),
        "clip_ratio": ((ratio - 1).abs() > epsilon).float().mean().detach(),
        "ratio": ratio.mean().detach(),
    }
    if reference_mean is not None:
        kl = scale_kl(step_kl(transition.mean, reference_mean, transition.std), transition, kl_scaling).mean()
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    if teacher_mean is not None:
        teacher_kl = scale_kl(step_kl(transition.mean, teacher_mean, transition.std), transition, kl_scaling).mean()
        loss = loss + opd_coef * teacher_kl
        stats["teacher_kl"] = teacher_kl.detach()
    return loss, stats


def distillation_loss(
    transition: TransitionOutput,
    teacher_mean: torch.Tensor,
    *,
    loss_type: str = "analytic",
    kl_scaling: str = "exact",
    epsilon: float = 1e-4,
    old_log_prob: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The on-policy distillation loss of one trained step (a scalar to backpropagate) and the per-sample step KL
    (detached, for logging).

    `analytic`: the (scaled) step KL, differentiated directly (mean matching at noise level 0). `policy_gradient`:
    the clipped surrogate with the advantage `A = -KL` kept differentiable. `score_function`:
    `stopgrad(D * (log pi_S - log pi_T)) * log pi_S`, `D` the latent size, which turns the per-dimension-averaged
    log-probs back into the summed log-ratio so that its expected gradient is the analytic loss's.

    Args:
        transition ([`~sde.TransitionOutput`]): the student's step (its mean carries the gradient).
        teacher_mean (`torch.Tensor`): the teacher's transition mean from the same state, with the same kernel.
        loss_type (`str`, defaults to `"analytic"`): one of `LOSS_TYPES`.
        kl_scaling (`str`, defaults to `"exact"`): see [`scale_kl`].
        epsilon (`float`, defaults to `1e-4`): the clip range of the `policy_gradient` surrogate.
        old_log_prob (`torch.Tensor`, *optional*): the stored transition's log-prob at sampling time (a reused
            rollout); the current one, detached, otherwise (the ratio is then 1).

    Returns:
        `(loss, kl)`: the scalar loss and the detached per-sample step KL of shape `(batch_size,)`.
    """
    kl = scale_kl(step_kl(transition.mean, teacher_mean, transition.std), transition, kl_scaling)
    if loss_type == "analytic":
        per_sample = kl
    elif loss_type == "policy_gradient":
        old = transition.log_prob.detach() if old_log_prob is None else old_log_prob
        ratio = torch.exp(transition.log_prob - old)
        per_sample = clipped_surrogate(-kl, ratio, epsilon)
    elif loss_type == "score_function":
        dims = transition.mean[0].numel()
        teacher_log_prob = gaussian_log_prob(transition.prev_sample, teacher_mean, transition.std)
        cost = scale_kl((transition.log_prob - teacher_log_prob).detach() * dims, transition, kl_scaling)
        per_sample = cost * transition.log_prob
    else:
        raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}.")
    return per_sample.mean(), kl.detach()
