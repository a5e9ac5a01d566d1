"""
The teacher pass batched across tasks (`targets.teacher_means`, `lora.mixed_adapters`): one denoiser forward for the
rows of every teacher, equal to one forward per task up to float rounding, on a transformer (SD3) and a UNet (SD 1.5).
"""

import logging

import pytest
import torch
from peft import LoraConfig

from diffusion_opd_trainer import targets
from diffusion_opd_trainer.lora import (
    STUDENT_ADAPTER,
    MixedAdapterBatchError,
    add_student_adapter,
    lora_parameters,
    mixed_adapters,
)
from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.targets import teacher_means
from diffusion_opd_trainer.teachers import load_teachers
from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline, tiny_sd_pipeline


PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog", "a red square", "two cats"]
TASKS = ["a", "b", "c", "b", "a", "c"]
STUDENT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Each teacher covers other modules: "a" the family's default targets (SD3's include the joint blocks' `add_*_proj`,
# which the student does not cover), "b" two projections, "c" the feed-forward output too.
TEACHER_TARGETS = {"a": None, "b": ["to_q", "to_v"], "c": ["to_k", "to_out.0", "ff.net.2"]}
FAMILIES = {"sd3": tiny_sd3_pipeline, "sd": tiny_sd_pipeline}


def setup(tmp_path, name):
    """A tiny pipeline with a random (non-zero) student LoRA and three teachers on its denoiser."""
    pipe = FAMILIES[name]()
    sources = {
        task: save_random_lora(pipe, tmp_path / task, "peft", seed=i + 1, std=0.3, target_modules=modules)
        for i, (task, modules) in enumerate(TEACHER_TARGETS.items())
    }
    family = get_family(pipe)
    denoiser = family.denoiser
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=STUDENT_TARGETS)
    params = add_student_adapter(denoiser, config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in params:  # a trained-looking student: its LoRA would show if it leaked into a teacher row
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    teachers = load_teachers(denoiser, sources, family.denoiser_name)
    family.set_timesteps(4, 32, 32)
    x = torch.randn(len(TASKS), 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return family, teachers, x, family.scheduler.timesteps[1], family.encode_prompts(PROMPTS)


def denoiser_state(denoiser):
    """What must survive a teacher pass: active adapters, enabled state, `requires_grad`, no hook left."""
    layers = [m for m in denoiser.modules() if hasattr(m, "active_adapters") and hasattr(m, "lora_A")]
    return (
        [(list(m.active_adapters), m.disable_adapters, len(m._forward_pre_hooks)) for m in layers],
        [(n, p.requires_grad) for n, p in denoiser.named_parameters()],
    )


def count_forwards(denoiser):
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize(
    "scales, forwards",
    [
        ({"a": 4.5, "b": 2.0, "c": 4.5}, 1),  # two CFG scales: one CFG forward, each row combined with its own
        ({"a": 4.5, "b": 1.0, "c": 3.0}, 2),  # a CFG-free teacher: its rows in a forward of their own (no negative)
    ],
)
def test_batched_teacher_means_equal_per_task_ones(tmp_path, name, scales, forwards):
    family, teachers, x, t, embeds = setup(tmp_path, name)
    denoiser = family.denoiser
    before = denoiser_state(denoiser)
    kwargs = dict(guidance_scales=scales, noise_level=0.7)
    per_task = teacher_means(family, teachers, x, t, embeds, TASKS, batched=False, **kwargs)
    calls, handle = count_forwards(denoiser)
    batched = teacher_means(family, teachers, x, t, embeds, TASKS, **kwargs)
    handle.remove()
    assert len(calls) == forwards
    torch.testing.assert_close(batched, per_task, rtol=0, atol=1e-5)
    # Not trivially equal: each teacher moves its rows away from the others' and from the student's.
    for task in ("b", "c"):
        assert not torch.allclose(per_task[0], teacher_means(family, teachers, x, t, embeds, [task] * 6, **kwargs)[0])
    assert denoiser_state(denoiser) == before
    assert all(p.requires_grad for p in lora_parameters(denoiser, STUDENT_ADAPTER).values())
    assert not any(p.requires_grad for task in teachers for p in lora_parameters(denoiser, f"teacher_{task}").values())


def test_the_student_forward_is_unchanged_by_a_batched_teacher_pass(tmp_path):
    family, teachers, x, t, embeds = setup(tmp_path, "sd3")
    with torch.no_grad():
        student = family.predict(x, t, embeds, 4.5)
        teacher_means(family, teachers, x, t, embeds, TASKS, guidance_scales=dict.fromkeys("abc", 4.5), noise_level=0)
        after = family.predict(x, t, embeds, 4.5)
    assert torch.equal(student, after)


def test_rows_that_are_not_the_batch_cannot_be_routed(tmp_path):
    family, teachers, x, t, embeds = setup(tmp_path, "sd3")
    names = [teachers[task].adapter_name for task in TASKS]
    with pytest.raises(ValueError, match="no adapter"):
        with mixed_adapters(family.denoiser, ["teacher_z"] * 6):
            pass
    # Three rows for a forward of six (or twelve under CFG): refused, never guessed.
    with pytest.raises(MixedAdapterBatchError, match="input rows"):
        with torch.no_grad(), mixed_adapters(family.denoiser, names[:3]):
            family.predict(x, t, embeds, 4.5)
    assert all(not m._forward_pre_hooks for m in family.denoiser.modules() if hasattr(m, "lora_A"))


def test_a_denoiser_without_mixed_batches_falls_back_to_one_forward_per_task(tmp_path, monkeypatch, caplog):
    family, teachers, x, t, embeds = setup(tmp_path, "sd")
    kwargs = dict(guidance_scales={"a": 4.5, "b": 2.0, "c": 4.5}, noise_level=0.0)
    per_task = teacher_means(family, teachers, x, t, embeds, TASKS, batched=False, **kwargs)

    def refuse(denoiser, names):
        raise MixedAdapterBatchError("the LoRA layer 'x' takes no mixed batch")

    monkeypatch.setattr(targets, "mixed_adapters", refuse)
    with caplog.at_level(logging.WARNING, logger="diffusion_opd_trainer.targets"):
        means = teacher_means(family, teachers, x, t, embeds, TASKS, **kwargs)
    assert "one forward per task" in caplog.text
    assert torch.equal(means, per_task)
    assert family.denoiser in targets._NO_MIXED_BATCHES  # not tried again
