"""Preflight checks of a teacher set-up, before the first step: the sampling grid, frozen teachers, finite targets."""

import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from test_grpo import LORA, PROMPTS, grpo_args, make_pattern_reward

from diffusion_opd_trainer import DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.lora import lora_parameters
from diffusion_opd_trainer.preflight import SCHEDULER_CONFIG_NAME
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora, tiny_sd3_pipeline


def opd_trainer(tmp_path, teacher, **overrides):
    args = {**TINY_TRAINING_ARGS, "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, **overrides}
    return DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers={"t": str(teacher)},
        args=DiffusionOPDConfig(**args),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
    )


@pytest.fixture
def teacher(tmp_path):
    return Path(save_random_lora(tiny_sd3_pipeline(), tmp_path / "teacher", "peft", std=0.3))


def test_a_run_says_each_check_once(tmp_path, teacher, caplog):
    with caplog.at_level(logging.INFO, "diffusion_opd_trainer.preflight"):
        opd_trainer(tmp_path, teacher, max_steps=2).train()
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_opd_trainer.preflight"]
    assert len(lines) == 4, lines
    assert "options supported: on-policy distillation, analytic loss, fused schedule" in lines[0]
    assert "ODE (mean matching), exact KL scaling; teachers: t CFG 1.0" in lines[0]
    assert "no scheduler recorded, run on the student's: ['t']" in lines[1]
    assert "1 teacher(s) frozen" in lines[2]
    assert "finite and of the student's shape" in lines[3]


def test_a_teacher_trained_by_this_library_records_its_grid_and_passes(tmp_path, caplog):
    pipe = tiny_sd3_pipeline()
    grpo = DiffusionGRPOTrainer(
        pipe,
        reward_funcs=make_pattern_reward(pipe),
        args=grpo_args(tmp_path / "g", max_steps=1),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
    )
    grpo.train()
    grpo.save_model()
    saved = Path(grpo.args.output_dir)
    assert (saved / SCHEDULER_CONFIG_NAME).is_file()
    with caplog.at_level(logging.INFO, "diffusion_opd_trainer.preflight"):
        opd_trainer(tmp_path, saved, max_steps=1).train()
    assert "recorded and identical: ['t']" in caplog.text


def test_a_teacher_from_another_grid_stops_before_the_first_step(tmp_path, teacher):
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_config(teacher)  # the tiny pipeline samples with shift 3
    trainer = opd_trainer(tmp_path, teacher)
    with pytest.raises(
        ValueError,
        match=r"Teacher for task 't'.*another sampling grid.*\[1000, 500.5, 1\], the student.s gives \[1000, 751",
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_trainable_teacher_stops_before_the_first_step(tmp_path, teacher):
    trainer = opd_trainer(tmp_path, teacher)
    for parameter in lora_parameters(trainer.unwrapped_denoiser, "teacher_t").values():
        parameter.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"Teacher for task 't'.*is not frozen"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_non_finite_teacher_targets_name_the_teacher(tmp_path):
    # Finite weights (the loader checks that) whose products overflow float32 in the forward.
    huge = save_random_lora(tiny_sd3_pipeline(), tmp_path / "huge", "peft", std=1e12)
    trainer = opd_trainer(tmp_path, huge)
    with pytest.raises(ValueError, match=r"Teacher for task 't'.*non-finite transition means"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_teacher_that_changed_is_not_saved(tmp_path, teacher):
    trainer = opd_trainer(tmp_path, teacher, max_steps=1)
    trainer.train()
    with torch.no_grad():
        next(iter(lora_parameters(trainer.unwrapped_denoiser, "teacher_t").values())).add_(1.0)
    with pytest.raises(RuntimeError, match=r"Teacher\(s\) \['t'\] changed since they were loaded"):
        trainer.save_model()
    assert not any(Path(trainer.args.output_dir).glob("*.safetensors"))


def test_the_hybrid_runs_the_same_checks(tmp_path, teacher, caplog):
    pipe = tiny_sd3_pipeline()
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_config(teacher)
    trainer = DiffusionGRPOTrainer(
        pipe,
        reward_funcs=make_pattern_reward(pipe),
        args=grpo_args(tmp_path, opd_coef=1.0, noise_level=0.7),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
        teachers={"t": str(teacher)},
    )
    with pytest.raises(ValueError, match=r"another sampling grid"):
        trainer.train()
