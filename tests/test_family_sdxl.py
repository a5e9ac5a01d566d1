"""The SDXL family: parity with `StableDiffusionXLPipeline`, training, saving, teachers, the scheduler error.

Guidance semantics (SDXL): `guidance_scale`, in `rollout`, `PipelineFamily.predict` and the trainers' configs, is the
pipeline's classifier-free guidance scale (1 disables it: one forward, no negative prompt). For an LCM-style UNet with
a guidance embedding (`time_cond_proj_dim`) it is the embedded guidance and no CFG runs, as in the pipeline. The
library's default negative prompt `""` is the pipeline's default (no negative prompt): all-zero negative conditioning
with `force_zeros_for_empty_prompt`, the released configs' setting. The kernel is DDIM with eta = noise level.
"""

import time

import pytest
import torch
from datasets import Dataset
from diffusers import EulerDiscreteScheduler
from family_training import (
    check_grpo_trains_and_reloads,
    check_grpo_with_default_kernel_settings,
    check_opd_with_three_teacher_formats,
    grpo_trainer,
    teachers_in_two_formats,
)

from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.pipelines import get_family
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora, tiny_sdxl_pipeline


PROMPTS = ["a red circle", "two blue squares", "a photo of a cat"]


def pipeline_images(pipe, prompts, seed=0, steps=4, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images


def ode_images(pipe, prompts, seed=0, steps=4, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return rollout(
        pipe, prompts, num_inference_steps=steps, noise_level=0.0, generator=generator, decode=True, **kwargs
    ).images


def test_tiny_sdxl_pipeline_builds_fast_offline_and_deterministic():
    start = time.process_time()  # CPU time: the wall clock of a shared machine says little
    pipe = tiny_sdxl_pipeline(seed=1)
    assert time.process_time() - start < 1.0
    for (name, p), q in zip(pipe.unet.named_parameters(), tiny_sdxl_pipeline(seed=1).unet.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_sdxl_ode_rollout_gives_the_pipelines_images(guidance_scale):
    """DDIM at eta 0 = the pipeline's sampler; no negative prompt on either side (zeros with CFG)."""
    pipe = tiny_sdxl_pipeline()
    expected = pipeline_images(pipe, PROMPTS, guidance_scale=guidance_scale)
    got = ode_images(pipe, PROMPTS, guidance_scale=guidance_scale)
    assert got.shape == (3, 3, 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_sdxl_negative_prompt_and_guidance_embedding_give_the_pipelines_images():
    pipe = tiny_sdxl_pipeline()
    expected = pipeline_images(pipe, PROMPTS, guidance_scale=5.0, negative_prompt="text")
    got = ode_images(pipe, PROMPTS, guidance_scale=5.0, negative_prompt="text")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (got - ode_images(pipe, PROMPTS, guidance_scale=5.0)).abs().max() > 1e-4  # "" is not "text"
    lcm = tiny_sdxl_pipeline(time_cond_proj_dim=8)
    assert get_family(lcm).cfg_scale(5.0) == 1.0  # embedded: no CFG forward
    torch.testing.assert_close(
        ode_images(lcm, PROMPTS, guidance_scale=5.0),
        pipeline_images(lcm, PROMPTS, guidance_scale=5.0),
        rtol=0,
        atol=1e-4,
    )


def test_sdxl_sde_rollout_has_finite_log_probs():
    trajectory = rollout(
        tiny_sdxl_pipeline(),
        PROMPTS,
        num_inference_steps=4,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert trajectory.latents.shape == (3, 5, 4, 16, 16)
    assert trajectory.log_probs.shape == (3, 4) and torch.isfinite(trajectory.log_probs).all()


def test_sdxl_default_lora_targets_cover_every_attention_projection():
    from peft import LoraConfig

    family = get_family(tiny_sdxl_pipeline())
    unet = family.denoiser
    unet.add_adapter(LoraConfig(r=2, target_modules=family.lora_target_modules(ffn=True)))
    covered = {name.rsplit(".lora_A", 1)[0] for name, _ in unet.named_parameters() if ".lora_A." in name}
    blocks = {name.rsplit(".", 1)[0] for name, _ in unet.named_modules() if name.endswith(".attn1")}
    attention = {
        f"{b}.{a}.{p}" for b in blocks for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")
    }
    ffn = {f"{b}.ff.{p}" for b in blocks for p in ("net.0.proj", "net.2")}
    assert covered == attention | ffn
    assert len(blocks) == 4  # the down, mid and two up transformer blocks: self- and cross-attention in each
    unet.delete_adapters(["default"])
    unet.add_adapter(LoraConfig(r=2, target_modules=family.lora_target_modules()))
    assert {name.rsplit(".lora_A", 1)[0] for name, _ in unet.named_parameters() if ".lora_A." in name} == attention


def test_sdxl_euler_scheduler_is_a_clear_error_before_training(tmp_path):
    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TypeError, match="EulerDiscreteScheduler.*DDIMScheduler.from_config"):
        grpo_trainer(tmp_path, pipe, PROMPTS[:2])


def trained_images(pipe, prompts):
    return ode_images(pipe, prompts, guidance_scale=5.0)


def reference_images(pipe, prompts):
    return pipeline_images(pipe, prompts, guidance_scale=5.0)


def test_sdxl_grpo_trains_two_steps_and_the_saved_lora_loads_in_the_pipeline(tmp_path):
    check_grpo_trains_and_reloads(
        tmp_path, tiny_sdxl_pipeline, PROMPTS, trained_images, reference_images, guidance_scale=5.0
    )


def test_sdxl_grpo_with_the_configs_default_kernel_settings(tmp_path):
    check_grpo_with_default_kernel_settings(
        tmp_path, tiny_sdxl_pipeline(), PROMPTS, keys=("noise_level", "beta", "kl_scaling"), guidance_scale=5.0
    )


def test_sdxl_opd_with_peft_diffusers_and_hub_teachers(tmp_path_factory, tmp_path, local_hub):
    teachers = teachers_in_two_formats(tmp_path_factory.mktemp("sdxl_teachers"), tiny_sdxl_pipeline())
    check_opd_with_three_teacher_formats(
        tmp_path,
        tiny_sdxl_pipeline,
        teachers,
        local_hub,
        PROMPTS,
        trained_images,
        reference_images,
        guidance_scale=5.0,
    )


def test_an_sdxl_unet_lora_given_to_a_transformer_names_both_architectures(tmp_path):
    from diffusion_opd_trainer.testing import tiny_sd3_pipeline

    lora = save_random_lora(tiny_sdxl_pipeline(), tmp_path / "sdxl_lora", "diffusers")
    args = DiffusionOPDConfig(
        **dict(TINY_TRAINING_ARGS, output_dir=str(tmp_path / "out"), per_device_train_batch_size=2)
    )
    dataset = Dataset.from_dict({"prompt": ["a red circle", "a cat"], "task": ["ocr", "ocr"]})
    with pytest.raises(
        ValueError, match=r"task 'ocr'.*sdxl_lora.*a UNet \(UNet2DConditionModel.*SDXL\).*SD3Transformer2DModel"
    ):
        DiffusionOPDTrainer(tiny_sd3_pipeline(), teachers={"ocr": lora}, args=args, train_dataset=dataset)
