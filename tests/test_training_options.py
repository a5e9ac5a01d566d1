"""GRPO's SDE window (Flow-GRPO-Fast / MixGRPO), per-prompt stat tracking (Flow-GRPO), and the gradient cosine."""

import math

import numpy as np
import pytest
import torch
from test_grpo import grpo_args, make_trainer

from diffusion_opd_trainer.lora import adapter_state_dict
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.stat_tracking import PerPromptStatTracker
from diffusion_opd_trainer.testing import tiny_sd3_pipeline


def _rewards(trainer):
    return [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]


def test_window_over_every_step_is_todays_grpo_to_the_bit(tmp_path):
    plain = make_trainer(tmp_path / "plain", max_steps=2)
    plain.train()
    # The default trains steps 0-2 of 4; a window over all four steps samples exactly as today and trains the same.
    windowed = make_trainer(tmp_path / "window", max_steps=2, sde_window_size=4, sde_window_start=0)
    windowed.train()
    a, b = adapter_state_dict(plain.model), adapter_state_dict(windowed.model)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _rewards(plain) == _rewards(windowed)


def test_window_samples_ode_outside_and_sde_inside():
    pipe = tiny_sd3_pipeline()
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, noise_level=0.7)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    windowed = rollout(pipe, ["a", "b"], latents=noise, sde_steps=[1, 2], generator=generator, **kwargs)
    ode = rollout(pipe, ["a", "b"], latents=noise, **{**kwargs, "noise_level": 0.0})
    assert windowed.sde_steps == [1, 2]
    assert windowed.log_probs.shape == (2, 4)
    assert torch.isnan(windowed.log_probs[:, [0, 3]]).all() and torch.isfinite(windowed.log_probs[:, [1, 2]]).all()
    # Step 0 is the ODE step: the same state as the deterministic sampler; the window then departs from it.
    assert torch.equal(windowed.latents[:, 1], ode.latents[:, 1])
    assert not torch.allclose(windowed.latents[:, 2], ode.latents[:, 2])


def test_window_trains_only_its_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, sde_window_size=2, sde_window_start=1)
    calls = []
    trainer.model.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    trainer.train()
    # 4 rollout forwards (no grad), then one policy forward per trained window step (steps 1 and 2).
    assert calls.count(True) == 2 and calls.count(False) == 4


def test_random_window_is_shared_and_inside_the_trained_steps(tmp_path):
    args = grpo_args(tmp_path, num_inference_steps=10, sde_window_size=3)  # trains steps 0-8
    starts = {args.sde_window(i)[0] for i in range(200)}
    assert starts == set(range(7))  # 0..6: the window ends at step 8 at the latest
    assert args.sde_window(5) == args.sde_window(5)  # a function of the seed and rollout index: every rank agrees
    assert grpo_args(tmp_path).sde_window(0) is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(sde_window_size=4), "last trained step"),
        (dict(sde_window_size=2, sde_window_start=3), "within the 4 rollout steps"),
        (dict(sde_window_size=1, sde_window_start=3), "no trained step"),
        (dict(sde_window_start=1), "needs `sde_window_size`"),
        (dict(stat_tracking_buffer_size=0), "stat_tracking_buffer_size"),
    ],
)
def test_invalid_window_and_tracker_settings(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        grpo_args(tmp_path, **overrides)


def test_stat_tracker_against_a_hand_computation():
    tracker = PerPromptStatTracker(buffer_size=5)
    mean, std = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 2.0, 2.0]))
    assert mean.tolist() == [2.0, 2.0, 2.0, 2.0] and std.tolist() == [1.0, 1.0, 0.0, 0.0]
    # The second time "a" comes, its baseline is the mean of all four of its rewards; the buffer keeps the newest 5.
    mean, std = tracker.update(["a", "a", "c", "c"], torch.tensor([5.0, 7.0, float("nan"), 1.0]))
    history = np.array([1.0, 3.0, 5.0, 7.0])
    assert mean[0].item() == pytest.approx(history.mean()) and std[0].item() == pytest.approx(history.std())
    assert mean[2].item() == 1.0 and std[2].item() == 0.0  # the NaN is not recorded
    tracker.update(["a"] * 3, torch.tensor([9.0, 9.0, 9.0]))
    assert list(tracker.history["a"]) == [5.0, 7.0, 9.0, 9.0, 9.0]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_tracked_advantages_against_a_hand_computation(tmp_path, scale_rewards):
    trainer = make_trainer(tmp_path, per_prompt_stat_tracking=True, scale_rewards=scale_rewards)
    first = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 1.5])
    trainer._advantages(first, ["x"] * 4 + ["y"] * 4)
    second = torch.tensor([4.0, 4.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    prompts = ["x"] * 4 + ["z"] * 4
    advantages, _ = trainer._advantages(second, prompts)
    x_history = np.array([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 2.0, 2.0])
    expected = np.concatenate([second[:4].numpy() - x_history.mean(), np.zeros(4)])
    if scale_rewards == "group":
        expected[:4] /= x_history.std() + 1e-4
    elif scale_rewards == "batch":
        expected /= second.std().item() + 1e-4
    np.testing.assert_allclose(advantages.numpy(), np.clip(expected, -5, 5), rtol=1e-5, atol=1e-6)
    assert not any(math.isnan(value) for value in advantages.tolist())


def test_gradient_cosine_leaves_the_grpo_update_unchanged(tmp_path):
    plain = make_trainer(tmp_path / "plain", max_steps=2)
    plain.train()
    halved = make_trainer(tmp_path / "halves", max_steps=2, log_gradient_cosine=True)
    halved.train()
    a, b = adapter_state_dict(plain.model), adapter_state_dict(halved.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    cosines = [entry["grad_cosine"] for entry in halved.state.log_history if "grad_cosine" in entry]
    assert len(cosines) == 2 and all(-1 <= value <= 1 for value in cosines)
    assert not any("grad_cosine" in entry for entry in plain.state.log_history)


def test_gradient_cosine_of_two_identical_halves_is_one(tmp_path):
    # Two copies of one group: both halves hold the same images with the same advantages, so the same gradient.
    trainer = make_trainer(tmp_path, log_gradient_cosine=True, per_device_train_batch_size=4)
    batch = trainer._generate_and_score([{"prompt": "a red circle"}] * 4)
    doubled = type(batch)(
        latents=torch.cat([batch.latents, batch.latents]),
        log_probs=torch.cat([batch.log_probs, batch.log_probs]),
        timesteps=batch.timesteps,
        prompt_embeds=batch.prompt_embeds[[0, 1, 2, 3, 0, 1, 2, 3]],
        advantages=torch.cat([batch.advantages, batch.advantages]),
        trained_steps=batch.trained_steps,
        tasks=batch.tasks * 2,
    )
    trainer.model.zero_grad(set_to_none=True)
    trainer._backward_in_halves(lambda rows, weight: trainer._policy_update(trainer.model, doubled[rows], weight), 8)
    assert trainer._metrics["train"]["grad_cosine"][-1] == pytest.approx(1.0, abs=1e-5)


def test_gradient_cosine_in_opd(tmp_path):
    from test_opd import make_trainer as make_opd_trainer

    from diffusion_opd_trainer.testing import save_random_lora

    teacher = save_random_lora(tiny_sd3_pipeline(), tmp_path / "teacher", "peft", seed=1, std=0.3)
    for fused in (True, False):
        trainer = make_opd_trainer(
            tmp_path / str(fused),
            {"a": str(teacher), "b": str(teacher)},
            log_gradient_cosine=True,
            rollout_schedule="fused" if fused else "two_pass",
        )
        trainer.train()
        cosines = [entry["grad_cosine"] for entry in trainer.state.log_history if "grad_cosine" in entry]
        assert len(cosines) == 2 and all(-1 <= value <= 1 for value in cosines)


def test_shared_initial_noise_per_group(tmp_path):
    trainer = make_trainer(tmp_path, share_initial_noise=True, sde_window_size=1, sde_window_start=1)
    batch = trainer._generate_and_score([{"prompt": p} for p in ["a red circle"] * 4 + ["a dog"] * 4])
    start = batch.latents[:, 0]
    # One initial noise per group of 4, different between groups ...
    assert all(torch.equal(start[i], start[0]) for i in range(4)) and all(
        torch.equal(start[i], start[4]) for i in range(4, 8)
    )
    assert not torch.equal(start[0], start[4])
    # ... so with a window at step 1 the group's first ODE step is shared too, and the images differ from step 2 on.
    assert all(torch.equal(batch.latents[i, 1], batch.latents[0, 1]) for i in range(4))
    assert not torch.equal(batch.latents[0, 2], batch.latents[1, 2])
    # A function of the seed and the rollout index: the same on every process and after a resume.
    again = make_trainer(tmp_path / "again", share_initial_noise=True)
    assert torch.equal(again._group_initial_noise(0, 8), trainer._group_initial_noise(0, 8))
