"""The example scripts run offline end to end (one process, and two under accelerate), and the prompt loader."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_opd_trainer.data import load_prompt_dataset
from diffusion_opd_trainer.lora import read_lora


ROOT = Path(__file__).resolve().parents[1]


def run(command, tmp_path, env=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def two_processes(script, *arguments):
    """`accelerate launch` of two CPU processes (as `python -m accelerate.commands.launch`: no venv bin/ on PATH)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        *arguments,
    ]


def check_saved_lora(output_dir, card_mentions):
    """The saved LoRA reads back with the YAML's rank and alpha, and its model card describes the run."""
    state_dict, config, fmt = read_lora(output_dir)
    assert fmt == "peft" and (config.r, config.lora_alpha) == (8, 16)
    assert all(math.isfinite(float(value.abs().sum())) for value in state_dict.values())
    card = (Path(output_dir) / "README.md").read_text()
    assert "library_name: diffusers" in card and "load_lora_weights" in card
    for text in card_mentions:
        assert text in card
    args = json.loads((Path(output_dir) / "training_args.json").read_text())
    assert args["max_steps"] == 2 and args["num_inference_steps"] == 4


card_mentions = {"train_teacher_sd3.py": ["Flow-GRPO", "jpeg_compressibility"], "distill_sd3.py": ["## Teachers"]}


@pytest.mark.parametrize(
    "script, config", [("train_teacher_sd3.py", "grpo_tiny.yaml"), ("distill_sd3.py", "opd_tiny.yaml")]
)
def test_example_runs_offline(tmp_path, script, config):
    run(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            "--config",
            str(ROOT / "examples" / "configs" / config),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--disable_tqdm",
            "true",
        ],
        tmp_path,
    )
    assert {"pytorch_lora_weights.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "out"))
    check_saved_lora(tmp_path / "out", card_mentions[script])


def test_example_resumes_with_resume_from_checkpoint_true(tmp_path):
    """`--resume_from_checkpoint true`, as TRL's scripts take it: the newest intact checkpoint of `output_dir`."""
    command = [
        sys.executable,
        str(ROOT / "examples" / "train_teacher_sd3.py"),
        "--config",
        str(ROOT / "examples" / "configs" / "grpo_tiny.yaml"),
        "--output_dir",
        str(tmp_path / "out"),
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]
    run(command + ["--max_steps", "1"], tmp_path)
    result = run(command + ["--max_steps", "2", "--resume_from_checkpoint", "true"], tmp_path)
    assert "Resumed the student LoRA from" in result.stderr and "checkpoint-1" in result.stderr
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_grpo_with_groups_spanning_two_processes(tmp_path):
    """Two CPU processes of 2 images each, groups of 4: every group spans both processes (rewards are gathered)."""
    run(
        two_processes(
            ROOT / "examples" / "train_teacher_sd3.py",
            "--config",
            str(ROOT / "examples" / "configs" / "grpo_tiny.yaml"),
            "--output_dir",
            str(tmp_path / "out"),
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "2",
            "--disable_tqdm",
            "true",
        ),
        tmp_path,
        env={"ACCELERATE_USE_CPU": "true"},
    )
    check_saved_lora(tmp_path / "out", card_mentions["train_teacher_sd3.py"])


def test_metrics_are_the_whole_batchs_over_two_processes(tmp_path):
    """
    Every logged figure is the global batch's (gathered, as TRL does), not the main process's: both processes log the
    same history. GRPO's reward is 0 on one process and 1 on the other, so only gathered rewards average 0.5.
    """
    run(
        two_processes(Path(__file__).parent / "two_process_metrics.py", str(tmp_path)),
        tmp_path,
        env={"ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)},
    )
    local = ("timing/", "step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    for method, keys in (
        ("grpo", {"reward", "rewards/rank_reward/mean", "kl", "policy_loss", "clip_ratio", "ratio", "loss"}),
        ("opd", {"kl", "kl/a", "kl/b", "kl/step_0", "kl/step_1", "loss"}),
    ):
        histories = [json.loads((tmp_path / f"{method}-rank{rank}.json").read_text()) for rank in (0, 1)]
        train_entries = [entry for entry in histories[0] if "loss" in entry]
        assert len(train_entries) == 2 and all(keys <= set(entry) for entry in train_entries), method
        for entry_0, entry_1 in zip(*histories):
            assert {k: v for k, v in entry_0.items() if not k.startswith(local)} == {
                k: v for k, v in entry_1.items() if not k.startswith(local)
            }, method
    for entry in train_entries_of(tmp_path / "grpo-rank0.json"):
        assert entry["rewards/rank_reward/mean"] == pytest.approx(0.5, abs=0.01)
        assert entry["reward"] == pytest.approx(0.5, abs=0.01)


def train_entries_of(path):
    return [entry for entry in json.loads(Path(path).read_text()) if "loss" in entry]


def test_load_prompt_dataset_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\ntwo blue squares\n")
    assert load_prompt_dataset(str(tmp_path / "p.txt"))["prompt"] == ["a red circle", "two blue squares"]
    (tmp_path / "p.jsonl").write_text('{"text": "a cat", "task": "x"}\n{"text": "a dog", "task": "y"}\n')
    dataset = load_prompt_dataset(str(tmp_path / "p.jsonl"), prompt_column="text")
    assert dataset["prompt"] == ["a cat", "a dog"] and dataset["task"] == ["x", "y"]
    with pytest.raises(ValueError, match="no `prompt` column"):
        load_prompt_dataset(str(tmp_path / "p.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompt_dataset(str(tmp_path / "missing.txt"))
