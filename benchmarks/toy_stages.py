"""
The stages of the paper's Table 1 in miniature, on the toy world, and a runner that runs them in parallel processes:
single-task GRPO teachers, their multi-teacher on-policy distillation (ODE and SDE), the multi-task and cascade GRPO
baselines, and the evaluation of every model on every task's test prompts. `benchmarks/toy_report.py` turns what they
return into the table; `benchmarks/toy_table.py` is the command line.

```python
from benchmarks.toy_report import assemble_seed
from benchmarks.toy_stages import TableConfig, run_stages

outputs = run_stages(TableConfig.quick(output_dir="results/toy_table_quick", seed=0), workers=2)
table = assemble_seed(outputs)
```

Every model is a LoRA of the same size on the same bundled base model, trained on the same prompts (an equal number
per task) and evaluated by the same harness ([`~diffusion_opd_trainer.evaluate`]: deterministic ODE sampler at the
toy's default steps and guidance, fixed seeds). Compute is counted the same way for every stage, inside the process
that trains it: a forward hook on the denoiser adds up *image-forwards* (the batch size of every denoiser call; a CFG
call on `B` latents counts `2B`), and wall-clock seconds of training exclude the periodic evaluations that draw the
reward-versus-compute curves.

Each stage (a teacher, a baseline, a distillation, an evaluation) is cached under `<output_dir>/seed-<seed>/`, keyed
by a hash of the settings it depends on, of the base model's weights and of the toy world's source code (renderer,
rewards, prompts, font), so teachers are trained once and a rerun only redoes what changed.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import diffusers
import torch
import transformers
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from diffusion_opd_trainer import toy
from diffusion_opd_trainer.evaluation import EvaluationResult, evaluate
from diffusion_opd_trainer.grpo_config import DiffusionGRPOConfig
from diffusion_opd_trainer.grpo_trainer import DiffusionGRPOTrainer
from diffusion_opd_trainer.lora import DEFAULT_TARGET_MODULES, STUDENT_ADAPTER, load_adapter_weights, read_lora
from diffusion_opd_trainer.opd_config import DiffusionOPDConfig
from diffusion_opd_trainer.opd_trainer import DiffusionOPDTrainer
from diffusion_opd_trainer.toy.model import (
    BASE_MODEL_DIR,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    load_pipeline,
)
from diffusion_opd_trainer.toy.rewards import reward_funcs
from diffusion_opd_trainer.toy.world import TASKS, prompts


logger = logging.getLogger(__name__)

__all__ = [
    "ForwardCounter",
    "StageOutputs",
    "StageResult",
    "TableConfig",
    "base_model_fingerprint",
    "distill",
    "evaluate_model",
    "opd_name",
    "run_stages",
    "stage_keys",
    "train_cascade_grpo",
    "train_multitask_grpo",
    "train_teacher",
    "world_fingerprint",
]

STAGE_FILE = "stage.json"
LORA_SUBDIR = "lora"
# Bump when a change to this module changes what a cached stage would contain.
CACHE_VERSION = 2
# The toy world's code: a change to any of these (a reward, the renderer, the prompts) changes what a stage trains on
# and how it is scored, so their source is part of every cache key. The model code is covered by the weights' hash.
WORLD_SOURCES = tuple(Path(toy.__file__).parent / f"{name}.py" for name in ("rewards", "render", "world", "font"))


@dataclass
class TableConfig:
    r"""
    Settings of the miniature Table 1. [`TableConfig.quick`] runs the whole pipeline in a few minutes;
    [`TableConfig.full`] is the committed table (about 31 minutes a seed on two quiet CPU cores, see
    docs/toy_table.md).

    Parameters:
        output_dir (`str`, defaults to `"results/toy_table"`):
            Root of the runs: seed `N` caches its stages (LoRAs, logs, evaluations) under `<output_dir>/seed-N/` and
            writes its table to `<output_dir>/seed-N.json`; the report over all seeds is written next to it as
            `<output_dir>.json`, `<output_dir>.md` and `<output_dir>_curves.png`.
        base_model (`str`, *optional*):
            A pipeline folder to start from instead of the bundled toy base model (see `toy.load_pipeline`).
        seed (`int`, defaults to 0):
            Seed of every trainer (LoRA init, prompt order, rollout noise). The evaluation noise does not depend on it
            (`eval_seed`), so the spread over seeds is the spread of training.
        train_prompts_per_task (`int`, *optional*):
            Training prompts of each task (the first ones of its shuffled train split), the same number for every task
            so that tasks weigh the same in the multi-task runs. Defaults to all that the smallest task's train split
            holds beside its validation prompts.
        eval_prompts_per_task (`int`, *optional*):
            Test prompts of each task in the table (the first ones of its shuffled test split); all by default.
        curve_prompts_per_task (`int`, defaults to 48):
            Validation prompts of each task: train-split prompts right after the training prompts, never trained on.
            The periodic evaluations that draw the reward-versus-compute curves (and any tuning) use them, so that the
            test prompts are only used for the table.
        curve_points (`int`, defaults to 4):
            Evaluations per training run for the curves (plus the base model at zero compute): multi-task GRPO's and
            the distillations', whose curves the compute claims read.
        teacher_curve_points (`int`, defaults to 1):
            Evaluations per teacher run: the final one is what the curves' normalised average divides by; more only
            draw the teachers' curves in the plot (each costs about 20 s of a two-core machine's time).
        cascade_curve_points (`int`, defaults to 1):
            Evaluations per phase of cascade GRPO (1: at the end of each task's phase, which shows the forgetting).
        eval_seed (`int`, defaults to 0):
            Base seed of the evaluation noise (image `i` of a task starts from the noise of seed `eval_seed + i`).
        eval_num_inference_steps (`int`), eval_guidance_scale (`float`), eval_batch_size (`int`):
            The evaluation sampler: the toy's default ODE steps and CFG.
        num_inference_steps (`int`, defaults to 10), guidance_scale (`float`):
            Rollout steps and CFG of every training run (GRPO and OPD, students and teachers alike).
        lora_r (`int`, defaults to 32), lora_alpha (`int`, defaults to 64):
            The LoRA of every model, on the attention projections (the paper's).
        grpo_learning_rate (`float`), grpo_beta (`float`), grpo_noise_level (`float`), grpo_kl_scaling (`str`),
        grpo_scale_rewards (`str`), num_generations (`int`), grpo_prompts_per_step (`int`),
        grpo_gradient_accumulation_steps (`int`), grpo_sde_window_size (`int`, *optional*),
        grpo_sde_window_start (`int`, *optional*), grpo_per_prompt_stat_tracking (`bool`),
        grpo_timestep_fraction (`float`), grpo_share_initial_noise (`bool`):
            GRPO (teachers and both baselines): each micro-step samples `grpo_prompts_per_step` prompts x
            `num_generations` images; the others are [`DiffusionGRPOConfig`]'s settings of the same name. The SDE
            window sits on the first two steps by default: the toy's prompt-independent failures (washed-out
            shapes, the text banner, dull backgrounds) are settled there, so that is where exploration pays (a
            window at a random place trained the compositional teacher half as fast, see docs/toy_table.md).
        teacher_steps (`int`):
            Optimizer steps of each single-task teacher.
        multitask_steps (`int`, *optional*):
            Optimizer steps of multi-task GRPO. Defaults to the fewest steps whose denoiser forwards (by
            [`TableConfig.grpo_step_forwards`]) are at least those of OPD including its teachers (the three teachers
            plus the ODE distillation), so that the baseline gets no less compute than the method.
        cascade_steps_per_task (`int`, *optional*):
            Optimizer steps of cascade GRPO on each task in turn; defaults to `multitask_steps / len(TASKS)`, rounded
            up (the same compute as multi-task GRPO).
        opd_learning_rate (`float`), opd_batch_size (`int`), opd_gradient_accumulation_steps (`int`),
        opd_steps (`int`), opd_sde_noise_level (`float`), opd_timestep_fraction (`float`, defaults to 0.99):
            On-policy distillation: prompts per micro-step (one image each, tasks mixed), optimizer steps, the noise
            level of the SDE variant (the ODE variant uses 0), and the fraction of the rollout steps trained
            ([`DiffusionOPDConfig`]'s `timestep_fraction`).
    """

    output_dir: str = "results/toy_table"
    base_model: Optional[str] = None
    seed: int = 0
    train_prompts_per_task: Optional[int] = None
    eval_prompts_per_task: Optional[int] = None
    curve_prompts_per_task: int = 48
    curve_points: int = 4
    teacher_curve_points: int = 1
    cascade_curve_points: int = 1
    eval_seed: int = 0
    eval_num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    eval_guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    eval_batch_size: int = 64
    num_inference_steps: int = 10
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    lora_r: int = 32
    lora_alpha: int = 64
    grpo_learning_rate: float = 5e-4
    grpo_beta: float = 0.01
    grpo_noise_level: float = 0.7
    grpo_kl_scaling: str = "sigma"
    grpo_scale_rewards: str = "batch"
    num_generations: int = 8
    grpo_prompts_per_step: int = 6
    grpo_gradient_accumulation_steps: int = 1
    grpo_sde_window_size: Optional[int] = 2
    grpo_sde_window_start: Optional[int] = 0
    grpo_per_prompt_stat_tracking: bool = False
    grpo_timestep_fraction: float = 0.99
    grpo_share_initial_noise: bool = False
    teacher_steps: int = 32
    multitask_steps: Optional[int] = None
    cascade_steps_per_task: Optional[int] = None
    opd_learning_rate: float = 1e-3
    opd_batch_size: int = 16
    opd_gradient_accumulation_steps: int = 1
    opd_steps: int = 32
    opd_sde_noise_level: float = 0.7
    opd_timestep_fraction: float = 0.99

    def __post_init__(self):
        if self.multitask_steps is None:
            opd_with_teachers = len(TASKS) * self.teacher_steps * self.grpo_step_forwards()
            opd_with_teachers += self.opd_steps * self.opd_step_forwards()
            self.multitask_steps = math.ceil(opd_with_teachers / self.grpo_step_forwards())
        if self.cascade_steps_per_task is None:
            self.cascade_steps_per_task = math.ceil(self.multitask_steps / len(TASKS))
        steps = (self.teacher_steps, self.multitask_steps, self.cascade_steps_per_task, self.opd_steps)
        if min(steps) < 1 or min(self.curve_points, self.teacher_curve_points, self.cascade_curve_points) < 1:
            raise ValueError(f"Every stage needs at least one step and one curve point; got steps {steps}.")
        if self.opd_sde_noise_level <= 0:
            # Noise level 0 is the ODE distillation, which is always in the table.
            raise ValueError(f"`opd_sde_noise_level` must be positive, got {self.opd_sde_noise_level}.")

    def _cfg_factor(self) -> int:
        return 2 if self.guidance_scale > 1 else 1  # a CFG call on B latents is one call on 2B

    def grpo_step_forwards(self) -> int:
        """
        Denoiser image-forwards of one GRPO optimizer step: the rollout's `num_inference_steps` calls, then per trained
        step one policy call (and one reference call when `grpo_beta > 0`), for every image.
        """
        images = self.grpo_prompts_per_step * self.num_generations * self.grpo_gradient_accumulation_steps
        trained = max(1, int(self.grpo_timestep_fraction * self.num_inference_steps))
        if self.grpo_sde_window_size is not None and self.grpo_sde_window_start is None:
            trained = self.grpo_sde_window_size  # a random window lies inside the trained steps
        elif self.grpo_sde_window_size is not None:
            window = range(self.grpo_sde_window_start, self.grpo_sde_window_start + self.grpo_sde_window_size)
            trained = len(set(window) & set(range(trained)))
        calls = self.num_inference_steps + trained * (2 if self.grpo_beta > 0 else 1)
        return images * calls * self._cfg_factor()

    def opd_step_forwards(self) -> int:
        """
        Denoiser image-forwards of one OPD optimizer step with the fused schedule: the student's call at every rollout
        step (the trained ones carry the gradient) plus its teacher's call at every trained step, for every prompt.
        """
        trained = max(1, int(self.opd_timestep_fraction * self.num_inference_steps))
        calls = self.num_inference_steps + trained
        return self.opd_batch_size * self.opd_gradient_accumulation_steps * calls * self._cfg_factor()

    @classmethod
    def quick(cls, **overrides) -> "TableConfig":
        """
        The whole pipeline in about three minutes on two cores: 6-step rollouts and evaluation, teachers of 6 steps of
        6 prompts x 8 images at lr 1e-3 with the SDE window on step 0 only (a 2-step window is a third of a 6-step
        rollout and made the text teacher worse) and no KL to the base model (beta 0: the reference forwards are
        spent on more images instead, which made the text teacher learn on seeds where 4 prompts did not), 16 test
        prompts per task. Sized for each teacher to beat the base
        model on its own task (the prompt-independent failures are learnt in a few steps, see docs/toy_table.md), not
        for the claims, which need the full run's budget and its 3 seeds.
        """
        settings = dict(
            output_dir="results/toy_table_quick",
            train_prompts_per_task=64,
            eval_prompts_per_task=16,
            curve_prompts_per_task=4,
            curve_points=1,
            eval_num_inference_steps=6,
            num_inference_steps=6,
            grpo_prompts_per_step=6,
            teacher_steps=6,
            grpo_learning_rate=1e-3,
            grpo_beta=0.0,
            grpo_sde_window_size=1,
            opd_batch_size=8,
            opd_steps=6,
        )
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def full(cls, **overrides) -> "TableConfig":
        """The committed table (about 31 minutes a seed on two quiet CPU cores, see docs/toy_table.md)."""
        return cls(**overrides)

    @property
    def seed_dir(self) -> str:
        """This seed's stage cache, `<output_dir>/seed-<seed>`."""
        return os.path.join(self.output_dir, f"seed-{self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- compute accounting --------------------------------------------------------------------------------------------
class ForwardCounter:
    """
    Counts the denoiser's image-forwards with a forward pre-hook: each call adds its batch size (a CFG call on `B`
    latents is one call on `2B`). Calls made with gradients enabled (the ones a backward pass follows) are also counted
    apart. Wall-clock seconds are counted between `start()` and `stop()`.
    """

    def __init__(self):
        self.forwards = 0
        self.grad_forwards = 0
        self.calls = 0
        self._paused = 0
        self._handles = []
        self._seconds = 0.0
        self._started: Optional[float] = None

    def attach(self, module: torch.nn.Module) -> None:
        self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module, args, kwargs):
        if self._paused:
            return
        latents = kwargs.get("hidden_states", kwargs.get("sample"))
        if latents is None:
            latents = args[0]
        self.calls += 1
        self.forwards += latents.shape[0]
        if torch.is_grad_enabled():
            self.grad_forwards += latents.shape[0]

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._started = None

    @property
    def seconds(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._seconds + running

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Neither forwards nor seconds count inside the block (measurements, not training)."""
        self._paused += 1
        running = self._started is not None
        self.stop()
        try:
            yield
        finally:
            self._paused -= 1
            if running:
                self.start()


class _CurveCallback(TrainerCallback):
    """Evaluates the policy being trained every `every` optimizer steps (and at the end), outside the compute count."""

    def __init__(self, pipeline, config: TableConfig, counter: ForwardCounter, every: int, curve: list, phase: str):
        self.pipeline, self.config, self.counter, self.every = pipeline, config, counter, every
        self.curve, self.phase = curve, phase
        self._done: set[int] = set()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._evaluate(state.global_step)

    def _evaluate(self, step: int) -> None:
        if step in self._done:
            return
        self._done.add(step)
        with self.counter.paused():
            result = evaluate(
                self.pipeline,
                _validation_sets(self.config),
                reward_funcs(),
                model_name=f"{self.phase} step {step}",
                show_progress=False,
                **eval_kwargs(self.config),
            )
        self.curve.append(_curve_point(result, self.counter, phase=self.phase, step=step))


class _QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar without its per-step printing of the logs (they stay in `state.log_history`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _curve_point(result: EvaluationResult, counter: ForwardCounter, **extra) -> dict[str, Any]:
    return {
        **extra,
        "forwards": counter.forwards,
        "grad_forwards": counter.grad_forwards,
        "seconds": round(counter.seconds, 2),
        "rewards": {task: task_reward(result, task) for task in TASKS},
    }


# ----- data and settings ---------------------------------------------------------------------------------------------
def num_train_prompts(config: TableConfig) -> int:
    """Training prompts per task: `train_prompts_per_task`, at most what the train splits hold beside validation."""
    available = min(len(prompts(task, "train")) for task in TASKS) - config.curve_prompts_per_task
    count = available if config.train_prompts_per_task is None else min(config.train_prompts_per_task, available)
    if count < 1:
        raise ValueError(f"No training prompts left beside {config.curve_prompts_per_task} validation prompts.")
    return count


def _train_set(config: TableConfig, tasks=TASKS):
    """The first `n` train prompts of each task (the same prompts for every method), concatenated."""
    from datasets import concatenate_datasets

    count = num_train_prompts(config)
    return concatenate_datasets([prompts(task, "train").select(range(count)) for task in tasks])


def _validation_sets(config: TableConfig) -> dict:
    """Each task's validation prompts: the train-split prompts right after the training ones."""
    start = num_train_prompts(config)
    return {task: prompts(task, "train").select(range(start, start + config.curve_prompts_per_task)) for task in TASKS}


def _test_sets(max_prompts: Optional[int]) -> dict:
    sets = {}
    for task in TASKS:
        dataset = prompts(task, "test")
        if max_prompts is not None:
            dataset = dataset.select(range(min(max_prompts, len(dataset))))
        sets[task] = dataset
    return sets


def eval_kwargs(config: TableConfig) -> dict[str, Any]:
    """The evaluation sampler's settings, as [`~diffusion_opd_trainer.evaluate`] takes them."""
    return {
        "num_inference_steps": config.eval_num_inference_steps,
        "guidance_scale": config.eval_guidance_scale,
        "batch_size": config.eval_batch_size,
        "seed": config.eval_seed,
    }


def task_reward(result: EvaluationResult, task: str) -> float:
    """A task's mean reward in an evaluation result."""
    # The harness names each toy reward's metric after the reward (its __name__, which is the task's name).
    return float(result.metrics[task][task])


def _lora_config(config: TableConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(DEFAULT_TARGET_MODULES["transformer"]),
    )


def _common_args(config: TableConfig, output_dir: str, max_steps: int, show_progress: bool) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        max_steps=max_steps,
        seed=config.seed,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        eval_num_inference_steps=config.eval_num_inference_steps,
        eval_guidance_scale=config.eval_guidance_scale,
        # Constant learning rate (Flow-GRPO's): a decaying one would make runs of different lengths incomparable.
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
    )


def grpo_args(config: TableConfig, output_dir: str, max_steps: int, show_progress: bool) -> DiffusionGRPOConfig:
    """The [`DiffusionGRPOConfig`] of the teachers and both GRPO baselines."""
    return DiffusionGRPOConfig(
        **_common_args(config, output_dir, max_steps, show_progress),
        per_device_train_batch_size=config.grpo_prompts_per_step * config.num_generations,
        gradient_accumulation_steps=config.grpo_gradient_accumulation_steps,
        num_generations=config.num_generations,
        learning_rate=config.grpo_learning_rate,
        beta=config.grpo_beta,
        noise_level=config.grpo_noise_level,
        kl_scaling=config.grpo_kl_scaling,
        scale_rewards=config.grpo_scale_rewards,
        sde_window_size=config.grpo_sde_window_size,
        sde_window_start=config.grpo_sde_window_start,
        per_prompt_stat_tracking=config.grpo_per_prompt_stat_tracking,
        timestep_fraction=config.grpo_timestep_fraction,
        share_initial_noise=config.grpo_share_initial_noise,
    )


def opd_args(config: TableConfig, output_dir: str, noise_level: float, show_progress: bool) -> DiffusionOPDConfig:
    """The [`DiffusionOPDConfig`] of a distillation (ODE at `noise_level=0`, SDE otherwise)."""
    return DiffusionOPDConfig(
        **_common_args(config, output_dir, config.opd_steps, show_progress),
        per_device_train_batch_size=config.opd_batch_size,
        gradient_accumulation_steps=config.opd_gradient_accumulation_steps,
        learning_rate=config.opd_learning_rate,
        noise_level=noise_level,
        timestep_fraction=config.opd_timestep_fraction,
    )


# ----- cache ---------------------------------------------------------------------------------------------------------
_BASE_FINGERPRINT: dict[str, str] = {}


def base_model_fingerprint(path: Optional[str] = None) -> str:
    """A hash of the base model's files, so that cached stages are redone when the base model changes."""
    path = os.path.abspath(path or BASE_MODEL_DIR)
    if path not in _BASE_FINGERPRINT:
        digest = hashlib.sha256()
        for file in sorted(Path(path).rglob("*")):
            if file.is_file() and file.suffix in (".safetensors", ".json", ".txt", ".model"):
                digest.update(str(file.relative_to(path)).encode())
                digest.update(file.read_bytes())
        _BASE_FINGERPRINT[path] = digest.hexdigest()
    return _BASE_FINGERPRINT[path]


def fingerprint_files(paths: Sequence[os.PathLike]) -> str:
    """A hash of files' names and contents, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


# Read at import, next to the import of the world's code itself: the fingerprint describes the code this process runs,
# even if the files are edited later (a long run keeps the code it started with, and keys its stages accordingly).
_WORLD_FINGERPRINT = fingerprint_files(WORLD_SOURCES)


def world_fingerprint() -> str:
    """A hash of the toy world's source (`toy/{rewards,render,world,font}.py`) as this process imported it."""
    return _WORLD_FINGERPRINT


def _stage_key(config: TableConfig, kind: str, settings: dict[str, Any]) -> str:
    payload = {
        "kind": kind,
        "version": CACHE_VERSION,
        "base": base_model_fingerprint(config.base_model),
        "world": world_fingerprint(),
        **settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class StageResult:
    """
    A trained stage: its LoRA, what it cost and its reward-versus-compute curve.

    Args:
        name (`str`): the row's name, e.g. `"teacher (text)"`.
        key (`str`): the hash of the settings it depends on (its cache key).
        lora_dir (`str`): the saved LoRA (diffusers and PEFT formats).
        seconds (`float`): training wall-clock seconds (periodic evaluations excluded).
        forwards (`int`), grad_forwards (`int`), calls (`int`): denoiser image-forwards, those with gradients, and
            denoiser calls, during training.
        steps (`int`): optimizer steps.
        curve (`list[dict]`): periodic evaluations on the curve prompts: `forwards`, `seconds`, `rewards` per task.
        log_history (`list[dict]`): the trainers' logged metrics.
        settings (`dict`): the settings the key was made from.
    """

    name: str
    key: str
    lora_dir: str
    seconds: float
    forwards: int
    grad_forwards: int
    calls: int
    steps: int
    curve: list = field(default_factory=list)
    log_history: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Cache hits of this process: the runner reads it around a job to tell the parent whether the job trained anything.
_CACHE_HITS = 0


def _load_cached(stage_dir: Path) -> Optional[StageResult]:
    path = stage_dir / STAGE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["lora_dir"] = str(stage_dir / LORA_SUBDIR)
    return StageResult(**data)


def _write_stage(stage_dir: Path, result: StageResult) -> None:
    # Written last and atomically: its presence marks a complete stage.
    tmp = stage_dir / (STAGE_FILE + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=1, default=str))
    os.replace(tmp, stage_dir / STAGE_FILE)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _cached_stage(config: TableConfig, name: str, kind: str, settings: dict, force: bool, train) -> StageResult:
    global _CACHE_HITS
    key = _stage_key(config, kind, settings)
    stage_dir = Path(config.seed_dir) / f"{_slug(name)}-{key}"
    if not force:
        cached = _load_cached(stage_dir)
        if cached is not None:
            _CACHE_HITS += 1
            logger.info(
                "%s: cached in %s (%.0f s, %.2fM forwards)", name, stage_dir, cached.seconds, cached.forwards / 1e6
            )
            return cached
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    logger.info("%s: training (cache %s)", name, stage_dir)
    counter = ForwardCounter()
    curve: list = []
    log_history: list = []
    steps = train(stage_dir, counter, curve, log_history)
    result = StageResult(
        name=name,
        key=key,
        lora_dir=str(stage_dir / LORA_SUBDIR),
        seconds=round(counter.seconds, 2),
        forwards=counter.forwards,
        grad_forwards=counter.grad_forwards,
        calls=counter.calls,
        steps=steps,
        curve=curve,
        log_history=log_history,
        settings=settings,
    )
    _write_stage(stage_dir, result)
    logger.info("%s: %.0f s, %.2fM image-forwards", name, result.seconds, result.forwards / 1e6)
    return result


def _load_base(config: TableConfig):
    """A fresh base pipeline, checked to be the one the cache keys were made from (not replaced during the run)."""
    pipe = load_pipeline(config.base_model, device=device())
    path = os.path.abspath(config.base_model or BASE_MODEL_DIR)
    expected = base_model_fingerprint(config.base_model)
    _BASE_FINGERPRINT.pop(path, None)
    if base_model_fingerprint(config.base_model) != expected:
        raise RuntimeError(f"The base model at {path} changed during the run; rerun to retrain on the new one.")
    return pipe


def device() -> str:
    """Where stages run: CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_trainer(
    trainer, counter: ForwardCounter, config: TableConfig, curve: list, phase: str, steps: int, points: int
) -> None:
    """
    Trains with the forward hook and the curve callback (`points` evaluations) attached; the clock runs during
    `train()` only.
    """
    every = max(1, math.ceil(steps / points))
    trainer.add_callback(_CurveCallback(trainer.pipeline, config, counter, every, curve, phase))
    # The Trainer prints every log entry (progress bar's `write`, or PrinterCallback without bars): keep the bar only.
    trainer.pop_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgressCallback)
    counter.attach(trainer.pipeline.transformer)
    counter.start()
    try:
        trainer.train()
    finally:
        counter.stop()
        counter.detach()


# ----- the settings each stage's key is made of ----------------------------------------------------------------------
_CURVE_KEYS = [
    "curve_prompts_per_task",
    "curve_points",
    "teacher_curve_points",
    "cascade_curve_points",
    "eval_seed",
    "eval_num_inference_steps",
    "eval_guidance_scale",
]


def _grpo_settings(config: TableConfig) -> dict[str, Any]:
    keys = [f.name for f in dataclasses.fields(config) if f.name.startswith("grpo_")]
    keys += ["seed", "num_generations", "num_inference_steps", "guidance_scale", "lora_r", "lora_alpha", *_CURVE_KEYS]
    settings = {key: getattr(config, key) for key in keys}
    settings["train_prompts_per_task"] = num_train_prompts(config)
    return settings


def _teacher_settings(config: TableConfig, task: str) -> dict[str, Any]:
    return {**_grpo_settings(config), "task": task, "steps": config.teacher_steps}


def _multitask_settings(config: TableConfig) -> dict[str, Any]:
    return {**_grpo_settings(config), "steps": config.multitask_steps}


def _cascade_settings(config: TableConfig) -> dict[str, Any]:
    return {**_grpo_settings(config), "steps_per_task": config.cascade_steps_per_task, "order": list(TASKS)}


def _opd_settings(config: TableConfig, noise_level: float, teacher_keys: dict[str, str]) -> dict[str, Any]:
    # Every `opd_*` setting (so that a new one cannot be forgotten here), except the SDE's noise level: it is this
    # stage's `noise_level`, and the ODE stage must not retrain when only the SDE's changes.
    keys = [
        f.name for f in dataclasses.fields(config) if f.name.startswith("opd_") and f.name != "opd_sde_noise_level"
    ]
    keys += ["seed", "num_inference_steps", "guidance_scale", "lora_r", "lora_alpha", *_CURVE_KEYS]
    settings = {key: getattr(config, key) for key in keys}
    settings.update(noise_level=noise_level, train_prompts_per_task=num_train_prompts(config), teachers=teacher_keys)
    return settings


def _eval_settings(
    config: TableConfig, model_key: Optional[str], max_prompts: Optional[int], split: str
) -> dict[str, Any]:
    settings = {**eval_kwargs(config), "model": model_key, "max_prompts": max_prompts, "split": split}
    if split == "validation":
        settings["validation"] = {"start": num_train_prompts(config), "count": config.curve_prompts_per_task}
    elif split != "test":
        raise ValueError(f"`split` must be 'test' or 'validation', got {split!r}.")
    return settings


def teacher_name(task: str) -> str:
    return f"teacher ({task})"


def opd_name(noise_level: float) -> str:
    """The row name of a distillation: `"OPD-ODE"` at noise level 0, `"OPD-SDE (noise <level>)"` otherwise."""
    return "OPD-ODE" if noise_level == 0 else f"OPD-SDE (noise {noise_level:g})"


def stage_keys(config: TableConfig) -> dict[str, str]:
    """
    The cache key of every stage of `config`, without running anything: the trained stages by row name, their test
    evaluations as `"eval: <name>"` (`"eval: base"` for the base model) and the base model's validation evaluation as
    `"eval: base (validation)"`.
    """
    keys = {teacher_name(task): _stage_key(config, "grpo_teacher", _teacher_settings(config, task)) for task in TASKS}
    teacher_keys = {task: keys[teacher_name(task)] for task in TASKS}
    keys["multi-task GRPO"] = _stage_key(config, "grpo_multitask", _multitask_settings(config))
    keys["cascade GRPO"] = _stage_key(config, "grpo_cascade", _cascade_settings(config))
    for noise in (0.0, config.opd_sde_noise_level):
        keys[opd_name(noise)] = _stage_key(config, "opd", _opd_settings(config, noise, teacher_keys))
    max_prompts = config.eval_prompts_per_task
    evals = {"eval: base": _stage_key(config, "evaluation", _eval_settings(config, None, max_prompts, "test"))}
    for name, key in keys.items():
        evals[f"eval: {name}"] = _stage_key(config, "evaluation", _eval_settings(config, key, max_prompts, "test"))
    settings = _eval_settings(config, None, None, "validation")
    evals["eval: base (validation)"] = _stage_key(config, "evaluation", settings)
    return {**keys, **evals}


def _grpo_trainer(
    config: TableConfig, output_dir: Path, tasks: tuple[str, ...], steps: int, show_progress: bool
) -> DiffusionGRPOTrainer:
    """A GRPO trainer on a fresh base pipeline for `tasks`' prompts, each scored by its own task's reward."""
    rewards = reward_funcs()
    return DiffusionGRPOTrainer(
        model=_load_base(config),
        reward_funcs={task: rewards[task] for task in tasks},
        args=grpo_args(config, str(output_dir), steps, show_progress),
        train_dataset=_train_set(config, tasks),
        peft_config=_lora_config(config),
    )


# ----- stages --------------------------------------------------------------------------------------------------------
def train_teacher(config: TableConfig, task: str, force: bool = False, show_progress: bool = True) -> StageResult:
    """
    Stage 1: a single-task GRPO teacher, trained on `task`'s prompts with `task`'s reward only.

    Args:
        config ([`TableConfig`]): the settings.
        task (`str`): one of `toy.TASKS`.
        force (`bool`, defaults to `False`): retrain even when cached.
        show_progress (`bool`, defaults to `True`): the trainer's progress bar.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; the toy tasks are {TASKS}.")

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        trainer = _grpo_trainer(config, stage_dir, (task,), config.teacher_steps, show_progress)
        _run_trainer(trainer, counter, config, curve, task, config.teacher_steps, config.teacher_curve_points)
        trainer.save_model(str(stage_dir / LORA_SUBDIR))
        log_history.extend(trainer.state.log_history)
        return trainer.state.global_step

    settings = _teacher_settings(config, task)
    return _cached_stage(config, teacher_name(task), "grpo_teacher", settings, force, train)


def train_multitask_grpo(config: TableConfig, force: bool = False, show_progress: bool = True) -> StageResult:
    """
    The joint multi-task RL baseline: one LoRA trained by GRPO on every task's prompts at once, each prompt scored by
    its own task's reward, for `config.multitask_steps` optimizer steps.

    Args:
        config ([`TableConfig`]): the settings.
        force (`bool`, defaults to `False`): retrain even when cached.
        show_progress (`bool`, defaults to `True`): the trainer's progress bar.
    """

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        trainer = _grpo_trainer(config, stage_dir, TASKS, config.multitask_steps, show_progress)
        _run_trainer(trainer, counter, config, curve, "multi-task", config.multitask_steps, config.curve_points)
        trainer.save_model(str(stage_dir / LORA_SUBDIR))
        log_history.extend(trainer.state.log_history)
        return trainer.state.global_step

    return _cached_stage(config, "multi-task GRPO", "grpo_multitask", _multitask_settings(config), force, train)


def train_cascade_grpo(config: TableConfig, force: bool = False, show_progress: bool = True) -> StageResult:
    """
    The cascade RL baseline: one LoRA trained by GRPO on each task in turn (in `toy.TASKS` order),
    `config.cascade_steps_per_task` optimizer steps each. Each phase is a fresh trainer (fresh AdamW state) whose
    student LoRA starts from the previous phase's weights.

    Args:
        config ([`TableConfig`]): the settings.
        force (`bool`, defaults to `False`): retrain even when cached.
        show_progress (`bool`, defaults to `True`): the trainers' progress bars.
    """

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        previous: Optional[Path] = None
        total_steps = 0
        for task in TASKS:
            phase_dir = stage_dir / f"phase-{task}"
            trainer = _grpo_trainer(config, phase_dir, (task,), config.cascade_steps_per_task, show_progress)
            if previous is not None:
                state_dict, _, _ = read_lora(previous)
                load_adapter_weights(
                    trainer.unwrapped_denoiser, state_dict, STUDENT_ADAPTER, f"Cascade LoRA {previous}"
                )
            steps = config.cascade_steps_per_task
            _run_trainer(trainer, counter, config, curve, task, steps, config.cascade_curve_points)
            total_steps += trainer.state.global_step
            log_history.extend({**entry, "phase": task} for entry in trainer.state.log_history)
            previous = phase_dir / LORA_SUBDIR
            trainer.save_model(str(previous))
        shutil.copytree(previous, stage_dir / LORA_SUBDIR)
        return total_steps

    return _cached_stage(config, "cascade GRPO", "grpo_cascade", _cascade_settings(config), force, train)


def distill(
    config: TableConfig,
    noise_level: float,
    teachers: dict[str, StageResult],
    force: bool = False,
    show_progress: bool = True,
) -> StageResult:
    """
    Stage 2: multi-teacher on-policy distillation of `teachers` (task -> teacher stage) into one student LoRA, on
    every task's prompts (mixed batches, each prompt routed to its task's teacher), with the ODE (`noise_level=0`,
    mean matching) or the SDE at `noise_level` (exact step KL). No reward is used in training.

    Args:
        config ([`TableConfig`]): the settings.
        noise_level (`float`): 0 for the ODE, the SDE's noise level otherwise.
        teachers (`dict[str, StageResult]`): each task's trained teacher.
        force (`bool`, defaults to `False`): retrain even when cached.
        show_progress (`bool`, defaults to `True`): the trainer's progress bar.
    """
    settings = _opd_settings(config, noise_level, {task: stage.key for task, stage in teachers.items()})
    name = opd_name(noise_level)

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        pipe = _load_base(config)
        trainer = DiffusionOPDTrainer(
            model=pipe,
            teachers={task: os.path.abspath(stage.lora_dir) for task, stage in teachers.items()},
            args=opd_args(config, str(stage_dir), noise_level, show_progress),
            train_dataset=_train_set(config, tuple(teachers)),
            peft_config=_lora_config(config),
        )
        _run_trainer(trainer, counter, config, curve, name, config.opd_steps, config.curve_points)
        if not all(trainer.teachers_unchanged().values()):
            raise RuntimeError("A teacher's weights changed during distillation.")
        trainer.save_model(str(stage_dir / LORA_SUBDIR))
        log_history.extend(trainer.state.log_history)
        return trainer.state.global_step

    return _cached_stage(config, name, "opd", settings, force, train)


def evaluate_model(
    config: TableConfig,
    name: str,
    stage: Optional[StageResult] = None,
    max_prompts: Optional[int] = None,
    force: bool = False,
    show_progress: bool = True,
    split: str = "test",
) -> EvaluationResult:
    """
    Evaluates the base model (`stage=None`) or a stage's saved LoRA, loaded by the evaluation harness into a fresh
    float32 `toy.load_pipeline()`, with the deterministic ODE sampler at the table's evaluation settings and fixed
    seeds. Cached under `<output_dir>/seed-<seed>/eval/`.

    Args:
        config ([`TableConfig`]): the settings.
        name (`str`): the model's row name.
        stage ([`StageResult`], *optional*): the trained stage; `None` evaluates the base model.
        max_prompts (`int`, *optional*): the first prompts of each task's test split only (all by default).
        force (`bool`, defaults to `False`): re-evaluate even when cached.
        show_progress (`bool`, defaults to `True`): progress bars.
        split (`str`, defaults to `"test"`): `"test"` (the table) or `"validation"` (the curves' prompts).
    """
    global _CACHE_HITS
    settings = _eval_settings(config, None if stage is None else stage.key, max_prompts, split)
    key = _stage_key(config, "evaluation", settings)
    path = Path(config.seed_dir) / "eval" / f"{_slug(name)}-{key}.json"
    if path.is_file() and not force:
        _CACHE_HITS += 1
        return EvaluationResult(**json.loads(path.read_text()))
    pipe = _load_base(config)
    start = time.perf_counter()
    result = evaluate(
        pipe,
        _test_sets(max_prompts) if split == "test" else _validation_sets(config),
        reward_funcs(),
        lora=None if stage is None else os.path.abspath(stage.lora_dir),
        model_name=name,
        show_progress=show_progress,
        **eval_kwargs(config),
    )
    result.settings["eval_seconds"] = round(time.perf_counter() - start, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: another process may read the evaluation cache while this one writes it.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result.to_dict(), default=str))
    os.replace(tmp, path)
    return result


# ----- the runner ----------------------------------------------------------------------------------------------------
@dataclass
class StageOutputs:
    """
    Everything [`run_stages`] produced for one seed: what `toy_report.assemble_seed` turns into the seed's table.

    Args:
        config ([`TableConfig`]): the settings, with `base_model` set to the snapshot the stages were trained from.
        teachers (`dict[str, StageResult]`): task -> its teacher.
        trained (`list[StageResult]`): every trained stage in row order (teachers, multi-task GRPO, cascade GRPO,
            OPD-ODE, OPD-SDE).
        evaluations (`dict[str, EvaluationResult]`): row name -> its evaluation on the test prompts (`"base"` too).
        curve_base (`EvaluationResult`): the base model on the validation prompts (every curve's origin).
        jobs (`list[dict]`): one record per job in order of submission: `name`, `pid` of the process that ran it,
            `cached`, `submitted` and `finished` (seconds since the start of the run, as the parent saw them) and
            `wall_seconds` (in the process that ran it).
        workers (`int`), threads_per_worker (`int`): how the stages ran.
        wall_seconds (`float`): the run's wall clock (cached stages take almost none).
    """

    config: TableConfig
    teachers: dict[str, StageResult]
    trained: list[StageResult]
    evaluations: dict[str, EvaluationResult]
    curve_base: EvaluationResult
    jobs: list[dict] = field(default_factory=list)
    workers: int = 1
    threads_per_worker: int = 1
    wall_seconds: float = 0.0


@dataclass
class _Job:
    """A unit of work: `fn(*make_args(results), **kwargs)`, startable once every job named in `deps` is done."""

    name: str
    fn: Callable
    make_args: Callable[[dict[str, Any]], tuple]
    deps: tuple[str, ...] = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class _Outcome:
    value: Any
    pid: int
    cached: bool
    wall_seconds: float


def _run_job(fn: Callable, args: tuple, kwargs: dict) -> _Outcome:
    """Runs one job where it is submitted (a worker, or this process), and says where and whether it computed."""
    hits, start = _CACHE_HITS, time.perf_counter()
    value = fn(*args, **kwargs)
    return _Outcome(value, os.getpid(), _CACHE_HITS > hits, round(time.perf_counter() - start, 2))


class _InlineExecutor:
    """The executor of `workers=1`: runs each job in this process when it is submitted."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # the scheduler re-raises it from `future.result()`
            future.set_exception(error)
        return future


def _schedule(jobs: list[_Job], executor, workers: int, on_done: Optional[Callable] = None) -> tuple[dict, list]:
    """
    Runs `jobs` on `executor`, at most `workers` at a time. Whenever a slot is free it submits the first job of the
    list whose dependencies are done, so the list's order is the priority order. Jobs are only handed to the executor
    when a worker is free (never queued in it), so that a job that becomes ready later (a distillation, once every
    teacher is done) still overtakes the ones behind it in the list.

    Returns:
        `(results, records)`: job name -> what it returned, and one record per job in order of submission.
    """
    order = {job.name: index for index, job in enumerate(jobs)}
    missing = {dep for job in jobs for dep in job.deps} - set(order)
    if missing:
        raise ValueError(f"Unknown dependencies: {sorted(missing)}")
    results: dict[str, Any] = {}
    records: list[dict] = []
    pending = list(jobs)
    running: dict[Future, tuple[_Job, dict]] = {}
    start = time.perf_counter()
    try:
        while pending or running:
            while len(running) < workers:
                job = next((job for job in pending if all(dep in results for dep in job.deps)), None)
                if job is None:
                    break
                pending.remove(job)
                record = {"name": job.name, "submitted": round(time.perf_counter() - start, 2)}
                records.append(record)
                logger.debug("%s: submitted", job.name)
                running[executor.submit(_run_job, job.fn, job.make_args(results), job.kwargs)] = (job, record)
            if not running:  # cannot happen with known, acyclic dependencies
                raise RuntimeError(f"Jobs whose dependencies never finish: {[job.name for job in pending]}")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: order[running[f][0].name]):
                job, record = running.pop(future)
                outcome: _Outcome = future.result()
                results[job.name] = outcome.value
                record.update(
                    finished=round(time.perf_counter() - start, 2),
                    pid=outcome.pid,
                    cached=outcome.cached,
                    wall_seconds=outcome.wall_seconds,
                )
                if on_done is not None:
                    on_done(job, outcome)
    except BaseException:
        for future in running:
            future.cancel()
        raise
    return results, records


def _init_worker(threads: int, world: str, base_fingerprints: dict[str, str], verbosity: int) -> None:
    """A spawned worker's initializer: its threads, and the parent's fingerprints, checked against what it imported."""
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)
    # Each stage loads fresh pipelines: their loading bars, from several processes, would garble the parent's bar.
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    if world != _WORLD_FINGERPRINT:
        # The world's code was edited after the run started: this worker would train on other rewards or prompts than
        # the stages of the parent's keys, and the table would mix the two.
        raise RuntimeError("The toy world's source changed since this run started; rerun.")
    _BASE_FINGERPRINT.update(base_fingerprints)


def _snapshot_base_model(output_dir: str) -> str:
    """
    A copy of the bundled base model under `output_dir` (shared by every seed), so that replacing the bundled weights
    mid-run cannot mix two bases. Created under a temporary name and renamed, since seeds may run concurrently.
    """
    snapshot = Path(output_dir) / f"base_model-{base_model_fingerprint()[:12]}"
    if not (snapshot / "model_index.json").is_file():
        if snapshot.exists():  # left incomplete by an interrupted copy
            shutil.rmtree(snapshot)
        tmp = Path(output_dir) / f".{snapshot.name}.tmp-{os.getpid()}"
        shutil.copytree(BASE_MODEL_DIR, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, snapshot)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(snapshot)


def _jobs(config: TableConfig, force: bool, show_progress: bool) -> list[_Job]:
    """Every job of a seed, in priority order: teachers, baselines, distillations, then the evaluations."""
    common = {"force": force, "show_progress": show_progress}
    teachers = [teacher_name(task) for task in TASKS]
    jobs = [_Job(teacher_name(task), train_teacher, lambda done, t=task: (config, t), (), common) for task in TASKS]
    jobs.append(_Job("multi-task GRPO", train_multitask_grpo, lambda done: (config,), (), common))
    jobs.append(_Job("cascade GRPO", train_cascade_grpo, lambda done: (config,), (), common))
    for noise in (0.0, config.opd_sde_noise_level):

        def opd_inputs(done, noise=noise):
            return config, noise, {task: done[teacher_name(task)] for task in TASKS}

        jobs.append(_Job(opd_name(noise), distill, opd_inputs, tuple(teachers), common))
    trained = [job.name for job in jobs]
    max_prompts = config.eval_prompts_per_task
    jobs.append(_Job("eval: base", evaluate_model, lambda done: (config, "base", None, max_prompts), (), common))
    for name in trained:
        inputs = lambda done, n=name: (config, n, done[n], max_prompts)  # noqa: E731
        jobs.append(_Job(f"eval: {name}", evaluate_model, inputs, (name,), common))
    validation = {**common, "split": "validation"}
    jobs.append(_Job("eval: base (validation)", evaluate_model, lambda done: (config, "base"), (), validation))
    return jobs


def run_stages(
    config: TableConfig,
    workers: int = 1,
    threads_per_worker: int = 1,
    force: bool = False,
    show_progress: bool = True,
) -> StageOutputs:
    """
    Runs every stage of one seed (or reads it from the cache under `config.seed_dir`) and evaluates every model.

    With `workers > 1` the stages run in that many worker processes (multiprocessing's "spawn" context, each with
    `torch.set_num_threads(threads_per_worker)`), submitted in this order as workers free up: the three teachers,
    multi-task GRPO, cascade GRPO, the two distillations (as soon as all three teachers are done), then the
    evaluations. Each stage's compute (image-forwards, seconds) is measured inside the process that trains it. With
    `workers=1` everything runs in this process, one stage after the other, with `threads_per_worker` threads.

    Args:
        config ([`TableConfig`]): the settings.
        workers (`int`, defaults to 1): worker processes; 1 runs in this process.
        threads_per_worker (`int`, defaults to 1): torch intra-op threads of each worker.
        force (`bool`, defaults to `False`): redo every stage, cached or not.
        show_progress (`bool`, defaults to `True`): a progress bar over the stages (and, with `workers=1`, the
            trainers' own bars).

    Returns:
        [`StageOutputs`]: the trained stages and the evaluations.
    """
    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"`workers` and `threads_per_worker` must be >= 1, got {workers} and {threads_per_worker}.")
    started = time.perf_counter()
    os.makedirs(config.seed_dir, exist_ok=True)
    if config.base_model is None:
        config = dataclasses.replace(config, base_model=_snapshot_base_model(config.output_dir))
    # Bars from several processes would overwrite each other: workers only report to the parent's bar.
    jobs = _jobs(config, force, show_progress=show_progress and workers == 1)
    bar = tqdm(total=len(jobs), desc=f"toy table, seed {config.seed}", disable=not show_progress, unit="stage")

    def on_done(job: _Job, outcome: _Outcome) -> None:
        value = outcome.value
        how = "from the cache" if outcome.cached else f"in {outcome.wall_seconds:.0f} s"
        if isinstance(value, StageResult):
            logger.info(
                "%s: done %s (pid %d): %.0f s of training, %.1fk image-forwards",
                job.name,
                how,
                outcome.pid,
                value.seconds,
                value.forwards / 1e3,
            )
        else:
            logger.info("%s: done %s (pid %d)", job.name, how, outcome.pid)
        bar.set_postfix_str(job.name)
        bar.update()

    try:
        if workers == 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads_per_worker)
            try:
                results, records = _schedule(jobs, _InlineExecutor(), 1, on_done)
            finally:
                torch.set_num_threads(previous)
        else:
            initargs = (
                threads_per_worker,
                world_fingerprint(),
                {os.path.abspath(config.base_model): base_model_fingerprint(config.base_model)},
                transformers.logging.get_verbosity(),
            )
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs) as pool:
                try:
                    results, records = _schedule(jobs, pool, workers, on_done)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()

    teachers = {task: results[teacher_name(task)] for task in TASKS}
    names = [*(teacher_name(task) for task in TASKS), "multi-task GRPO", "cascade GRPO"]
    names += [opd_name(noise) for noise in (0.0, config.opd_sde_noise_level)]
    return StageOutputs(
        config=config,
        teachers=teachers,
        trained=[results[name] for name in names],
        evaluations={"base": results["eval: base"], **{name: results[f"eval: {name}"] for name in names}},
        curve_base=results["eval: base (validation)"],
        jobs=records,
        workers=workers,
        threads_per_worker=threads_per_worker,
        wall_seconds=round(time.perf_counter() - started, 1),
    )
