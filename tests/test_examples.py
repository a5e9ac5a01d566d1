"""The example scripts run offline end to end (one process, and two under accelerate), and the prompt loader."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_opd_trainer.data import load_prompt_dataset


ROOT = Path(__file__).resolve().parents[1]


def run(command, tmp_path, env=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


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


def test_grpo_with_groups_spanning_two_processes(tmp_path):
    """Two CPU processes of 2 images each, groups of 4: every group spans both processes (rewards are gathered)."""
    # `python -m accelerate.commands.launch` is `accelerate launch` without needing the venv's bin/ on PATH (CI).
    run(
        [
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
            str(ROOT / "examples" / "train_teacher_sd3.py"),
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
        ],
        tmp_path,
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


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
