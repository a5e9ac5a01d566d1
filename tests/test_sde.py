"""The transition kernels against the flow SDE's formulas, diffusers' own schedulers and torch.distributions."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from diffusion_opd_trainer.losses import scale_kl
from diffusion_opd_trainer.sde import gaussian_log_prob, sde_step, step_kl


SHAPE = (3, 4, 8, 8)


@pytest.fixture
def flow_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    return scheduler


def _reference_flow_sde(x, v, t, t_next, second_sigma, a):
    """The flow SDE step (Flow-GRPO, arXiv 2505.05470), written out in float64 from the formulas."""
    x, v = x.double(), v.double()
    dt = t_next - t
    sigma_t = a * math.sqrt((t if t < 1 else 1.0) / (1 - (t if t < 1 else second_sigma)))
    mean = x * (1 + sigma_t**2 * dt / (2 * t)) + v * (1 + sigma_t**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma_t * math.sqrt(-dt)


@pytest.mark.parametrize("index", [0, 1, 5, 8])
@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_flow_sde_mean_std_log_prob_match_formulas(flow_scheduler, index, noise_level):
    generator = torch.Generator().manual_seed(index)
    x = torch.randn(SHAPE, generator=generator)
    v = torch.randn(SHAPE, generator=generator)
    sigmas = flow_scheduler.sigmas
    t, t_next = float(sigmas[index]), float(sigmas[index + 1])
    out = sde_step(flow_scheduler, v, flow_scheduler.timesteps[index], x, noise_level=noise_level, generator=generator)

    mean, std = _reference_flow_sde(x, v, t, t_next, float(sigmas[1]), noise_level)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert out.std.shape == (SHAPE[0], 1, 1, 1)
    torch.testing.assert_close(out.std.double().flatten(), torch.full((SHAPE[0],), std, dtype=torch.float64))
    assert out.log_prob.shape == (SHAPE[0],)
    expected = Normal(mean, std).log_prob(out.prev_sample.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.dt.flatten(), torch.full((SHAPE[0],), t_next - t))


def test_first_step_uses_second_sigma_in_denominator_only(flow_scheduler):
    sigmas = flow_scheduler.sigmas
    assert float(sigmas[0]) == 1.0
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = sde_step(flow_scheduler, v, flow_scheduler.timesteps[0], x, noise_level=0.7)
    expected_sigma_t = 0.7 * math.sqrt(1.0 / (1.0 - float(sigmas[1])))
    assert out.sigma_t.flatten()[0].item() == pytest.approx(expected_sigma_t, rel=1e-6)
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_prob).all()


def test_noise_level_zero_is_the_scheduler_step(flow_scheduler):
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    for index, t in enumerate(flow_scheduler.timesteps):
        out = sde_step(flow_scheduler, v, t, x, noise_level=0.0)
        flow_scheduler._step_index = index
        expected = flow_scheduler.step(v, t, x, return_dict=False)[0]
        torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=0)
        assert out.std is None and out.log_prob is None
        torch.testing.assert_close(out.mean, expected, rtol=0, atol=0)


def test_noise_level_zero_ddim_is_the_scheduler_step():
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    scheduler.set_timesteps(10)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in scheduler.timesteps:
        out = sde_step(scheduler, eps, t, x, noise_level=0.0)
        expected = scheduler.step(eps, t, x, eta=0.0, return_dict=False)[0]
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-6, atol=1e-6)
        assert out.std is None and out.log_prob is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers_mean_and_std(prediction_type):
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(10)
    x, out_model = torch.randn(SHAPE), torch.randn(SHAPE)
    t = scheduler.timesteps[3]
    noise = torch.randn(SHAPE)
    out = sde_step(scheduler, out_model, t, x, noise_level=1.0, prev_sample=None, generator=None)
    # diffusers' DDIM step with eta adds std * variance_noise to the same mean.
    expected = scheduler.step(out_model, t, x, eta=1.0, variance_noise=noise, return_dict=False)[0]
    torch.testing.assert_close(out.mean + out.std * noise, expected, rtol=1e-5, atol=1e-5)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar, abar_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t]
    std = math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    assert out.std.flatten()[0].item() == pytest.approx(std, rel=1e-5)
    assert out.dt is None


def test_empirical_mean_and_std_of_sampled_steps(flow_scheduler):
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x, v = x.expand(4000, -1, -1, -1), v.expand(4000, -1, -1, -1)
    generator = torch.Generator().manual_seed(0)
    out = sde_step(flow_scheduler, v, flow_scheduler.timesteps[4], x, noise_level=0.7, generator=generator)
    residual = out.prev_sample - out.mean
    std = out.std.flatten()[0].item()
    assert residual.mean().abs().item() < 3 * std / math.sqrt(residual.numel())
    assert residual.std().item() == pytest.approx(std, rel=0.01)


def test_given_prev_sample_is_scored_not_resampled(flow_scheduler):
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    target = torch.randn(SHAPE)
    out = sde_step(flow_scheduler, v, flow_scheduler.timesteps[2], x, noise_level=0.7, prev_sample=target)
    torch.testing.assert_close(out.prev_sample, target)
    torch.testing.assert_close(out.log_prob, gaussian_log_prob(target, out.mean, out.std))


def test_per_sample_timesteps(flow_scheduler):
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    timesteps = flow_scheduler.timesteps[[0, 3, 7]]
    out = sde_step(flow_scheduler, v, timesteps, x, noise_level=0.7)
    for i, t in enumerate(timesteps):
        single = sde_step(flow_scheduler, v[i : i + 1], t, x[i : i + 1], noise_level=0.7)
        torch.testing.assert_close(out.mean[i : i + 1], single.mean)
        torch.testing.assert_close(out.std[i : i + 1], single.std)


def test_deterministic_under_a_generator(flow_scheduler):
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    t = flow_scheduler.timesteps[1]
    a = sde_step(flow_scheduler, v, t, x, noise_level=0.7, generator=torch.Generator().manual_seed(3))
    b = sde_step(flow_scheduler, v, t, x, noise_level=0.7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=0)


def test_half_precision_model_output_is_computed_in_float32(flow_scheduler):
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = sde_step(flow_scheduler, v.bfloat16(), flow_scheduler.timesteps[8], x.bfloat16(), noise_level=0.7)
    assert out.mean.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    assert torch.isfinite(out.log_prob).all()


def test_unsupported_scheduler_is_a_type_error():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(TypeError, match="EulerDiscreteScheduler"):
        sde_step(scheduler, torch.randn(SHAPE), scheduler.timesteps[0], torch.randn(SHAPE), noise_level=0.7)


def test_unknown_timestep_is_a_clear_error(flow_scheduler):
    with pytest.raises(ValueError, match="not in the scheduler"):
        sde_step(flow_scheduler, torch.randn(SHAPE), 12345.0, torch.randn(SHAPE), noise_level=0.7)


def test_step_kl_is_the_exact_gaussian_kl():
    ms, mt = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    std = torch.rand(SHAPE[0], 1, 1, 1, dtype=torch.float64) + 0.1
    kl = step_kl(ms, mt, std)
    expected = kl_divergence(Normal(ms, std.expand_as(ms)), Normal(mt, std.expand_as(mt))).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)


def test_step_kl_without_std_is_mean_matching():
    ms, mt = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(step_kl(ms, mt, None), 0.5 * ((ms - mt) ** 2).mean(dim=(1, 2, 3)))


def test_equal_means_give_zero_kl_and_zero_gradient(flow_scheduler):
    x, v = torch.randn(SHAPE), torch.randn(SHAPE, requires_grad=True)
    out = sde_step(flow_scheduler, v, flow_scheduler.timesteps[3], x, noise_level=0.7)
    kl = step_kl(out.mean, out.mean.detach(), out.std)
    kl.sum().backward()
    assert kl.abs().max().item() == 0.0
    assert v.grad.abs().max().item() == 0.0


def test_sigma_scaling_is_exact_kl_times_abs_dt(flow_scheduler):
    x, v, v2 = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t = flow_scheduler.timesteps[2]
    student = sde_step(flow_scheduler, v, t, x, noise_level=0.7)
    teacher = sde_step(flow_scheduler, v2, t, x, noise_level=0.7)
    exact = step_kl(student.mean, teacher.mean, student.std)
    sigma_scaled = ((student.mean - teacher.mean) ** 2 / (2 * student.sigma_t**2)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(scale_kl(exact, student, "sigma"), sigma_scaled, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scale_kl(exact, student, "exact"), exact)
    with pytest.raises(ValueError, match="kl_scaling"):
        scale_kl(exact, student, "bogus")


def test_mean_matching_is_a_weighted_velocity_mse(flow_scheduler):
    """DiffusionOPD (arXiv 2605.15055): both losses are velocity MSEs with a per-step weight."""
    x, vs, vt = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    t_index = 3
    t = flow_scheduler.timesteps[t_index]
    sigma, sigma_next = float(flow_scheduler.sigmas[t_index]), float(flow_scheduler.sigmas[t_index + 1])
    dt = sigma_next - sigma
    velocity_mse = ((vs - vt) ** 2).mean(dim=(1, 2, 3))
    ode = step_kl(
        sde_step(flow_scheduler, vs, t, x, noise_level=0).mean, sde_step(flow_scheduler, vt, t, x, noise_level=0).mean
    )
    torch.testing.assert_close(ode, 0.5 * dt**2 * velocity_mse, rtol=1e-4, atol=1e-7)
    s = sde_step(flow_scheduler, vs, t, x, noise_level=0.7)
    sde = step_kl(s.mean, sde_step(flow_scheduler, vt, t, x, noise_level=0.7).mean, s.std)
    sigma_t = 0.7 * math.sqrt(sigma / (1 - sigma))
    weight = abs(dt) / 2 * (1 / sigma_t + sigma_t * (1 - sigma) / (2 * sigma)) ** 2
    torch.testing.assert_close(sde, weight * velocity_mse, rtol=1e-4, atol=1e-7)
