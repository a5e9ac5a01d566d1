"""
The evaluation harness: sample a pipeline (optionally with a LoRA) on each task's test prompts with the deterministic
ODE sampler, score every requested reward, and write a Table-1-style table (Markdown + JSON).

```python
>>> from diffusion_opd_trainer import evaluate
>>> result = evaluate(
...     pipe,
...     tasks={"geneval": geneval_test, "ocr": ocr_test, "pickscore": pick_test},  # datasets with a "prompt" column
...     reward_funcs={"geneval": "geneval", "ocr": "ocr", "pickscore": ["pickscore", "clip_score", "aesthetic"]},
...     lora="./sd35-opd",
...     output_dir="eval/sd35-opd",
... )
>>> print(result.to_markdown())
```
"""

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .image_logging import ImageCollector, log_images
from .rewards import get_reward, reward_name, to_uint8_images
from .rollout import rollout


logger = logging.getLogger(__name__)

__all__ = ["EvaluationCallback", "EvaluationResult", "evaluate", "format_table", "load_lora", "sample_images"]

EVAL_ADAPTER = "evaluation"


@dataclass
class EvaluationResult:
    """
    The scores of one model on a set of tasks.

    Args:
        model_name (`str`): the row's name in tables.
        metrics (`dict[str, dict[str, float]]`): task -> metric -> aggregated value (GenEval: mean of tag accuracies).
        samples (`dict[str, list[dict]]`): task -> one record per image (`prompt`, `seed`, and each metric's value).
        settings (`dict[str, Any]`): the sampler settings, seed and LoRA source.
    """

    model_name: str
    metrics: dict[str, dict[str, float]]
    samples: dict[str, list[dict]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self, precision: int = 4) -> str:
        """This result as a one-row Markdown table (see [`format_table`])."""
        return format_table([self], precision=precision)

    def save(self, output_dir: Union[str, os.PathLike]) -> dict[str, str]:
        """Writes `results.json` (everything, per-image scores included) and `results.md`; returns their paths."""
        os.makedirs(output_dir, exist_ok=True)
        paths = {"json": os.path.join(output_dir, "results.json"), "markdown": os.path.join(output_dir, "results.md")}
        with open(paths["json"], "w") as file:
            json.dump(self.to_dict(), file, indent=2, default=_json_default)
        with open(paths["markdown"], "w") as file:
            file.write(self.to_markdown() + "\n")
        return paths


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def _column_labels(results: Sequence[EvaluationResult]) -> list[tuple[str, str, str]]:
    # A metric reported by one task only is labelled by its name; one shared by tasks gets "task/metric".
    pairs = list(dict.fromkeys((task, metric) for r in results for task, ms in r.metrics.items() for metric in ms))
    counts: dict[str, int] = {}
    for _, metric in pairs:
        counts[metric] = counts.get(metric, 0) + 1
    return [(task, metric, metric if counts[metric] == 1 else f"{task}/{metric}") for task, metric in pairs]


def format_table(results: Sequence[EvaluationResult], precision: int = 4) -> str:
    """
    A Table-1-style Markdown table: one row per model, one column per (task, metric).

    Args:
        results (`Sequence[EvaluationResult]`): the rows, e.g. the teachers, the student and the baselines.
        precision (`int`, defaults to 4): significant digits after the decimal point.
    """
    columns = _column_labels(results)
    lines = [
        "| model | " + " | ".join(label for _, _, label in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for result in results:
        cells = []
        for task, metric, _ in columns:
            value = result.metrics.get(task, {}).get(metric)
            cells.append("-" if value is None or math.isnan(value) else f"{value:.{precision}f}")
        lines.append(f"| {result.model_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _as_columns(data: Any, max_prompts: Optional[int]) -> dict[str, list]:
    """A task's prompts as a dict of equal-length lists with a `prompt` key."""
    if isinstance(data, str):
        raise TypeError("A task's prompts must be a list of strings or a dataset, not a single string.")
    if hasattr(data, "column_names") and hasattr(data, "to_dict"):  # a `datasets.Dataset`
        columns = data.to_dict()
    elif isinstance(data, Mapping):
        columns = {key: list(value) for key, value in data.items()}
    else:
        data = list(data)
        if data and isinstance(data[0], Mapping):
            columns = {key: [row.get(key) for row in data] for key in data[0]}
        else:
            columns = {"prompt": [str(prompt) for prompt in data]}
    if "prompt" not in columns:
        raise ValueError(f"A task's prompts need a 'prompt' column; got columns {sorted(columns)}.")
    if max_prompts is not None:
        columns = {key: value[:max_prompts] for key, value in columns.items()}
    return columns


def _split_by_task(data: Any, tasks: Iterable[str]) -> dict[str, dict[str, list]]:
    """One prompt set with a `task` column as task -> its rows (tasks without rows are left out)."""
    columns = _as_columns(data, None)
    if "task" not in columns:
        raise ValueError("Per-task rewards need a `task` column in the prompts, or a dict task -> prompts.")
    split = {}
    for task in tasks:
        rows = [i for i, name in enumerate(columns["task"]) if name == task]
        if rows:
            split[task] = {key: [values[i] for i in rows] for key, values in columns.items()}
    return split


def _resolve_rewards(reward_funcs: Any, tasks: Iterable[str]) -> dict[str, list[tuple[str, Any]]]:
    """task -> [(metric name, reward callable)], each named reward built once and shared across tasks."""
    built: dict[str, Any] = {}

    def resolve(item) -> tuple[str, Any]:
        if isinstance(item, str):
            if item not in built:
                built[item] = get_reward(item)
            return item, built[item]
        return reward_name(item), item

    def as_list(value) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value]

    if isinstance(reward_funcs, Mapping):
        missing = [task for task in tasks if task not in reward_funcs]
        if missing:
            raise ValueError(f"No reward for task(s) {missing}; `reward_funcs` has {sorted(reward_funcs)}.")
        return {task: [resolve(item) for item in as_list(reward_funcs[task])] for task in tasks}
    return {task: [resolve(item) for item in as_list(reward_funcs)] for task in tasks}


def load_lora(pipeline, source: Union[str, os.PathLike], adapter_name: str = EVAL_ADAPTER) -> None:
    """
    Loads a LoRA into `pipeline`'s denoiser as the (inactive, frozen) adapter `adapter_name`: a PEFT folder, a
    diffusers LoRA folder or `.safetensors` file, or a Hub id `owner/repo[/subfolder][@revision]`, read by the same
    code as the OPD teachers.
    """
    from .lora import load_adapter, read_lora
    from .pipelines import get_family
    from .teachers import resolve_source

    family = get_family(pipeline)
    path = resolve_source(source, "Evaluation LoRA")
    state_dict, config, _ = read_lora(path, family.denoiser_name, denoiser=family.denoiser)
    load_adapter(family.denoiser, state_dict, config, adapter_name, repr(os.fspath(source)))


@contextmanager
def _lora_applied(pipeline, source, scale: float):
    """Activates the LoRA `source` (alone) inside the block; removes it and restores the active adapters after."""
    if source is None:
        yield
        return
    previous = list(pipeline.get_active_adapters()) if hasattr(pipeline, "get_active_adapters") else []
    load_lora(pipeline, source, EVAL_ADAPTER)
    try:
        pipeline.set_adapters([EVAL_ADAPTER], adapter_weights=[scale])
        yield
    finally:
        pipeline.delete_adapters(EVAL_ADAPTER)
        if previous:
            pipeline.set_adapters(previous)


@contextmanager
def _eval_mode(pipeline):
    modules = [m for m in getattr(pipeline, "components", {}).values() if isinstance(m, torch.nn.Module)]
    training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, was_training in zip(modules, training):
            module.train(was_training)


@torch.no_grad()
def sample_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 40,
    guidance_scale: float = 4.5,
    height: Optional[int] = None,
    width: Optional[int] = None,
    negative_prompt: str = "",
    batch_size: Optional[int] = None,
    true_cfg_scale: Optional[float] = None,
    max_sequence_length: Optional[int] = None,
) -> torch.Tensor:
    """
    The seeded ODE sampler of the evaluations: image `i` starts from the noise of a CPU generator seeded `seeds[i]`,
    so an image does not depend on `batch_size`, on the device or on the other prompts of its batch.

    Args:
        pipeline (`DiffusionPipeline`): the model.
        prompts (`Sequence[str]`): one image per prompt.
        seeds (`Sequence[int]`): the seed of each image's initial noise.
        num_inference_steps (`int`, defaults to 40), guidance_scale (`float`, defaults to 4.5): the ODE sampler.
        height (`int`, *optional*), width (`int`, *optional*): the image size; the pipeline's default otherwise.
        negative_prompt (`str`, defaults to `""`): CFG's negative prompt.
        batch_size (`int`, *optional*): images per forward; all at once when omitted.
        true_cfg_scale (`float`, *optional*): true CFG on top of embedded guidance (Flux.1-dev's
            `true_cfg_scale`; only 1 for the other families); by default the family's own (1 for a pipeline).
        max_sequence_length (`int`, *optional*): the T5 length (SD3: 256 by default; Flux: 512).

    Returns:
        `torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`, float32, on the pipeline's device.
    """
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds.")
    batch_size = batch_size or max(len(prompts), 1)
    from .pipelines import get_family

    family = get_family(pipeline)
    if true_cfg_scale is not None:
        family.set_true_cfg_scale(true_cfg_scale)
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        trajectory = rollout(
            family,
            prompts[start:stop],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            noise_level=0.0,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds[start:stop]],
            negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length,
            decode=True,
        )
        images.append(trajectory.images.float())
    return torch.cat(images)


@torch.no_grad()
def evaluate(
    pipeline,
    tasks: Union[Mapping[str, Any], Any],
    reward_funcs: Union[Mapping[str, Any], Sequence[Any], Any],
    *,
    lora: Optional[Union[str, os.PathLike]] = None,
    lora_scale: float = 1.0,
    model_name: Optional[str] = None,
    num_inference_steps: int = 40,
    guidance_scale: float = 4.5,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_images_per_prompt: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    max_prompts: Optional[int] = None,
    negative_prompt: str = "",
    true_cfg_scale: Optional[float] = None,
    max_sequence_length: Optional[int] = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    save_images: bool = False,
    show_progress: bool = True,
    on_batch: Optional[Callable[[str, list[str], torch.Tensor, dict[str, list]], None]] = None,
) -> EvaluationResult:
    """
    Samples `pipeline` on each task's prompts with the deterministic ODE sampler ([`sample_images`]) and scores the
    images.

    Image `k` of prompt `i` starts from the noise of a CPU generator seeded `seed + i * num_images_per_prompt + k`,
    so scores do not depend on `batch_size` or on the device, and two models see the same noise.

    Args:
        pipeline (`DiffusionPipeline`): the model (the SD3/SD3.5 and SD 1.x/2.x families, see `pipelines/`).
        tasks (`dict[str, Dataset | list]` or one dataset / prompt list): task -> test prompts: a `datasets.Dataset`
            or a list of dicts with a `prompt` column (other columns, e.g. GenEval's `metadata`, reach the rewards),
            or a plain list of prompts. A single set is the task `"eval"`, or, with per-task `reward_funcs`, split
            into tasks by its `task` column.
        reward_funcs (`dict[str, ...]` or list): the rewards of every task (a list of names / callables), or per task
            (`{task: name | callable | list}`). Named rewards are built once and shared across tasks.
        lora (`str` or `os.PathLike`, *optional*): a LoRA to evaluate (diffusers-format file or folder, or Hub id),
            active alone during the evaluation and removed afterwards.
        lora_scale (`float`, defaults to 1.0): its weight.
        model_name (`str`, *optional*): the table row's name; the LoRA source or the pipeline's model id otherwise.
        num_inference_steps (`int`, defaults to 40), guidance_scale (`float`, defaults to 4.5): the paper's
            evaluation sampler (40-step ODE, CFG 4.5).
        height (`int`, *optional*), width (`int`, *optional*): the image size; the pipeline's default otherwise.
        num_images_per_prompt (`int`, defaults to 1): images per prompt (GenEval's protocol uses 4).
        batch_size (`int`, defaults to 8): images per sampling batch.
        seed (`int`, defaults to 0): the base seed.
        max_prompts (`int`, *optional*): the first `max_prompts` prompts of each task only.
        negative_prompt (`str`, defaults to `""`): CFG's negative prompt.
        true_cfg_scale (`float`, *optional*): true CFG on top of embedded guidance (Flux.1-dev's `true_cfg_scale`),
            recorded in the settings when given.
        max_sequence_length (`int`, *optional*): the T5 length (SD3: 256 by default; Flux: 512), recorded in the
            settings when given.
        output_dir (`str` or `os.PathLike`, *optional*): where to write `results.json` and `results.md`.
        save_images (`bool`, defaults to `False`): also save the images as PNG under `output_dir/<task>/`.
        show_progress (`bool`, defaults to `True`): progress bars.
        on_batch (`Callable`, *optional*): called after each batch is scored as `on_batch(task, prompts, images,
            scores)`, `scores` mapping each metric to the batch's values (how the trainers log evaluation images).

    Returns:
        [`EvaluationResult`]
    """
    if not isinstance(tasks, Mapping):
        tasks = _split_by_task(tasks, reward_funcs) if isinstance(reward_funcs, Mapping) else {"eval": tasks}
    if save_images and output_dir is None:
        raise ValueError("`save_images=True` needs an `output_dir`.")
    rewards = _resolve_rewards(reward_funcs, list(tasks))
    if model_name is None:
        model_name = str(lora) if lora is not None else getattr(pipeline, "name_or_path", None) or "model"
    settings = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "num_images_per_prompt": num_images_per_prompt,
        "seed": seed,
        "lora": None if lora is None else os.fspath(lora) if isinstance(lora, os.PathLike) else lora,
        "lora_scale": lora_scale,
        "sampler": "ode",
    }
    if true_cfg_scale is not None:
        settings["true_cfg_scale"] = true_cfg_scale
    if max_sequence_length is not None:
        settings["max_sequence_length"] = max_sequence_length
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict]] = {}
    with _eval_mode(pipeline), _lora_applied(pipeline, lora, lora_scale):
        for task, data in tasks.items():
            columns = _as_columns(data, max_prompts)
            # One row per image: prompts (and their columns) repeated num_images_per_prompt times.
            rows = [(i, k) for i in range(len(columns["prompt"])) for k in range(num_images_per_prompt)]
            image_columns = {key: [values[i] for i, _ in rows] for key, values in columns.items()}
            seeds = [seed + i * num_images_per_prompt + k for i, k in rows]
            values: dict[str, list] = {}
            owners: dict[str, Any] = {}
            progress = tqdm(
                range(0, len(rows), batch_size), desc=f"evaluate {task}", disable=not show_progress, unit="batch"
            )
            for start in progress:
                stop = min(start + batch_size, len(rows))
                prompts = image_columns["prompt"][start:stop]
                images = sample_images(
                    pipeline,
                    prompts,
                    seeds[start:stop],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    negative_prompt=negative_prompt,
                    true_cfg_scale=true_cfg_scale,
                    max_sequence_length=max_sequence_length,
                )
                extra = {key: value[start:stop] for key, value in image_columns.items() if key != "prompt"}
                scores: dict[str, list] = {}
                for name, reward in rewards[task]:
                    if hasattr(reward, "compute_metrics"):
                        batch_metrics = reward.compute_metrics(prompts, images, **extra)
                    else:
                        batch_metrics = {name: list(reward(prompts=prompts, images=images, **extra))}
                    for metric, metric_values in batch_metrics.items():
                        if owners.get(metric, reward) is not reward:
                            raise ValueError(f"Two rewards of task {task!r} report a metric named {metric!r}.")
                        values.setdefault(metric, []).extend(metric_values)
                        owners[metric] = reward
                    scores.update({metric: list(metric_values) for metric, metric_values in batch_metrics.items()})
                if on_batch is not None:
                    on_batch(task, list(prompts), images, scores)
                if save_images:
                    folder = os.path.join(output_dir, task)
                    os.makedirs(folder, exist_ok=True)
                    for offset, array in enumerate(to_uint8_images(images)):
                        i, k = rows[start + offset]
                        Image.fromarray(array).save(os.path.join(folder, f"{i:05d}_{k:02d}.png"))
            metrics[task] = {
                metric: _aggregate(owners[metric], metric, metric_values, image_columns)
                for metric, metric_values in values.items()
            }
            samples[task] = [
                {"prompt": image_columns["prompt"][j], "seed": seeds[j], **{m: v[j] for m, v in values.items()}}
                for j in range(len(rows))
            ]
            logger.info("%s on %s: %s", model_name, task, metrics[task])
    result = EvaluationResult(model_name=model_name, metrics=metrics, samples=samples, settings=settings)
    if output_dir is not None:
        result.save(output_dir)
    return result


def _aggregate(reward, metric: str, values: list, columns: dict[str, list]) -> float:
    if hasattr(reward, "aggregate"):
        return reward.aggregate(metric, values, columns)
    kept = [float(value) for value in values if value is not None]
    return sum(kept) / len(kept) if kept else math.nan


class EvaluationCallback(TrainerCallback):
    """
    Runs [`evaluate`] during training, every `eval_steps` optimizer steps (and at the end of training), on the main
    process only, and logs each metric as `eval/<column>` through the trainer's `log` (so every logging integration
    sees it); tables go to `<output_dir>/evaluation/step-<n>/`. With `log_images_steps` set in the trainer's
    arguments, its first 16 images, captioned with their prompts and scores, go to TensorBoard / W&B as `eval/images`.

    `pipeline` must be the pipeline being trained (its denoiser carries the trained LoRA): the images then come from
    the current weights. Other processes wait for the main one at their next collective operation.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline under training.
        tasks, reward_funcs: as in [`evaluate`].
        eval_steps (`int`, *optional*): the period; the trainer's `eval_steps` (or `logging_steps`) otherwise.
        evaluate_at_end (`bool`, defaults to `True`): also evaluate when training ends.
        trainer (`transformers.Trainer`, *optional*): the trainer to log through. [`DiffusionGRPOTrainer`] and
            [`DiffusionOPDTrainer`] attach themselves to the callbacks they are given; pass it with another trainer.
        **evaluate_kwargs: other arguments of [`evaluate`] (`num_inference_steps`, `max_prompts`, ...).
    """

    def __init__(
        self,
        pipeline,
        tasks,
        reward_funcs,
        eval_steps: Optional[int] = None,
        evaluate_at_end: bool = True,
        trainer=None,
        **evaluate_kwargs,
    ):
        self.pipeline, self.tasks, self.reward_funcs, self.trainer = pipeline, tasks, reward_funcs, trainer
        self.eval_steps, self.evaluate_at_end = eval_steps, evaluate_at_end
        self.evaluate_kwargs = {"show_progress": False, **evaluate_kwargs}
        self.results: list[EvaluationResult] = []
        self._built_rewards = None
        self._last_step = -1

    def _run(self, args, state) -> None:
        # Under FSDP the sharded denoiser's forwards need every process: all sample, the main one writes and logs.
        every_process = bool(getattr(self.trainer, "shards_parameters", False))
        main = state.is_world_process_zero
        if not (main or every_process) or state.global_step == self._last_step:
            return
        if self.trainer is None:
            raise ValueError("`EvaluationCallback` logs through its trainer: pass `trainer=` (ours attach themselves)")
        if self._built_rewards is None:
            # Named rewards are built at the first evaluation and kept: their models load once.
            self._built_rewards = _resolve_rewards(self.reward_funcs, list(self._task_names()))
            self._built_rewards = {
                task: [reward for _, reward in items] for task, items in self._built_rewards.items()
            }
        self._last_step = state.global_step
        output_dir = os.path.join(args.output_dir, "evaluation", f"step-{state.global_step}") if main else None
        kwargs = dict(self.evaluate_kwargs)
        collector = None
        if getattr(args, "log_images_steps", 0) and main:
            # The first images, captioned with their prompts and scores, go to TensorBoard / W&B as `eval/images`.
            collector = ImageCollector()
            user_hook = kwargs.get("on_batch")

            def on_batch(*batch):
                collector(*batch)
                if user_hook is not None:
                    user_hook(*batch)

            kwargs["on_batch"] = on_batch
        # The rewards are built per task by now: a single prompt set is the task "eval" they were built for.
        tasks = (
            self.tasks
            if isinstance(self.tasks, Mapping) or isinstance(self.reward_funcs, Mapping)
            else {"eval": self.tasks}
        )
        result = evaluate(
            self.pipeline,
            tasks,
            self._built_rewards,
            model_name=f"step {state.global_step}",
            output_dir=output_dir,
            **kwargs,
        )
        self.results.append(result)
        if not main:
            return
        logs = {f"eval/{label}": result.metrics[task][metric] for task, metric, label in _column_labels([result])}
        # Our trainers' `log_evaluation` keeps the pending training metrics out of this entry.
        getattr(self.trainer, "log_evaluation", self.trainer.log)(logs)
        if collector is not None and len(collector):
            log_images(self.trainer, "eval/images", collector.stacked(), collector.captions)
        logger.info("step %d: %s", state.global_step, logs)

    def _task_names(self):
        return self.tasks.keys() if isinstance(self.tasks, Mapping) else ["eval"]

    def prompts(self) -> list[str]:
        """Every prompt this callback evaluates (a trainer offloading its text encoders encodes them up front)."""
        sets = self.tasks.values() if isinstance(self.tasks, Mapping) else [self.tasks]
        max_prompts = self.evaluate_kwargs.get("max_prompts")
        return [prompt for data in sets for prompt in _as_columns(data, max_prompts)["prompt"]]

    def on_step_end(self, args, state, control, **kwargs):
        period = self.eval_steps or getattr(args, "eval_steps", None) or args.logging_steps
        if period and state.global_step % int(period) == 0:
            # Logging goes through `Trainer.log`, which clears `control.should_log`: here, mid-step, that would cancel
            # the step's own log on this process only (and under several processes the others would wait in its
            # loss gather). The flag is put back for any trainer.
            should_log = getattr(control, "should_log", None)
            self._run(args, state)
            if control is not None:
                control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs):
        if self.evaluate_at_end:
            self._run(args, state)
