"""The hybrid: DiffusionGRPOTrainer with `teachers` and `opd_coef`, the GRPO loss plus the step KL to a teacher."""

import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from test_grpo import LORA, PROMPTS, grpo_args, make_pattern_reward

from diffusion_opd_trainer import DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.opd_trainer import _CachedRollout
from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return Path(save_random_lora(tiny_sd3_pipeline(), tmp_path_factory.mktemp("teacher") / "t", "peft", std=0.3))


def hybrid_trainer(tmp_path, teachers=None, reward=None, dataset=None, **overrides):
    pipe = tiny_sd3_pipeline()
    return DiffusionGRPOTrainer(
        pipe,
        reward_funcs=reward or make_pattern_reward(pipe),
        args=grpo_args(tmp_path, **overrides),
        train_dataset=dataset or Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
        teachers=teachers,
    )


def student_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def student_gradient(trainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])


def opd_gradient_on(opd, batch) -> torch.Tensor:
    """The OPD trainer's gradient (two-pass, cached teacher means) on the states of a GRPO trainer's scored rollout."""
    tasks = list(batch.tasks)
    means = {
        j: opd.teacher_means(batch.latents[:, j], batch.timesteps[j], batch.prompt_embeds, tasks)
        for j in batch.trained_steps
    }
    cached = _CachedRollout(batch.latents, batch.log_probs, batch.timesteps, batch.prompt_embeds, tasks, means)
    opd.model.zero_grad(set_to_none=True)
    opd._train_on_rollout(opd.model, cached)
    return student_gradient(opd)


def test_opd_coef_zero_is_plain_grpo_to_the_bit(tmp_path, teacher_dir, caplog):
    settings = dict(max_steps=2, beta=0.04, noise_level=0.7)
    plain = hybrid_trainer(tmp_path / "plain", **settings)
    with caplog.at_level(logging.WARNING, "diffusion_opd_trainer"):
        unused = hybrid_trainer(tmp_path / "unused", teachers={"t": str(teacher_dir)}, opd_coef=0.0, **settings)
    assert "opd_coef=0" in caplog.text  # teachers given for nothing: said once, at set-up
    plain.train()
    unused.train()
    after_plain, after_unused = student_state(plain), student_state(unused)
    assert after_plain.keys() == after_unused.keys()
    assert all(torch.equal(after_plain[name], after_unused[name]) for name in after_plain)
    assert all("teacher_kl" not in entry for entry in unused.state.log_history)


@pytest.mark.parametrize("kl_scaling", ["exact", "sigma"])
def test_hybrid_gradient_is_grpo_plus_opd_coef_times_opd(tmp_path, teacher_dir, kl_scaling):
    """
    On one scored rollout: with zero advantages (a constant reward) the hybrid's gradient is `opd_coef` times the
    gradient of on-policy distillation (`analytic` loss, same kernel and scaling) on the same states; with a real
    reward it is GRPO's gradient plus that.
    """
    settings = dict(noise_level=0.7, kl_scaling=kl_scaling, beta=0.0)
    teachers = {"t": str(teacher_dir)}
    constant = hybrid_trainer(
        tmp_path / "c", teachers, reward=lambda prompts, images, **kw: [0.5] * len(prompts), opd_coef=2.0, **settings
    )
    rows = [{"prompt": prompt} for prompt in PROMPTS[:2] for _ in range(4)]
    batch = constant._generate_and_score(rows)
    assert torch.equal(batch.advantages, torch.zeros_like(batch.advantages))
    constant.model.zero_grad(set_to_none=True)
    constant._policy_update(constant.model, batch)
    hybrid_gradient = student_gradient(constant)

    opd = DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers=teachers,
        args=DiffusionOPDConfig(
            **{k: v for k, v in grpo_args(tmp_path / "o").to_dict().items() if k in ("output_dir", "seed")},
            per_device_train_batch_size=8,
            num_inference_steps=4,
            guidance_scale=1.0,
            report_to=[],
            rollout_schedule="two_pass",
            noise_level=settings["noise_level"],
            kl_scaling=kl_scaling,
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
    )
    assert opd.args.trained_step_indices == batch.trained_steps
    opd.family.set_timesteps(4, *opd.image_size)  # the rollout's schedule (the OPD trainer has not rolled out)
    # The same student at the start (the LoRA's init depends on the seed only).
    assert all(torch.equal(a, b) for a, b in zip(student_state(opd).values(), student_state(constant).values()))
    opd_gradient = opd_gradient_on(opd, batch)
    assert opd_gradient.abs().max() > 0
    torch.testing.assert_close(hybrid_gradient, 2.0 * opd_gradient, rtol=1e-5, atol=1e-9)

    # A real reward: the hybrid's gradient is GRPO's plus opd_coef x OPD's, on the same scored rollout.
    rewarded = hybrid_trainer(tmp_path / "r", teachers, opd_coef=0.0, **settings)
    batch = rewarded._generate_and_score(rows)
    assert batch.advantages.abs().max() > 0
    gradients = {}
    for coef in (0.0, 2.0):
        rewarded.args.opd_coef = coef
        rewarded.model.zero_grad(set_to_none=True)
        rewarded._policy_update(rewarded.model, batch)
        gradients[coef] = student_gradient(rewarded)
    torch.testing.assert_close(
        gradients[2.0] - gradients[0.0], 2.0 * opd_gradient_on(opd, batch), rtol=1e-4, atol=1e-8
    )


def test_hybrid_trains_logs_and_saves_the_student_only(tmp_path, teacher_dir):
    plain = hybrid_trainer(tmp_path / "plain", max_steps=1)
    plain.save_model()
    trainer = hybrid_trainer(tmp_path / "hybrid", teachers={"t": str(teacher_dir)}, opd_coef=1.0, noise_level=0.7)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "teacher_kl" in entry]
    assert len(logs) == 2 and all(entry["teacher_kl"] > 0 for entry in logs)
    assert trainer.teachers_unchanged() == {"t": True}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for name, p in trainer.model.named_parameters() if ".teacher_" in name)
    trainer.save_model()
    saved = load_file(str(tmp_path / "hybrid" / "out" / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(tmp_path / "plain" / "out" / "pytorch_lora_weights.safetensors"))
    assert saved.keys() == reference.keys()  # the teacher's adapter is not saved
    card = (tmp_path / "hybrid" / "out" / "README.md").read_text()
    assert "opd_coef" in card and str(teacher_dir) in card


def test_hybrid_routes_each_task_to_its_teacher(tmp_path, teacher_dir):
    second = save_random_lora(tiny_sd3_pipeline(), tmp_path / "second", "diffusers", seed=2, std=0.3)
    dataset = Dataset.from_dict({"prompt": PROMPTS, "task": ["a", "b", "a", "b"]})
    trainer = hybrid_trainer(
        tmp_path, teachers={"a": str(teacher_dir), "b": str(second)}, dataset=dataset, opd_coef=1.0, max_steps=1
    )
    rows = [{"prompt": PROMPTS[i], "task": dataset["task"][i]} for i in (0, 1) for _ in range(4)]
    batch = trainer._generate_and_score(rows)
    assert batch.tasks == ["a"] * 4 + ["b"] * 4


@pytest.mark.parametrize(
    "teachers, overrides, dataset, message",
    [
        (None, dict(opd_coef=1.0), None, r"`opd_coef` is 1.0 but no `teachers`"),
        (None, dict(teacher_guidance_scales={"t": 1.0}), None, r"`teacher_guidance_scales` is set but no `teachers`"),
        ({"a": "TEACHER", "b": "TEACHER"}, dict(opd_coef=1.0), None, r"`train_dataset` needs a `task` column"),
        ({"t": "./missing"}, dict(opd_coef=1.0), None, r"Teacher for task 't'.*does not exist"),
    ],
)
def test_hybrid_errors_before_any_work(tmp_path, teacher_dir, teachers, overrides, dataset, message):
    if teachers is not None:
        teachers = {task: str(teacher_dir) if source == "TEACHER" else source for task, source in teachers.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        hybrid_trainer(tmp_path, teachers=teachers, dataset=dataset, **overrides)


def test_opd_coef_must_be_a_non_negative_number(tmp_path):
    with pytest.raises(ValueError, match=r"`opd_coef` must be >= 0"):
        grpo_args(tmp_path, opd_coef=-1.0)
