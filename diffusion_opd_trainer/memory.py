"""Will it fit? Accelerator memory of a training run by part, before the run: weights, LoRA state, activations.

Parameter counts are exact: they come from the pipeline's own modules, or, for a pipeline folder, from its components
built on the meta device (`accelerate.init_empty_weights`: nothing downloaded or allocated). The activation term is
the one estimate: the bytes autograd keeps for the backward pass of one image, per token and per block, as a linear
function of the transformer's width, fitted to exact counts on SD3 transformers of five sizes with the student LoRA
attached ([`saved_activation_bytes`]; `benchmarks/memory_calibration.py` measures, fits and prints the calibration)
and scaled to the real model's tokens, width, depth and dtype. It is calibrated for the SD3 family only; other
families report the activations as not estimated rather than guess.
"""

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch


logger = logging.getLogger(__name__)

__all__ = ["ACTIVATION_CALIBRATION", "MemoryEstimate", "estimate_memory", "saved_activation_bytes"]

# Bytes autograd saves per token and per block of an SD3 transformer with the default attention LoRA (base frozen),
# for one image (one CFG half), in float32: a x width + c. Fitted by `benchmarks/memory_calibration.py` on widths 64
# to 512, 2 to 4 blocks, 272 to 1040 tokens (a = 55.0, c = 578; every size within 3% of the fit), rounded up.
# Half-precision activations take half.
ACTIVATION_CALIBRATION = {"SD3Family": (55.0, 600.0)}
_GIB = 2**30


def saved_activation_bytes(module: torch.nn.Module, **inputs) -> int:
    """
    The bytes of the tensors autograd saves for the backward pass during one forward of `module` (its parameters
    excluded; each storage counted once): the activation memory of a training step, measured exactly on any device.
    """
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(**inputs)
    return sum(saved.values())


@dataclass
class MemoryEstimate:
    """
    Accelerator bytes of a training run by part (see [`estimate_memory`]).

    Args:
        parts (`dict[str, int]`): bytes of each part; `None` for a part that could not be estimated.
        notes (`dict[str, str]`): how each part was counted.
        levers (`dict[str, bool]`): the memory levers the estimate assumes.
    """

    parts: dict[str, Optional[int]]
    notes: dict[str, str] = field(default_factory=dict)
    levers: dict[str, bool] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The sum of the estimated parts (a part that could not be estimated counts 0: see `table`)."""
        return sum(value for value in self.parts.values() if value is not None)

    def table(self) -> str:
        """A Markdown table: part, GiB, how it is counted; the total last."""
        rows = ["| part | GiB | counted as |", "|---|---:|---|"]
        for name, value in self.parts.items():
            size = "not estimated" if value is None else f"{value / _GIB:.2f}"
            rows.append(f"| {name} | {size} | {self.notes.get(name, '')} |")
        missing = " (without the parts not estimated)" if None in self.parts.values() else ""
        rows.append(f"| **total**{missing} | **{self.total / _GIB:.2f}** | |")
        return "\n".join(rows)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0


def _meta_components(folder: Path) -> dict[str, torch.nn.Module]:
    """The torch components of a pipeline folder (`model_index.json` + each component's config), on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json.")
    index = json.loads(index_file.read_text())
    components = {}
    with init_empty_weights(include_buffers=True):
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            library, class_name = spec
            if library == "diffusers" and hasattr(diffusers, class_name):
                cls = getattr(diffusers, class_name)
                if issubclass(cls, torch.nn.Module):
                    components[name] = cls.from_config(cls.load_config(folder / name))
            elif library == "transformers" and hasattr(transformers, class_name):
                cls = getattr(transformers, class_name)
                if issubclass(cls, torch.nn.Module):
                    config = transformers.AutoConfig.from_pretrained(folder / name)
                    components[name] = cls(config)
    return components


def _sd3_geometry(family, height: int, width: int, max_sequence_length: Optional[int]) -> tuple[int, int, int]:
    """(tokens, width, blocks) of one SD3 transformer forward at an image size."""
    denoiser = family.denoiser
    patch = denoiser.config.patch_size * family.vae_scale_factor
    limits = family.text_length_limits(max_sequence_length)
    # The two CLIP encoders' tokens sit side by side in the features; the T5 tokens follow them in the sequence.
    t5 = limits.pop(family.t5_tokenizer_name, 0)
    text_tokens = max(limits.values(), default=0) + t5
    tokens = (height // patch) * (width // patch) + text_tokens
    return tokens, denoiser.config.num_attention_heads * denoiser.config.attention_head_dim, denoiser.config.num_layers


def estimate_memory(
    model: Union[str, os.PathLike, "object"],
    args=None,
    *,
    num_teachers: int = 0,
    lora_rank: int = 32,
    resolution: Optional[int] = None,
    batch_size: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    weights_dtype: Optional[torch.dtype] = None,
    gradient_checkpointing: Optional[bool] = None,
    optimizer_8bit: Optional[bool] = None,
    text_encoders_on_device: Optional[bool] = None,
    vae_on_device: Optional[bool] = None,
) -> MemoryEstimate:
    """
    Accelerator memory of one training process, by part, before anything is loaded on it.

    Args:
        model (`DiffusionPipeline`, or `str` / `os.PathLike`): a pipeline, or a pipeline folder (its components are
            built on the meta device from their configs: no weights are read).
        args ([`DiffusionTrainingConfig`], *optional*): the run's config; its `bf16`/`fp16`, `resolution`
            (or `height`/`width`), `per_device_train_batch_size`, `guidance_scale`, `gradient_checkpointing` and
            `optim` fill the arguments left `None`.
        num_teachers (`int`, defaults to 0): teacher LoRAs (OPD, or GRPO with teachers), each the student's size.
        lora_rank (`int`, defaults to 32): rank of the student's default LoRA (the family's attention targets).
        resolution (`int`, *optional*): square training size in pixels; the pipeline's default otherwise.
        batch_size (`int`, *optional*): images per forward with gradients (the per-device batch); defaults to 1.
        guidance_scale (`float`, *optional*): CFG doubles the images of a forward when the family runs CFG at it.
        weights_dtype (`torch.dtype`, *optional*): the frozen weights' dtype: a pipeline's own, else `args`' `bf16` or
            `fp16`, else bfloat16 (the LoRA and its optimizer state are float32 in any case).
        gradient_checkpointing (`bool`, *optional*): recompute each block's activations in the backward pass.
        optimizer_8bit (`bool`, *optional*): 8-bit AdamW state (bitsandbytes) instead of two float32 moments.
        text_encoders_on_device (`bool`, *optional*): `False` when the prompts are encoded once up front and the
            text encoders are moved off the accelerator; defaults to `args.text_encoder_offload == "none"` (else
            `True`).
        vae_on_device (`bool`, *optional*): `False` when the VAE stays on the CPU between decodes; defaults to `not
            args.offload_vae` (else `True`; a trainer passes its resolved setting).

    Returns:
        [`MemoryEstimate`]: bytes by part and how each was counted. Not included: the framework's own overhead (CUDA
        context, allocator fragmentation, often 1-2 GiB), the decode of rewards and evaluation images (transient), and
        the no-grad rollout and teacher forwards (their activations are freed layer by layer).
    """
    from peft import LoraConfig

    from .lora import STUDENT_ADAPTER, lora_parameters
    from .pipelines import get_family

    def setting(value, name, default):
        if value is not None:
            return value
        return getattr(args, name, default) if args is not None else default

    batch_size = setting(batch_size, "per_device_train_batch_size", 1)
    guidance_scale = setting(guidance_scale, "guidance_scale", 1.0)
    checkpointing = bool(setting(gradient_checkpointing, "gradient_checkpointing", False))
    if text_encoders_on_device is None:
        text_encoders_on_device = getattr(args, "text_encoder_offload", "none") == "none"
    if vae_on_device is None:
        vae_on_device = not getattr(args, "offload_vae", None)
    if optimizer_8bit is None:
        optimizer_8bit = "8bit" in str(getattr(args, "optim", "")) if args is not None else False
    if resolution is None and args is not None:
        resolution = args.resolution or args.height

    if isinstance(model, (str, os.PathLike)):
        from types import SimpleNamespace

        from .pipelines import FAMILIES, family_class

        folder = Path(model)
        components = _meta_components(folder)
        pipeline_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
        names = [entry[3] for entry in FAMILIES if entry[0] == pipeline_class]
        if not names:
            raise TypeError(f"{folder}: no pipeline family for {pipeline_class}.")
        cls = family_class(names[0])
        vae = components.get("vae")
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        # The tokenizers' length limits are all the estimate needs of them (their vocabularies are not read).
        tokenizers = {
            path.parent.name: SimpleNamespace(model_max_length=json.loads(path.read_text()).get("model_max_length"))
            for path in folder.glob("tokenizer*/tokenizer_config.json")
        }
        family = cls(SimpleNamespace(vae_scale_factor=scale, default_sample_size=None, **components, **tokenizers))
    else:
        family = get_family(model)
        components = {k: v for k, v in model.components.items() if isinstance(v, torch.nn.Module)}
        if weights_dtype is None:
            weights_dtype = family.dtype  # a loaded pipeline's own
    if args is not None and weights_dtype is None:
        weights_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    weights_dtype = weights_dtype or torch.bfloat16
    denoiser = family.denoiser
    weight_bytes = _dtype_bytes(weights_dtype)

    all_lora = sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" in n)
    student = lora_parameters(denoiser, STUDENT_ADAPTER)
    lora_params = sum(p.numel() for p in student.values()) if student else all_lora
    # In a trainer the teachers are loaded already: count their adapters rather than assume the student's size.
    teacher_params = all_lora - lora_params if student and all_lora > lora_params else None
    if lora_params == 0:  # a bare pipeline: the default LoRA, counted on a meta copy of the layers it targets
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=True):
            probe = type(denoiser).from_config(denoiser.config)
            probe.add_adapter(LoraConfig(r=lora_rank, target_modules=family.lora_target_modules()))
        lora_params = sum(p.numel() for n, p in probe.named_parameters() if "lora_" in n)
    base_params = _parameters(denoiser) - sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" in n)
    text_params = sum(_parameters(module) for name, module in components.items() if name.startswith("text_encoder"))
    vae_params = _parameters(components.get("vae"))
    dtype_name = str(weights_dtype).removeprefix("torch.")

    parts: dict[str, Optional[int]] = {}
    notes: dict[str, str] = {}
    parts["denoiser weights"] = base_params * weight_bytes
    notes["denoiser weights"] = f"{base_params / 1e9:.3f} B parameters in {dtype_name}"
    parts["text encoders"] = text_params * weight_bytes if text_encoders_on_device else 0
    notes["text encoders"] = f"{text_params / 1e9:.3f} B parameters" + (
        f" in {dtype_name}" if text_encoders_on_device else ", off the accelerator (prompts encoded once)"
    )
    parts["VAE"] = vae_params * weight_bytes if vae_on_device else 0
    notes["VAE"] = f"{vae_params / 1e6:.1f} M parameters" + ("" if vae_on_device else ", off the accelerator")
    state = 2 if optimizer_8bit else 8  # AdamW's two moments: float32, or 8-bit
    parts["student LoRA, gradients, AdamW"] = lora_params * (4 + 4 + state)
    notes["student LoRA, gradients, AdamW"] = (
        f"{lora_params / 1e6:.2f} M parameters: float32 weights and gradients, "
        + ("8-bit" if optimizer_8bit else "float32")
        + " AdamW moments"
    )
    if teacher_params is None:
        parts["teacher adapters"] = num_teachers * lora_params * weight_bytes
        notes["teacher adapters"] = f"{num_teachers} x the student's LoRA size in {dtype_name}"
    else:
        parts["teacher adapters"] = teacher_params * weight_bytes
        notes["teacher adapters"] = f"{num_teachers} loaded, {teacher_params / 1e6:.2f} M parameters in {dtype_name}"

    calibration = ACTIVATION_CALIBRATION.get(type(family).__name__)
    cfg = 2 if family.cfg_scale(guidance_scale) != 1.0 else 1
    images = batch_size * cfg
    size = resolution or family.default_resolution
    name = f"activations ({images} image{'s' if images > 1 else ''} with gradients at {size} px)"
    if calibration is None:
        parts[name] = None
        notes[name] = f"not calibrated for {type(family).__name__}"
    else:
        tokens, width, blocks = _sd3_geometry(family, size, size, getattr(args, "max_sequence_length", None))
        slope, offset = calibration
        per_block = (slope * width + offset) / 4 * _dtype_bytes(weights_dtype) * tokens
        if checkpointing:
            # Each block's inputs are kept (image and text streams: one token x width each) and one block's full
            # activations exist at a time, while it is recomputed for the backward pass.
            per_image = blocks * tokens * width * _dtype_bytes(weights_dtype) + per_block
        else:
            per_image = blocks * per_block
        parts[name] = math.ceil(images * per_image)
        notes[name] = (
            f"{tokens} tokens x {blocks} blocks x ({slope / 4:.2f} x width {width} + {offset / 4:.0f}) values"
            + (", checkpointed per block" if checkpointing else "")
        )
    levers = {
        "gradient_checkpointing": checkpointing,
        "optimizer_8bit": bool(optimizer_8bit),
        "text_encoders_on_device": text_encoders_on_device,
        "vae_on_device": vae_on_device,
    }
    return MemoryEstimate(parts, notes, levers)
