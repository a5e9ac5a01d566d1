"""
The memory levers: prompts encoded up front with the text encoders offloaded (`text_encoder_offload="cpu"`) or
released (`"free"`), the VAE on the accelerator only while it decodes (`offload_vae`), 8-bit AdamW (bitsandbytes'
CPU optimizer). On a machine without an accelerator every device is the CPU: the tests check what the levers change
that a CPU can see (which modules exist, which forwards run, which prompts are encoded, which moves are asked for,
the results); the memory they save on a GPU is `benchmarks/gpu_check.py`'s to measure.
"""

import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from test_grpo import LORA, PROMPTS, grpo_args, make_pattern_reward

from diffusion_opd_trainer import DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer, EvaluationCallback
from diffusion_opd_trainer.lora import adapter_state_dict
from diffusion_opd_trainer.memory import estimate_memory
from diffusion_opd_trainer.pipelines import TextEncodersReleasedError, get_family
from diffusion_opd_trainer.pipelines.base import modules_on
from diffusion_opd_trainer.rollout import rollout
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora, tiny_sd3_pipeline


EVAL_PROMPTS = ["a green star", "three cats"]
CALLBACK_PROMPTS = ["a yellow moon"]
SD35_MEDIUM = Path(__file__).parent.parent / "examples" / "configs" / "stable-diffusion-3.5-medium"


def grpo_trainer(tmp_path, pipe=None, **overrides):
    """GRPO on the pattern reward with an evaluation dataset and an evaluation callback of a third prompt set."""
    pipe = pipe or tiny_sd3_pipeline()
    reward = make_pattern_reward(pipe)
    callback = EvaluationCallback(pipe, CALLBACK_PROMPTS, [reward], eval_steps=1, num_inference_steps=2)
    return DiffusionGRPOTrainer(
        pipe,
        reward_funcs=reward,
        args=grpo_args(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": EVAL_PROMPTS}),
        peft_config=LoraConfig(**LORA),
        callbacks=[callback],
    )


def count_encodes(trainer) -> list[list[str]]:
    """Records the prompts of every text-encoder pass of the trainer's family from now on."""
    calls = []
    family = trainer.family
    encode = family._encode

    def recording(prompts, max_sequence_length):
        calls.append(list(prompts))
        return encode(prompts, max_sequence_length)

    family._encode = recording
    return calls


def test_released_text_encoders_train_and_evaluate_as_the_encoders_on_device(tmp_path):
    """
    `"free"`: every prompt of the run (training, evaluation, the callback's) is encoded before training, the
    encoders leave the pipeline, and training, `evaluate` and the callback give what the default gives.
    """
    plain = grpo_trainer(tmp_path / "plain")
    plain.train()
    plain_eval = plain.evaluate()

    freed = grpo_trainer(tmp_path / "free", text_encoder_offload="free")
    pipe = freed.pipeline
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    assert freed.family.text_encoders == {}
    freed.train()
    freed_eval = freed.evaluate()

    trained, reference = adapter_state_dict(freed.model), adapter_state_dict(plain.model)
    assert trained.keys() == reference.keys()
    assert all(torch.allclose(trained[key], reference[key], rtol=0, atol=1e-6) for key in trained)
    assert freed_eval["eval_reward"] == pytest.approx(plain_eval["eval_reward"], abs=1e-5)
    callback = next(c for c in freed.callback_handler.callbacks if isinstance(c, EvaluationCallback))
    assert len(callback.results) == 2  # every step, and each saw the callback's prompt encoded up front

    # A prompt that was not encoded up front is an error naming it and the setting, from any family of the pipeline.
    with pytest.raises(TextEncodersReleasedError, match="a red dog.*text_encoder_offload"):
        freed.encode(["a red dog"])
    with pytest.raises(TextEncodersReleasedError, match="a red dog"):
        rollout(pipe, ["a red dog"], num_inference_steps=2, guidance_scale=4.5)


def test_cpu_offload_encodes_every_prompt_once_up_front_and_later_prompts_still_work(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="diffusion_opd_trainer.trainer_base"):
        trainer = grpo_trainer(tmp_path, text_encoder_offload="cpu", max_steps=2)
    assert "Encoded 7 prompt(s) up front" in caplog.text  # 4 training, 2 evaluation, 1 callback
    assert set(trainer.family.text_encoders) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    calls = count_encodes(trainer)
    trainer.train()
    trainer.evaluate()
    assert calls == []  # training, evaluation and the callback ran on the prompts encoded up front
    # A new prompt borrows the encoders (back on the accelerator for its pass): the same embeddings as on-device.
    fresh = trainer.encode(["a red dog"])
    assert calls == [["a red dog"]]
    expected = get_family(tiny_sd3_pipeline()).encode_prompts(["a red dog"], cache=False)
    assert torch.allclose(fresh.cond["encoder_hidden_states"], expected.cond["encoder_hidden_states"], atol=1e-6)


def test_modules_on_moves_only_what_is_elsewhere_and_moves_it_back():
    class Recording(torch.nn.Linear):
        def __init__(self, device="cpu"):
            super().__init__(2, 2, device=device)
            self.moves = []

        def to(self, device):
            self.moves.append(torch.device(device))
            return self

    target = torch.device("meta")  # a device other than the CPU
    offloaded, resident = Recording(), Recording(device=target)
    with modules_on([offloaded, resident], target):
        assert offloaded.moves == [target]
    assert offloaded.moves == [target, torch.device("cpu")]  # back where it was
    assert resident.moves == []
    with pytest.raises(RuntimeError), modules_on([offloaded], target):  # moved back after an error too
        raise RuntimeError
    assert offloaded.moves[-1] == torch.device("cpu")


def test_vae_offload_default_follows_whether_training_decodes(tmp_path):
    pipe = tiny_sd3_pipeline()
    teacher = save_random_lora(pipe, tmp_path / "teacher", "peft", seed=1)
    data = Dataset.from_dict({"prompt": PROMPTS})

    def opd(**kwargs):
        args = DiffusionOPDConfig(**dict(TINY_TRAINING_ARGS, output_dir=str(tmp_path / "out"), **kwargs))
        return DiffusionOPDTrainer(tiny_sd3_pipeline(), teachers={"t": str(teacher)}, args=args, train_dataset=data)

    assert opd().offload_vae  # nothing decodes: the VAE stays off the accelerator
    assert not opd(log_images_steps=5).offload_vae
    assert not opd(offload_vae=False).offload_vae
    assert not grpo_trainer(tmp_path / "grpo").offload_vae  # rewards decode every step
    assert grpo_trainer(tmp_path / "grpo2", offload_vae=True).offload_vae
    # The estimate logged at the start of training counts what the trainer keeps where.
    estimate = opd().log_memory_estimate()
    assert estimate.parts["VAE"] == 0 and estimate.levers["vae_on_device"] is False


def test_the_estimate_reads_the_levers_from_the_config(tmp_path):
    args = DiffusionOPDConfig(
        **dict(TINY_TRAINING_ARGS, output_dir=str(tmp_path)), text_encoder_offload="free", offload_vae=True
    )
    on = estimate_memory(SD35_MEDIUM, args, num_teachers=3, resolution=512)
    off = estimate_memory(SD35_MEDIUM, num_teachers=3, resolution=512)
    assert on.parts["text encoders"] == on.parts["VAE"] == 0
    assert off.parts["text encoders"] > 10 * 2**30 and off.parts["VAE"] > 0


def test_bad_offload_setting_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="`text_encoder_offload` must be one of"):
        DiffusionOPDConfig(**dict(TINY_TRAINING_ARGS, output_dir=str(tmp_path)), text_encoder_offload="gpu")


def test_8bit_adamw_trains_with_8bit_state(tmp_path):
    """`optim="adamw_bnb_8bit"`: bitsandbytes' 8-bit AdamW: moments of tensors of 4,096+ values take 8 bits."""
    import bitsandbytes

    pipe = tiny_sd3_pipeline()
    reward = make_pattern_reward(pipe)
    # Rank 128 on the tiny transformer's 32-wide projections: 4,096-value LoRA matrices, quantised by bitsandbytes.
    lora = LoraConfig(r=128, lora_alpha=128, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    trainer = DiffusionGRPOTrainer(
        pipe,
        reward_funcs=reward,
        args=grpo_args(tmp_path, optim="adamw_bnb_8bit", learning_rate=1e-3),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=lora,
    )
    before = {k: v.clone() for k, v in adapter_state_dict(trainer.model).items()}
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    # transformers builds bitsandbytes' AdamW with `optim_bits=8`.
    assert isinstance(optimizer, bitsandbytes.optim.AdamW) and optimizer.args.optim_bits == 8
    states = [state for state in optimizer.state.values() if state]
    assert states and all(state["state1"].dtype == torch.uint8 for state in states)
    after = adapter_state_dict(trainer.model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
