"""`estimate_memory`: exact parameter counts on the meta device, the calibrated activation term, the levers."""

import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_opd_trainer.estimate import main
from diffusion_opd_trainer.lora import default_lora_config
from diffusion_opd_trainer.memory import ACTIVATION_CALIBRATION, estimate_memory, saved_activation_bytes
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, tiny_sd3_pipeline, tiny_sd3_transformer, tiny_sd_pipeline


SD35_MEDIUM = Path(__file__).parent.parent / "examples" / "configs" / "stable-diffusion-3.5-medium"
GIB = 2**30


def test_saved_activation_bytes_counts_what_autograd_keeps():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    # y = relu(linear(x)): the linear saves its input (x, 128 bytes), relu its output (128 bytes); weights excluded.
    assert saved_activation_bytes(torch.nn.Sequential(linear, torch.nn.ReLU()), input=x) == 2 * 4 * 8 * 4


def test_the_calibration_predicts_a_size_it_was_not_fitted_on():
    """A width, depth and token count outside `benchmarks/memory_calibration.py`'s sizes: within 5%."""
    heads, head_dim, blocks, side, text = 6, 32, 3, 40, 24
    torch.manual_seed(0)
    denoiser = tiny_sd3_transformer(side, blocks, num_attention_heads=heads, attention_head_dim=head_dim)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(default_lora_config(r=32))
    measured = saved_activation_bytes(
        denoiser,
        hidden_states=torch.randn(1, 4, side, side),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, text, 32),
        pooled_projections=torch.randn(1, 32),
        return_dict=False,
    )
    slope, offset = ACTIVATION_CALIBRATION["SD3Family"]
    predicted = blocks * ((side // 2) ** 2 + text) * (slope * heads * head_dim + offset)
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)


def test_sd35_medium_from_its_config_folder_exact_counts_and_the_24gb_goal():
    """The paper's recipe: OPD with 3 teachers at 512 px, batch 1, CFG on; the levers take it far below 24 GiB."""
    from diffusion_opd_trainer.model_sizes import REAL_SCALE_DENOISERS

    off = estimate_memory(SD35_MEDIUM, num_teachers=3, resolution=512, guidance_scale=4.5)
    assert off.parts["denoiser weights"] == 2_243_171_520 * 2
    # CLIP-L (123.7 M) + CLIP-G (694.7 M) + T5-XXL's encoder (4.762 B), in bf16.
    assert off.parts["text encoders"] == (123_650_304 + 694_659_840 + 4_762_310_656) * 2
    assert off.parts["teacher adapters"] == 3 * 23_887_872 * 2
    assert off.parts["student LoRA, gradients, AdamW"] == 23_887_872 * 16
    name = "activations (2 images with gradients at 512 px)"  # CFG: both halves carry gradients
    assert name in off.parts and "1357 tokens" in off.notes[name]  # 32 x 32 latent patches + 77 CLIP + 256 T5
    on = estimate_memory(
        SD35_MEDIUM,
        num_teachers=3,
        resolution=512,
        guidance_scale=4.5,
        gradient_checkpointing=True,
        optimizer_8bit=True,
        text_encoders_on_device=False,
        vae_on_device=False,
    )
    assert on.parts["text encoders"] == on.parts["VAE"] == 0
    assert on.parts[name] < off.parts[name] / 5
    assert on.total < 6 * GIB  # the goal: under 24 GiB with the levers on
    assert off.total - on.total > 10 * GIB  # mostly T5-XXL
    assert "| **total** |" in on.table()
    # The folder's transformer is the one the sizes table counts.
    config = {k: v for k, v in __import__("json").loads((SD35_MEDIUM / "transformer/config.json").read_text()).items()}
    expected = dict(REAL_SCALE_DENOISERS["SD3.5-Medium"]["config"], dual_attention_layers=list(range(13)))
    assert {k: config[k] for k in expected} == expected


def test_a_family_without_calibration_says_so(capsys):
    estimate = estimate_memory(tiny_sd_pipeline(), guidance_scale=1.0)
    name = next(k for k in estimate.parts if k.startswith("activations"))
    assert estimate.parts[name] is None and "not calibrated for SDFamily" in estimate.notes[name]
    assert "not estimated" in estimate.table() and "without the parts not estimated" in estimate.table()


def test_the_command_line_prints_the_table(capsys):
    main([str(SD35_MEDIUM), "--num_teachers", "3", "--resolution", "512", "--text_encoder_offload", "cpu"])
    out = capsys.readouterr().out
    assert "| text encoders | 0.00 |" in out and "| teacher adapters | 0.13 |" in out


def test_the_trainers_log_the_estimate_when_training_starts(tmp_path, caplog):
    args = DiffusionGRPOConfig(
        **dict(
            TINY_TRAINING_ARGS, max_steps=1, output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2
        )
    )
    trainer = DiffusionGRPOTrainer(
        tiny_sd3_pipeline(),
        reward_funcs=lambda prompts, images, **kwargs: images.mean(dim=(1, 2, 3)).tolist(),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "a cat"]}),
    )
    with caplog.at_level(logging.INFO, logger="diffusion_opd_trainer.trainer_base"):
        trainer.train()
    logged = [r.getMessage() for r in caplog.records if "Memory estimate" in r.getMessage()]
    assert (
        len(logged) == 1 and "| denoiser weights |" in logged[0] and "| student LoRA, gradients, AdamW |" in logged[0]
    )
    estimate = trainer.log_memory_estimate()
    student = sum(p.numel() for n, p in trainer.family.denoiser.named_parameters() if "lora_" in n)
    assert estimate.parts["student LoRA, gradients, AdamW"] == student * 16


@pytest.mark.parametrize("bad", ["missing-folder"])
def test_a_folder_without_model_index_is_a_clear_error(tmp_path, bad):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        estimate_memory(tmp_path / bad)
