"""
Seeded GRPO and OPD runs give bit-identical LoRA weights: the checksums below were recorded before the code-shape
refactor (issue 11), so that moving the training loop, the losses and the targets into their own modules provably
changes nothing. A change that is meant to alter the numbers must re-record them (and say so).
"""

import hashlib

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.lora import STUDENT_ADAPTER, adapter_state_dict
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora, tiny_sd3_pipeline, tiny_sd_pipeline


PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog"]
LORA = dict(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
COMMON = TINY_TRAINING_ARGS

GRPO_CHECKSUMS = {
    "beta0": "e3b630597a9763a86dbe8a563c4b4502d24d8c6dcd0d64148cab890676436d18",
    "beta_kl_cfg": "237fbedf48231b78ce06bbbc9e73a7e854bf68334bc72a2eb994c2b30797a25f",
    "window_shared_noise_cosine": "2237db4878475a7a00332912e9d6dc33afcd3ef148deb43e920d91884e768ec0",
    "iterations2": "54afb4cfaee63d39ea7491ccc2e9e7f69f54ae925c9a197e62f2f4fdbc2fedc9",
    "sd_ddim": "54d9bd5cc66e1af6553b46e5c094875cc5d2e359a9fd1059d7f8aff36187ad23",
}
# The ODE's fused and two-pass schedules compute the same gradient, to the bit: their checksums agree.
OPD_CHECKSUMS = {
    "fused_ode_analytic": "e25841c11e2ed2b10b54f6015edb18585acc5be4c0ea71c8cde8c66029963260",
    "two_pass_ode_analytic": "e25841c11e2ed2b10b54f6015edb18585acc5be4c0ea71c8cde8c66029963260",
    "fused_sde_policy_gradient_cosine": "831e929912448c50837d9cffe55034aaa33ffa1e1b420b8c026ca57e277f237a",
    "two_pass_sde_score_function": "955254d5dc4dc89bb91e5f2f66f83955cd51e4e941c08bcb7fb62afa25a1bc3d",
    "two_pass_sde_exact_iterations2": "9bdecd1735c953109dc4bf78c54df52d6092adf93ac99ce454be07fd0fc797af",
    "fused_sde_sigma_analytic": "057b368db526fd9562ef43ed5f7f63c5510e2d69c5ef0c9ec0f8d6e20cf756b1",
}
GRPO_CASES = {
    "beta0": dict(beta=0.0),
    "beta_kl_cfg": dict(beta=0.04, guidance_scale=3.0),
    "window_shared_noise_cosine": dict(
        beta=0.04, sde_window_size=1, share_initial_noise=True, log_gradient_cosine=True
    ),
    "iterations2": dict(beta=0.0, num_iterations=2, kl_scaling="exact", per_prompt_stat_tracking=True),
    "sd_ddim": dict(beta=0.04, kl_scaling="exact", scale_rewards="group"),
}
OPD_CASES = {
    "fused_ode_analytic": dict(rollout_schedule="fused"),
    "two_pass_ode_analytic": dict(rollout_schedule="two_pass"),
    "fused_sde_policy_gradient_cosine": dict(
        rollout_schedule="fused", noise_level=0.7, loss_type="policy_gradient", log_gradient_cosine=True
    ),
    "two_pass_sde_score_function": dict(rollout_schedule="two_pass", noise_level=0.7, loss_type="score_function"),
    "two_pass_sde_exact_iterations2": dict(rollout_schedule="two_pass", noise_level=0.7, num_iterations=2),
    "fused_sde_sigma_analytic": dict(rollout_schedule="fused", noise_level=0.7, kl_scaling="sigma"),
}


def lora_checksum(trainer) -> str:
    """SHA-256 of the student LoRA's weights, key by key in sorted order (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for key, value in sorted(adapter_state_dict(trainer.unwrapped_denoiser, STUDENT_ADAPTER).items()):
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.float().numpy().tobytes())
    return digest.hexdigest()


def image_mean_reward(prompts, images, **kwargs):
    return (images[:, 0] - images[:, 2]).mean(dim=(1, 2)).tolist()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("checksum_teachers")
    pipe = tiny_sd3_pipeline()
    return {
        "a": save_random_lora(pipe, root / "a", "peft", seed=1, std=0.3),
        "b": save_random_lora(pipe, root / "b", "diffusers", seed=2, std=0.3),
    }


@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_grpo_weights_are_bit_identical(tmp_path, case):
    torch.set_num_threads(1)
    args = DiffusionGRPOConfig(
        output_dir=str(tmp_path / "out"),
        **{**COMMON, "per_device_train_batch_size": 4, "num_generations": 2, **GRPO_CASES[case]},
    )
    trainer = DiffusionGRPOTrainer(
        tiny_sd_pipeline(seed=0) if case.startswith("sd_") else tiny_sd3_pipeline(seed=0),
        reward_funcs=image_mean_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
    )
    initial = lora_checksum(trainer)
    trainer.train()
    assert lora_checksum(trainer) != initial
    assert lora_checksum(trainer) == GRPO_CHECKSUMS[case]


@pytest.mark.parametrize("case", sorted(OPD_CASES))
def test_opd_weights_are_bit_identical(tmp_path, teachers, case):
    torch.set_num_threads(1)
    args = DiffusionOPDConfig(
        output_dir=str(tmp_path / "out"), **{**COMMON, "per_device_train_batch_size": 2, **OPD_CASES[case]}
    )
    trainer = DiffusionOPDTrainer(
        tiny_sd3_pipeline(seed=0),
        teachers={task: str(path) for task, path in teachers.items()},
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "task": ["a", "b", "a", "b"]}),
        peft_config=LoraConfig(**LORA),
    )
    initial = lora_checksum(trainer)
    trainer.train()
    assert lora_checksum(trainer) != initial
    assert lora_checksum(trainer) == OPD_CHECKSUMS[case]
