"""
The paper's Table 1 in miniature, on the toy world: single-task GRPO teachers, their multi-teacher on-policy
distillation (ODE and SDE), and the multi-task and cascade GRPO baselines, all evaluated on every task's test prompts.

```python
from diffusion_opd_trainer.toy.table import TableConfig, run_table

table = run_table(TableConfig.quick(output_dir="results/toy_table_quick"))
print(table["markdown"])
```

Every model is a LoRA of the same size on the same bundled base model, trained on the same prompts (an equal number
per task) and evaluated by the same harness ([`~diffusion_opd_trainer.evaluate`]: deterministic ODE sampler at the
toy's default steps and guidance, fixed seeds). Compute is counted the same way for every stage: a forward hook on
the denoiser adds up *image-forwards* (the batch size of every denoiser call; a CFG call on `B` latents counts `2B`),
and wall-clock seconds of training exclude the periodic evaluations that draw the reward-versus-compute curves.

Each stage (a teacher, a baseline, a distillation, an evaluation) is cached under `output_dir`, keyed by a hash of the
settings it depends on (and of the base model's weights), so teachers are trained once and a rerun only redoes what
changed.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..evaluation import EvaluationResult, evaluate
from ..grpo_config import DiffusionGRPOConfig
from ..grpo_trainer import DiffusionGRPOTrainer
from ..lora import DEFAULT_TARGET_MODULES, STUDENT_ADAPTER, read_lora
from ..opd_config import DiffusionOPDConfig
from ..opd_trainer import DiffusionOPDTrainer
from .model import BASE_MODEL_DIR, DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, load_pipeline
from .rewards import reward_funcs
from .world import TASKS, prompts


logger = logging.getLogger(__name__)

__all__ = [
    "ForwardCounter",
    "StageResult",
    "TableConfig",
    "distill",
    "evaluate_model",
    "format_markdown",
    "plot_curves",
    "run_table",
    "train_cascade_grpo",
    "train_multitask_grpo",
    "train_teacher",
]

STAGE_FILE = "stage.json"
LORA_SUBDIR = "lora"
# Bump when a change to this module changes what a cached stage would contain.
CACHE_VERSION = 1


@dataclass
class TableConfig:
    r"""
    Settings of the miniature Table 1. [`TableConfig.quick`] runs the whole pipeline in a few minutes;
    [`TableConfig.full`] is the committed table (about an hour on two CPU cores).

    Parameters:
        output_dir (`str`, defaults to `"results/toy_table"`):
            Cache of every stage (LoRAs, logs, evaluations). The table is written next to it as `<output_dir>.json`,
            `<output_dir>.md` and `<output_dir>_curves.png`.
        base_model (`str`, *optional*):
            A pipeline folder to start from instead of the bundled toy base model (see `toy.load_pipeline`).
        seed (`int`, defaults to 0):
            Seed of every trainer (LoRA init, prompt order, rollout noise).
        train_prompts_per_task (`int`, *optional*):
            Training prompts of each task (the first ones of its shuffled train split), the same number for every task
            so that tasks weigh the same in the multi-task runs. Defaults to all that the smallest task's train split
            holds beside its validation prompts.
        eval_prompts_per_task (`int`, *optional*):
            Test prompts of each task in the table (the first ones of its shuffled test split); all by default.
        curve_prompts_per_task (`int`, defaults to 16):
            Validation prompts of each task: train-split prompts right after the training prompts, never trained on.
            The periodic evaluations that draw the reward-versus-compute curves (and any tuning) use them, so that the
            test prompts are only used for the table.
        curve_points (`int`, defaults to 5):
            Evaluations per training run for the curves (plus the base model at zero compute).
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
        grpo_gradient_accumulation_steps (`int`):
            GRPO (teachers and both baselines): each micro-step samples `grpo_prompts_per_step` prompts x
            `num_generations` images.
        teacher_steps (`int`):
            Optimizer steps of each single-task teacher.
        multitask_steps (`int`, *optional*):
            Optimizer steps of multi-task GRPO; defaults to `len(TASKS) * teacher_steps` (the teachers' total).
        cascade_steps_per_task (`int`, *optional*):
            Optimizer steps of cascade GRPO on each task in turn; defaults to `teacher_steps`.
        opd_learning_rate (`float`), opd_batch_size (`int`), opd_gradient_accumulation_steps (`int`),
        opd_steps (`int`), opd_sde_noise_level (`float`):
            On-policy distillation: prompts per micro-step (one image each, tasks mixed), optimizer steps, and the
            noise level of the SDE variant (the ODE variant uses 0).
    """

    output_dir: str = "results/toy_table"
    base_model: Optional[str] = None
    seed: int = 0
    train_prompts_per_task: Optional[int] = None
    eval_prompts_per_task: Optional[int] = None
    curve_prompts_per_task: int = 16
    curve_points: int = 5
    eval_seed: int = 0
    eval_num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    eval_guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    eval_batch_size: int = 64
    num_inference_steps: int = 10
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    lora_r: int = 32
    lora_alpha: int = 64
    grpo_learning_rate: float = 1e-3
    grpo_beta: float = 0.01
    grpo_noise_level: float = 0.7
    grpo_kl_scaling: str = "sigma"
    grpo_scale_rewards: str = "batch"
    num_generations: int = 8
    grpo_prompts_per_step: int = 2
    grpo_gradient_accumulation_steps: int = 1
    grpo_sde_window_size: Optional[int] = None
    grpo_sde_window_start: Optional[int] = None
    grpo_per_prompt_stat_tracking: bool = False
    grpo_timestep_fraction: float = 0.99
    teacher_steps: int = 32
    multitask_steps: Optional[int] = None
    cascade_steps_per_task: Optional[int] = None
    opd_learning_rate: float = 1e-3
    opd_batch_size: int = 16
    opd_gradient_accumulation_steps: int = 1
    opd_steps: int = 40
    opd_sde_noise_level: float = 0.7

    def __post_init__(self):
        if self.multitask_steps is None:
            self.multitask_steps = len(TASKS) * self.teacher_steps
        if self.cascade_steps_per_task is None:
            self.cascade_steps_per_task = self.teacher_steps
        steps = (self.teacher_steps, self.multitask_steps, self.cascade_steps_per_task, self.opd_steps)
        if min(steps) < 1 or self.curve_points < 1:
            raise ValueError(f"Every stage needs at least one step and one curve point; got steps {steps}.")

    @classmethod
    def quick(cls, **overrides) -> "TableConfig":
        """The whole pipeline at tiny scale (a few minutes on two cores): checks that everything runs, not results."""
        settings = dict(
            output_dir="results/toy_table_quick",
            train_prompts_per_task=32,
            eval_prompts_per_task=8,
            curve_prompts_per_task=4,
            curve_points=2,
            num_inference_steps=4,
            num_generations=4,
            grpo_prompts_per_step=2,
            teacher_steps=2,
            opd_batch_size=8,
            opd_steps=2,
        )
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def full(cls, **overrides) -> "TableConfig":
        """The committed table (sized for about an hour on two CPU cores)."""
        return cls(**overrides)

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
                **_eval_kwargs(self.config),
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
        "rewards": {task: _task_reward(result, task) for task in TASKS},
    }


# ----- data and settings ---------------------------------------------------------------------------------------------
def _num_train_prompts(config: TableConfig) -> int:
    available = min(len(prompts(task, "train")) for task in TASKS) - config.curve_prompts_per_task
    count = available if config.train_prompts_per_task is None else min(config.train_prompts_per_task, available)
    if count < 1:
        raise ValueError(f"No training prompts left beside {config.curve_prompts_per_task} validation prompts.")
    return count


def _train_set(config: TableConfig, tasks=TASKS):
    """The first `n` train prompts of each task (the same prompts for every method), concatenated."""
    from datasets import concatenate_datasets

    count = _num_train_prompts(config)
    return concatenate_datasets([prompts(task, "train").select(range(count)) for task in tasks])


def _validation_sets(config: TableConfig) -> dict:
    """Each task's validation prompts: the train-split prompts right after the training ones."""
    start = _num_train_prompts(config)
    return {task: prompts(task, "train").select(range(start, start + config.curve_prompts_per_task)) for task in TASKS}


def _test_sets(max_prompts: Optional[int]) -> dict:
    sets = {}
    for task in TASKS:
        dataset = prompts(task, "test")
        if max_prompts is not None:
            dataset = dataset.select(range(min(max_prompts, len(dataset))))
        sets[task] = dataset
    return sets


def _eval_kwargs(config: TableConfig) -> dict[str, Any]:
    return {
        "num_inference_steps": config.eval_num_inference_steps,
        "guidance_scale": config.eval_guidance_scale,
        "batch_size": config.eval_batch_size,
        "seed": config.eval_seed,
    }


def _task_reward(result: EvaluationResult, task: str) -> float:
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


def _grpo_args(config: TableConfig, output_dir: str, max_steps: int, show_progress: bool) -> DiffusionGRPOConfig:
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
    )


def _opd_args(config: TableConfig, output_dir: str, noise_level: float, show_progress: bool) -> DiffusionOPDConfig:
    return DiffusionOPDConfig(
        **_common_args(config, output_dir, config.opd_steps, show_progress),
        per_device_train_batch_size=config.opd_batch_size,
        gradient_accumulation_steps=config.opd_gradient_accumulation_steps,
        learning_rate=config.opd_learning_rate,
        noise_level=noise_level,
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


def _stage_key(config: TableConfig, kind: str, settings: dict[str, Any]) -> str:
    payload = {"kind": kind, "version": CACHE_VERSION, "base": base_model_fingerprint(config.base_model), **settings}
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
    key = _stage_key(config, kind, settings)
    stage_dir = Path(config.output_dir) / f"{_slug(name)}-{key}"
    if not force:
        cached = _load_cached(stage_dir)
        if cached is not None:
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
    pipe = load_pipeline(config.base_model, device=_device())
    path = os.path.abspath(config.base_model or BASE_MODEL_DIR)
    expected = base_model_fingerprint(config.base_model)
    _BASE_FINGERPRINT.pop(path, None)
    if base_model_fingerprint(config.base_model) != expected:
        raise RuntimeError(f"The base model at {path} changed during the run; rerun to retrain on the new one.")
    return pipe


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_trainer(trainer, counter: ForwardCounter, config: TableConfig, curve: list, phase: str, steps: int) -> None:
    """Trains with the forward hook and the curve callback attached; the clock runs during `train()` only."""
    every = max(1, math.ceil(steps / config.curve_points))
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


def _grpo_settings(config: TableConfig) -> dict[str, Any]:
    keys = [f.name for f in dataclasses.fields(config) if f.name.startswith("grpo_")]
    keys += ["seed", "num_generations", "num_inference_steps", "guidance_scale", "lora_r", "lora_alpha"]
    keys += ["curve_prompts_per_task", "curve_points", "eval_seed", "eval_num_inference_steps", "eval_guidance_scale"]
    settings = {key: getattr(config, key) for key in keys}
    settings["train_prompts_per_task"] = _num_train_prompts(config)
    return settings


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
    settings = {**_grpo_settings(config), "task": task, "steps": config.teacher_steps}

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        pipe = _load_base(config)
        trainer = DiffusionGRPOTrainer(
            model=pipe,
            reward_funcs={task: reward_funcs()[task]},
            args=_grpo_args(config, str(stage_dir), config.teacher_steps, show_progress),
            train_dataset=_train_set(config, (task,)),
            peft_config=_lora_config(config),
        )
        _run_trainer(trainer, counter, config, curve, task, config.teacher_steps)
        trainer.save_model(str(stage_dir / LORA_SUBDIR))
        log_history.extend(trainer.state.log_history)
        return trainer.state.global_step

    return _cached_stage(config, f"teacher ({task})", "grpo_teacher", settings, force, train)


def train_multitask_grpo(config: TableConfig, force: bool = False, show_progress: bool = True) -> StageResult:
    """
    The joint multi-task RL baseline: one LoRA trained by GRPO on every task's prompts at once, each prompt scored by
    its own task's reward, for `config.multitask_steps` optimizer steps.
    """
    settings = {**_grpo_settings(config), "steps": config.multitask_steps}

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        pipe = _load_base(config)
        trainer = DiffusionGRPOTrainer(
            model=pipe,
            reward_funcs=reward_funcs(),
            args=_grpo_args(config, str(stage_dir), config.multitask_steps, show_progress),
            train_dataset=_train_set(config),
            peft_config=_lora_config(config),
        )
        _run_trainer(trainer, counter, config, curve, "multi-task", config.multitask_steps)
        trainer.save_model(str(stage_dir / LORA_SUBDIR))
        log_history.extend(trainer.state.log_history)
        return trainer.state.global_step

    return _cached_stage(config, "multi-task GRPO", "grpo_multitask", settings, force, train)


def train_cascade_grpo(config: TableConfig, force: bool = False, show_progress: bool = True) -> StageResult:
    """
    The cascade RL baseline: one LoRA trained by GRPO on each task in turn (in `toy.TASKS` order),
    `config.cascade_steps_per_task` optimizer steps each. Each phase is a fresh trainer (fresh AdamW state) whose
    student LoRA starts from the previous phase's weights.
    """
    settings = {**_grpo_settings(config), "steps_per_task": config.cascade_steps_per_task, "order": list(TASKS)}

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        previous: Optional[Path] = None
        total_steps = 0
        for task in TASKS:
            phase_dir = stage_dir / f"phase-{task}"
            pipe = _load_base(config)
            trainer = DiffusionGRPOTrainer(
                model=pipe,
                reward_funcs={task: reward_funcs()[task]},
                args=_grpo_args(config, str(phase_dir), config.cascade_steps_per_task, show_progress),
                train_dataset=_train_set(config, (task,)),
                peft_config=_lora_config(config),
            )
            if previous is not None:
                state_dict, _, _ = read_lora(previous)
                result = set_peft_model_state_dict(
                    trainer.unwrapped_denoiser, state_dict, adapter_name=STUDENT_ADAPTER
                )
                unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
                if unexpected:
                    raise RuntimeError(f"Cascade: the previous phase's LoRA did not load: {unexpected[:3]}")
            _run_trainer(trainer, counter, config, curve, task, config.cascade_steps_per_task)
            total_steps += trainer.state.global_step
            log_history.extend({**entry, "phase": task} for entry in trainer.state.log_history)
            previous = phase_dir / LORA_SUBDIR
            trainer.save_model(str(previous))
        shutil.copytree(previous, stage_dir / LORA_SUBDIR)
        return total_steps

    return _cached_stage(config, "cascade GRPO", "grpo_cascade", settings, force, train)


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
    """
    keys = ["seed", "num_inference_steps", "guidance_scale", "lora_r", "lora_alpha"]
    keys += ["curve_prompts_per_task"]
    keys += ["curve_points", "eval_seed", "eval_num_inference_steps", "eval_guidance_scale"]
    keys += ["opd_learning_rate", "opd_batch_size", "opd_gradient_accumulation_steps", "opd_steps"]
    settings = {key: getattr(config, key) for key in keys}
    settings.update(
        noise_level=noise_level,
        train_prompts_per_task=_num_train_prompts(config),
        teachers={task: stage.key for task, stage in teachers.items()},
    )
    name = "OPD-ODE" if noise_level == 0 else f"OPD-SDE (noise {noise_level:g})"

    def train(stage_dir: Path, counter, curve, log_history) -> int:
        pipe = _load_base(config)
        trainer = DiffusionOPDTrainer(
            model=pipe,
            teachers={task: os.path.abspath(stage.lora_dir) for task, stage in teachers.items()},
            args=_opd_args(config, str(stage_dir), noise_level, show_progress),
            train_dataset=_train_set(config, tuple(teachers)),
            peft_config=_lora_config(config),
        )
        _run_trainer(trainer, counter, config, curve, name, config.opd_steps)
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
    seeds. Cached under `<output_dir>/eval/`.

    Args:
        config ([`TableConfig`]): the settings.
        name (`str`): the model's row name.
        stage ([`StageResult`], *optional*): the trained stage; `None` evaluates the base model.
        max_prompts (`int`, *optional*): the first prompts of each task's test split only (all by default).
        force (`bool`, defaults to `False`): re-evaluate even when cached.
        show_progress (`bool`, defaults to `True`): progress bars.
        split (`str`, defaults to `"test"`): `"test"` (the table) or `"validation"` (the curves' prompts).
    """
    settings = {
        **_eval_kwargs(config),
        "model": None if stage is None else stage.key,
        "max_prompts": max_prompts,
        "split": split,
    }
    if split == "validation":
        settings["validation"] = {"start": _num_train_prompts(config), "count": config.curve_prompts_per_task}
    elif split != "test":
        raise ValueError(f"`split` must be 'test' or 'validation', got {split!r}.")
    key = _stage_key(config, "evaluation", settings)
    path = Path(config.output_dir) / "eval" / f"{_slug(name)}-{key}.json"
    if path.is_file() and not force:
        data = json.loads(path.read_text())
        return EvaluationResult(**data)
    pipe = _load_base(config)
    start = time.perf_counter()
    result = evaluate(
        pipe,
        _test_sets(max_prompts) if split == "test" else _validation_sets(config),
        reward_funcs(),
        lora=None if stage is None else os.path.abspath(stage.lora_dir),
        model_name=name,
        show_progress=show_progress,
        **_eval_kwargs(config),
    )
    result.settings["eval_seconds"] = round(time.perf_counter() - start, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), default=str))
    return result


# ----- the table -----------------------------------------------------------------------------------------------------
def _normalised(rewards: dict[str, float], base: dict[str, float], teachers: dict[str, dict[str, float]]) -> float:
    """
    Mean over tasks of `(r - base) / (teacher - base)`: 0 is the base model, 1 each teacher on its own task. Undefined
    (NaN) unless every teacher beats the base model on its task: with a teacher at or below the base, the ratio would
    reward doing worse than the base.
    """
    gains = []
    for task in TASKS:
        span = teachers[task][task] - base[task]
        gains.append((rewards[task] - base[task]) / span if span > 1e-9 else math.nan)
    return sum(gains) / len(gains)


def _compute_to_reach(curve: list[dict], values: list[float], target: float) -> Optional[float]:
    """Image-forwards at which a curve first reaches `target` (linear interpolation between its points)."""
    previous = None
    for point, value in zip(curve, values):
        if value >= target:
            if previous is None:
                return float(point["forwards"])
            (x0, y0), x1 = previous, point["forwards"]
            return float(x0 + (x1 - x0) * (target - y0) / (value - y0)) if value > y0 else float(x1)
        previous = (point["forwards"], value)
    return None


def _compute_ratios(curves: dict[str, dict], reference: str, methods: list[str], metric: str) -> dict[str, Any]:
    """
    For each method: the image-forwards it needs to reach the curve level (of `metric`, `"normalised_average"` or
    `"mean_reward"`) that both it and `reference` reach, the lower of their final levels, divided by what `reference`
    needs. `None` where the level is not above the base model's (nothing to reach).
    """
    ratios = {}
    ref = curves[reference]
    for method in methods:
        own = curves[method]
        target = min(own[metric][-1], ref[metric][-1])
        own_cost = _compute_to_reach(own["points"], own[metric], target)
        ref_cost = _compute_to_reach(ref["points"], ref[metric], target)
        ratios[method] = {
            "metric": metric,
            "target": target,
            "forwards": own_cost,
            "reference_forwards": ref_cost,
            "ratio": own_cost / ref_cost if own_cost is not None and ref_cost else None,
        }
    return ratios


def run_table(config: TableConfig, force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """
    Runs every stage (or reads it from the cache), evaluates every model, and writes the table as
    `<output_dir>.json` and `<output_dir>.md` and the curves as `<output_dir>_curves.png`.

    Args:
        config ([`TableConfig`]): the settings.
        force (`bool`, defaults to `False`): redo every stage, cached or not.
        show_progress (`bool`, defaults to `True`): progress bars.

    Returns:
        `dict`: the table (what the JSON holds), plus `"markdown"` and `"paths"`.
    """
    started = time.perf_counter()
    os.makedirs(config.output_dir, exist_ok=True)
    if config.base_model is None:
        # Work on a snapshot of the bundled model: replacing the bundled weights mid-run must not mix two bases.
        snapshot = Path(config.output_dir) / f"base_model-{base_model_fingerprint()[:12]}"
        if not (snapshot / "model_index.json").is_file():
            shutil.copytree(BASE_MODEL_DIR, snapshot, dirs_exist_ok=True)
        config = dataclasses.replace(config, base_model=str(snapshot))
    stages = tqdm(total=len(TASKS) + 4 + 1, desc="toy table: stages", disable=not show_progress, unit="stage")

    def done(what: str) -> None:
        stages.set_postfix_str(what)
        stages.update()

    teachers = {}
    for task in TASKS:
        teachers[task] = train_teacher(config, task, force=force, show_progress=show_progress)
        done(f"teacher ({task})")
    trained = [teachers[task] for task in TASKS]
    trained.append(train_multitask_grpo(config, force=force, show_progress=show_progress))
    done("multi-task GRPO")
    trained.append(train_cascade_grpo(config, force=force, show_progress=show_progress))
    done("cascade GRPO")
    for noise in (0.0, config.opd_sde_noise_level):
        trained.append(distill(config, noise, teachers, force=force, show_progress=show_progress))
        done(trained[-1].name)

    # Evaluations: the table on the test prompts, and the base model on the curve prompts (every curve's origin).
    max_prompts = config.eval_prompts_per_task
    base = evaluate_model(config, "base", None, max_prompts, force=force, show_progress=show_progress)
    results = {"base": base}
    for stage in trained:
        results[stage.name] = evaluate_model(config, stage.name, stage, max_prompts, force, show_progress)
    curve_base = evaluate_model(config, "base", None, force=force, show_progress=show_progress, split="validation")
    done("evaluations")
    stages.close()

    table = _assemble(config, teachers, trained, results, curve_base)
    # With cached stages this is the time of this invocation only; each stage's own cost is in its row.
    table["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    table["markdown"] = format_markdown(table)
    table["paths"] = _write_outputs(config, table)
    return table


def _assemble(config, teachers, trained, results, curve_base) -> dict[str, Any]:
    rewards = {name: {task: _task_reward(result, task) for task in TASKS} for name, result in results.items()}
    base = rewards["base"]
    teacher_rewards = {task: rewards[teachers[task].name] for task in TASKS}
    teacher_cost = {
        "seconds": round(sum(stage.seconds for stage in teachers.values()), 2),
        "forwards": sum(stage.forwards for stage in teachers.values()),
    }
    rows = [_row("base", "base", base, base, teacher_rewards, 0.0, 0, 0, 0.0, 0, 0)]
    for stage in trained:
        kind = "opd" if stage.name.startswith("OPD") else "teacher" if stage.name.startswith("teacher") else "baseline"
        extra = teacher_cost if kind == "opd" else {"seconds": 0.0, "forwards": 0}
        rows.append(
            _row(
                stage.name,
                kind,
                rewards[stage.name],
                base,
                teacher_rewards,
                stage.seconds,
                stage.forwards,
                stage.grad_forwards,
                stage.seconds + extra["seconds"],
                stage.forwards + extra["forwards"],
                stage.steps,
            )
        )

    # Curves: the base model on the curve prompts at zero compute, then each run's periodic evaluations.
    curve_base_rewards = {task: _task_reward(curve_base, task) for task in TASKS}
    curve_teachers = {task: teachers[task].curve[-1]["rewards"] for task in TASKS}
    curves = {}
    for stage in trained:
        points = [{"forwards": 0, "grad_forwards": 0, "seconds": 0.0, "rewards": curve_base_rewards}] + stage.curve
        curves[stage.name] = {
            "points": points,
            "normalised_average": [_normalised(p["rewards"], curve_base_rewards, curve_teachers) for p in points],
            "mean_reward": [sum(p["rewards"].values()) / len(TASKS) for p in points],
            **{f"reward/{task}": [p["rewards"][task] for p in points] for task in TASKS},
        }
    opd_names = [stage.name for stage in trained if stage.name.startswith("OPD")]
    baselines = ["multi-task GRPO", "cascade GRPO"]
    return {
        "description": (
            "Miniature Table 1 of DiffusionOPD on the toy world: single-task GRPO teachers, multi-task and cascade "
            "GRPO baselines, and on-policy distillation of the teachers (ODE and SDE). Rewards: mean over each task's "
            "test prompts, deterministic ODE sampler, fixed seeds."
        ),
        "tasks": list(TASKS),
        "columns": {
            "rewards": "mean reward of each task's test prompts, each scored by its own task's reward",
            "normalised_average": (
                "mean over tasks of (reward - base) / (teacher - base): 0 = base, 1 = every teacher; undefined (NaN) "
                "unless every teacher beats the base model on its own task"
            ),
            "mean_reward": "plain mean of the task rewards",
            "seconds": "training wall-clock seconds of the stage (periodic curve evaluations excluded)",
            "forwards": "denoiser image-forwards of the stage (a CFG call on B latents counts 2B), training only",
            "grad_forwards": "the image-forwards computed with gradients (each followed by a backward pass)",
            "total_seconds": "seconds including the stages it depends on (OPD: plus the three teachers)",
            "total_forwards": "image-forwards including the stages it depends on (OPD: plus the three teachers)",
        },
        "rows": rows,
        "teachers_total": teacher_cost,
        "teacher_gains": {task: teacher_rewards[task][task] - base[task] for task in TASKS},
        "curves": curves,
        "curve_definition": (
            f"normalised average on {config.curve_prompts_per_task} validation prompts of each task (held-out "
            "train-split prompts; same sampler and seeds as the table, but on the training pipeline), normalised by "
            "the base model and each teacher's final point on those prompts; "
            "x = the stage's training image-forwards (OPD: distillation only)"
        ),
        "compute_to_reach_multitask": {
            metric: _compute_ratios(curves, "multi-task GRPO", opd_names + ["cascade GRPO"], metric)
            for metric in ("normalised_average", "mean_reward", *(f"reward/{task}" for task in TASKS))
        },
        "compute_fraction_of_baselines": {
            opd: {
                base_name: {
                    "forwards": _by_name(rows, opd)["forwards"] / max(1, _by_name(rows, base_name)["forwards"]),
                    "seconds": _by_name(rows, opd)["seconds"] / max(1e-9, _by_name(rows, base_name)["seconds"]),
                }
                for base_name in baselines
            }
            for opd in opd_names
        },
        "config": config.to_dict(),
        "evaluation": {
            **_eval_kwargs(config),
            "sampler": "ode",
            "test_prompts": {task: len(results["base"].samples[task]) for task in TASKS},
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": _device(),
            "base_model": config.base_model or "bundled toy base model",
            "base_model_sha256": base_model_fingerprint(config.base_model)[:12],
        },
    }


def _by_name(rows: list[dict], name: str) -> dict:
    return next(row for row in rows if row["model"] == name)


def _row(name, kind, rewards, base, teachers, seconds, forwards, grad_forwards, total_seconds, total_forwards, steps):
    return {
        "model": name,
        "kind": kind,
        "rewards": rewards,
        "normalised_average": _normalised(rewards, base, teachers),
        "mean_reward": sum(rewards.values()) / len(rewards),
        "seconds": round(seconds, 1),
        "forwards": forwards,
        "grad_forwards": grad_forwards,
        "total_seconds": round(total_seconds, 1),
        "total_forwards": total_forwards,
        "steps": steps,
    }


def _count(value: float) -> str:
    """A forward count, short: 950, 12.3k, 4.56M."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def format_markdown(table: dict[str, Any]) -> str:
    """The table in Markdown, with its definitions and the compute comparison."""
    tasks = table["tasks"]
    header = ["model", *tasks, "norm. avg", "mean", "seconds", "forwards", "total seconds", "total forwards"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in table["rows"]:
        cells = [row["model"], *(f"{row['rewards'][t]:.3f}" for t in tasks)]
        cells += [_number(row["normalised_average"]), f"{row['mean_reward']:.3f}"]
        cells += [f"{row['seconds']:.0f}", _count(row["forwards"])]
        cells += [f"{row['total_seconds']:.0f}", _count(row["total_forwards"])]
        lines.append("| " + " | ".join(cells) + " |")
    evaluation, teachers = table["evaluation"], table["teachers_total"]
    counts = ", ".join(f"{task} {n}" for task, n in evaluation["test_prompts"].items())
    lines += [
        "",
        f"Rewards: mean over each task's test prompts ({counts}), deterministic ODE sampler with "
        f"{evaluation['num_inference_steps']} steps, CFG {evaluation['guidance_scale']}, seeds from "
        f"{evaluation['seed']}. Norm. avg: {table['columns']['normalised_average']}. Mean: the plain mean of the "
        f"three rewards. Seconds: {table['columns']['seconds']}. Forwards: {table['columns']['forwards']}. Total: "
        f"OPD rows add the three teachers ({teachers['seconds']:.0f} s, {_count(teachers['forwards'])} forwards).",
        "",
        "Teachers' gain over the base model on their own task (test prompts; the normalised average divides by "
        "these and is undefined unless all are positive): "
        + ", ".join(f"{task} {gain:+.3f}" for task, gain in table["teacher_gains"].items())
        + ".",
        "",
        "Training image-forwards to reach the level that both a method and multi-task GRPO reach on the validation "
        "curves (the lower of their two final levels), relative to multi-task GRPO:",
        "",
    ]
    labels = {"normalised_average": "normalised average", "mean_reward": "mean reward"}
    for metric, ratios in table["compute_to_reach_multitask"].items():
        for method, ratio in ratios.items():
            level = f"{labels.get(metric, metric.replace('reward/', '') + ' reward')} {_number(ratio['target'])}"
            if ratio["ratio"] is None:
                lines.append(f"- {method}, {level}: undefined (not above the base model on both curves)")
            else:
                lines.append(
                    f"- {method}, {level}: {ratio['ratio']:.2f}x ({_count(ratio['forwards'])} vs "
                    f"{_count(ratio['reference_forwards'])})"
                )
    return "\n".join(lines)


def plot_curves(table: dict[str, Any], path: str) -> None:
    """
    Reward on the validation prompts versus training image-forwards, for the baselines and the OPD students: one
    panel per task (its teacher's final level dashed), the mean reward and the normalised average (OPD also dotted,
    shifted by the teachers' compute).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, curves = table["tasks"], table["curves"]
    shown = [name for name in curves if not name.startswith("teacher")]
    teachers_total = table["teachers_total"]["forwards"] / 1e6
    teacher_levels = {task: curves[f"teacher ({task})"]["points"][-1]["rewards"][task] for task in tasks}
    panels = [*tasks, "mean_reward"]
    if any(math.isfinite(value) for name in shown for value in curves[name]["normalised_average"]):
        panels.append("normalised_average")  # undefined unless every teacher beats the base model
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.6), constrained_layout=True)
    for panel, ax in zip(panels, axes):
        aggregate = panel not in tasks
        for name in shown:
            points = curves[name]["points"]
            xs = [p["forwards"] / 1e6 for p in points]
            ys = curves[name][panel] if aggregate else [p["rewards"][panel] for p in points]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
            if aggregate and name.startswith("OPD"):
                shifted = [x + teachers_total for x in xs]
                ax.plot(shifted, ys, linestyle=":", color=line.get_color(), alpha=0.7, label=f"{name} + teachers")
        if panel in tasks:
            level, title = teacher_levels[panel], f"{panel} reward"
        elif panel == "mean_reward":
            level, title = sum(teacher_levels.values()) / len(tasks), "mean reward"
        else:
            level, title = 1.0, "normalised average"
        ax.axhline(level, color="black", linestyle="--", linewidth=1, label="teachers' level")
        ax.set_title(title)
        ax.set_xlabel("training image-forwards (M)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward on the validation prompts")
    axes[-1].legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _strict_json(value):
    """NaN and infinities (undefined ratios) as `null`: standard JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def _write_outputs(config: TableConfig, table: dict[str, Any]) -> dict[str, str]:
    stem = os.path.normpath(config.output_dir)
    paths = {"json": f"{stem}.json", "markdown": f"{stem}.md", "curves": f"{stem}_curves.png"}
    payload = _strict_json({key: value for key, value in table.items() if key not in ("markdown", "paths")})
    with open(paths["json"], "w") as file:
        json.dump(payload, file, indent=1, default=str, allow_nan=False)
    with open(paths["markdown"], "w") as file:
        file.write("# Toy Table 1\n\n" + table["markdown"] + "\n")
    plot_curves(table, paths["curves"])
    return paths
