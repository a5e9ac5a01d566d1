"""DiffusionGRPOTrainer on the tiny SD3 pipeline: learning, the maths of a step, saving, resuming, the Hub, errors."""

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import tiny_sd3_pipeline


PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog"]
LORA = dict(r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def make_pattern_reward(pipe):
    """
    Correlation of the image with the direction a left/right latent pattern takes through the VAE decoder.

    A random tiny VAE maps every latent to roughly the same mean colour (its GroupNorms erase uniform shifts), so
    brightness cannot move; a spatial pattern survives the decoder and gives the policy a direction to learn.
    """
    family = get_family(pipe)
    pattern = torch.zeros(1, 4, 16, 16)
    pattern[:, 0, :, :8], pattern[:, 0, :, 8:] = 1.0, -1.0
    direction = (family.decode(pattern) - family.decode(-pattern))[0]
    direction = direction / direction.norm()

    def pattern_reward(prompts, images, **kwargs):
        return (images * direction).sum(dim=(1, 2, 3)).tolist()

    return pattern_reward


def grpo_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        num_inference_steps=4,
        eval_num_inference_steps=4,
        guidance_scale=1.0,
        max_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        beta=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return DiffusionGRPOConfig(**values)


def make_trainer(tmp_path, reward_funcs=None, dataset=None, pipe=None, **overrides):
    pipe = pipe or tiny_sd3_pipeline()
    return DiffusionGRPOTrainer(
        pipe,
        reward_funcs=reward_funcs or make_pattern_reward(pipe),
        args=grpo_args(tmp_path, **overrides),
        train_dataset=dataset or Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
    )


def ode_reward(pipe, reward, seed=0):
    trajectory = rollout(
        pipe,
        PROMPTS * 2,
        num_inference_steps=4,
        guidance_scale=1.0,
        noise_level=0.0,
        generator=torch.Generator().manual_seed(seed),
        decode=True,
    )
    return sum(reward(PROMPTS * 2, trajectory.images)) / 8, trajectory.images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One GRPO run of 100 steps, shared by the tests that need a trained LoRA."""
    tmp_path = tmp_path_factory.mktemp("grpo")
    pipe = tiny_sd3_pipeline()
    reward = make_pattern_reward(pipe)
    base_reward, base_images = ode_reward(pipe, reward)
    trainer = make_trainer(tmp_path, reward_funcs=reward, pipe=pipe, max_steps=100)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    return trainer, reward, base_reward, base_images, tmp_path / "lora"


def test_pattern_reward_rises(trained):
    trainer, reward, base_reward, *_ = trained
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    first, last = sum(rewards[:15]) / 15, sum(rewards[-15:]) / 15
    assert last > first + 0.15, (first, last)
    for key in (
        "reward_std",
        "rewards/pattern_reward/mean",
        "rewards/pattern_reward/std",
        "clip_ratio",
        "frac_reward_zero_std",
        "policy_loss",
        "step_time",
    ):
        assert key in trainer.state.log_history[0], key


def test_saved_lora_reloads_in_plain_diffusers_pipeline(trained):
    trainer, reward, base_reward, base_images, lora_dir = trained
    assert {"pytorch_lora_weights.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= set(
        os.listdir(lora_dir)
    )
    assert not any("vae" in k or "text_encoder" in k for k in load_file(lora_dir / "pytorch_lora_weights.safetensors"))
    trained_reward, trained_images = ode_reward(trainer.pipeline, reward)
    fresh = tiny_sd3_pipeline()
    fresh.load_lora_weights(str(lora_dir))
    reloaded_reward, reloaded_images = ode_reward(fresh, reward)
    torch.testing.assert_close(reloaded_images, trained_images, rtol=1e-4, atol=1e-4)
    # The trained LoRA moves the deterministic samples in the rewarded direction.
    assert reloaded_reward > base_reward + 0.1, (base_reward, reloaded_reward)
    assert not torch.allclose(reloaded_images, base_images, atol=1e-3)


def test_alpha_differs_from_rank_and_reloads_at_training_scale(trained):
    *_, lora_dir = trained
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16


def test_ratio_is_one_on_first_inner_step_and_moves_after(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, num_iterations=2, learning_rate=5e-2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "ratio" in entry]
    assert logs[0]["ratio"] == 1.0 and logs[0]["clip_ratio"] == 0.0
    assert logs[1]["ratio"] != 1.0  # the same rollout, after one optimizer step: off-policy


def test_kl_is_zero_with_the_adapter_at_init(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, beta=0.04)
    trainer.train()
    assert trainer.state.log_history[0]["kl"] == 0.0


@pytest.mark.parametrize("scale_rewards", ["batch", "group", "none"])
def test_advantages_are_zero_mean_per_group(tmp_path, scale_rewards):
    trainer = make_trainer(tmp_path, scale_rewards=scale_rewards)
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    advantages, group_std = trainer._advantages(rewards)
    torch.testing.assert_close(advantages.view(2, 4).mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    centred = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0])
    expected = {"batch": centred / (rewards.std() + 1e-4), "group": centred / (group_std[0] + 1e-4), "none": centred}
    torch.testing.assert_close(advantages, expected[scale_rewards].clamp(-5, 5))
    assert group_std[1] == 0


def test_resume_continues_identically(tmp_path):
    straight = make_trainer(tmp_path / "a", max_steps=4)
    straight.train()
    interrupted = make_trainer(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    interrupted.train()
    resumed = make_trainer(tmp_path / "b", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    from diffusion_opd_trainer.lora import adapter_state_dict

    a, b = adapter_state_dict(straight.model), adapter_state_dict(resumed.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    rewards = lambda t: [e["reward"] for e in t.state.log_history if "reward" in e]  # noqa: E731
    assert rewards(resumed)[-2:] == pytest.approx(rewards(straight)[-2:], rel=1e-5)


def test_per_task_rewards_route_each_prompt(tmp_path):
    calls = {}

    def reward_a(prompts, images, task, **kwargs):
        calls.setdefault("a", []).extend(task)
        return [1.0] * len(prompts)

    def reward_b(prompts, images, task, **kwargs):
        calls.setdefault("b", []).extend(task)
        return [0.0] * len(prompts)

    dataset = Dataset.from_dict({"prompt": PROMPTS, "task": ["a", "b", "a", "b"]})
    trainer = make_trainer(tmp_path, reward_funcs={"a": reward_a, "b": reward_b}, dataset=dataset, max_steps=2)
    trainer.train()
    assert set(calls["a"]) == {"a"} and set(calls["b"]) == {"b"}
    entry = trainer.state.log_history[0]
    assert entry["rewards/a/mean"] == 1.0 and entry["rewards/b/mean"] == 0.0


def test_weighted_sum_of_rewards(tmp_path):
    def one(prompts, images, **kwargs):
        return [1.0] * len(prompts)

    def two(prompts, images, **kwargs):
        return [2.0] * len(prompts)

    trainer = make_trainer(tmp_path, reward_funcs=[one, two], reward_weights=[0.5, 2.0], max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["reward"] == pytest.approx(0.5 + 4.0)
    assert trainer.state.log_history[0]["frac_reward_zero_std"] == 1.0


def test_ema_weights_are_saved(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, ema=True, ema_decay=0.5, ema_update_interval=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "ema"))
    saved = load_file(tmp_path / "ema" / "pytorch_lora_weights.safetensors")
    raw = load_file(tmp_path / "ema" / "adapter_model.safetensors")
    key = next(k for k in saved if "lora_B" in k)
    raw_key = "base_model.model." + key.removeprefix("transformer.")
    assert not torch.allclose(saved[key], raw[raw_key])
    assert os.path.isfile(tmp_path / "ema" / "ema_state.safetensors")


def test_evaluate_scores_ode_samples(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.eval_dataset = Dataset.from_dict({"prompt": PROMPTS})
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert "eval_reward" in first and "eval_rewards/pattern_reward/mean" in first
    assert first["eval_reward"] == second["eval_reward"]  # fixed seeds, deterministic sampler


def test_push_to_hub_uploads_lora_and_model_card(tmp_path, monkeypatch):
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, sorted(os.listdir(folder_path)), kwargs))
            return "commit"

    import transformers.trainer

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    trainer = make_trainer(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="tiny-grpo", hub_token="secret")
    trainer.train()
    trainer.push_to_hub()
    repo_id, files, kwargs = uploads[-1]
    assert repo_id == "user/tiny-grpo"
    assert {"pytorch_lora_weights.safetensors", "adapter_config.json", "README.md"} <= set(files)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: diffusers" in card and "pattern_reward" in card and "load_lora_weights" in card
    assert "secret" not in card
    assert "secret" not in (tmp_path / "out" / "training_args.json").read_text()  # the token is never written


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(noise_level=0.0), "noise_level"),
        (dict(per_device_train_batch_size=6, num_generations=4), "multiple of num_generations"),
        (dict(num_generations=1), "num_generations"),
        (dict(scale_rewards="batchy"), "scale_rewards"),
        (dict(kl_scaling="approx"), "kl_scaling"),
        (dict(timestep_fraction=0.0), "timestep_fraction"),
        (dict(train_timestep_indices=[7]), "train_timestep_indices"),
    ],
)
def test_invalid_configs_raise_clear_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        grpo_args(tmp_path, **overrides)


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="prompt"):
        make_trainer(tmp_path, dataset=Dataset.from_dict({"text": PROMPTS}))
    with pytest.raises(ValueError, match="task"):
        make_trainer(tmp_path, reward_funcs={"a": lambda **k: [0.0]}, dataset=Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(ValueError, match=r"\['b'\]"):
        make_trainer(
            tmp_path,
            reward_funcs={"a": lambda **k: [0.0]},
            dataset=Dataset.from_dict({"prompt": PROMPTS, "task": ["a", "b", "a", "a"]}),
        )
    with pytest.raises(ValueError, match="reward_weights"):
        make_trainer(tmp_path, reward_funcs=[lambda **k: [0.0]], reward_weights=[1.0, 2.0])


def test_memory_levers_and_tensorboard_images(tmp_path):
    """bf16 autocast (kernel maths stay float32), diffusers' gradient checkpointing, rollout images in TensorBoard."""
    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=True,  # transformers 5 name of gradient_checkpointing
        report_to=["tensorboard"],
        log_images_steps=1,
        beta=0.04,
    )
    assert trainer.model.gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["policy_loss"]))
    # The rollout runs under the same autocast as the update, so the on-policy ratio stays exactly 1 in bf16.
    assert trainer.state.log_history[0]["ratio"] == 1.0
    assert trainer.state.log_history[0]["kl"] == 0.0  # reference and policy passes share the autocast
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "out").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "rollout/images" in events.Tags()["images"]


def test_evaluation_during_training_keeps_train_metrics_apart(tmp_path):
    pipe = tiny_sd3_pipeline()
    trainer = DiffusionGRPOTrainer(
        pipe,
        reward_funcs=make_pattern_reward(pipe),
        args=grpo_args(
            tmp_path, max_steps=2, logging_steps=2, eval_strategy="steps", eval_steps=1, eval_num_inference_steps=2
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_reward" in entry]
    trains = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(evals) == 2 and len(trains) == 1  # an evaluation at step 1, before the first training log
    assert all("reward" not in entry for entry in evals)
