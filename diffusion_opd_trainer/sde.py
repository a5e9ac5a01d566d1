"""Gaussian transition kernels of diffusion samplers: mean, std, log-probability and the per-step KL.

Pure tensor maths, no model and no state: every function here is a function of its arguments and of the scheduler's
(already set) schedule. All of it runs in float32 whatever the model's dtype, because the variance terms overflow or
lose all precision in half precision.

Two scheduler families are supported:

- [`~diffusers.FlowMatchEulerDiscreteScheduler`] (SD3/SD3.5): the flow SDE of Flow-GRPO (arXiv 2505.05470). With
  ``t`` the current sigma, ``dt = t_next - t < 0``, ``v`` the velocity and ``a`` the noise level,

      sigma_t = a * sqrt(t / (1 - t))          (at t = 1: a * sqrt(1 / (1 - t_1)), t_1 the schedule's second sigma)
      mean    = x * (1 + sigma_t**2 * dt / (2 t)) + v * (1 + sigma_t**2 * (1 - t) / (2 t)) * dt
      std     = sigma_t * sqrt(-dt)

  With ``a = 0`` this is exactly the scheduler's Euler step ``x + v * dt``.
- [`~diffusers.DDIMScheduler`] (SD 1.x/2.x): DDIM with ``eta = noise_level`` (DDPO's kernel, arXiv 2305.13301).

Every kernel is Gaussian with a state-independent std, so the KL between a student's and a teacher's transition from
the same state is closed-form (`step_kl`).
"""

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


__all__ = ["TransitionOutput", "sde_step", "step_kl", "gaussian_log_prob"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class TransitionOutput(BaseOutput):
    """
    Output of [`sde_step`]: one Gaussian transition x_{j+1} ~ N(mean, std^2 I) of a sampler.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, ...)`):
            The next state x_{j+1}, sampled (or the one passed in as `prev_sample`), in float32.
        mean (`torch.Tensor` of shape `(batch_size, ...)`):
            The mean of the transition, in float32. Differentiable with respect to `model_output`.
        std (`torch.Tensor` broadcastable to the sample, or `None`):
            The transition's standard deviation (`sigma_t * sqrt(-dt)` for the flow SDE, `eta * sigma_ddim` for DDIM),
            shape `(batch_size, 1, ..., 1)`. `None` for a deterministic step (`noise_level=0`).
        log_prob (`torch.Tensor` of shape `(batch_size,)`, or `None`):
            Gaussian log-density of `prev_sample`, averaged (not summed) over the non-batch dimensions, as in Flow-GRPO
            and DDPO. `None` for a deterministic step.
        dt (`torch.Tensor` of shape `(batch_size, 1, ..., 1)`, or `None`):
            The flow-matching time increment `t_next - t` (negative). `None` for DDIM.
        sigma_t (`torch.Tensor` of shape `(batch_size, 1, ..., 1)`, or `None`):
            The SDE's diffusion coefficient at this step (`std / sqrt(-dt)` for the flow SDE). `None` for a
            deterministic step and for DDIM.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: Optional[torch.Tensor] = None
    log_prob: Optional[torch.Tensor] = None
    dt: Optional[torch.Tensor] = None
    sigma_t: Optional[torch.Tensor] = None


def _per_sample(values: torch.Tensor, batch_size: int, ndim: int) -> torch.Tensor:
    """Broadcasts a scalar or `[B]` tensor to `[B, 1, ..., 1]` with `ndim` dimensions."""
    values = values.reshape(-1)
    if values.numel() == 1:
        values = values.expand(batch_size)
    elif values.numel() != batch_size:
        raise ValueError(f"Expected one timestep or one per batch element ({batch_size}), got {values.numel()}.")
    return values.reshape(batch_size, *([1] * (ndim - 1)))


def _step_indices(schedule: torch.Tensor, timestep: Union[float, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Positions of `timestep` (one value or one per sample) in the scheduler's `timesteps`, as a `[B]` long tensor."""
    timestep = torch.as_tensor(timestep, device=schedule.device).reshape(-1)
    if timestep.numel() == 1:
        timestep = timestep.expand(batch_size)
    elif timestep.numel() != batch_size:
        raise ValueError(f"Expected one timestep or one per batch element ({batch_size}), got {timestep.numel()}.")
    # Match with a tolerance: timesteps round-trip through float16/bfloat16 in some pipelines.
    distance = (schedule.float()[None, :] - timestep.float()[:, None]).abs()
    min_distance, indices = distance.min(dim=1)
    tolerance = 1e-3 * max(1.0, float(schedule.float().abs().max()))
    if bool((min_distance > tolerance).any()):
        bad = timestep[min_distance > tolerance][0].item()
        raise ValueError(
            f"Timestep {bad} is not in the scheduler's current schedule; call `scheduler.set_timesteps(...)` with the "
            "rollout's settings before `sde_step`."
        )
    return indices


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """
    Log-density of `x` under N(mean, std^2 I), averaged over the non-batch dimensions.

    Args:
        x (`torch.Tensor` of shape `(batch_size, ...)`): the sample.
        mean (`torch.Tensor` of shape `(batch_size, ...)`): the Gaussian's mean.
        std (`torch.Tensor` broadcastable to `x`): the Gaussian's standard deviation (positive).

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float32.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _finish(
    mean: torch.Tensor,
    std: Optional[torch.Tensor],
    prev_sample: Optional[torch.Tensor],
    generator: Optional[Union[torch.Generator, list]],
    dt: Optional[torch.Tensor] = None,
    sigma_t: Optional[torch.Tensor] = None,
) -> TransitionOutput:
    """Samples (or takes) the next state and computes its log-probability under N(mean, std^2 I)."""
    if std is None:
        if prev_sample is None:
            prev_sample = mean.detach()
        return TransitionOutput(prev_sample=prev_sample.float(), mean=mean, dt=dt)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean.detach() + std * noise
    prev_sample = prev_sample.float()
    # The sample is data, not a function of the parameters: only the mean carries gradient into the log-prob.
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return TransitionOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob, dt=dt, sigma_t=sigma_t)


def _flow_match_step(scheduler, model_output, timestep, sample, noise_level, prev_sample, generator):
    batch_size, ndim = sample.shape[0], sample.ndim
    sigmas = scheduler.sigmas.to(device=sample.device, dtype=torch.float32)
    schedule = scheduler.timesteps.to(sample.device)
    index = _step_indices(schedule, timestep, batch_size)
    t = _per_sample(sigmas[index], batch_size, ndim)
    t_next = _per_sample(sigmas[index + 1], batch_size, ndim)
    dt = t_next - t

    x = sample.float()
    v = model_output.float()
    if noise_level == 0:
        # Exactly `FlowMatchEulerDiscreteScheduler.step` (before its cast to the model dtype).
        return _finish(x + dt * v, None, prev_sample, generator, dt=dt)

    # Flow-GRPO's first-step rule: at t = 1 the denominator 1 - t would vanish, so it takes 1 - t_1 instead, t_1 being
    # the schedule's second sigma; the numerator keeps t = 1.
    second_sigma = sigmas[1] if len(sigmas) > 1 else sigmas[0]
    denominator = 1 - torch.where(t >= 1, second_sigma, t)
    sigma_t = noise_level * torch.sqrt(t / denominator)
    mean = x * (1 + sigma_t**2 / (2 * t) * dt) + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt
    std = sigma_t * torch.sqrt(-dt)
    return _finish(mean, std, prev_sample, generator, dt=dt, sigma_t=sigma_t)


def _ddim_step(scheduler, model_output, timestep, sample, noise_level, prev_sample, generator):
    batch_size, ndim = sample.shape[0], sample.ndim
    config = scheduler.config
    if scheduler.num_inference_steps is None:
        raise ValueError("Call `scheduler.set_timesteps(...)` before `sde_step`.")
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).long()
    if timestep.numel() == 1:
        timestep = timestep.expand(batch_size)
    prev_timestep = timestep - config.num_train_timesteps // scheduler.num_inference_steps

    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    final_alpha_cumprod = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=sample.device)
    alpha_prod_t = _per_sample(alphas_cumprod[timestep.clamp(min=0)], batch_size, ndim)
    alpha_prod_t_prev = torch.where(
        prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final_alpha_cumprod.expand(batch_size)
    )
    alpha_prod_t_prev = _per_sample(alpha_prod_t_prev, batch_size, ndim)
    beta_prod_t = 1 - alpha_prod_t

    x = sample.float()
    out = model_output.float()
    if config.prediction_type == "epsilon":
        x0 = (x - beta_prod_t**0.5 * out) / alpha_prod_t**0.5
        eps = out
    elif config.prediction_type == "sample":
        x0 = out
        eps = (x - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
    elif config.prediction_type == "v_prediction":
        x0 = alpha_prod_t**0.5 * x - beta_prod_t**0.5 * out
        eps = alpha_prod_t**0.5 * out + beta_prod_t**0.5 * x
    else:
        raise ValueError(f"Unsupported DDIM prediction_type {config.prediction_type!r}.")
    if config.thresholding:
        raise NotImplementedError("DDIM dynamic thresholding is not supported by `sde_step`.")
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        eps = (x - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5

    # DDIM's sigma_t (Song et al., eq. 16): eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = noise_level * variance.clamp(min=0) ** 0.5
    mean = alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev - std**2).clamp(min=0) ** 0.5 * eps
    return _finish(mean, std if noise_level > 0 else None, prev_sample, generator)


def sde_step(
    scheduler,
    model_output: torch.Tensor,
    timestep: Union[float, torch.Tensor],
    sample: torch.Tensor,
    *,
    noise_level: float,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, list]] = None,
) -> TransitionOutput:
    """
    One Gaussian transition of a sampler, with its mean, std and the log-probability of the next state.

    Does not touch the scheduler's state (no `step_index` is advanced): the step is located by `timestep` in the
    scheduler's current schedule, so call `scheduler.set_timesteps(...)` first, as a pipeline does.

    Args:
        scheduler ([`~diffusers.FlowMatchEulerDiscreteScheduler`] or [`~diffusers.DDIMScheduler`]):
            The scheduler whose schedule defines the step.
        model_output (`torch.Tensor` of shape `(batch_size, ...)`):
            The denoiser's output after classifier-free guidance: a velocity for flow matching, else what the
            scheduler's `prediction_type` says.
        timestep (`float` or `torch.Tensor`):
            The current timestep (a value of `scheduler.timesteps`), one for the batch or one per sample.
        sample (`torch.Tensor` of shape `(batch_size, ...)`):
            The current state x_j.
        noise_level (`float`):
            Flow SDE: Flow-GRPO's noise level `a` (0.7 in Flow-GRPO). DDIM: `eta`. 0 gives the deterministic step.
        prev_sample (`torch.Tensor`, *optional*):
            A given next state x_{j+1} whose log-probability to compute (e.g. the stored rollout sample when
            recomputing the policy ratio). Sampled when omitted.
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
            Generator(s) for the transition noise.

    Returns:
        [`TransitionOutput`]: `prev_sample`, `mean`, `std`, `log_prob` (and `dt`, `sigma_t` for flow matching).
        At `noise_level=0`, `std` and `log_prob` are `None` and `prev_sample` is the scheduler's own step.
    """
    if noise_level < 0:
        raise ValueError(f"`noise_level` must be >= 0, got {noise_level}.")
    check_scheduler(scheduler)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return _flow_match_step(scheduler, model_output, timestep, sample, noise_level, prev_sample, generator)
    return _ddim_step(scheduler, model_output, timestep, sample, noise_level, prev_sample, generator)


def check_scheduler(scheduler) -> None:
    """
    Raises when the kernels do not cover `scheduler`: a `TypeError` for a scheduler type other than
    `FlowMatchEulerDiscreteScheduler` and `DDIMScheduler` (with the swap to DDIM that keeps the noise schedule), a
    `ValueError` for a flow-matching scheduler that adds noise of its own. The trainers call it before any work.
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if getattr(scheduler.config, "stochastic_sampling", False):
            raise ValueError("`sde_step` implements its own noise: use a scheduler with `stochastic_sampling=False`.")
        return
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(
            f"The transition kernels support FlowMatchEulerDiscreteScheduler and DDIMScheduler, got "
            f"{type(scheduler).__name__}. Swap the pipeline's scheduler, e.g. "
            "`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` (the same noise schedule)."
        )


def step_kl(
    mean_student: torch.Tensor, mean_teacher: torch.Tensor, std: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    KL(student || teacher) between two Gaussian transitions that share the covariance `std^2 I`.

    `||mean_student - mean_teacher||^2 / (2 std^2)`, averaged (not summed) over the non-batch dimensions. With
    `std=None` (a deterministic, ODE step) this is the unit-variance surrogate, mean matching
    `0.5 * mean((mean_student - mean_teacher)^2)`.

    Args:
        mean_student (`torch.Tensor` of shape `(batch_size, ...)`): the student's transition mean.
        mean_teacher (`torch.Tensor` of shape `(batch_size, ...)`): the teacher's transition mean from the same state.
        std (`torch.Tensor` broadcastable to the means, *optional*): the shared transition std.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float32.
    """
    if mean_student.shape != mean_teacher.shape:
        raise ValueError(f"Means differ in shape: {tuple(mean_student.shape)} vs {tuple(mean_teacher.shape)}.")
    squared = (mean_student.float() - mean_teacher.float()) ** 2
    kl = squared / (2 * std.float() ** 2) if std is not None else 0.5 * squared
    return kl.mean(dim=tuple(range(1, kl.ndim)))
