"""
The training checks every pipeline family's tests run, with the family's own pipeline builder and image samplers:
GRPO for two steps and its LoRA reloaded in the plain pipeline, OPD with teachers in three formats (PEFT folder,
diffusers file, Hub id), GRPO at the config's default kernel settings.
"""

from collections.abc import Callable

import torch
from datasets import Dataset

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora


OPD_PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog"]
#: `images(pipe, prompts)`: a family's images for prompts, from our rollout or from the pipeline's own `__call__`.
Sampler = Callable[[object, list[str]], torch.Tensor]


def brightness(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def lora_modules(pipe, targets, denoiser_name: str = "transformer") -> set[str]:
    """The module names a LoRA on `targets` adapts in the pipeline's denoiser."""
    from peft import LoraConfig

    denoiser = getattr(pipe, denoiser_name)
    denoiser.add_adapter(LoraConfig(r=2, target_modules=targets))
    return {name.rsplit(".lora_A", 1)[0] for name, _ in denoiser.named_parameters() if ".lora_A." in name}


def grpo_trainer(tmp_path, pipe, prompts: list[str], **overrides) -> DiffusionGRPOTrainer:
    """GRPO on the brightness reward: 2 prompts x 2 generations a step, beta 0, the tiny test settings."""
    values = dict(
        TINY_TRAINING_ARGS,
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        beta=0.0,
    )
    values.update(overrides)
    return DiffusionGRPOTrainer(
        pipe,
        reward_funcs=brightness,
        args=DiffusionGRPOConfig(**values),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )


def opd_trainer(tmp_path, pipe, teachers: dict, **overrides) -> DiffusionOPDTrainer:
    """OPD over four prompts whose tasks take the teachers in turn, 3 rollout steps, the tiny test settings."""
    values = dict(
        TINY_TRAINING_ARGS, output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_inference_steps=3
    )
    values.update(overrides)
    tasks = list(teachers)
    return DiffusionOPDTrainer(
        pipe,
        teachers=teachers,
        args=DiffusionOPDConfig(**values),
        train_dataset=Dataset.from_dict(
            {"prompt": OPD_PROMPTS, "task": [tasks[i % len(tasks)] for i in range(len(OPD_PROMPTS))]}
        ),
    )


def teachers_in_two_formats(root, pipe, **lora_kwargs) -> tuple:
    """Two random teacher LoRAs of `pipe`: a PEFT folder and a diffusers `pytorch_lora_weights.safetensors` file."""
    peft_dir = save_random_lora(pipe, root / "peft", "peft", seed=1, std=0.3, **lora_kwargs)
    diffusers_dir = save_random_lora(pipe, root / "diffusers", "diffusers", seed=2, std=0.3, **lora_kwargs)
    return peft_dir, f"{diffusers_dir}/pytorch_lora_weights.safetensors"


def check_grpo_trains_and_reloads(
    tmp_path,
    build: Callable[[], object],
    prompts: list[str],
    trained_images: Sampler,
    pipeline_images: Sampler,
    min_change: float = 1e-5,
    **overrides,
) -> None:
    """
    Two GRPO steps on `build()`'s pipeline; the saved LoRA, loaded by a fresh pipeline's own `load_lora_weights`, gives
    the trained pipeline's images and moves them off the base model's.
    """
    trainer = grpo_trainer(tmp_path, build(), prompts[:2], **overrides)
    trainer.train()
    assert trainer.state.global_step == 2
    trainer.save_model(str(tmp_path / "lora"))
    trained = trained_images(trainer.pipeline, prompts)
    fresh = build()
    base = pipeline_images(fresh, prompts)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    reloaded = pipeline_images(fresh, prompts)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-4)
    assert (reloaded - base).abs().max() > min_change  # the LoRA trained, and loaded


def check_opd_with_three_teacher_formats(
    tmp_path,
    build: Callable[[], object],
    teachers: tuple,
    local_hub,
    prompts: list[str],
    trained_images: Sampler,
    pipeline_images: Sampler,
    **overrides,
) -> None:
    """
    OPD with a PEFT-folder, a diffusers-file and a Hub-id teacher: two steps with a positive KL, the teachers
    unchanged, the student reloaded in a fresh pipeline giving the trained pipeline's images.
    """
    peft_dir, diffusers_file = teachers
    local_hub(peft_dir, "user/teachers", "ocr")
    trainer = opd_trainer(
        tmp_path, build(), {"a": peft_dir, "b": diffusers_file, "c": "user/teachers/ocr@main"}, **overrides
    )
    assert [trainer.teachers[t].format for t in "abc"] == ["peft", "diffusers", "peft"]
    trainer.train()
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert len(kls) == 2 and all(kl > 0 for kl in kls)
    assert trainer.teachers_unchanged() == {"a": True, "b": True, "c": True}
    trainer.save_model(str(tmp_path / "student"))
    fresh = build()
    fresh.load_lora_weights(str(tmp_path / "student"))
    torch.testing.assert_close(
        pipeline_images(fresh, prompts[:2]), trained_images(trainer.pipeline, prompts[:2]), rtol=0, atol=1e-4
    )


def check_grpo_with_default_kernel_settings(
    tmp_path, pipe, prompts: list[str], keys=("noise_level", "beta", "kl_scaling", "guidance_scale"), **overrides
) -> None:
    """GRPO with the config's defaults for `keys` (noise 0.7, beta 0.04, sigma scaling, CFG 4.5): two finite steps."""
    defaults = DiffusionGRPOConfig(output_dir=str(tmp_path / "defaults"))
    values = {key: getattr(defaults, key) for key in keys}
    trainer = grpo_trainer(tmp_path, pipe, prompts[:2], **{**overrides, **values})
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    assert trainer._nonfinite_steps == 0
