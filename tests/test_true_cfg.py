"""Trainer-level true CFG (`DiffusionTrainingConfig.true_cfg_scale`): Flux.1-dev's `true_cfg_scale` in training."""

import pytest
import torch
from family_training import grpo_trainer

from diffusion_opd_trainer import DiffusionGRPOConfig
from diffusion_opd_trainer.evaluation import sample_images
from diffusion_opd_trainer.testing import tiny_flux_pipeline, tiny_sd3_pipeline


PROMPTS = ["a red circle", "two blue squares"]


def make_trainer(tmp_path, pipe, **overrides):
    """GRPO over the two prompts, one group of 2 a step."""
    return grpo_trainer(tmp_path, pipe, PROMPTS, per_device_train_batch_size=2, **overrides)


def test_true_cfg_scale_reaches_the_flux_family_and_samples_as_the_pipeline(tmp_path):
    pipe = tiny_flux_pipeline()
    trainer = make_trainer(tmp_path, pipe, guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt="text")
    assert trainer.family.cfg_scale(3.5) == 4.0  # the trainer's rollouts and teacher means run true CFG
    expected = pipe(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=3.5,
        true_cfg_scale=4.0,
        negative_prompt="text",
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="pt",
        max_sequence_length=8,
    ).images
    got = sample_images(
        pipe, PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=3.5, negative_prompt="text", true_cfg_scale=4.0
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    trainer.train()
    assert trainer.state.global_step == 2


def test_true_cfg_scale_is_an_error_where_guidance_scale_is_already_cfg(tmp_path):
    with pytest.raises(ValueError, match="true_cfg_scale.*SD3Family.*guidance_scale"):
        make_trainer(tmp_path, tiny_sd3_pipeline(), true_cfg_scale=4.0)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        DiffusionGRPOConfig(output_dir=str(tmp_path), true_cfg_scale=0.5)
