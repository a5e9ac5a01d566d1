"""The `diffusion-opd` command line: help, the training jobs on the tiny recipes, the toy evaluation, clear errors."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from diffusion_opd_trainer.cli import main
from diffusion_opd_trainer.lora import read_lora


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


def run_main(argv, capsys):
    """`main(argv)` as the console script runs it: its exit status and what it wrote."""
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], ["usage: diffusion-opd", "grpo", "opd", "eval", "toy"]),
        (["grpo", "--help"], ["usage: diffusion-opd grpo", "--reward_funcs", "Registered reward names", "--beta"]),
        (["opd", "--help"], ["usage: diffusion-opd opd", "--teachers", "task=source", "--loss_type"]),
        (["eval", "--help"], ["usage: diffusion-opd eval", "--lora", "--max_prompts", "--toy", "--json"]),
        (["toy", "--help"], ["usage: diffusion-opd toy", "--quick", "--seed"]),
    ],
)
def test_help(capsys, argv, expected):
    status, out, _ = run_main(argv, capsys)
    assert status == 0
    for text in expected:
        assert text in out, text


def test_training_help_lists_every_field(capsys):
    """Every field of the script arguments and of the config is an option, with its help text."""
    from dataclasses import fields

    from diffusion_opd_trainer import DiffusionGRPOConfig
    from diffusion_opd_trainer.cli.grpo import GRPOScriptArguments

    _, out, _ = run_main(["grpo", "--help"], capsys)
    for dataclass_type in (GRPOScriptArguments, DiffusionGRPOConfig):
        for item in fields(dataclass_type):
            if item.init:
                assert f"--{item.name}" in out, item.name
    for item in fields(GRPOScriptArguments):
        assert item.metadata.get("help"), f"{item.name} has no help text"


def test_python_dash_m_and_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_opd_trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: diffusion-opd" in result.stdout and "eval" in result.stdout
    (script,) = entry_points(group="console_scripts", name="diffusion-opd")
    assert script.value == "diffusion_opd_trainer.cli:main"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bogus"], "invalid choice: 'bogus'"),
        ([], "the following arguments are required: command"),
        (["grpo", "--config", "missing-recipe.yaml"], "missing-recipe.yaml"),
        (["opd", "--config", "missing-recipe.yaml"], "missing-recipe.yaml"),
        (["grpo", "--config"], "`--config` needs the path"),
        (["eval"], "Set `--model`"),
        (["eval", "--model", "./no-such-pipeline"], "no-such-pipeline"),
        (["eval", "--toy", "--task", "bogus"], "not a toy task"),
        (["eval", "--toy", "--reward", "no_such_reward"], "no_such_reward"),
        (["eval", "--toy", "--reward", "nowhere=jpeg_compressibility"], "'nowhere'"),
        (["eval", "--toy", "--lora", "opd=./no-such-lora"], "no-such-lora"),
        (["eval", "--toy", "--lora", "no-equals-sign"], "`name=source`"),
        (["eval", "--model", "x/y", "--task", "geneval=prompts.txt"], "prompts.txt"),
    ],
)
def test_clear_errors(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(argv, capsys)
    assert status == 2
    assert message in err, err[-2000:]


@pytest.mark.parametrize("command, config", [("grpo", "grpo_tiny.yaml"), ("opd", "opd_tiny.yaml")])
def test_training_command_with_overrides(capsys, tmp_path, command, config):
    """The tiny recipe runs end to end, and command-line values beat the YAML's (max_steps 4 -> 1, lora_r 8 -> 4)."""
    output_dir = tmp_path / "out"
    argv = [command, "--config", str(CONFIGS / config), "--output_dir", str(output_dir)]
    status, _, _ = run_main(argv + ["--max_steps", "1", "--lora_r", "4", "--disable_tqdm", "true"], capsys)
    assert status == 0
    args = json.loads((output_dir / "training_args.json").read_text())
    assert args["max_steps"] == 1 and args["num_inference_steps"] == 4  # the override, and the YAML's own value
    _, lora_config, _ = read_lora(output_dir)
    assert (lora_config.r, lora_config.lora_alpha) == (4, 16)


def test_grpo_command_runs_the_hybrid(capsys, tmp_path):
    """`diffusion-opd grpo --teachers task=source --opd_coef C`: the reward plus the KL to the teacher."""
    from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline

    teacher = save_random_lora(tiny_sd3_pipeline(), tmp_path / "teacher", "peft", std=0.3)
    output_dir = tmp_path / "out"
    argv = ["grpo", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--output_dir", str(output_dir), "--max_steps", "1"]
    argv += ["--teachers", f"shapes={teacher}", "--opd_coef", "0.5", "--noise_level", "0.7", "--disable_tqdm", "true"]
    status, out, _ = run_main(argv, capsys)
    assert status == 0
    assert "'teacher_kl'" in out  # the Trainer's printed log line
    assert json.loads((output_dir / "training_args.json").read_text())["opd_coef"] == 0.5
    assert "opd_coef" in (output_dir / "README.md").read_text()


def test_eval_on_the_toy_model(capsys, tmp_path):
    """The toy model and a LoRA on the toy world's three tasks: a two-row table (Markdown, JSON), rewards in [0, 1]."""
    from diffusion_opd_trainer import toy
    from diffusion_opd_trainer.testing import save_random_lora

    lora = save_random_lora(toy.load_pipeline(), tmp_path / "lora", "peft", seed=1, std=0.3)
    output_dir = tmp_path / "eval"
    argv = ["eval", "--toy", "--lora", f"random={lora}", "--max_prompts", "2", "--num_inference_steps", "2"]
    argv += ["--output_dir", str(output_dir), "--json", str(tmp_path / "table.json"), "--no_progress"]
    status, out, _ = run_main(argv, capsys)
    assert status == 0

    markdown = (output_dir / "table.md").read_text()
    assert markdown.splitlines()[0] == "| model | compositional | text | preference |"
    assert [line.split("|")[1].strip() for line in markdown.splitlines()[2:]] == ["base", "random"]
    assert markdown.strip() in out  # the table is also the command's output

    rows = json.loads((tmp_path / "table.json").read_text())["models"]
    assert [row["model_name"] for row in rows] == ["base", "random"]
    for row in rows:
        assert set(row["metrics"]) == set(toy.TASKS)
        for task, metrics in row["metrics"].items():
            assert 0.0 <= metrics[task] <= 1.0
        assert row["settings"]["num_inference_steps"] == 2
        assert row["settings"]["guidance_scale"] == toy.DEFAULT_GUIDANCE_SCALE
    assert rows[1]["settings"]["lora"] == str(lora)
    # Each row's per-image scores, as the harness writes them: two prompts per task.
    samples = json.loads((output_dir / "random" / "results.json").read_text())["samples"]
    assert {task: len(records) for task, records in samples.items()} == {task: 2 for task in toy.TASKS}


def test_eval_plan_tasks_and_rewards(tmp_path):
    """Toy tasks by name beside a prompt file of one's own; `--reward` per task or shared; nothing loads a model."""
    from diffusion_opd_trainer.cli.evaluate import make_parser, plan_evaluation
    from diffusion_opd_trainer.rewards import reward_name

    (tmp_path / "mine.txt").write_text("a red circle\ntwo blue squares\n")
    argv = ["--toy", "--task", "text", "--task", f"mine={tmp_path / 'mine.txt'}"]
    argv += ["--reward", "mine=jpeg_compressibility"]
    plan = plan_evaluation(make_parser().parse_args(argv + ["--lora", f"x={tmp_path}", "--no_base"]))
    assert plan.rows == [("x", str(tmp_path))] and list(plan.tasks) == ["text", "mine"]
    assert plan.tasks["mine"]["prompt"] == ["a red circle", "two blue squares"]
    assert {task: [reward_name(r) for r in rewards] for task, rewards in plan.rewards.items()} == {
        "text": ["text"],
        "mine": ["jpeg_compressibility"],
    }
    assert (plan.num_inference_steps, plan.guidance_scale) == (10, 3.0)  # the toy's sampler defaults
    # A shared reward replaces the toy task's own and is built once for every task.
    plan = plan_evaluation(make_parser().parse_args(argv[:-2] + ["--reward", "jpeg_compressibility", "--seed", "1"]))
    assert plan.rewards["text"][0] is plan.rewards["mine"][0]


def test_toy_without_the_checkout(capsys, tmp_path):
    """From an installed wheel (no benchmarks/ next to the package) the command names what is missing."""
    from diffusion_opd_trainer.cli import toy as toy_command

    with pytest.raises(SystemExit) as exit:
        toy_command.main(["--quick"], root=tmp_path)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "benchmarks/toy_table.py" in err and str(tmp_path) in err and "pip install -e ." in err


def test_toy_delegates_to_the_benchmark(capsys, tmp_path):
    """`toy` runs benchmarks/toy_table.py's main: its own error for a report over no seeds, nothing trained."""
    import transformers

    verbosity = transformers.logging.get_verbosity()  # toy_table.main quiets transformers for the whole process
    try:
        status, _, err = run_main(["toy", "--report_only", "--output_dir", str(tmp_path / "none")], capsys)
    finally:
        transformers.logging.set_verbosity(verbosity)
    assert status == 2 and "usage: diffusion-opd toy" in err


@pytest.mark.slow
def test_accelerate_launch_dash_m(tmp_path):
    """`accelerate launch -m diffusion_opd_trainer grpo ...` on two CPU processes (about 30 s)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "diffusion_opd_trainer", "grpo", "--config", str(CONFIGS / "grpo_tiny.yaml")]
    command += ["--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "training_args.json").read_text())["max_steps"] == 1


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_recipe_parses_into_its_config(path):
    """Each recipe of examples/configs names only real fields with valid values (nothing is loaded or trained)."""
    from diffusion_opd_trainer.cli import grpo, opd

    parser = (opd if path.name.startswith("opd") else grpo).make_parser()
    # The GPU recipes ask for bf16, which TrainingArguments refuses without a GPU: only that is overridden here.
    overrides = [] if torch.cuda.is_available() else ["--bf16", "false"]
    if path.name == "grpo_sd35_pickscore.yaml":  # 12 images x 8 GPUs hold whole groups of 24; one process needs 24
        overrides += ["--per_device_train_batch_size", "24"]
    _, training_args = parser.parse_args_and_config(["--config", str(path), *overrides])
    if path.name == "opd_sd35_24gb.yaml":
        assert training_args.text_encoder_offload == "free" and training_args.offload_vae
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 64
