"""Rollout-source mixing in OPD (`teacher_rollout_fraction`): some trajectories sampled by the prompt's teacher."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from test_opd import LORA, PROMPTS, opd_args, two_task_dataset

from diffusion_opd_trainer import DiffusionOPDTrainer
from diffusion_opd_trainer.lora import STUDENT_ADAPTER, adapter_state_dict
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.teachers import as_teacher
from diffusion_opd_trainer.testing import tiny_sd3_pipeline


def trainer_with(tmp_path, teachers, dataset=None, **overrides):
    return DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers={task: str(path) for task, path in teachers.items()},
        args=opd_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else two_task_dataset(),
        peft_config=LoraConfig(**LORA),
    )


def seeded_rollout(trainer, prompts, noise_level, seed):
    """A rollout of the trainer's denoiser as it is now (student, or a teacher inside `as_teacher`) at its settings."""
    return rollout(
        trainer.family,
        prompts,
        num_inference_steps=trainer.args.num_inference_steps,
        guidance_scale=trainer.args.guidance_scale,
        noise_level=noise_level,
        height=trainer.image_size[0],
        width=trainer.image_size[1],
        generator=torch.Generator().manual_seed(seed),
        negative_prompt=trainer.args.negative_prompt,
    )


def test_fraction_zero_is_todays_opd(tmp_path, random_teachers):
    settings = dict(rollout_schedule="two_pass", noise_level=0.7, max_steps=2)
    runs = [trainer_with(tmp_path / "default", random_teachers, **settings)]
    runs.append(trainer_with(tmp_path / "zero", random_teachers, teacher_rollout_fraction=0.0, **settings))
    for trainer in runs:
        trainer.train()
    first, second = (adapter_state_dict(t.unwrapped_denoiser, STUDENT_ADAPTER) for t in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert all("teacher_rollouts" not in entry for entry in runs[1].state.log_history)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_fraction_one_trains_on_the_teachers_own_trajectories(tmp_path, random_teachers, noise_level):
    trainer = trainer_with(
        tmp_path,
        {"a": random_teachers["a"]},
        dataset=Dataset.from_dict({"prompt": PROMPTS}),
        teacher_rollout_fraction=1.0,
        noise_level=noise_level,
    )
    prompts = PROMPTS[:3]
    trainer.rollout_generator.manual_seed(7)
    cached = trainer._rollout_with_teachers(prompts, ["a"] * 3)
    with as_teacher(trainer.family.denoiser, trainer.teachers["a"]):
        expected = seeded_rollout(trainer, prompts, noise_level, seed=7)
    torch.testing.assert_close(cached.latents, expected.latents)
    student = seeded_rollout(trainer, prompts, noise_level, seed=7)
    assert not torch.allclose(cached.latents[:, -1], student.latents[:, -1])  # not the student's own


def test_mixed_batches_train_and_log_the_fraction(tmp_path, random_teachers):
    trainer = trainer_with(tmp_path, random_teachers, teacher_rollout_fraction=0.5, max_steps=6, noise_level=0.7)
    trainer.train()
    fractions = [entry["teacher_rollouts"] for entry in trainer.state.log_history if "teacher_rollouts" in entry]
    assert len(fractions) == 6 and all(0.0 <= f <= 1.0 for f in fractions)
    assert 0.0 < sum(fractions) / len(fractions) < 1.0  # some of each, over the run
    assert all(entry["kl"] > 0 for entry in trainer.state.log_history if "kl" in entry)
    assert trainer.teachers_unchanged() == {"a": True, "b": True}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(teacher_rollout_fraction=1.5), r"`teacher_rollout_fraction` must be <= 1"),
        (dict(teacher_rollout_fraction=-0.1), r"`teacher_rollout_fraction` must be >= 0"),
        (dict(teacher_rollout_fraction=0.5, noise_level=0.7, loss_type="policy_gradient"), r"needs `loss_type="),
        (dict(teacher_rollout_fraction=0.5, rollout_schedule="fused"), r"needs the two-pass schedule"),
    ],
)
def test_mixing_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        opd_args(tmp_path, **overrides)


def test_auto_schedule_is_two_pass_with_mixing(tmp_path):
    assert opd_args(tmp_path).fused and not opd_args(tmp_path, teacher_rollout_fraction=0.25).fused
