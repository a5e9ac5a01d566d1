"""One command on one GPU: SD3.5-Medium-scale OPD and GRPO steps, their time and peak memory, levers on and off.

    python benchmarks/gpu_check.py [--output results/gpu_check.json] [--time_budget 480]
    python benchmarks/gpu_check.py --tiny    # the same code path on the CPU with the tiny SD3 pipeline (CI)

The model is SD3.5-Medium's architecture with random weights, built from the config-only folder
`examples/configs/stable-diffusion-3.5-medium` directly on the GPU and cast to bf16 (a few seconds): the MMDiT
transformer (2.24 B parameters), the VAE and the three text encoders at their real sizes (CLIP-L, CLIP-G, T5-XXL: 5.58
B). Nothing is downloaded and no remote code runs. The folder ships no vocabularies, so the tokenizers are the
library's deterministic word-level ones (`diffusion_opd_trainer.testing`) with the folder's length limits (77, 77,
512; SD3 encodes 256 T5 tokens): the sequence lengths, hence the compute and the activations, are the real model's.
Random weights make the figures about time and memory only.

At 512 px, 10 rollout steps (9 trained), CFG 4.5 (both halves with gradients), the default student LoRA (r32):

- OPD (ODE, mean matching) with 0, 1 and 3 teachers (random LoRAs, r32) at per-device batch 1 and 4, levers off and
  on: one trainer per configuration runs a warm-up step of each schedule, then fused and two-pass optimizer steps in
  turn (A B A B ...), so that a drift of the machine hits both; each schedule's seconds per step (median, range and
  spread) and its peak accelerator memory (`torch.cuda.max_memory_allocated`, reset before every step; the maximum
  over the schedule's steps), beside the library's estimate (`memory.estimate_memory`). "0 teachers" is the base
  model as the teacher (no teacher adapter), as in `benchmarks/opd_step.py`.
- GRPO (SDE at noise level 0.7, beta 0.04, per-device batch 4 = one group of 4, a cheap image statistic as the
  reward): seconds per step after a warm-up step, images per second, the trainer's rollout / reward / training split,
  peak memory, levers off and on.

Levers on: activation checkpointing, 8-bit AdamW (`optim="adamw_bnb_8bit"`; skipped, and recorded, when
bitsandbytes does not import), the text encoders off the accelerator once the prompts are encoded up front
(`text_encoder_offload`, `--text_encoder_offload`) and the VAE on the CPU except while it decodes (`offload_vae`).
Levers off: none of them, `offload_vae=False` said explicitly (OPD would otherwise offload it). bf16 weights in both.
The text encoders and the VAE are built once and shared by every configuration (the script keeps a reference to
them, so with `text_encoder_offload="free"` their host memory is not given back; their accelerator memory is, as in a
real run); the transformer is rebuilt (seeded) for each configuration, so none inherits another's adapters or wrappers.

Robustness: each configuration runs in a guard (an out-of-memory error is recorded as `"oom"`, any other error with
its message, and the next configuration runs); a time guard starts no configuration unless it should end within
`--time_budget` seconds of the process' start (predicted by the longest similar configuration so far), recording it as
skipped; the JSON is rewritten after every configuration, so a killed run leaves what it measured; the exit status is 0
whenever the JSON was written. Progress is logged with UTC timestamps to stderr; the figures end as two tables on
stdout.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional


_IMPORT_START = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` as well as `python -m benchmarks.gpu_check`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; a stray Hub call fails at once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from benchmarks._common import load_averages, median_and_spread  # noqa: E402
from diffusion_opd_trainer import (  # noqa: E402
    DiffusionGRPOConfig,
    DiffusionGRPOTrainer,
    DiffusionOPDConfig,
    DiffusionOPDTrainer,
)
from diffusion_opd_trainer.lora import STUDENT_ADAPTER  # noqa: E402
from diffusion_opd_trainer.memory import estimate_memory  # noqa: E402
from diffusion_opd_trainer.pipelines import get_family  # noqa: E402
from diffusion_opd_trainer.quiet import dropped_log_messages, quiet_pipeline_imports  # noqa: E402
from diffusion_opd_trainer.testing import (  # noqa: E402
    DEFAULT_WORDS,
    build_clip_tokenizer,
    build_t5_tokenizer,
    save_random_lora,
    seeded,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)


with quiet_pipeline_imports():
    from diffusers import StableDiffusion3Pipeline  # noqa: E402

_IMPORTED = time.monotonic()

logger = logging.getLogger("gpu_check")

SD35_FOLDER = ROOT / "examples" / "configs" / "stable-diffusion-3.5-medium"
DEFAULT_OUTPUT = ROOT / "results" / "gpu_check.json"
DEFAULT_TINY_OUTPUT = ROOT / "results" / "gpu_check_tiny.json"
# Files of a real tokenizer; a tokenizer folder with none of them only states its length limit.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model")
PROMPTS = [" ".join(DEFAULT_WORDS[(i + k) % len(DEFAULT_WORDS)] for k in range(4)) for i in range(0, 48, 2)]
GUIDANCE_SCALE = 4.5
LORA_RANK, LORA_ALPHA = 32, 64
GRPO_BETA = 0.04
GRPO_NOISE_LEVEL = 0.7
SCHEDULES = ("fused", "two_pass")
LEVERS = ("off", "on")
GIB = 2**30
# A configuration starts only if its predicted time, times this margin, still ends within the budget.
TIME_MARGIN = 1.15


# ----- the model -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Model:
    """
    What every configuration shares: the frozen components (text encoders, tokenizers, VAE), a factory of fresh
    transformers and schedulers, the teachers' LoRA files, and a description for the JSON.
    """

    components: dict[str, Any]
    make_transformer: Callable[[], torch.nn.Module]
    make_scheduler: Callable[[], Any]
    info: dict[str, Any]
    probe: Optional[torch.nn.Module] = None  # a first transformer, for the teachers' LoRA files (then dropped)
    teacher_paths: list[str] = dataclasses.field(default_factory=list)

    def pipeline(self, transformer: Optional[torch.nn.Module] = None) -> StableDiffusion3Pipeline:
        """A new pipeline of the shared components with `transformer` (a fresh one by default), a fresh scheduler."""
        transformer = self.make_transformer() if transformer is None else transformer
        pipe = StableDiffusion3Pipeline(**self.components, transformer=transformer, scheduler=self.make_scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cap_layers(config: Any, max_layers: int) -> Any:
    """A component config with at most `max_layers` blocks (diffusers: a dict; transformers: a config object)."""
    if isinstance(config, dict):
        config = dict(config)
        if "num_layers" in config:
            config["num_layers"] = min(config["num_layers"], max_layers)
            if config.get("dual_attention_layers"):
                config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < max_layers]
        return config
    for name in ("num_hidden_layers", "num_layers"):
        if hasattr(config, name):
            setattr(config, name, min(getattr(config, name), max_layers))
    return config


def _random_component(
    folder: Path,
    name: str,
    library: str,
    class_name: str,
    device: torch.device,
    dtype: torch.dtype,
    max_layers: Optional[int] = None,
) -> torch.nn.Module:
    """
    Component `name` of a pipeline folder with random weights from its config: built on `device` (float32, so every
    initialiser runs on any device), then cast to `dtype`, frozen and in eval mode; `max_layers` caps its blocks.
    """
    import transformers

    path = folder / name
    with torch.device(device):
        if library == "diffusers":
            cls = getattr(diffusers, class_name)
            config = dict(cls.load_config(path))
            module = cls.from_config(_cap_layers(config, max_layers) if max_layers else config)
        elif library == "transformers":
            cls = getattr(transformers, class_name)
            config = transformers.AutoConfig.from_pretrained(path)  # a local folder: no download, no remote code
            module = cls(_cap_layers(config, max_layers) if max_layers else config)
        else:
            raise ValueError(f"{path}: unknown library {library!r} for {class_name}.")
    return _cast(module, dtype=dtype).eval().requires_grad_(False)


def _cast(module: torch.nn.Module, **to) -> torch.nn.Module:
    """`module.to(**to)`, without diffusers' advice to cast in `from_pretrained` instead (there is none here)."""
    with dropped_log_messages("diffusers.models.modeling_utils", r"^There are modules in"):
        return module.to(**to)


def _tokenizer(folder: Path, name: str, class_name: str) -> tuple[Any, str]:
    """The folder's tokenizer if it ships one, else a deterministic word-level one with the folder's length limit."""
    import transformers

    path = folder / name
    if any((path / file).is_file() for file in TOKENIZER_FILES):
        return getattr(transformers, class_name).from_pretrained(path), f"{class_name} from {path}"
    limit = json.loads((path / "tokenizer_config.json").read_text())["model_max_length"]
    if "T5" in class_name:
        return build_t5_tokenizer(DEFAULT_WORDS, model_max_length=limit), f"word-level T5, max length {limit}"
    return build_clip_tokenizer(DEFAULT_WORDS, model_max_length=limit), f"word-level CLIP, max length {limit}"


def sd35_model(
    folder: Path, device: torch.device, dtype: torch.dtype, seed: int = 0, max_layers: Optional[int] = None
) -> Model:
    """SD3.5-Medium's architecture from its config folder, random weights on `device` in `dtype` (see above)."""
    index = json.loads((folder / "model_index.json").read_text())
    specs = {
        name: spec
        for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None
    }
    components: dict[str, Any] = {}
    tokenizers: dict[str, str] = {}
    parameters: dict[str, int] = {}
    for offset, (name, (library, class_name)) in enumerate(sorted(specs.items())):
        if name in ("transformer", "scheduler"):
            continue
        if name.startswith("tokenizer"):
            components[name], tokenizers[name] = _tokenizer(folder, name, class_name)
            continue
        start = time.monotonic()
        with seeded(seed + offset):
            components[name] = _random_component(folder, name, library, class_name, device, dtype, max_layers)
        parameters[name] = _parameters(components[name])
        seconds = time.monotonic() - start
        logger.info("built %s (%s, %.3f B parameters) in %.1f s", name, class_name, parameters[name] / 1e9, seconds)
        _empty_cache(device)
    library, transformer_class = specs["transformer"]
    scheduler_class = getattr(diffusers, specs["scheduler"][1])
    scheduler_config = scheduler_class.load_config(folder / "scheduler")

    def make_transformer() -> torch.nn.Module:
        with seeded(seed):
            return _random_component(folder, "transformer", library, transformer_class, device, dtype, max_layers)

    probe = make_transformer()
    parameters["transformer"] = _parameters(probe)
    logger.info("transformer: %.3f B parameters", parameters["transformer"] / 1e9)
    info = {
        "architecture": f"SD3.5-Medium from {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}",
        "weights": f"random (seeded), {str(dtype).removeprefix('torch.')}, built on {device.type}",
        "parameters": parameters,
        "tokenizers": tokenizers,
        "tokenizer_note": "the config folder ships no vocabularies: deterministic word-level tokenizers "
        "(diffusion_opd_trainer.testing) with the folder's length limits, padded to them as the real ones"
        if any("word-level" in text for text in tokenizers.values())
        else "the folder's own tokenizers",
    }
    if max_layers:
        info["max_layers"] = max_layers
    return Model(components, make_transformer, lambda: scheduler_class.from_config(scheduler_config), info, probe)


def tiny_model(resolution: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Model:
    """The tiny SD3 pipeline of `diffusion_opd_trainer.testing` (2 blocks), the transformer rebuilt for each run."""
    with dropped_log_messages("diffusers.models.modeling_utils", r"^There are modules in"):
        pipe = tiny_sd3_pipeline(seed=seed, resolution=resolution, dtype=dtype)
    components = {
        name: module.to(device) if isinstance(module, torch.nn.Module) else module
        for name, module in pipe.components.items()
        if name not in ("transformer", "scheduler") and module is not None
    }
    scheduler = pipe.scheduler

    def make_transformer() -> torch.nn.Module:
        with seeded(seed):
            transformer = tiny_sd3_transformer(resolution // 2, 2, joint_attention_dim=32, pooled_projection_dim=32)
        return _cast(transformer, device=device, dtype=dtype).eval().requires_grad_(False)

    probe = make_transformer()
    info = {
        "architecture": "tiny SD3 (diffusion_opd_trainer.testing.tiny_sd3_pipeline, 2 blocks)",
        "weights": f"random (seeded), {str(dtype).removeprefix('torch.')}, on {device.type}",
        "parameters": {
            "transformer": _parameters(probe),
            **{name: _parameters(m) for name, m in components.items() if isinstance(m, torch.nn.Module)},
        },
        "tokenizers": {name: "word-level (testing)" for name in components if name.startswith("tokenizer")},
        "tokenizer_note": "the tiny pipeline's deterministic word-level tokenizers",
    }
    return Model(components, make_transformer, lambda: type(scheduler).from_config(scheduler.config), info, probe)


def write_teachers(pipe: StableDiffusion3Pipeline, folder: str, count: int) -> tuple[list[str], str]:
    """
    `count` random teacher LoRAs (PEFT folders, r32, alpha 64, the default targets) for `pipe`'s transformer, each
    changing its layers' outputs by about a tenth (weights of std `sqrt(0.03 / sqrt(r x width))`); returns their
    paths and a description.
    """
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    std = math.sqrt(0.03 / math.sqrt(LORA_RANK * width))
    paths = [
        save_random_lora(
            pipe, Path(folder, f"teacher{i}"), "peft", r=LORA_RANK, lora_alpha=LORA_ALPHA, std=std, seed=i
        )
        for i in range(count)
    ]
    return paths, f"{count} random PEFT LoRAs (r{LORA_RANK}, alpha {LORA_ALPHA}, weights std {std:.4f})"


# ----- levers --------------------------------------------------------------------------------------------------------
def bitsandbytes_status() -> tuple[bool, str]:
    """Whether 8-bit AdamW can run: bitsandbytes imports (its version), or why not."""
    try:
        import bitsandbytes
    except Exception as error:  # ImportError, or a library load error on a machine without its CUDA build
        return False, f"bitsandbytes does not import ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
    return True, f"bitsandbytes {getattr(bitsandbytes, '__version__', '?')}"


def lever_settings(on: bool, text_encoder_offload: str, bnb: tuple[bool, str]) -> dict:
    """
    The config keyword arguments of the levers off or on, and what was applied: 8-bit AdamW without bitsandbytes is
    recorded as skipped with the reason. Off says `offload_vae=False` explicitly (OPD would otherwise offload it).
    """
    kwargs: dict[str, Any] = {
        "activation_checkpointing": on,
        "text_encoder_offload": text_encoder_offload if on else "none",
        "offload_vae": on,
    }
    skipped: dict[str, str] = {}
    if on and bnb[0]:
        kwargs["optim"] = "adamw_bnb_8bit"
    elif on:
        skipped["optim"] = f"adamw_bnb_8bit not used: {bnb[1]}"
    applied = {**kwargs, "optim": kwargs.get("optim", "the TrainingArguments default")}
    return {"kwargs": kwargs, "applied": applied, "skipped": skipped}


# ----- one configuration ---------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _allocated_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


class StepRecorder(TrainerCallback):
    """
    Times every optimizer step (the device synchronised at both ends; the optimizer step included, logging not) and
    records its peak accelerator memory (the peak is reset when the step begins). With `schedules`, sets the OPD
    rollout schedule of each step before it runs: step `k` runs `schedules[k]`.
    """

    def __init__(self, device: torch.device, label: str, total: int, schedules: Optional[list[str]] = None):
        self.device = device
        self.label = label
        self.total = total
        self.schedules = schedules
        self.steps: list[dict[str, Any]] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.schedules is not None:
            args.rollout_schedule = self.schedules[len(self.steps)]
        _synchronize(self.device)
        _reset_peak(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize(self.device)
        seconds = time.perf_counter() - self._start
        step = {"schedule": args.rollout_schedule if self.schedules is not None else None, "seconds": seconds}
        step["peak_gib"] = _peak_gib(self.device)
        self.steps.append(step)
        peak = f", peak {step['peak_gib']:.2f} GiB" if step["peak_gib"] is not None else ""
        schedule = f" {step['schedule']}" if step["schedule"] else ""
        logger.info("  %s step %d/%d%s: %.3f s%s", self.label, len(self.steps), self.total, schedule, seconds, peak)


def _settings(args, output_dir: str, batch: int, levers: dict, max_steps: int, device: torch.device) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        num_inference_steps=args.inference_steps,
        guidance_scale=GUIDANCE_SCALE,
        resolution=args.resolution,
        max_steps=max_steps,
        bf16=True,
        use_cpu=device.type == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **levers["kwargs"],
    )


def _memory_estimate(trainer, pipe, num_teachers: int, levers: dict) -> dict:
    """The library's estimate of this run's accelerator memory, with the run's levers said explicitly."""
    applied = levers["applied"]
    kwargs: dict[str, Any] = dict(
        num_teachers=num_teachers,
        resolution=trainer.image_size[0],
        gradient_checkpointing=applied["activation_checkpointing"],
        optimizer_8bit="8bit" in str(applied["optim"]),
        text_encoders_on_device=trainer.args.text_encoder_offload == "none",
        vae_on_device=not trainer.offload_vae,
    )
    try:
        estimate = estimate_memory(pipe, trainer.args, **kwargs)
    except Exception as error:  # the estimate is a comparison, not the measurement: record why it is missing
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "total_gib": estimate.total / GIB,
        "parts_gib": {name: None if value is None else value / GIB for name, value in estimate.parts.items()},
    }


def _optimizer_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


def _device_of(module: Optional[torch.nn.Module]) -> str:
    if module is None:
        return "released"
    parameter = next(module.parameters(), None)
    return "no parameters" if parameter is None else str(parameter.device)


def trainer_state(trainer, pipe) -> dict:
    """What the levers did to a trainer, read back from it once built: checkpointing, optimizer, where things live."""
    denoiser = trainer.unwrapped_denoiser
    adapters = [name for name in getattr(denoiser, "peft_config", {}) if name != STUDENT_ADAPTER]
    return {
        "activation_checkpointing": bool(getattr(denoiser, "is_gradient_checkpointing", False)),
        "optim": _optimizer_name(trainer.args),
        "teacher_adapters": len(adapters),
        "text_encoders": {
            name: _device_of(getattr(pipe, name, None))
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if hasattr(pipe, name)
        },
        "vae": _device_of(getattr(pipe, "vae", None)),
    }


def _summary(values: list[float]) -> dict:
    return {**median_and_spread(values), "values": values}


def run_opd(model: Model, args, device: torch.device, teachers: int, batch: int, levers: dict, partial: dict) -> dict:
    """
    One OPD configuration: a trainer with `teachers` teachers (0: the base model as the teacher) at per-device
    `batch`, a warm-up step of each schedule, then `args.repeats` rounds of a fused and a two-pass step.
    """
    loaded = max(1, teachers)
    schedules = list(SCHEDULES) * (1 + args.repeats)
    label = f"opd teachers={teachers} batch={batch} levers={levers['name']}"
    recorder = StepRecorder(device, label, len(schedules), schedules)
    partial["steps"] = recorder.steps
    with tempfile.TemporaryDirectory() as tmp:
        config = DiffusionOPDConfig(
            **_settings(args, tmp, batch, levers, len(schedules), device), noise_level=0.0, rollout_schedule="fused"
        )
        _reset_peak(device)
        start = time.perf_counter()
        pipe = model.pipeline()
        trainer = DiffusionOPDTrainer(
            pipe,
            teachers={f"task{i}": model.teacher_paths[i] for i in range(loaded)},
            args=config,
            train_dataset=Dataset.from_dict(
                {"prompt": PROMPTS, "task": [f"task{i % loaded}" for i in range(len(PROMPTS))]}
            ),
            callbacks=[recorder],
        )
        trainer.remove_callback(PrinterCallback)  # the log dicts: the recorder logs each step instead
        if teachers == 0:  # the base model as the teacher: no teacher adapter in memory
            teacher = trainer.teachers["task0"]
            trainer.unwrapped_denoiser.delete_adapters([teacher.adapter_name])
            teacher.adapter_name = None
        _synchronize(device)
        partial.update(setup_seconds=time.perf_counter() - start, setup_peak_gib=_peak_gib(device))
        partial["estimate"] = _memory_estimate(trainer, pipe, teachers, levers)
        partial["state"] = trainer_state(trainer, pipe)
        partial["optim"] = partial["state"]["optim"]
        _empty_cache(device)
        partial["allocated_before_steps_gib"] = _allocated_gib(device)
        trainer.train()
    result = {"steps": recorder.steps}
    for schedule in SCHEDULES:
        mine = [step for step in recorder.steps if step["schedule"] == schedule]
        peaks = [step["peak_gib"] for step in mine if step["peak_gib"] is not None]
        result[schedule] = {
            "warmup_seconds": mine[0]["seconds"],
            "step_seconds": _summary([step["seconds"] for step in mine[1:]]),
            "peak_memory_gib": max(peaks) if peaks else None,
        }
    fused, two_pass = (result[s]["step_seconds"]["values"] for s in SCHEDULES)
    result["two_pass_over_fused"] = (
        result["two_pass"]["step_seconds"]["median"] / result["fused"]["step_seconds"]["median"]
    )
    result["two_pass_over_fused_per_round"] = median_and_spread([b / a for a, b in zip(fused, two_pass)])
    peaks = [result[s]["peak_memory_gib"] for s in SCHEDULES if result[s]["peak_memory_gib"] is not None]
    result["peak_memory_gib"] = max(peaks) if peaks else None
    return result


def image_contrast(prompts, images, **kwargs) -> list[float]:
    """A cheap image-dependent reward (the spread of each image's pixels): the check times the trainer, no reward."""
    return images.float().std(dim=(1, 2, 3)).tolist()


def run_grpo(model: Model, args, device: torch.device, levers: dict, partial: dict) -> dict:
    """One GRPO configuration: a warm-up step, then `args.grpo_steps` timed steps."""
    total = 1 + args.grpo_steps
    recorder = StepRecorder(device, f"grpo levers={levers['name']}", total)
    partial["steps"] = recorder.steps
    with tempfile.TemporaryDirectory() as tmp:
        config = DiffusionGRPOConfig(
            **_settings(args, tmp, args.grpo_batch, levers, total, device),
            num_generations=args.grpo_generations,
            beta=GRPO_BETA,
            noise_level=GRPO_NOISE_LEVEL,
        )
        _reset_peak(device)
        start = time.perf_counter()
        pipe = model.pipeline()
        trainer = DiffusionGRPOTrainer(
            pipe,
            reward_funcs=image_contrast,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            callbacks=[recorder],
        )
        trainer.remove_callback(PrinterCallback)
        _synchronize(device)
        partial.update(setup_seconds=time.perf_counter() - start, setup_peak_gib=_peak_gib(device))
        partial["estimate"] = _memory_estimate(trainer, pipe, 0, levers)
        partial["state"] = trainer_state(trainer, pipe)
        partial["optim"] = partial["state"]["optim"]
        _empty_cache(device)
        partial["allocated_before_steps_gib"] = _allocated_gib(device)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "timing/rollout" in entry][1:]
    seconds = [step["seconds"] for step in recorder.steps[1:]]
    summary = _summary(seconds)
    peaks = [step["peak_gib"] for step in recorder.steps if step["peak_gib"] is not None]
    return {
        "steps": recorder.steps,
        "warmup_seconds": recorder.steps[0]["seconds"],
        "step_seconds": summary,
        "images_per_second": args.grpo_batch / summary["median"],
        # As the trainer logs them (wall time of each phase, without a device synchronisation at its ends).
        "phase_seconds": {
            phase: median_and_spread([entry[f"timing/{phase}"] for entry in logs])["median"] if logs else None
            for phase in ("rollout", "reward", "train")
        },
        "peak_memory_gib": max(peaks) if peaks else None,
    }


def _runner(entry: dict, levers: dict, model: Model, args, device: torch.device) -> Callable[[dict], dict]:
    """The function that runs `entry`'s configuration into a `partial` dict (see [`guarded`])."""
    lever = {**levers[entry["levers"]][entry["kind"]], "name": entry["levers"], "on": entry["levers"] == "on"}
    if entry["kind"] == "opd":
        return lambda partial: run_opd(model, args, device, entry["teachers"], entry["batch"], lever, partial)
    return lambda partial: run_grpo(model, args, device, lever, partial)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def guarded(run: Callable[[dict], dict], entry: dict, device: torch.device) -> dict:
    """
    Runs one configuration into `entry`: `"ok"` and its figures, `"oom"` or `"error"` with the message (and whatever
    it measured before); the memory it held is released either way.
    """
    partial: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        entry.update(run(partial))
        entry["status"] = "ok"
    except Exception as error:
        entry.update({key: value for key, value in partial.items() if key not in entry})
        entry["status"] = "oom" if _is_oom(error) else "error"
        entry["error"] = "".join(traceback.format_exception_only(type(error), error)).strip()[:2000]
        logger.error("%s: %s", entry["name"], entry["error"].splitlines()[-1][:300])
        if entry["status"] == "error":
            logger.debug("%s", traceback.format_exc())
    entry["wall_seconds"] = time.perf_counter() - start
    _empty_cache(device)
    entry["allocated_after_gib"] = _allocated_gib(device)
    for key in ("setup_seconds", "setup_peak_gib", "estimate", "state", "optim", "allocated_before_steps_gib"):
        if key in partial:
            entry.setdefault(key, partial[key])
    return entry


# ----- the plan and the time guard -----------------------------------------------------------------------------------
def plan(args) -> list[dict]:
    """The configurations in the order they run: the paper's recipe (3 teachers) and GRPO first, then the rest."""
    levers = list(LEVERS) if args.levers == "both" else [args.levers]
    teachers = sorted(set(args.teachers), reverse=True)
    batches = sorted(set(args.batches))
    entries = []

    def opd(count: int, batch: int) -> list[dict]:
        return [
            {
                "kind": "opd",
                "teachers": count,
                "batch": batch,
                "levers": lever,
                "name": f"opd/teachers={count}/batch={batch}/levers={lever}",
            }
            for lever in levers
        ]

    grpo = [
        {"kind": "grpo", "batch": args.grpo_batch, "levers": lever, "name": f"grpo/levers={lever}"} for lever in levers
    ]
    for i, count in enumerate(teachers):
        for batch in batches:
            entries += opd(count, batch)
            if i == 0 and batch == batches[0] and not args.skip_grpo:
                entries += grpo
    if not teachers and not args.skip_grpo:
        entries += grpo
    return entries


def predicted_seconds(entry: dict, done: list[dict]) -> float:
    """The longest wall time of the most similar finished configuration (0 when none has finished yet)."""
    finished = [e for e in done if e.get("status") in ("ok", "oom", "error")]
    for similar in (
        lambda e: (e["kind"], e["batch"], e["levers"]) == (entry["kind"], entry["batch"], entry["levers"]),
        lambda e: (e["kind"], e["batch"]) == (entry["kind"], entry["batch"]),
        lambda e: True,
    ):
        times = [e["wall_seconds"] for e in finished if similar(e)]
        if times:
            return max(times)
    return 0.0


# ----- report --------------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "device": device.type,
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            device_name=properties.name,
            device_memory_gib=properties.total_memory / GIB,
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    return info


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def _seconds(summary: Optional[dict]) -> str:
    if not summary:
        return "-"
    return f"{summary['median']:.3f} ({100 * summary['spread']:.0f}%)"


def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def tables(report: dict) -> str:
    """The OPD and GRPO tables (Markdown): seconds per step as median (spread), peak GiB, the estimate."""
    lines = [
        "| teachers | batch | levers | fused s/step | two-pass s/step | two-pass / fused | peak GiB fused | "
        "peak GiB two-pass | estimate GiB | status |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in report["opd"]:
        fused, two_pass = e.get("fused", {}), e.get("two_pass", {})
        ratio = f"{e['two_pass_over_fused']:.2f}x" if "two_pass_over_fused" in e else "-"
        lines.append(
            f"| {e['teachers']} | {e['batch']} | {e['levers']} | {_seconds(fused.get('step_seconds'))} | "
            f"{_seconds(two_pass.get('step_seconds'))} | {ratio} | {_gib(fused.get('peak_memory_gib'))} | "
            f"{_gib(two_pass.get('peak_memory_gib'))} | {_gib(e.get('estimate', {}).get('total_gib'))} | "
            f"{e['status']} |"
        )
    lines += [
        "",
        "| GRPO levers | images/step | s/step | images/s | rollout s | reward s | train s | peak GiB | estimate GiB "
        "| status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in report["grpo"]:
        phases = e.get("phase_seconds") or {}
        images = f"{e['images_per_second']:.2f}" if "images_per_second" in e else "-"
        lines.append(
            f"| {e['levers']} | {e['batch']} | {_seconds(e.get('step_seconds'))} | {images} | "
            + " | ".join(_gib(phases.get(p)) for p in ("rollout", "reward", "train"))
            + f" | {_gib(e.get('peak_memory_gib'))} | {_gib(e.get('estimate', {}).get('total_gib'))} | "
            f"{e['status']} |"
        )
    return "\n".join(lines)


# ----- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny SD3 pipeline, on the CPU without a GPU (CI)")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"JSON file (default {DEFAULT_OUTPUT.relative_to(ROOT)}; --tiny {DEFAULT_TINY_OUTPUT.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--time_budget",
        type=float,
        default=480.0,
        help="seconds from the process' start within which every configuration started must end",
    )
    parser.add_argument("--levers", choices=["both", "off", "on"], default="both")
    parser.add_argument(
        "--text_encoder_offload",
        choices=["cpu", "free"],
        default="free",
        help="the text encoders' lever when the levers are on",
    )
    parser.add_argument("--teachers", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="OPD per-device batches (prompts)")
    parser.add_argument(
        "--repeats",
        type=int,
        help="OPD rounds of a fused and a two-pass step after the warm-up (default 2; --tiny: 1)",
    )
    parser.add_argument("--grpo_steps", type=int, help="timed GRPO steps after the warm-up (default 2; --tiny: 1)")
    parser.add_argument("--grpo_batch", type=int, default=4, help="GRPO images per step and device")
    parser.add_argument("--grpo_generations", type=int, default=4, help="GRPO group size")
    parser.add_argument("--skip_grpo", action="store_true")
    parser.add_argument("--inference_steps", type=int, help="rollout steps (default 10; --tiny: 3)")
    parser.add_argument("--resolution", type=int, help="image size in pixels (default 512; --tiny: 32)")
    parser.add_argument(
        "--device",
        help="default: cuda (required without --tiny, unless given as cpu); --tiny: cuda if there is one, else cpu",
    )
    parser.add_argument("--config_folder", type=Path, default=SD35_FOLDER, help="the pipeline's config folder")
    parser.add_argument(
        "--layers",
        type=int,
        help="build each model with at most this many blocks: a quick run of the full-size code path on a small "
        "machine (the figures then describe no real model)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--verbose", action="store_true", help="also the library's INFO logs")
    args = parser.parse_args(argv)
    defaults = (
        dict(repeats=1, grpo_steps=1, inference_steps=3, resolution=32)
        if args.tiny
        else dict(repeats=2, grpo_steps=2, inference_steps=10, resolution=512)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.grpo_steps < 1:
        parser.error("--repeats and --grpo_steps must be at least 1.")
    if args.output is None:
        args.output = DEFAULT_TINY_OUTPUT if args.tiny else DEFAULT_OUTPUT
    return args


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime


@contextlib.contextmanager
def _logging(verbose: bool):
    """Timestamped progress on stderr (this script's logger); the library's INFO lines only with `verbose`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UTCFormatter("%(asctime)sZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    library = logging.getLogger("diffusion_opd_trainer")
    saved = (logger.level, logger.propagate, library.level)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    library.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        library.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        library.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        library.setLevel(saved[2])


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the check (see the module docstring); returns the exit status (0 once the JSON is written)."""
    args = parse_args(argv)
    # A SIGTERM (an outer `timeout`) ends the run as Ctrl-C would: the JSON is written once more, marked.
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        with _logging(args.verbose):
            return _main(args, time.monotonic() - (_IMPORTED - _IMPORT_START))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args, start: float) -> int:
    def elapsed() -> float:
        return time.monotonic() - start

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.tiny:
        device = torch.device("cpu")
    else:
        logger.error("No CUDA device: the full-size check needs one (use --tiny, or --device cpu with --layers).")
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    bnb = bitsandbytes_status()
    report: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "full",
        "complete": False,
        "command": " ".join([Path(sys.argv[0]).name, *map(str, sys.argv[1:])]) if __name__ == "__main__" else None,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(device),
        "settings": {
            "resolution": args.resolution,
            "num_inference_steps": args.inference_steps,
            "trained_steps": max(1, int(0.99 * args.inference_steps)),
            "guidance_scale": GUIDANCE_SCALE,
            "student_lora": f"the trainers' default (r{LORA_RANK}, alpha {LORA_ALPHA}, attention projections)",
            "opd": f"ODE (noise level 0), {args.repeats} round(s) of a fused and a two-pass step after one warm-up "
            "step of each, interleaved in one trainer",
            "grpo": f"noise level {GRPO_NOISE_LEVEL}, beta {GRPO_BETA}, {args.grpo_batch} images per step "
            f"(groups of {args.grpo_generations}), {args.grpo_steps} timed step(s) after one warm-up step",
            "prompts": len(PROMPTS),
            "step_time": "one optimizer step, device synchronised at both ends (rollout, teachers, backward passes, "
            "optimizer step; not logging)",
            "peak_memory": "torch.cuda.max_memory_allocated, reset before every step; a schedule's peak is the "
            "maximum over its steps (the warm-up, which allocates the optimizer state, included)",
        },
        "levers": {},
        "opd": [],
        "grpo": [],
        "time_guard": {"budget_seconds": args.time_budget, "skipped": []},
        "load_average_before": load_averages(),
    }
    levers = {}
    for lever in LEVERS:
        opd = lever_settings(lever == "on", args.text_encoder_offload, bnb)
        grpo = lever_settings(lever == "on", args.text_encoder_offload, bnb)
        levers[lever] = {"opd": opd, "grpo": grpo}
        report["levers"][lever] = {"applied": opd["applied"], "skipped": opd["skipped"], "bf16": True}
    report["levers"]["bitsandbytes"] = bnb[1]
    write_json(report, args.output)
    name = report["environment"].get("device_name", device)
    logger.info("gpu_check (%s) on %s; writing %s", report["mode"], name, args.output)

    workspace = tempfile.TemporaryDirectory(prefix="gpu_check_")
    try:
        setup_start = time.monotonic()
        try:
            if args.tiny:
                model = tiny_model(args.resolution, device, dtype)
            else:
                model = sd35_model(args.config_folder, device, dtype, max_layers=args.layers)
            probe_pipe = model.pipeline(model.probe)
            report["settings"]["text_tokens"] = get_family(probe_pipe).text_length_limits(None)
            count = max(1, max(args.teachers, default=1))
            model.teacher_paths, model.info["teachers"] = write_teachers(probe_pipe, workspace.name, count)
            model.probe = probe_pipe = None  # only the shared components stay
        except Exception as error:
            report["setup_error"] = "".join(traceback.format_exception_only(type(error), error)).strip()
            logger.error("setting up the model failed: %s", report["setup_error"])
            logger.debug("%s", traceback.format_exc())
            write_json(report, args.output)
            return 1
        _empty_cache(device)
        # The imports and the shared model live to the end: out of the collector's sight, each configuration's
        # collections (to free its trainer before the next is measured) scan only what it made (0.4 s a call less).
        gc.freeze()
        report["model"] = model.info
        report["model"]["setup_seconds"] = time.monotonic() - setup_start
        report["model"]["allocated_gib"] = _allocated_gib(device)
        logger.info("model ready in %.1f s (%.0f s since start)", report["model"]["setup_seconds"], elapsed())

        entries = plan(args)
        for entry in entries:  # all listed from the start: a killed run shows what it did not reach
            entry["status"] = "pending"
            report[entry["kind"]].append(entry)
        write_json(report, args.output)
        done: list[dict] = []
        try:
            for number, entry in enumerate(entries, 1):
                predicted = predicted_seconds(entry, done)
                if elapsed() + TIME_MARGIN * predicted > args.time_budget:
                    entry["status"] = "skipped"
                    entry["reason"] = (
                        f"time guard: {elapsed():.0f} s elapsed, about {predicted:.0f} s predicted, budget "
                        f"{args.time_budget:.0f} s"
                    )
                    report["time_guard"]["skipped"].append(entry["name"])
                    logger.warning("[%d/%d] %s skipped: %s", number, len(entries), entry["name"], entry["reason"])
                else:
                    logger.info("[%d/%d] %s (%.0f s elapsed)", number, len(entries), entry["name"], elapsed())
                    entry["status"] = "running"
                    guarded(_runner(entry, levers, model, args, device), entry, device)
                    done.append(entry)
                    status, seconds = entry["status"], entry["wall_seconds"]
                    logger.info("[%d/%d] %s: %s in %.1f s", number, len(entries), entry["name"], status, seconds)
                report["time_guard"]["elapsed_seconds"] = elapsed()
                write_json(report, args.output)
        except BaseException:  # SIGTERM (see `main`) or Ctrl-C: the JSON says where it stopped
            for entry in entries:
                if entry["status"] == "running":
                    entry["status"] = "interrupted"
            report["time_guard"]["elapsed_seconds"] = elapsed()
            write_json(report, args.output)
            raise
        report["complete"] = all(entry["status"] == "ok" for entry in entries)
    finally:
        gc.unfreeze()
        workspace.cleanup()
    report["time_guard"]["elapsed_seconds"] = elapsed()
    report["load_average_after"] = load_averages()
    write_json(report, args.output)
    print(tables(report))
    ok = sum(entry["status"] == "ok" for entry in entries)
    print(
        f"\n{report['mode']} check: {ok} of {len(entries)} configurations ok in {elapsed():.0f} s; JSON: {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
