"""
Scale-out through accelerate: the example configs (`examples/accelerate/`) parse into accelerate's own launch settings
and plugins; the same forwards on every process (FSDP's requirement); DeepSpeed's accumulation boundaries; the settings
refused with an error; and two CPU processes under FSDP2 (gloo) training OPD with two teachers, checked against DDP.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from safetensors.torch import load_file

from diffusion_opd_trainer import targets
from diffusion_opd_trainer.lora import MixedAdapterBatchError, adapter_checksum, read_lora
from diffusion_opd_trainer.targets import teacher_means
from diffusion_opd_trainer.testing import tiny_sd3_pipeline


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"


# ----- the example configs ------------------------------------------------------------------------------------------
def launch_settings(config_file, *flags):
    """What `accelerate launch --config_file <file> <flags> script.py` resolves, as its own parser and checks do."""
    args = launch_command_parser().parse_args(["--config_file", str(config_file), *flags, "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def plugin_from_env(monkeypatch, env, plugin_class):
    """The plugin a launched process builds from the launcher's environment (as `Accelerator()` does)."""
    for key in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    return plugin_class()


@pytest.mark.parametrize("name", ["ddp.yaml", "deepspeed_zero2.yaml", "fsdp2.yaml"])
def test_every_key_of_the_configs_is_one_accelerate_reads(name):
    config = load_config_from_file(str(CONFIGS / name))  # raises on an unknown top-level key
    assert (config.mixed_precision, config.num_processes, config.num_machines) == ("bf16", 8, 1)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    # The nested blocks are copied onto the launcher's arguments, where an unknown key would be silently ignored.
    args, _ = launch_settings(CONFIGS / name)
    options = vars(launch_command_parser().parse_args(["script.py"]))
    for block, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in raw.get(block, {}):
            assert (key if key.startswith(prefix) else prefix + key) in options, f"{name}: {block}.{key}"
    # The launch command in the header names this file and a script that exists.
    header = [line for line in (CONFIGS / name).read_text().splitlines() if "accelerate launch" in line]
    assert header and all(f"--config_file examples/accelerate/{name}" in line for line in header)
    for line in header:
        script = next(word for word in line.split() if word.endswith(".py"))
        assert (ROOT / script).is_file(), script
    assert args.num_processes == 8 and args.mixed_precision == "bf16"


def test_ddp_config_launches_multi_gpu():
    args, defaults = launch_settings(CONFIGS / "ddp.yaml")
    assert defaults.distributed_type == DistributedType.MULTI_GPU and args.multi_gpu
    assert not (args.use_fsdp or args.use_deepspeed)


def test_fsdp2_config_builds_an_fsdp2_plugin_wrapping_the_denoisers_blocks(monkeypatch):
    args, defaults = launch_settings(CONFIGS / "fsdp2.yaml")
    assert defaults.distributed_type == DistributedType.FSDP and args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    plugin = plugin_from_env(monkeypatch, env, FullyShardedDataParallelPlugin)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and not plugin.cpu_ram_efficient_loading
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type) and not plugin.activation_checkpointing
    # Transformer-block wrapping from the denoiser's `_no_split_modules`: SD3's joint blocks.
    transformer = tiny_sd3_pipeline().transformer
    plugin.set_auto_wrap_policy(transformer)
    wrapped = [name for name, module in transformer.named_modules() if plugin.auto_wrap_policy(module, False, 0)]
    assert wrapped and all(name.startswith("transformer_blocks.") and name.count(".") == 1 for name in wrapped)
    assert len(wrapped) == len(transformer.transformer_blocks)


def test_deepspeed_zero2_config_builds_a_zero2_plugin(monkeypatch):
    """DeepSpeed itself is not installed: the launcher's settings and accelerate's plugin only."""
    args, defaults = launch_settings(CONFIGS / "deepspeed_zero2.yaml")
    assert defaults.distributed_type == DistributedType.DEEPSPEED and args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `launch_command` sets it
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    plugin = plugin_from_env(monkeypatch, env, DeepSpeedPlugin)
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 2 and zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    # Left to the training config (`gradient_accumulation_steps`, `max_grad_norm`), which transformers fills in.
    assert plugin.gradient_accumulation_steps == "auto" and plugin.gradient_clipping == "auto"
    assert not plugin.zero3_init_flag


# ----- the same forwards on every process ---------------------------------------------------------------------------
def teacher_setup(tmp_path):
    from test_teacher_batching import setup

    return setup(tmp_path, "sd3")


def count_forwards(denoiser):
    """The rows of each denoiser forward, in order."""
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    return calls, denoiser.register_forward_pre_hook(record, with_kwargs=True)


SCALES = {"a": 4.5, "b": 1.0, "c": 3.0}  # "b" without CFG: its rows never share the others' forward


@pytest.mark.parametrize("batched", [True, False])
def test_a_process_runs_the_forwards_another_process_needs(tmp_path, batched):
    """
    A batch of task "a" only, while another process has rows of every task (`same_forwards` says so): the forwards
    run are those of every group (the others on one row, discarded), and the means are this batch's own.
    """
    family, teachers, x, t, embeds = teacher_setup(tmp_path)
    tasks = ["a"] * len(x)
    kwargs = dict(guidance_scales=SCALES, noise_level=0.7, batched=batched)
    alone = teacher_means(family, teachers, x, t, embeds, tasks, **kwargs)
    asked = []

    def everyone_has_everything(flags):
        asked.append(list(flags))
        return [True] * len(flags)

    calls, handle = count_forwards(family.denoiser)
    aligned = teacher_means(family, teachers, x, t, embeds, tasks, same_forwards=everyone_has_everything, **kwargs)
    handle.remove()
    # Batched: a CFG group ("a", "c") and a group without ("b"); one forward per task otherwise.
    if batched:
        assert asked == [[True, False]] and calls == [2 * len(x), 1]
    else:
        assert asked == [[True, False, False]] and calls == [2 * len(x), 1, 2]
    torch.testing.assert_close(aligned, alone, rtol=0, atol=1e-6)

    calls, handle = count_forwards(family.denoiser)
    teacher_means(family, teachers, x, t, embeds, tasks, same_forwards=lambda flags: list(flags), **kwargs)
    handle.remove()
    assert calls == [2 * len(x)]  # nobody else needs more: this batch's forward only


def test_the_shared_forward_falls_back_on_every_process_or_stops(tmp_path, monkeypatch):
    family, teachers, x, t, embeds = teacher_setup(tmp_path)
    tasks = ["a", "b", "c", "b", "a", "c"]
    kwargs = dict(guidance_scales=SCALES, noise_level=0.0, same_forwards=lambda flags: [True] * len(flags))
    per_task = teacher_means(
        family, teachers, x, t, embeds, tasks, guidance_scales=SCALES, noise_level=0.0, batched=False
    )

    def fail_in_forward(family, *args, **kwargs):
        raise MixedAdapterBatchError("the LoRA layer 'x' sees 12 input rows")

    monkeypatch.setattr(targets, "_batched_teacher_means", fail_in_forward)
    with pytest.raises(RuntimeError, match="batch_teacher_forwards = False"):
        teacher_means(family, teachers, x, t, embeds, tasks, **kwargs)
    assert family.denoiser not in targets._NO_MIXED_BATCHES

    # Refused on entry (before any forward, on every process alike): one forward per teacher, on every process.
    def refuse(denoiser, names):
        raise MixedAdapterBatchError("the LoRA layer 'x' takes no mixed batch")

    monkeypatch.setattr(targets, "mixed_adapters", refuse)
    calls, handle = count_forwards(family.denoiser)
    means = teacher_means(family, teachers, x, t, embeds, tasks, **kwargs)
    handle.remove()
    assert len(calls) == len(teachers) and torch.equal(means, per_task)


# ----- DeepSpeed's boundaries and the refused settings ---------------------------------------------------------------
@pytest.fixture
def opd_trainer(tmp_path, random_teachers):
    from test_opd import make_trainer

    return make_trainer(tmp_path, random_teachers, dataset=None)


@pytest.mark.parametrize("sync", [True, False])
def test_under_deepspeed_only_the_last_backward_is_a_boundary(opd_trainer, monkeypatch, sync):
    """
    DeepSpeed's engine steps the optimizer in the backward of an accumulation boundary: of a micro-step's per-timestep
    backwards only the last may be one (and only on the Trainer's sync step), none scaled again by the accumulation.
    """
    trainer = opd_trainer
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True, raising=False)
    seen = []
    state = trainer.accelerator.gradient_state
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss, **kw: seen.append((state.sync_gradients, kw)))
    state._set_sync_gradients(sync)
    weight = torch.nn.Parameter(torch.ones(()))
    trainer.train_on_steps(trainer.model, [0, 1, 2], lambda j: (weight * j, None))
    assert [flag for flag, _ in seen] == [False, False, sync]
    assert all(kwargs == {"scale_wrt_gas": False} for _, kwargs in seen)
    assert state.sync_gradients is sync  # restored
    state._set_sync_gradients(True)


def test_under_deepspeed_a_nonfinite_step_stops_training(opd_trainer, monkeypatch):
    trainer = opd_trainer
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True, raising=False)
    trainer.note_nonfinite("rollout step 1")
    with pytest.raises(RuntimeError, match="under DeepSpeed.*cannot be skipped"):
        trainer._skip_step_if_nonfinite()


def fake_accelerator(trainer, **state):
    return SimpleNamespace(state=SimpleNamespace(**state), device=trainer.accelerator.device)


def test_settings_that_cannot_work_are_refused(opd_trainer, monkeypatch):
    trainer = opd_trainer
    fsdp = dict(fsdp_version=2, activation_checkpointing=False)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True, raising=False)
    monkeypatch.setattr(trainer, "accelerator", fake_accelerator(trainer, fsdp_plugin=SimpleNamespace(**fsdp)))
    monkeypatch.setattr(trainer.args, "eval_strategy", "steps")
    trainer.check_scale_out()  # FSDP2, evaluation included: fine
    monkeypatch.setattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        trainer.check_scale_out()
    monkeypatch.setattr(trainer, "is_fsdp_enabled", False)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True, raising=False)
    monkeypatch.setattr(
        trainer, "accelerator", fake_accelerator(trainer, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    )
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        trainer.check_scale_out()


# ----- two CPU processes under FSDP2 --------------------------------------------------------------------------------
def launch(tmp_path, folder, *arguments, fsdp=True):
    """Two CPU processes running tests/scale_out_run.py: FSDP2 (the example config, CPU-sized) or DDP."""
    if fsdp:
        config = yaml.safe_load((CONFIGS / "fsdp2.yaml").read_text())
        config.update(mixed_precision="no", num_processes=2)  # CPU: float32, two processes
        config_file = tmp_path / "fsdp2_cpu.yaml"
        config_file.write_text(yaml.safe_dump(config))
        flags = ["--config_file", str(config_file)]
        arguments = (*arguments, "--force-fsdp-on-cpu")
    else:
        flags = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *flags,
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        str(Path(__file__).parent / "scale_out_run.py"),
        str(tmp_path / folder),
        *arguments,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.loads((tmp_path / folder / f"report-rank{r}.json").read_text()) for r in (0, 1)], result


def train_entries(report):
    return [entry for entry in report["log_history"] if "loss" in entry]


FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")  # the trained weights, the EMA's


@pytest.mark.slow
def test_opd_under_fsdp2_on_two_cpu_processes(tmp_path):
    fsdp, result = launch(tmp_path, "fsdp", "fsdp")
    assert all(r["distributed_type"] == "FSDP" and r["sharded"] for r in fsdp), result.stderr[-2000:]
    # The teacher forwards had to be made the same: at some step one process's batch held both tasks (a forward with
    # CFG and one without) and the other's one task (without alignment: gloo's "collective mismatch" abort).
    tasks = [r["tasks"] for r in fsdp]
    assert any(len(set(a)) != len(set(b)) for a, b in zip(*tasks)), tasks
    # Teachers: frozen, the same on both processes, as loaded.
    for report in fsdp:
        assert report["teachers_after"] == report["teachers_before"] == fsdp[0]["teachers_before"]
        assert report["teacher_checksums"] == report["recorded_checksums"]
    assert fsdp[0]["student_checksum"] == fsdp[1]["student_checksum"]
    final = {name: load_file(tmp_path / "fsdp" / "final" / name) for name in FILES}
    trained = sum(float(value.double().abs().sum()) for value in final[FILES[0]].values())
    assert trained == pytest.approx(fsdp[0]["student_checksum"], rel=1e-12)  # the trained weights, whole

    # The same training as DDP, up to float rounding (the gradients are reduce-scattered instead of all-reduced).
    ddp, _ = launch(tmp_path, "ddp", "ddp", fsdp=False)
    assert all(r["distributed_type"] == "MULTI_CPU" and not r["sharded"] for r in ddp)
    assert [r["tasks"] for r in fsdp] == [r["tasks"] for r in ddp]
    for name in FILES:
        ddp_lora = load_file(tmp_path / "ddp" / "final" / name)
        assert final[name].keys() == ddp_lora.keys()
        for key in ddp_lora:
            torch.testing.assert_close(final[name][key], ddp_lora[key], rtol=1e-4, atol=1e-6)
    for entry_fsdp, entry_ddp in zip(train_entries(fsdp[0]), train_entries(ddp[0]), strict=True):
        assert entry_fsdp["kl"] == pytest.approx(entry_ddp["kl"], rel=1e-4)
    # Evaluation under FSDP (every process samples, the main one's scores are logged): `evaluate` and the callback
    # give DDP's figures, and every process reports the same.
    assert fsdp[0]["evaluate"] == fsdp[1]["evaluate"]
    assert fsdp[0]["evaluate"]["eval_reward"] == pytest.approx(ddp[0]["evaluate"]["eval_reward"], rel=1e-4)
    assert len(fsdp[0]["callback"]) == len(ddp[0]["callback"]) == 1
    assert fsdp[0]["callback"][0] == pytest.approx(ddp[0]["callback"][0], rel=1e-4)

    # The saved LoRA is whole: the keys and shapes of a one-process save, and a plain pipeline loads every weight.
    from scale_out_run import build_trainer

    single = build_trainer(str(tmp_path / "single"), force_fsdp=False)
    single.save_model(str(tmp_path / "single" / "final"))
    for name in FILES:
        reference = load_file(tmp_path / "single" / "final" / name)
        assert {k: v.shape for k, v in final[name].items()} == {k: v.shape for k, v in reference.items()}
        assert any(not torch.equal(final[name][k], reference[k]) for k in reference)  # trained, not the initial
    _, config, _ = read_lora(tmp_path / "fsdp" / "final")
    assert (config.r, config.lora_alpha) == (4, 8)
    pipe = tiny_sd3_pipeline()
    pipe.load_lora_weights(str(tmp_path / "fsdp" / "final"), adapter_name="student")
    expected = sum(float(value.double().abs().sum()) for value in final[FILES[1]].values())
    assert adapter_checksum(pipe.transformer, "student") == pytest.approx(expected, rel=1e-6)

    # Checkpoints are complete: the LoRA, FSDP's optimizer shards, the scheduler, the EMA, every process's RNG
    # states; no base weights. A run resumed from checkpoint-1 ends where the uninterrupted one did.
    for step in (1, 2):
        names = set(os.listdir(tmp_path / "fsdp" / f"checkpoint-{step}"))
        assert {*FILES, "trainer_state.json", "scheduler.pt", "optimizer_0", "ema_state.safetensors"} <= names
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= names
        assert not any(name.startswith("pytorch_model_fsdp") for name in names), names
    for name, weights in final.items():
        torch.testing.assert_close(load_file(tmp_path / "fsdp" / "checkpoint-2" / name), weights, rtol=0, atol=0)
    resumed, result = launch(tmp_path, "fsdp", "fsdp", "resume")
    assert "Resumed the student LoRA from" in result.stderr
    for name, weights in final.items():
        torch.testing.assert_close(load_file(tmp_path / "fsdp" / "final" / name), weights, rtol=1e-5, atol=1e-7)
    assert resumed[0]["teachers_after"] == fsdp[0]["teachers_before"]
