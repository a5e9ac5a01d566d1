"""Bad inputs and faults: each is named early and clearly, nothing saved is non-finite, checkpoints survive crashes."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer, DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.checkpoints import STAGING_DIR, checkpoint_problems, latest_intact_checkpoint
from diffusion_opd_trainer.lora import PEFT_WEIGHT_NAME, adapter_state_dict
from diffusion_opd_trainer.scoring import RewardError
from diffusion_opd_trainer.testing import TINY_TRAINING_ARGS, save_random_lora, tiny_sd3_pipeline, tiny_sd_pipeline


PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog"]
LORA = dict(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
COMMON = dict(TINY_TRAINING_ARGS, eval_num_inference_steps=3)


def grpo_args(tmp_path, **overrides):
    values = dict(
        COMMON, output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2, beta=0.0
    )
    return DiffusionGRPOConfig(**{**values, **overrides})


def opd_args(tmp_path, **overrides):
    values = dict(COMMON, output_dir=str(tmp_path / "opd"), per_device_train_batch_size=2)
    return DiffusionOPDConfig(**{**values, **overrides})


def constant_reward(prompts, images, **kwargs):
    return [float(image.mean()) for image in images]


def grpo_trainer(tmp_path, reward=constant_reward, dataset=None, **overrides):
    return DiffusionGRPOTrainer(
        tiny_sd3_pipeline(),
        reward_funcs=reward,
        args=grpo_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(**LORA),
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_random_lora(tiny_sd3_pipeline(), tmp_path_factory.mktemp("t") / "teacher", "peft", seed=1, std=0.3)


def opd_trainer(tmp_path, teachers, **overrides):
    return DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers=teachers,
        args=opd_args(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "task": ["text"] * 4}),
        peft_config=LoraConfig(**LORA),
    )


def lora_weights(trainer):
    return {k: v.clone() for k, v in adapter_state_dict(trainer.unwrapped_denoiser).items()}


# ----- teachers ------------------------------------------------------------------------------------------------------
def test_teacher_with_a_nan_weight_is_refused_at_load(tmp_path, teacher):
    bad = Path(shutil.copytree(teacher, tmp_path / "nan_teacher"))
    weights = load_file(str(bad / PEFT_WEIGHT_NAME))
    key = next(iter(weights))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(bad / PEFT_WEIGHT_NAME))
    with pytest.raises(ValueError, match=r"task 'text'.*non-finite|task 'text'.*NaN"):
        opd_trainer(tmp_path, {"text": str(bad)})


def test_truncated_teacher_file_names_task_and_path(tmp_path, teacher):
    bad = Path(shutil.copytree(teacher, tmp_path / "cut_teacher"))
    data = (bad / PEFT_WEIGHT_NAME).read_bytes()
    (bad / PEFT_WEIGHT_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"task 'text'.*cut_teacher.*not a readable safetensors"):
        opd_trainer(tmp_path, {"text": str(bad)})


def test_hub_teacher_offline_names_task_and_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError, match=r"task 'text'.*someone/ocr-teacher.*not in the local Hub cache"):
        opd_trainer(tmp_path, {"text": "someone/ocr-teacher"})


def test_lora_of_another_architecture_is_named_as_such(tmp_path):
    unet_lora = save_random_lora(tiny_sd_pipeline(), tmp_path / "sd15", "diffusers", r=8)
    with pytest.raises(ValueError, match=r"task 'text'.*another model architecture"):
        opd_trainer(tmp_path, {"text": unet_lora})


# ----- configs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, field, value",
    [
        (opd_args, "noise_level", float("nan")),
        (grpo_args, "noise_level", float("inf")),
        (grpo_args, "guidance_scale", -3.0),
        (opd_args, "guidance_scale", float("nan")),
        (grpo_args, "learning_rate", float("nan")),
        (grpo_args, "beta", float("nan")),
        (grpo_args, "adv_clip_max", float("inf")),
        (grpo_args, "epsilon", float("nan")),
        (opd_args, "eval_guidance_scale", -1.0),
        (opd_args, "max_grad_norm", float("nan")),
    ],
)
def test_config_floats_must_be_finite_and_in_range(tmp_path, make, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make(tmp_path, **{field: value})


def test_teacher_guidance_scales_must_be_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_guidance_scales\['text'\].*'high'"):
        opd_args(tmp_path, teacher_guidance_scales={"text": "high"})
    with pytest.raises(ValueError, match=r"teacher_guidance_scales\['text'\].*>= 0"):
        opd_args(tmp_path, teacher_guidance_scales='{"text": -2}')


# ----- datasets ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompts, match",
    [
        (["a cat", "a dog", None, "a car"], r"row 2.*None"),
        ([1, 2, 3, 4], r"row 0.*1 \(int\)"),
        ([["a", "cat"], ["b"], ["c"], ["d"]], r"row 0.*\['a', 'cat'\]"),
    ],
)
def test_bad_prompts_are_named_by_row_before_any_work(tmp_path, prompts, match):
    with pytest.raises(ValueError, match=f"`train_dataset` {match}"):
        grpo_trainer(tmp_path, dataset=Dataset.from_dict({"prompt": prompts}))


def test_non_dataset_inputs_get_a_type_error(tmp_path, teacher):
    with pytest.raises(TypeError, match=r"`train_dataset` must be a `datasets.Dataset`.*got list"):
        grpo_trainer(tmp_path, dataset=[{"prompt": p} for p in PROMPTS])
    with pytest.raises(TypeError, match=r"DatasetDict.*\['train'\]"):
        grpo_trainer(tmp_path, dataset=DatasetDict({"train": Dataset.from_dict({"prompt": PROMPTS})}))
    with pytest.raises(TypeError, match="`train_dataset` must be a `datasets.Dataset`"):
        DiffusionOPDTrainer(tiny_sd3_pipeline(), {"text": teacher}, opd_args(tmp_path), train_dataset=PROMPTS)


def test_empty_prompts_warn_once_and_long_prompts_warn_once_per_run(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    trainer = grpo_trainer(tmp_path, dataset=Dataset.from_dict({"prompt": ["", "a cat", "", "a dog"]}))
    assert sum("empty prompt" in r.message for r in caplog.records) == 1
    caplog.clear()
    family = trainer.family
    long = [" ".join(["red circle"] * 40 + [str(i)]) for i in range(6)]
    family.encode_prompts(long[:3])
    family.encode_prompts(long[3:])
    truncation = [r for r in caplog.records if "truncated" in r.message]
    assert len(truncation) == 1 and "Said once per run" in truncation[0].message, [r.message for r in truncation]


# ----- rewards -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "output, match",
    [
        (lambda n: ["good"] * n, r"Reward 'bad_reward' returned 'good' \(str\)"),
        (lambda n: torch.zeros(n, 3), r"Reward 'bad_reward' returned an array of shape \(\d+, 3\)"),
        (lambda n: [True] * n, r"Reward 'bad_reward' returned a boolean"),
        (lambda n: torch.ones(n, dtype=torch.bool), r"Reward 'bad_reward' returned booleans"),
        (lambda n: [0.5] * (n - 1), r"Reward 'bad_reward' returned \d+ values for \d+ images"),
    ],
)
def test_reward_outputs_are_validated_and_the_reward_named(tmp_path, output, match):
    def bad_reward(prompts, images, **kwargs):
        return output(len(prompts))

    trainer = grpo_trainer(tmp_path, reward=bad_reward)
    with pytest.raises(RewardError, match=match):
        trainer.train()


def test_reward_outputs_may_be_any_iterable_of_numbers():
    from diffusion_opd_trainer.scoring import RewardSet

    def generator_reward(prompts, images, **kwargs):
        return (0.5 * i if i else None for i in range(len(prompts)))

    rewards = RewardSet(generator_reward)(PROMPTS[:3], torch.zeros(3, 3, 8, 8), {})
    assert rewards[1:, 0].tolist() == [0.5, 1.0] and torch.isnan(rewards[0, 0])


@pytest.mark.parametrize(
    "values, match",
    [
        (lambda n: [float("nan")] * n, "no finite value"),
        (lambda n: [float("inf")] + [0.1 * i for i in range(1, n)], "infinite value"),
        (lambda n: [1e30 * (1 + i) for i in range(n)], "too large"),
        (lambda n: [0.25] * n, "the same value"),
    ],
)
def test_uninformative_rewards_warn_once_per_reward(tmp_path, caplog, values, match):
    def odd_reward(prompts, images, **kwargs):
        return values(len(prompts))

    caplog.set_level(logging.WARNING)
    grpo_trainer(tmp_path, reward=odd_reward).train()
    warnings = [r.message for r in caplog.records if "odd_reward" in r.message]
    assert len(warnings) == 1 and match in warnings[0], warnings


def test_a_failing_reward_is_named_with_its_step_and_the_lora_saved(tmp_path):
    calls = []

    def flaky_reward(prompts, images, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the reward server went away")
        return [float(image.mean()) for image in images]

    trainer = grpo_trainer(tmp_path, reward=flaky_reward, max_steps=4)
    with pytest.raises(
        RewardError, match=r"'flaky_reward' raised RuntimeError: the reward server.*step 3.*interrupted"
    ):
        trainer.train()
    saved = load_file(str(tmp_path / "grpo" / "interrupted" / PEFT_WEIGHT_NAME))
    assert saved and all(torch.isfinite(v).all() for v in saved.values())


# ----- the non-finite guard ------------------------------------------------------------------------------------------
def _poison_teacher(trainer):
    for name, parameter in trainer.unwrapped_denoiser.named_parameters():
        if ".teacher_text." in name and "lora_B" in name:
            parameter.data.fill_(float("nan"))


class _PoisonAfterFirstStep(TrainerCallback):
    """The teacher goes bad after step 1 (a broken teacher from the start is the preflight's: test_preflight.py)."""

    def __init__(self, trainer):
        self.trainer, self.weights_when_poisoned = trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.weights_when_poisoned = lora_weights(self.trainer)
            _poison_teacher(self.trainer)


def test_nonfinite_steps_are_skipped_counted_and_named(tmp_path, teacher, caplog):
    trainer = opd_trainer(tmp_path, {"text": teacher}, max_nonfinite_steps=5, max_steps=3)
    poison = _PoisonAfterFirstStep(trainer)
    trainer.add_callback(poison)
    caplog.set_level(logging.WARNING)
    trainer.train()
    after = lora_weights(trainer)
    before = poison.weights_when_poisoned
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed a weight"
    assert trainer.state.log_history[-2]["nonfinite_steps"] == 2
    warnings = [r.message for r in caplog.records if "non-finite" in r.message]
    assert len(warnings) == 2 and "task 'text'" in warnings[0] and str(teacher) in warnings[0]


def test_consecutive_nonfinite_steps_stop_training(tmp_path, teacher):
    trainer = opd_trainer(tmp_path, {"text": teacher}, max_nonfinite_steps=2, max_steps=5)
    trainer.add_callback(_PoisonAfterFirstStep(trainer))
    with pytest.raises(RuntimeError, match=r"step 3: 2 consecutive steps.*task 'text'"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_saving_refuses_nonfinite_weights(tmp_path):
    trainer = grpo_trainer(tmp_path)
    parameter = next(p for n, p in trainer.unwrapped_denoiser.named_parameters() if "lora_A.default" in n)
    parameter.data[0, 0] = float("nan")
    target = tmp_path / "final"
    with pytest.raises(ValueError, match="Refusing to save.*NaN or infinite"):
        trainer.save_model(str(target))
    assert not (target / PEFT_WEIGHT_NAME).exists()


# ----- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A 2-step GRPO run with a checkpoint after each step."""
    root = tmp_path_factory.mktemp("ckpt")
    trainer = grpo_trainer(root, save_strategy="steps", save_steps=1)
    trainer.train()
    return root / "grpo"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damaged",
    [PEFT_WEIGHT_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json", "rollout_rng_state_0.safetensors"],
)
def test_a_damaged_latest_checkpoint_is_skipped_naming_the_file(tmp_path, checkpointed_run, damaged, caplog):
    run = Path(shutil.copytree(checkpointed_run, tmp_path / "run"))
    _truncate(run / "checkpoint-2" / damaged)
    caplog.set_level(logging.WARNING)
    assert latest_intact_checkpoint(run, PEFT_WEIGHT_NAME) == str(run / "checkpoint-1")
    assert any(damaged in r.message and "checkpoint-2" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-2: {damaged}"):
        grpo_trainer(tmp_path, output_dir=str(run), max_steps=3).train(
            resume_from_checkpoint=str(run / "checkpoint-2")
        )


def test_resume_true_falls_back_to_the_newest_intact_checkpoint(tmp_path, checkpointed_run):
    run = Path(shutil.copytree(checkpointed_run, tmp_path / "run"))
    _truncate(run / "checkpoint-2" / "optimizer.pt")
    trainer = grpo_trainer(tmp_path, output_dir=str(run), max_steps=3, save_strategy="no")
    trainer.train(resume_from_checkpoint="true")  # as the example scripts pass `--resume_from_checkpoint true`
    assert trainer.state.global_step == 3
    _truncate(run / "checkpoint-1" / PEFT_WEIGHT_NAME)
    with pytest.raises(
        ValueError, match=r"No intact checkpoint.*checkpoint-2: optimizer.pt.*checkpoint-1: adapter_model"
    ):
        grpo_trainer(tmp_path, output_dir=str(run), max_steps=3).train(resume_from_checkpoint=True)


def test_checkpoints_are_complete(checkpointed_run):
    for step in (1, 2):
        assert checkpoint_problems(checkpointed_run / f"checkpoint-{step}", PEFT_WEIGHT_NAME) == []
    assert not (checkpointed_run / STAGING_DIR).exists()


KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import test_faults
    from diffusion_opd_trainer import trainer_base

    original = trainer_base.save_lora

    def save_then_die(output_dir, *args, **kwargs):
        original(output_dir, *args, **kwargs)
        if Path(output_dir).name == "checkpoint-2":
            os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the LoRA is written, the optimizer state is not

    trainer_base.save_lora = save_then_die
    test_faults.grpo_trainer(Path({root!r}), save_strategy="steps", save_steps=1, max_steps=3).train()
    """
)


def test_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    script = KILLED_MID_SAVE.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stderr[-2000:]
    run = tmp_path / "grpo"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert checkpoint_problems(run / "checkpoint-1", PEFT_WEIGHT_NAME) == []
    assert (run / STAGING_DIR / "checkpoint-2").is_dir()  # the half-written one, never named as a checkpoint
    trainer = grpo_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2
    assert not (run / STAGING_DIR).exists()
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


# ----- security rules ------------------------------------------------------------------------------------------------
def test_pickled_lora_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled_teacher"
    folder.mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"task 'text'.*only safetensors are loaded"):
        opd_trainer(tmp_path, {"text": str(folder)})
    with pytest.raises(ValueError, match=r"task 'text'.*only .safetensors LoRA files are loaded"):
        opd_trainer(tmp_path, {"text": str(folder / "adapter_model.bin")})


def test_no_remote_code_is_ever_trusted():
    package = Path(__file__).parents[1] / "diffusion_opd_trainer"
    offenders = [p.name for p in package.rglob("*.py") if "trust_remote_code=True" in p.read_text()]
    assert offenders == []
