"""What the GRPO and OPD trainers share: the pipeline and its student LoRA, data, saving, resuming, EMA, metrics."""

import contextlib
import gc
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate.utils import broadcast_object_list
from diffusers import DiffusionPipeline
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoints import STAGING_DIR, checkpoint_problems, latest_intact_checkpoint
from .data import check_prompt_dataset
from .diffusion_config import DiffusionTrainingConfig
from .ema import LoRAEMA
from .evaluation import EvaluationCallback, evaluate
from .hub import save_lora, write_model_card
from .image_logging import IMAGE_INTEGRATIONS, ImageCollector, log_images
from .lora import (
    PEFT_WEIGHT_NAME,
    STUDENT_ADAPTER,
    adapter_state_dict,
    add_student_adapter,
    default_lora_config,
    load_adapter_weights,
    lora_parameters,
    nonfinite_keys,
)
from .memory import estimate_memory
from .pipelines import PipelineFamily, PromptEmbeddings, get_family
from .progress import StepPhaseCallback, report_phase
from .prompt_sampler import PromptSampler, RolloutBuffer
from .quiet import quiet_pipeline_imports
from .rewards import reward_name
from .rollout import Trajectory, rollout
from .scale_out import ScaleOutSupport
from .scoring import RewardError, RewardSet
from .sde import check_scheduler


logger = logging.getLogger(__name__)

EMA_STATE_NAME = "ema_state.safetensors"
ROLLOUT_RNG_NAME = "rollout_rng_state_{}.safetensors"
TRAINING_ARGS_JSON = "training_args.json"
INTERRUPTED_DIR = "interrupted"


def identity_collator(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows pass through untouched: prompts and metadata are not tensors."""
    return features


class _EMACallback(TrainerCallback):
    def __init__(self, trainer: "DiffusionTrainerBase"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            self.trainer._bind_ema()
            self.trainer.ema.step(state.global_step)


class _NonFiniteGuard(TrainerCallback):
    """Just before each optimizer step (gradients reduced and clipped): skips the step if anything is not finite."""

    def __init__(self, trainer: "DiffusionTrainerBase"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._skip_step_if_nonfinite()


class _TensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback, minus its `model.config.to_json_string()` (diffusers configs lack it)."""

    def on_train_begin(self, args, state, control, **kwargs):
        kwargs.pop("model", None)
        super().on_train_begin(args, state, control, **kwargs)


class DiffusionTrainerBase(ScaleOutSupport, Trainer):
    """
    Shared machinery of [`DiffusionGRPOTrainer`] and [`DiffusionOPDTrainer`]; not used directly.

    The Trainer's `model` is the pipeline's denoiser (the SD3 transformer or the UNet) carrying a trainable LoRA
    adapter named `"default"`. The VAE and text encoders stay beside it, frozen, on the same device, never in the
    optimizer and never in saved checkpoints.
    """

    _tag_names: list[str] = []
    _method_name: str = ""
    _citations: tuple[str, ...] = ()
    _config_class: type = DiffusionTrainingConfig
    _name_suffix: str = ""

    @classmethod
    def _resolve_args(cls, model, args: Optional[DiffusionTrainingConfig]) -> DiffusionTrainingConfig:
        """`args`, checked, or the default config `<pipeline name>-<suffix>` (as TRL's trainers do)."""
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = cls._config_class(f"{str(name).split('/')[-1]}-{cls._name_suffix}")
        if not isinstance(args, cls._config_class):
            raise TypeError(f"`args` must be a {cls._config_class.__name__}, got {type(args).__name__}.")
        return args

    @staticmethod
    def _check_datasets(train_dataset, eval_dataset) -> None:
        """Both datasets checked whole ([`~data.check_prompt_dataset`]) before anything is loaded."""
        check_prompt_dataset(train_dataset, "train_dataset")
        check_prompt_dataset(eval_dataset, "eval_dataset")

    def __init__(
        self,
        model: Union[str, os.PathLike, DiffusionPipeline],
        args: DiffusionTrainingConfig,
        train_dataset=None,
        eval_dataset=None,
        peft_config: Optional[LoraConfig] = None,
        callbacks: Optional[list[TrainerCallback]] = None,
        optimizers: tuple = (None, None),
    ):
        if isinstance(model, (str, os.PathLike)):
            # Half precision halves memory; the LoRA parameters are upcast to float32 below for stable updates.
            dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
            with quiet_pipeline_imports():
                model = DiffusionPipeline.from_pretrained(str(model), dtype=dtype)
        if not isinstance(model, DiffusionPipeline):
            raise TypeError(f"`model` must be a diffusers DiffusionPipeline or a model id/path, got {type(model)}.")
        self.pipeline = model
        self.pipeline.set_progress_bar_config(disable=True)
        self.family: PipelineFamily = get_family(model)
        check_scheduler(model.scheduler)  # before any weight is touched
        self.family.set_true_cfg_scale(args.true_cfg_scale)

        denoiser = self.family.denoiser
        for component in model.components.values():
            if isinstance(component, torch.nn.Module) and component is not denoiser:
                component.requires_grad_(False)
                component.eval()
        if peft_config is None:
            peft_config = default_lora_config(target_modules=self.family.lora_target_modules())
        # The LoRA's random init must depend on the seed only (Trainer.__init__ seeds too, but after this point).
        set_seed(args.seed)
        self.lora_config = peft_config
        add_student_adapter(denoiser, peft_config)
        self._upcast_trainable_parameters(denoiser)
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            # diffusers' own checkpointing; the Trainer's path expects a transformers model.
            denoiser.enable_gradient_checkpointing()
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False
        self._prepare_before_trainer_init(args)

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=identity_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.offload_vae = args.offload_vae if args.offload_vae is not None else not self._decodes_during_training()
        self._place_components()
        self.ema = None
        if args.ema:
            self.ema = LoRAEMA(lora_parameters(denoiser, STUDENT_ADAPTER), args.ema_decay, args.ema_update_interval)
        self.add_callback(_EMACallback(self))
        self.add_callback(_NonFiniteGuard(self))
        self.add_callback(StepPhaseCallback(self))
        self._nonfinite_sources: list[str] = []  # what produced a non-finite loss since the last optimizer step
        self._nonfinite_steps = 0
        self._consecutive_nonfinite = 0
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, EvaluationCallback) and callback.trainer is None:
                callback.trainer = self  # it logs through this trainer
            if type(callback) is TensorBoardCallback:
                self.callback_handler.remove_callback(callback)
                self.callback_handler.add_callback(_TensorBoardCallback(callback.tb_writer))
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._buffer = RolloutBuffer(args.gradient_accumulation_steps, args.num_iterations)
        self._next_images_step = 0  # the first step whose rollout images are logged next
        if args.log_images_steps and not set(args.report_to or []) & set(IMAGE_INTEGRATIONS):
            logger.warning(
                "`log_images_steps=%d` but `report_to` (%s) has neither 'tensorboard' nor 'wandb', the integrations "
                "that take images: no image will be logged.",
                args.log_images_steps,
                args.report_to,
            )
        self.rollout_generator = torch.Generator(device=self.accelerator.device)
        # Distinct noise per process: a group spread over processes must not repeat the same images.
        self.rollout_generator.manual_seed(args.seed * 1000 + self.accelerator.process_index)

    # ----- set-up hooks ----------------------------------------------------------------------------------------------
    def _prepare_before_trainer_init(self, args) -> None:
        """Subclass hook: load teachers, resolve rewards... before `Trainer.__init__` builds the optimizer state."""

    def _decodes_during_training(self) -> bool:
        """Subclass hook: whether training steps decode images (the default of `offload_vae` is the opposite)."""
        return True

    def _place_components(self) -> None:
        """
        The frozen components on the accelerator, but the text encoders with `text_encoder_offload` (after the run's
        prompts are encoded) and the VAE with `offload_vae` on the CPU: they borrow the accelerator only while they
        compute ([`~pipelines.base.modules_on`]).
        """
        args, device = self.args, self.accelerator.device
        offload_text = args.text_encoder_offload != "none"
        encoders = self.family.text_encoders
        for name, component in self.pipeline.components.items():
            if not isinstance(component, torch.nn.Module) or component is self.family.denoiser:
                continue
            offloaded = (name in encoders and offload_text) or (name == "vae" and self.offload_vae)
            component.to("cpu" if offloaded else device)
        if offload_text:
            self._encode_prompts_up_front()
            if args.text_encoder_offload == "free":
                released = self.family.release_text_encoders()
                gc.collect()
                logger.info("Released the text encoders (%s): the run's prompts are encoded.", ", ".join(released))

    def _run_prompts(self) -> list[tuple[list[str], Optional[str], Optional[int]]]:
        """
        Every prompt the run will encode, as `(prompts, negative prompt, T5 length)` sets: the datasets' (with the
        training negative prompt and length) and those of the evaluation callbacks (with their own settings).
        """
        args = self.args
        sets = []
        for dataset in (self.train_dataset, self.eval_dataset):
            if dataset is not None:
                sets.append((list(dataset["prompt"]), args.negative_prompt, args.max_sequence_length))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EvaluationCallback):
                kwargs = callback.evaluate_kwargs
                sets.append((callback.prompts(), kwargs.get("negative_prompt", ""), kwargs.get("max_sequence_length")))
        return sets

    def _encode_prompts_up_front(self) -> None:
        """Encodes every prompt of the run once (text encoders on the accelerator for the pass), for the offload."""
        start = time.perf_counter()
        sets = self._run_prompts()
        total = 0
        for prompts, negative_prompt, max_sequence_length in sets:
            total = self.family.precompute_prompt_embeddings(
                prompts,
                negative_prompt=negative_prompt,
                max_sequence_length=max_sequence_length,
                batch_size=max(self.args.per_device_eval_batch_size, 8),
                show_progress=not self.args.disable_tqdm and self.accelerator.is_local_main_process,
            )
        logger.info(
            "Encoded %d prompt(s) up front in %.1f s (`text_encoder_offload=%r`): %.1f MiB of embeddings on the CPU.",
            len({prompt for prompts, _, _ in sets for prompt in prompts}),
            time.perf_counter() - start,
            self.args.text_encoder_offload,
            total / 2**20,
        )

    def _sampler_options(self, dataset) -> dict[str, Any]:
        """Subclass hook: the [`PromptSampler`] options of the method (group size, task round-robin)."""
        return {}

    def _get_train_sampler(self, train_dataset=None) -> PromptSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        return PromptSampler(
            len(dataset),
            micro_batch_size=args.per_device_train_batch_size * self.accelerator.num_processes,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_iterations=args.num_iterations,
            seed=args.seed,
            **self._sampler_options(dataset),
        )

    @staticmethod
    def _upcast_trainable_parameters(denoiser: torch.nn.Module) -> None:
        for parameter in denoiser.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()

    @property
    def unwrapped_denoiser(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def loss_scale(self, num_trained_steps: Optional[int] = None) -> float:
        """
        Each trained step's share of a micro-step's loss: 1 / (trained steps x gradient accumulation steps).

        Args:
            num_trained_steps (`int`, *optional*): the steps this rollout trains on (defaults to every trained step).
        """
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if num_trained_steps is None:
            num_trained_steps = len(self.args.trained_step_indices)
        return 1.0 / (num_trained_steps * accumulation)

    def train_on_steps(
        self,
        model: torch.nn.Module,
        steps: list[int],
        step_loss: Callable[[int], tuple[torch.Tensor, Any]],
        weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[int, Any]]:
        """
        The per-step training loop both trainers share: for each trained step `j`, in order, `step_loss(j)` runs the
        forward with gradient and returns `(loss, stats)`; the loss, scaled by [`loss_scale`] and `weight`, is
        backpropagated at once (one backward per step, so only one step's activations are alive at a time). Under DDP
        every backward but the last runs inside `no_sync`, so the step pays one gradient all-reduce, not one per
        timestep (FSDP2 and DeepSpeed: see [`~scale_out.ScaleOutSupport.backward_context`]).

        Args:
            model (`torch.nn.Module`): the (wrapped) denoiser being trained.
            steps (`list[int]`): the rollout steps to train on.
            step_loss (`Callable[[int], tuple[torch.Tensor, Any]]`): the method's loss of one step.
            weight (`float`, defaults to 1.0): this part's share of the micro-batch (see `_backward_in_halves`).

        Returns:
            `(loss, stats)`: the summed scaled loss (detached) and each step's stats by step index.
        """
        scale = self.loss_scale(len(steps)) * weight
        total = torch.zeros((), device=self.accelerator.device)
        stats = {}
        for k, j in enumerate(steps):
            self.report_phase(f"train {k + 1}/{len(steps)}")
            last = k == len(steps) - 1
            with self.backward_context(model, last):
                loss, stats[j] = step_loss(j)
                self.accelerator.backward(loss * scale, **self.backward_kwargs())
            if not bool(torch.isfinite(loss.detach())):
                self.note_nonfinite(f"rollout step {j}")
            total += loss.detach() * scale
        return total, stats

    # ----- non-finite guard ------------------------------------------------------------------------------------------
    def note_nonfinite(self, source: str) -> None:
        """Records that `source` (a rollout step, a task and its teacher...) gave a non-finite loss this step."""
        if source not in self._nonfinite_sources:
            self._nonfinite_sources.append(source)

    def _skip_step_if_nonfinite(self) -> None:
        """
        Called just before the optimizer step: when the loss or any trainable gradient is not finite (on any process),
        drops the gradients so that the optimizer leaves every weight (and its moments) unchanged, counts the step in
        `nonfinite_steps` and warns; after `max_nonfinite_steps` such steps in a row, stops with an error.
        """
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        # Under FSDP2 a gradient is a DTensor: each process checks its shard, and the flags are gathered below.
        bad = bool(self._nonfinite_sources) or any(
            p.grad is not None and not bool(torch.isfinite(getattr(p.grad, "_local_tensor", p.grad)).all())
            for p in parameters
        )
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(torch.tensor([float(bad)], device=self.accelerator.device))
            bad = bool(flags.max() > 0)
        sources, self._nonfinite_sources = self._nonfinite_sources, []
        if not bad:
            self._consecutive_nonfinite = 0
            return
        for parameter in parameters:
            parameter.grad = None  # AdamW skips parameters without a gradient: no update, no weight decay
        self._nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        step = self.state.global_step + 1
        where = f" from {', '.join(sources)}" if sources else " (in the gradients)"
        self._raise_if_step_taken(step, where)
        logger.warning(
            "Step %d: non-finite loss or gradient%s; the optimizer step was skipped, no weight changed (%d in a row).",
            step,
            where,
            self._consecutive_nonfinite,
        )
        if self._consecutive_nonfinite >= self.args.max_nonfinite_steps:
            raise RuntimeError(
                f"Training stopped at step {step}: {self._consecutive_nonfinite} consecutive steps had a non-finite "
                f"loss or gradient{where}. No weight was changed by them, and the last checkpoint is intact. Check "
                "the rewards, the teachers and the learning rate (`max_nonfinite_steps` sets this limit)."
            )

    def _backward_in_halves(self, run: Callable[[slice, float], Any], batch_size: int) -> list[Any]:
        """
        Runs `run(rows, weight)`, which backpropagates the loss of `rows` scaled by `weight`, on the two halves of a
        micro-batch, and records the cosine between the two halves' gradients as `grad_cosine` (see
        `log_gradient_cosine`). Without the diagnostic (or with fewer than two rows) runs the whole batch at once.
        """
        halves = batch_size >= 2 and self.args.log_gradient_cosine
        if halves and (self.accelerator.num_processes > 1 or self.uses_deepspeed):
            if not getattr(self, "_warned_gradient_cosine", False):
                logger.warning(
                    "`log_gradient_cosine` runs on one process without DeepSpeed only (DeepSpeed keeps the gradients "
                    "in its engine); it is skipped."
                )
                self._warned_gradient_cosine = True
            halves = False
        if not halves:
            return [run(slice(0, batch_size), 1.0)]
        parameters = [p for p in self.model.parameters() if p.requires_grad]

        def snapshot() -> list[torch.Tensor]:
            return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in parameters]

        middle = batch_size // 2
        before = snapshot()
        first = run(slice(0, middle), middle / batch_size)
        between = snapshot()
        second = run(slice(middle, batch_size), (batch_size - middle) / batch_size)
        after = snapshot()
        dot = sum(((b - a) * (c - b)).sum() for a, b, c in zip(before, between, after))
        norm_first = sum(((b - a) ** 2).sum() for a, b in zip(before, between)).sqrt()
        norm_second = sum(((c - b) ** 2).sum() for b, c in zip(between, after)).sqrt()
        self._record("train", grad_cosine=(dot / (norm_first * norm_second).clamp_min(1e-30)).item())
        return [first, second]

    def _restore_training_schedule(self) -> None:
        """
        Sets the scheduler back to the training rollouts' schedule before training on a reused rollout
        (`num_iterations > 1`): an evaluation since the rollout (its own number of steps) changed it, and the
        transition kernel looks each stored timestep up in it.
        """
        height, width = self.image_size
        self.family.set_timesteps(self.args.num_inference_steps, height, width)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.args.image_size(self.family.default_resolution)

    # ----- data ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _split_batch(inputs: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[Any]]]:
        prompts = [row["prompt"] for row in inputs]
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key != "prompt"}
        return prompts, columns

    @torch.no_grad()
    def sample_trajectories(
        self,
        embeds: PromptEmbeddings,
        decode: bool = False,
        sde_steps: Optional[list[int]] = None,
        latents: Optional[torch.Tensor] = None,
        guidance_scale: Optional[float] = None,
    ) -> Trajectory:
        """
        Rolls out the current policy without gradient, with the training kernel (`noise_level`, on `sde_steps` only
        when given), CFG and schedule, under the same autocast as the training forwards (so a recomputed log-prob
        matches the stored one). The initial noise is `latents`, or drawn from the rollout generator;
        `guidance_scale` overrides the training CFG scale (a teacher's rollout with its own scale).
        """
        args = self.args
        height, width = self.image_size
        with self.compute_loss_context_manager():
            return rollout(
                self.family,
                prompt_embeds=embeds,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale if guidance_scale is None else guidance_scale,
                noise_level=args.noise_level,
                sde_steps=sde_steps,
                height=height,
                width=width,
                generator=self.rollout_generator,
                latents=latents,
                decode=decode,
            )

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        """The prompts' embeddings (each distinct prompt encoded once per run) with the CFG negative prompt."""
        return self.family.encode_prompts(
            prompts, negative_prompt=self.args.negative_prompt, max_sequence_length=self.args.max_sequence_length
        )

    def score(self, reward_set: RewardSet, prompts: list[str], images: torch.Tensor, columns: dict) -> torch.Tensor:
        """
        `reward_set(prompts, images, columns)`; when a reward fails, the LoRA as of the last optimizer step is saved to
        `output_dir/interrupted/` and the [`~scoring.RewardError`] is raised again with the step and that folder.
        """
        try:
            return reward_set(prompts, images, columns)
        except RewardError as error:
            step = self.state.global_step + 1
            folder = os.path.join(self.args.output_dir, INTERRUPTED_DIR)
            if self.shards_parameters:  # saving gathers the LoRA from every process, which are not all here
                saved = "the LoRA is not saved under FSDP; the last checkpoint is intact"
            else:
                try:
                    self._save(folder)
                    saved = f"the LoRA as of step {step - 1} is saved to {folder}"
                except Exception as save_error:  # the reward's error matters more; say why nothing was saved
                    saved = f"the LoRA could not be saved ({save_error})"
            raise RewardError(error.reward, f"{error} (at step {step}; {saved}).") from error

    # ----- metrics ---------------------------------------------------------------------------------------------------
    def _record(self, mode: str, **values: float) -> None:
        for key, value in values.items():
            if value is not None:
                self._metrics[mode][key].append(float(value))

    def _record_across_processes(self, mode: str, **values: Union[float, torch.Tensor]) -> None:
        """
        Records the mean over processes of per-process scalars (NaN-filtered, as TRL does with `accelerator.gather`),
        so that a logged figure is the whole batch's, not the main process's. Every process must call it with the
        same keys.
        """
        if not values:
            return
        local = torch.tensor([float(value) for value in values.values()], device=self.accelerator.device)
        gathered = self.accelerator.gather(local[None]).reshape(-1, len(values))
        self._record(mode, **dict(zip(values, gathered.nanmean(dim=0).tolist())))

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "train":
            metrics["nonfinite_steps"] = self._nonfinite_steps  # skipped steps so far (see `max_nonfinite_steps`)
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    # ----- images and progress --------------------------------------------------------------------------------------
    def report_phase(self, phase: str) -> None:
        """Announces the phase the current step enters (`"rollout"`, `"reward"`, `"train 3/9"`...): see
        [`~progress.StepPhaseCallback`]."""
        report_phase(self, phase)

    def _images_due(self) -> bool:
        """
        Whether the rollout now starting is to have its images logged: the first rollout at or after each multiple
        of `log_images_steps` (one per step even with gradient accumulation, and one per period when
        `num_iterations > 1` reuses rollouts), on the main process only.
        """
        steps = self.args.log_images_steps
        return bool(steps) and self.state.global_step >= self._next_images_step and self.is_world_process_zero()

    def _log_rollout_images(self, images: torch.Tensor, captions: list[str]) -> None:
        """Logs a rollout's images with their captions as `rollout/images` (see [`~image_logging.log_images`])."""
        log_images(self, "rollout/images", images, captions)
        steps = self.args.log_images_steps
        self._next_images_step = (self.state.global_step // steps + 1) * steps

    # ----- evaluation ------------------------------------------------------------------------------------------------
    def _eval_reward_set(self) -> Optional[RewardSet]:
        """The rewards `evaluate` scores with (subclasses)."""
        return None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        Samples the evaluation prompts with the deterministic ODE sampler (`eval_num_inference_steps`,
        `eval_guidance_scale`, seeds from `eval_seed`; the EMA weights when EMA is on) through the evaluation harness
        ([`~evaluation.evaluate`]) and logs `<prefix>_reward` and `<prefix>_rewards/<name>/mean` (with per-task
        rewards, `<name>` is the task). Runs on the main process; the others wait for its metrics. Under FSDP every
        process samples alike (the sharded denoiser's forwards need every process) and the main process's metrics
        are logged.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("`evaluate` needs an `eval_dataset`.")
        reward_set = self._eval_reward_set()
        if reward_set is None:
            raise ValueError("`evaluate` needs reward functions to score the samples with.")
        args = self.args
        metrics: dict[str, float] = {}
        collector = None
        if self.accelerator.is_main_process or self.shards_parameters:
            start = time.time()
            # Per-task rewards: the harness splits the prompts by their `task` column.
            named = dict(zip(reward_set.names, reward_set.funcs))
            height, width = self.image_size
            was_training = self.model.training
            # The first images, captioned with their prompts and scores, go to TensorBoard / W&B after the metrics.
            if args.log_images_steps and self.accelerator.is_main_process:
                collector = ImageCollector()
            self.model.eval()
            self._bind_ema()
            with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
                result = evaluate(
                    self.pipeline,
                    dataset,
                    named if reward_set.routed else list(reward_set.funcs),
                    num_inference_steps=args.eval_num_inference_steps,
                    guidance_scale=args.guidance_scale
                    if args.eval_guidance_scale is None
                    else args.eval_guidance_scale,
                    height=height,
                    width=width,
                    batch_size=args.per_device_eval_batch_size,
                    seed=args.eval_seed,
                    negative_prompt=args.negative_prompt,
                    true_cfg_scale=args.true_cfg_scale,
                    max_sequence_length=args.max_sequence_length,
                    show_progress=not args.disable_tqdm,
                    on_batch=collector,
                )
            self.model.train(was_training)

            def primary(task: str, func) -> float:
                # A reward model may report several metrics; its own name is the one it trains with.
                values = result.metrics[task]
                return values.get(reward_name(func), next(iter(values.values())))

            if reward_set.routed:
                means = {task: primary(task, named[task]) for task in result.metrics}
                reward = sum(means.values()) / len(means)
            else:
                means = {name: primary("eval", func) for name, func in named.items()}
                weights = dict(zip(reward_set.names, reward_set.weights.tolist()))
                reward = sum(weights[name] * value for name, value in means.items())
            metrics.update({f"{metric_key_prefix}_rewards/{name}/mean": value for name, value in means.items()})
            metrics[f"{metric_key_prefix}_reward"] = reward
            metrics[f"{metric_key_prefix}_runtime"] = time.time() - start
        metrics = broadcast_object_list([metrics])[0] if self.accelerator.num_processes > 1 else metrics
        self.log_evaluation(metrics)
        if collector is not None and len(collector):
            log_images(self, f"{metric_key_prefix}/images", collector.stacked(), collector.captions)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log_evaluation(self, metrics: dict[str, float]) -> None:
        """Logs evaluation metrics through `Trainer.log`, as an entry of their own (no pending train metrics)."""
        Trainer.log(self, metrics)

    # ----- saving and resuming ---------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, trial=None, ignore_keys_for_eval=None):
        """
        `Trainer.train`, with checked resuming. `resume_from_checkpoint=True` (or the string `"true"`, as the example
        scripts pass it) resumes from the newest intact checkpoint of `output_dir`, skipping damaged newer ones with a
        warning that names their files; a path is checked whole before anything is loaded, and a damaged one raises
        a `ValueError` naming its files.
        """
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("true", "false"):
            resume_from_checkpoint = resume_from_checkpoint.strip().lower() == "true"
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_intact_checkpoint(self.args.output_dir, PEFT_WEIGHT_NAME)
        elif resume_from_checkpoint:
            problems = checkpoint_problems(resume_from_checkpoint, PEFT_WEIGHT_NAME)
            if problems:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {'; '.join(problems)}.")
        self.check_scale_out()
        if self.accelerator.is_main_process:
            self.log_memory_estimate()
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint or None,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )

    def log_memory_estimate(self):
        """Logs [`~memory.estimate_memory`]'s table for this run (one process's accelerator memory, by part)."""
        estimate = estimate_memory(
            self.pipeline,
            self.args,
            num_teachers=len(getattr(self, "teachers", None) or {}),
            resolution=self.image_size[0],
            vae_on_device=not self.offload_vae,
        )
        logger.info("Memory estimate of one training process:\n%s", estimate.table())
        return estimate

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """
        Writes the checkpoint into a staging folder, then renames it to `checkpoint-<step>`: a process killed
        mid-save leaves every earlier checkpoint intact and no half-written `checkpoint-<step>` behind.
        """
        run_dir = self._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save left behind
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):  # saved again at the same step: the new one replaces it
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            logger.info("Saved checkpoint %s", final)
            if self.state.best_model_checkpoint == os.path.join(staging, name):
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """Writes the student LoRA (diffusers + PEFT formats; the EMA weights as the deliverable when EMA is on)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Under FSDP the adapters are sharded: every process takes part in gathering them (and in the teachers'
        # checksums), then only the main process writes.
        if not (self.args.should_save or self.shards_parameters):
            return
        self._reshard()
        self._check_before_save()
        denoiser = self.unwrapped_denoiser
        trained = adapter_state_dict(denoiser, STUDENT_ADAPTER)
        deliverable = trained
        if self.ema is not None:
            self._bind_ema()
            with self.ema.swapped_in():
                deliverable = adapter_state_dict(denoiser, STUDENT_ADAPTER)
        for name, weights in (("trained", trained), ("EMA", deliverable)):
            nonfinite = nonfinite_keys(weights)
            if nonfinite:
                raise ValueError(
                    f"Refusing to save to {output_dir}: the {name} LoRA weights have NaN or infinite values in "
                    f"{len(nonfinite)} tensor(s), e.g. {nonfinite[:3]}. Earlier checkpoints are left as they were."
                )
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.ema is not None:
            _save_file_atomic(self.ema.state_dict(), os.path.join(output_dir, EMA_STATE_NAME))
        save_lora(
            output_dir,
            type(self.pipeline),
            self.family.denoiser_name,
            deliverable,
            denoiser.peft_config[STUDENT_ADAPTER],
            base_model=self._base_model_id(),
            peft_state_dict=trained,
        )
        Path(output_dir, TRAINING_ARGS_JSON).write_text(self.args.to_json_string())
        # The sampler the LoRA was trained with: a distillation from it checks its grid against the student's.
        self.family.scheduler.save_config(output_dir)
        self.create_model_card(output_dir=output_dir)
        if getattr(self, "_staging_dir", None) is None:  # a checkpoint is logged once renamed into place
            logger.info("Saved the LoRA to %s", output_dir)

    def _check_before_save(self) -> None:
        """Subclass hook: raise before anything is written when the run must not be saved (a teacher changed)."""

    def _base_model_id(self) -> Optional[str]:
        return getattr(self.pipeline, "name_or_path", None) or self.pipeline.config.get("_name_or_path")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        weights = os.path.join(resume_from_checkpoint, PEFT_WEIGHT_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Checkpoint {resume_from_checkpoint} has no {PEFT_WEIGHT_NAME} to resume from.")
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}
        self._reshard()  # under FSDP2 each process copies its shard of the weights (`lora.load_adapter_weights`)
        load_adapter_weights(self.unwrapped_denoiser, state, STUDENT_ADAPTER, f"Checkpoint {resume_from_checkpoint}")
        ema_file = os.path.join(resume_from_checkpoint, EMA_STATE_NAME)
        if self.ema is not None and os.path.isfile(ema_file):
            self.ema.load_state_dict(load_file(ema_file))
        logger.info("Resumed the student LoRA from %s", resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        state = {"state": self.rollout_generator.get_state()}
        _save_file_atomic(state, os.path.join(output_dir, ROLLOUT_RNG_NAME.format(self.accelerator.process_index)))

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ROLLOUT_RNG_NAME.format(self.accelerator.process_index))
        if os.path.isfile(path):
            self.rollout_generator.set_state(load_file(path)["state"])
        else:
            logger.warning("No rollout RNG state in %s: the resumed run will not reproduce the original.", checkpoint)

    # ----- model card ------------------------------------------------------------------------------------------------
    def _model_card_sections(self) -> list[str]:
        return []

    def create_model_card(self, model_name: Optional[str] = None, output_dir: Optional[str] = None, **kwargs) -> None:
        """
        Writes the model card (`README.md`) into `output_dir` (the training output folder by default); called by
        `save_model` and `push_to_hub`.
        """
        if not self.is_world_process_zero():
            return
        final = {}
        for entry in self.state.log_history:
            final.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
        write_model_card(
            output_dir if output_dir is not None else self.args.output_dir,
            base_model=self._base_model_id(),
            method=self._method_name,
            tags=list(self._tag_names) + list(kwargs.get("tags") or []),
            metrics=final,
            model_name=model_name,
            extra_sections=self._model_card_sections(),
            guidance_scale=self.args.guidance_scale,
            num_inference_steps=self.args.eval_num_inference_steps,
            citations=list(self._citations),
        )


def _save_file_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
