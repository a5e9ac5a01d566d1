"""Fields shared by the GRPO and OPD configs: sampling, kernel, trained timesteps, rollout reuse, EMA."""

import json
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Optional

from transformers import TrainingArguments

from .losses import KL_SCALINGS


#: Where the text encoders live during training (`text_encoder_offload`).
TEXT_ENCODER_OFFLOADS = ("none", "cpu", "free")


def check_number(name: str, value, minimum: Optional[float] = None, strict: bool = False) -> None:
    """
    Raises a `ValueError` naming `name` unless `value` is a finite real number (not a bool) at least `minimum` (above
    it when `strict`). A NaN or infinite setting would otherwise reach the loss and turn every saved weight into NaN.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {minimum}, got {value}.")


def parse_teacher_guidance_scales(value) -> Optional[dict]:
    """
    The `teacher_guidance_scales` setting as a dict (task -> CFG scale), from a dict or its JSON text (the command
    line's form); raises `ValueError` naming the field for bad JSON, a non-dict, or a scale that is not a number >= 0.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`teacher_guidance_scales` is not valid JSON: {error}.") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("`teacher_guidance_scales` must map task names to CFG scales.")
    for task, scale in value.items():
        check_number(f"teacher_guidance_scales[{task!r}]", scale, 0)
    return value


@dataclass
class DiffusionTrainingConfig(TrainingArguments):
    r"""
    Base configuration of the diffusion trainers: a `TrainingArguments` plus the sampler, the transition kernel and
    which timesteps train. Use [`DiffusionGRPOConfig`] or [`DiffusionOPDConfig`].

    Parameters:
        > Sampling (rollouts)

        resolution (`int`, *optional*):
            Square image size in pixels. Defaults to the pipeline's native size. Overridden by `height`/`width`.
        height (`int`, *optional*), width (`int`, *optional*):
            Image height and width in pixels, for non-square images.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Denoising steps of a training rollout.
        eval_num_inference_steps (`int`, *optional*, defaults to `40`):
            Denoising steps of the deterministic (ODE) sampler used by `evaluate`.
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            Classifier-free guidance scale of the policy (the student) during rollouts and training; 1 disables CFG.
        eval_guidance_scale (`float`, *optional*):
            CFG scale for evaluation. Defaults to `guidance_scale`.
        true_cfg_scale (`float`, *optional*, defaults to `1.0`):
            True classifier-free guidance with `negative_prompt` on top of a guidance-distilled model's embedded
            guidance: the pipeline's own `true_cfg_scale` (Flux.1-dev, whose `guidance_scale` is embedded). 1 disables
            it; families whose `guidance_scale` is the CFG scale accept only 1. Used in rollouts, training (students
            and teachers alike) and evaluation.
        negative_prompt (`str`, *optional*, defaults to `""`):
            The negative prompt of classifier-free guidance.
        max_sequence_length (`int`, *optional*):
            T5 sequence length for SD3-family pipelines. Defaults to 256 (the pipeline's), capped at the tokenizer's
            maximum.

        > Kernel and trained timesteps

        noise_level (`float`, *optional*, defaults to `0.7`):
            Noise level `a` of the flow SDE (DDIM's `eta` for DDIM schedulers): `sigma_t = a * sqrt(t / (1 - t))`.
            0 gives the deterministic (ODE) sampler, which has no log-probabilities: a policy-gradient loss (GRPO,
            OPD's estimators) needs `noise_level > 0`. [`DiffusionOPDConfig`] defaults to 0.
        kl_scaling (`str`, *optional*, defaults to `"exact"`):
            `"exact"`: the step KL `||mu - mu'||^2 / (2 s^2)` with `s = sigma_t * sqrt(|dt|)` the transition std.
            `"sigma"`: divide by `2 sigma_t^2` instead (`= exact KL * |dt|`), the convention of Flow-GRPO and the
            public DiffusionOPD code, whose `beta` and learning rates are tuned to it. [`DiffusionGRPOConfig`]
            defaults to `"sigma"`. DDIM kernels (SD 1.x/2.x) have no `dt`: there both settings give the exact KL.
        epsilon (`float`, *optional*, defaults to `1e-4`):
            Clip range of the policy ratio in the clipped surrogate (GRPO's loss, OPD's `"policy_gradient"` loss),
            tuned for log-probs averaged over latent dimensions, as Flow-GRPO's.
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            Train on the first `int(timestep_fraction * num_inference_steps)` steps of each rollout (at least one).
            The default trains on all but the last step: that step ends at sigma = 0 with a tiny std, so its exact KL
            weight dwarfs the others and its log-prob is numerically fragile.
        train_timestep_indices (`list[int]`, *optional*):
            Explicit step indices (0 = the first, noisiest step) to train on; overrides `timestep_fraction`.
        eval_seed (`int`, *optional*, defaults to `0`):
            Seed of the initial noise in `evaluate`, so evaluations are comparable across checkpoints.
        num_iterations (`int`, *optional*, defaults to `1`):
            Optimizer steps per rollout (PPO epochs); 1 is on-policy, and the policy ratio is then exactly 1.

        > EMA of the LoRA weights

        ema (`bool`, *optional*, defaults to `False`):
            Keep an exponential moving average of the trained LoRA weights; evaluation and `save_model` then use it.
        ema_decay (`float`, *optional*, defaults to `0.9`):
            EMA decay per update.
        ema_update_interval (`int`, *optional*, defaults to `8`):
            Optimizer steps between EMA updates (the paper: decay 0.9 every 8 steps).

        > Faults

        max_nonfinite_steps (`int`, *optional*, defaults to `3`):
            A step whose loss or gradient is not finite (NaN or infinite) is skipped: no weight changes, it is counted
            as `nonfinite_steps` and warned about. After this many consecutive skipped steps training stops with an
            error, since the run is not recovering.

        > Memory

        text_encoder_offload (`str`, *optional*, defaults to `"none"`):
            Where the text encoders live during training. `"none"`: on the accelerator, each distinct prompt encoded
            when first sampled. `"cpu"`: every distinct prompt of `train_dataset` and `eval_dataset` (and the negative
            prompt) is encoded once before training, on the accelerator, then the text encoders move to the CPU; a
            prompt seen later (another evaluation dataset) borrows them back for its encoding. `"free"`: as `"cpu"`,
            then the text encoders are released from the pipeline; a prompt that was not encoded up front is an error.
            Saves the encoders' weights on the accelerator (SD3.5's T5-XXL alone is 4.7 B parameters, 9.5 GB in
            bf16); costs host memory for the cached embeddings (SD3 at the default 256 T5 tokens: 2.7 MB per prompt in
            bf16; lower `max_sequence_length` for large prompt sets).
        offload_vae (`bool`, *optional*):
            Keep the VAE on the CPU and move it to the accelerator only while it decodes (GRPO's rewards, evaluation,
            OPD's monitoring rewards). Defaults to `True` when training never decodes (OPD without `reward_funcs`),
            else `False`: a VAE decoding every step is cheaper left in place (SD3.5's is 84 M parameters).

        > Logging

        log_gradient_cosine (`bool`, *optional*, defaults to `False`):
            Log `grad_cosine`, the cosine between the gradients of the two halves of each micro-batch (each half runs
            its own forward and backward; the summed gradient is unchanged). It measures whether a batch carries
            signal: with `g = s + n` and independent noise in each half, `cos ~ |s|^2 / (|s|^2 + |n_half|^2)`, near
            0 when the gradient is noise and near 1 when every half agrees; the full batch's signal-to-noise ratio is
            then `sqrt(2 cos / (1 - cos))`. One process only (under several, the halves' gradients are synchronised
            in between and the figure would mix processes): it is skipped there with a warning.
        log_images_steps (`int`, *optional*, defaults to `0`):
            Every this many optimizer steps, log the rollout's images (at most 16), each captioned with its prompt
            (and its reward, or its task and step KL), to TensorBoard and Weights & Biases (those of `report_to`);
            evaluations then log their first 16 samples too. 0 disables.
    """

    # Overridden TrainingArguments defaults (the paper's recipe).
    learning_rate: float = field(default=3e-4, metadata={"help": "The initial learning rate for AdamW."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    remove_unused_columns: Optional[bool] = field(
        default=False,
        metadata={"help": "Keep every dataset column: `task` and metadata columns reach the trainer and the rewards."},
    )
    dataloader_pin_memory: bool = field(
        default=False,
        # The batches are prompt strings: nothing to pin, and on a machine without an accelerator PyTorch's
        # DataLoader warns at every epoch when asked to.
        metadata={"help": "Pin the prompt batches' memory (they are strings: off by default)."},
    )

    resolution: Optional[int] = field(default=None, metadata={"help": "Square image size; pipeline default if unset."})
    height: Optional[int] = field(default=None, metadata={"help": "Image height in pixels (overrides resolution)."})
    width: Optional[int] = field(default=None, metadata={"help": "Image width in pixels (overrides resolution)."})
    num_inference_steps: int = field(default=10, metadata={"help": "Denoising steps of a training rollout."})
    eval_num_inference_steps: int = field(default=40, metadata={"help": "ODE steps used by `evaluate`."})
    guidance_scale: float = field(default=4.5, metadata={"help": "CFG scale of the policy; 1 disables CFG."})
    eval_guidance_scale: Optional[float] = field(default=None, metadata={"help": "CFG scale for evaluation."})
    true_cfg_scale: float = field(
        default=1.0,
        metadata={"help": "True CFG with the negative prompt on top of embedded guidance (Flux.1-dev); 1 disables."},
    )
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt for classifier-free guidance."})
    max_sequence_length: Optional[int] = field(default=None, metadata={"help": "T5 sequence length (SD3 family)."})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (DDIM eta); 0 = ODE."})
    kl_scaling: str = field(default="exact", metadata={"help": "'exact' step KL, or 'sigma' (= exact KL * |dt|)."})
    epsilon: float = field(default=1e-4, metadata={"help": "Clip range of the policy ratio."})
    timestep_fraction: float = field(default=0.99, metadata={"help": "Train on int(fraction * steps) first steps."})
    train_timestep_indices: Optional[list[int]] = field(
        default=None, metadata={"help": "Explicit step indices to train on (overrides timestep_fraction)."}
    )
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation noise."})
    num_iterations: int = field(default=1, metadata={"help": "Optimizer steps per rollout (1 = on-policy)."})
    ema: bool = field(default=False, metadata={"help": "Keep an EMA of the LoRA weights for evaluation and saving."})
    ema_decay: float = field(default=0.9, metadata={"help": "EMA decay per update."})
    ema_update_interval: int = field(default=8, metadata={"help": "Optimizer steps between EMA updates."})
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Consecutive non-finite (skipped) steps before training stops with an error."}
    )
    text_encoder_offload: str = field(
        default="none",
        metadata={
            "help": "'none': text encoders on the accelerator; 'cpu': prompts encoded once up front, encoders moved "
            "to the CPU; 'free': as 'cpu', then the encoders are released.",
            "choices": ["none", "cpu", "free"],
        },
    )
    offload_vae: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Keep the VAE on the CPU, on the accelerator only while decoding (default: when nothing decodes "
            "during training)."
        },
    )
    log_gradient_cosine: bool = field(
        default=False, metadata={"help": "Log the cosine between the gradients of the two halves of each batch."}
    )
    log_images_steps: int = field(
        default=0, metadata={"help": "Log captioned rollout images to TensorBoard / W&B every N steps (0: never)."}
    )

    def __post_init__(self):
        super().__post_init__()
        # Every float setting must be a finite number in range: a NaN or infinity would reach the loss silently.
        for name, minimum, strict in (
            ("learning_rate", 0, False),
            ("weight_decay", 0, False),
            ("max_grad_norm", 0, False),
            ("guidance_scale", 0, False),
            ("noise_level", 0, False),
            ("epsilon", 0, True),
            ("timestep_fraction", 0, True),
            ("ema_decay", 0, False),
        ):
            check_number(name, getattr(self, name), minimum, strict)
        if self.eval_guidance_scale is not None:
            check_number("eval_guidance_scale", self.eval_guidance_scale, 0)
        # The pipelines run true CFG only above 1: a value below would mean something here and nothing there.
        check_number("true_cfg_scale", self.true_cfg_scale, 1)
        if self.text_encoder_offload not in TEXT_ENCODER_OFFLOADS:
            raise ValueError(
                f"`text_encoder_offload` must be one of {TEXT_ENCODER_OFFLOADS}, got {self.text_encoder_offload!r}."
            )
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"`max_nonfinite_steps` must be >= 1, got {self.max_nonfinite_steps}.")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"`resolution` must be positive, got {self.resolution}.")
        if (self.height is None) != (self.width is None):
            raise ValueError("Set both `height` and `width`, or neither (and `resolution` for a square image).")
        if self.num_inference_steps < 1 or self.eval_num_inference_steps < 1:
            raise ValueError("`num_inference_steps` and `eval_num_inference_steps` must be at least 1.")
        stochastic_loss = self._stochastic_loss()
        if stochastic_loss is not None and self.noise_level == 0:
            raise ValueError(
                f"{stochastic_loss} needs a stochastic kernel (`noise_level` > 0, e.g. 0.7 as in Flow-GRPO): the ODE "
                "(noise_level=0) is deterministic, so its transitions have no log-probability and the policy "
                "gradient is undefined."
            )
        if self.num_iterations < 1:
            raise ValueError(f"`num_iterations` must be >= 1, got {self.num_iterations}.")
        if self.kl_scaling not in KL_SCALINGS:
            raise ValueError(f"`kl_scaling` must be one of {KL_SCALINGS}, got {self.kl_scaling!r}.")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"`timestep_fraction` must be in (0, 1], got {self.timestep_fraction}.")
        if self.train_timestep_indices is not None:
            bad = [i for i in self.train_timestep_indices if not 0 <= i < self.num_inference_steps]
            if bad or not self.train_timestep_indices:
                raise ValueError(
                    f"`train_timestep_indices` must be a non-empty list of step indices in [0, "
                    f"{self.num_inference_steps}), got {self.train_timestep_indices}."
                )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")
        if self.ema_update_interval < 1:
            raise ValueError(f"`ema_update_interval` must be >= 1, got {self.ema_update_interval}.")

    def _stochastic_loss(self) -> Optional[str]:
        """The loss that needs log-probabilities (so `noise_level > 0`), named for errors; `None` if none does."""
        return None

    @property
    def trained_step_indices(self) -> list[int]:
        """The rollout steps that train, in order."""
        if self.train_timestep_indices is not None:
            return sorted(set(self.train_timestep_indices))
        return list(range(max(1, int(self.timestep_fraction * self.num_inference_steps))))

    def image_size(self, default: int) -> tuple[int, int]:
        """`(height, width)` of rollouts, given the pipeline's default size."""
        if self.height is not None:
            return self.height, self.width
        size = self.resolution or default
        return size, size
