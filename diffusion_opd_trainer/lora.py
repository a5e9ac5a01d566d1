"""LoRA adapters on a diffusers denoiser: the student's, frozen teachers', switching between them, reading and writing.

All adapters live on the one denoiser (PEFT layers injected by diffusers' `add_adapter`), so any number of teachers
costs one base model in memory. PEFT's `set_adapter` marks only the active adapter trainable; every switch here goes
through [`active_adapter`], which restores both the active adapter and the `requires_grad` flags on exit, even on an
exception, so a teacher pass never changes what trains. [`mixed_adapters`] runs one forward with a different adapter
per row (PEFT's mixed-adapter batches) without switching the active adapter at all.
"""

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor


logger = logging.getLogger(__name__)

STUDENT_ADAPTER = "default"
# diffusers' file name for LoRA weights (`pipe.load_lora_weights(dir)` looks for it) and PEFT's adapter files.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"

# The default targets by denoiser name; each family's own list is `PipelineFamily.lora_target_modules()` (the FFN
# layers on request), which the trainers use.
DEFAULT_TARGET_MODULES = {
    # The attention projections of SD3's joint blocks (the paper's targets). The same names are Flux.1's attention
    # projections: both streams of its double-stream blocks and q, k, v of its single-stream blocks.
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    # The UNet's attention projections (DDPO's targets).
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
}


def default_lora_config(
    denoiser_name: str = "transformer", r: int = 32, lora_alpha: int = 64, target_modules: Optional[list[str]] = None
) -> LoraConfig:
    """
    The paper's student/teacher LoRA: rank 32, alpha 64, gaussian init, on the attention projections
    (`target_modules`, by default those of `DEFAULT_TARGET_MODULES[denoiser_name]`).
    """
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(target_modules or DEFAULT_TARGET_MODULES[denoiser_name]),
    )


def lora_parameters(denoiser: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of one adapter, by name."""
    suffix = f".{adapter_name}.weight"
    return {name: p for name, p in denoiser.named_parameters() if "lora_" in name and name.endswith(suffix)}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """
    `tensor` whole: a `DTensor` (a parameter FSDP2 shards across processes) gathered from every process, any other
    tensor as it is. Gathering is a collective: under FSDP every process must call it, on the same tensors in the same
    order (as `torch.distributed.checkpoint`'s full state dicts gather each `DTensor` with `full_tensor`).
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def copy_full_(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """
    Copies the whole tensor `value` into `parameter`; into a `DTensor` (FSDP2's sharded parameter) as this process's
    shard, cut from `value` locally (every process holds `value` whole, so nothing is communicated).
    """
    if isinstance(parameter, DTensor):
        value = value.to(device=parameter.device, dtype=parameter.dtype)
        value = distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)
    parameter.copy_(value)


def adapter_checksum(denoiser: torch.nn.Module, adapter_name: str) -> float:
    """
    A cheap fingerprint of one adapter's weights (sum of absolute values, in float64). Under FSDP each weight is
    gathered whole first, so the fingerprint is the same on every process and equals the unsharded one (a collective).
    """
    parameters = lora_parameters(denoiser, adapter_name).values()
    return float(sum(full_tensor(p.detach()).double().abs().sum() for p in parameters))


def _tuner_layers(denoiser: torch.nn.Module):
    return [module for module in denoiser.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def _adapter_state_restored(denoiser: torch.nn.Module, layers: list):
    """Restores the layers' active adapters and enabled state and every LoRA parameter's `requires_grad` on exit."""
    previous = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    requires_grad = [(p, p.requires_grad) for name, p in denoiser.named_parameters() if "lora_" in name]
    try:
        yield
    finally:
        for layer, names, disabled in previous:
            layer.enable_adapters(not disabled)
            layer.set_adapter(names)
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def active_adapter(denoiser: torch.nn.Module, adapter_name: Optional[str]):
    """
    Runs the block with `adapter_name` as the denoiser's only active adapter (`None`: all adapters disabled, i.e. the
    base model), then restores the previous adapter, the enabled state and every parameter's `requires_grad`.

    Args:
        denoiser (`torch.nn.Module`): the (unwrapped) denoiser carrying the adapters.
        adapter_name (`str` or `None`): the adapter to use, or `None` for the base model.
    """
    layers = _tuner_layers(denoiser)
    if not layers:
        raise ValueError("The denoiser has no LoRA adapter to switch.")
    with _adapter_state_restored(denoiser, layers):
        for layer in layers:
            if adapter_name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(adapter_name)
        yield


# The placeholder PEFT's mixed-adapter batches read as "no adapter": the row runs the base weights.
BASE_ROWS = "__base__"
# The LoRA layer types whose forward takes `adapter_names` (PEFT's `_mixed_batch_forward`).
_MIXED_BATCH_LAYERS = (Linear, Embedding, Conv1d, Conv2d, Conv3d)


class MixedAdapterBatchError(RuntimeError):
    """
    The denoiser cannot run a mixed-adapter batch: a LoRA layer of another type, a merged or DoRA adapter, or a LoRA
    layer whose input rows are not the batch's (e.g. the tokens of every sample concatenated).
    """


def _route_rows(module, args, kwargs, adapter_names: list[str], name: str):
    # A forward pre-hook: the layer's rows are the batch's, or under CFG its negative then positive halves
    # (`PipelineFamily.predict`'s layout); anything else cannot be routed and must not be guessed.
    x = args[0] if args else next(iter(kwargs.values()))
    rows = x.shape[0]
    if rows == len(adapter_names):
        kwargs["adapter_names"] = adapter_names
    elif rows == 2 * len(adapter_names):
        kwargs["adapter_names"] = adapter_names + adapter_names
    else:
        raise MixedAdapterBatchError(
            f"the LoRA layer {name!r} sees {rows} input rows, neither the batch's {len(adapter_names)} nor the CFG "
            f"batch's {2 * len(adapter_names)}"
        )
    return args, kwargs


@contextlib.contextmanager
def mixed_adapters(denoiser: torch.nn.Module, adapter_names: Sequence[Optional[str]]):
    """
    Runs the block's denoiser forwards with a different adapter per row: row `i` (and, in a CFG forward of twice the
    rows, row `i` of each half) runs only `adapter_names[i]` (`None`: the base weights), as if it were the only
    active adapter. This is PEFT's mixed-adapter batch (`adapter_names` passed to every LoRA layer, as
    `PeftModel`'s `_enable_peft_forward_hooks` does), here through forward pre-hooks on the denoiser's LoRA layers,
    since diffusers' models do not pass `adapter_names` down. The active adapter is not switched, so the student's
    trainability is untouched; disabled layers are enabled for the block and every flag is restored on exit.

    Meant for no-grad passes (PEFT's mixed batches are an inference feature: each adapter's rows are gathered, its
    LoRA output added back to them). A layer's rows are taken for the batch's by their number alone: a layer whose
    input folds the batch into another dimension (tokens of all samples concatenated) is refused unless its row count
    happens to be the batch's or twice it.

    Args:
        denoiser (`torch.nn.Module`): the (unwrapped) denoiser carrying the adapters.
        adapter_names (`Sequence[str or None]`): each row's adapter.

    Raises `MixedAdapterBatchError` on entry when a LoRA layer cannot run mixed batches (its type, a merged or DoRA
    adapter), and in a forward when a LoRA layer's input rows are not the batch's: the caller then runs one forward
    per adapter instead.
    """
    names = [BASE_ROWS if name is None else name for name in adapter_names]
    layers = [(name, module) for name, module in denoiser.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ValueError("The denoiser has no LoRA adapter to run.")
    known = set().union(*(layer.lora_A.keys() | layer.lora_embedding_A.keys() for _, layer in layers))
    unknown = sorted(set(names) - known - {BASE_ROWS})
    if unknown:
        raise ValueError(f"The denoiser has no adapter(s) {unknown}.")
    for name, layer in layers:
        if not isinstance(layer, _MIXED_BATCH_LAYERS):
            raise MixedAdapterBatchError(f"the LoRA layer {name!r} ({type(layer).__name__}) takes no mixed batch")
        if layer.merged:
            raise MixedAdapterBatchError(f"the LoRA layer {name!r} has merged adapters")
        if any(layer.use_dora.get(adapter, False) for adapter in set(names)):
            raise MixedAdapterBatchError(f"the LoRA layer {name!r} has a DoRA adapter")
    handles = []
    # A disabled layer would run its base weights for every row: enabled for the block (PEFT's `enable_adapters`
    # also marks the active adapter trainable, hence the restore). Nothing is switched otherwise.
    disabled = [layer for _, layer in layers if layer.disable_adapters]
    with _adapter_state_restored(denoiser, disabled) if disabled else contextlib.nullcontext():
        try:
            for layer in disabled:
                layer.enable_adapters(True)
            for name, layer in layers:
                hook = partial(_route_rows, adapter_names=names, name=name)
                handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


def add_student_adapter(denoiser: torch.nn.Module, lora_config: LoraConfig) -> list[torch.nn.Parameter]:
    """
    Injects the trainable student LoRA (adapter name `"default"`), freezes everything else, returns its parameters.
    """
    if STUDENT_ADAPTER in getattr(denoiser, "peft_config", {}):
        raise ValueError("The denoiser already has a 'default' LoRA adapter; pass a pipeline without a loaded LoRA.")
    denoiser.requires_grad_(False)
    denoiser.add_adapter(lora_config, adapter_name=STUDENT_ADAPTER)
    params = lora_parameters(denoiser, STUDENT_ADAPTER)
    if not params:
        raise ValueError(
            f"The LoRA config's target_modules {sorted(lora_config.target_modules)} match no layer of "
            f"{type(denoiser).__name__}."
        )
    set_trainable_adapter(denoiser, STUDENT_ADAPTER)
    return list(params.values())


def set_trainable_adapter(denoiser: torch.nn.Module, adapter_name: str) -> None:
    """Makes `adapter_name` the active adapter and the only trainable parameters of the denoiser."""
    for layer in _tuner_layers(denoiser):
        layer.enable_adapters(True)
        layer.set_adapter(adapter_name)
    for name, parameter in denoiser.named_parameters():
        parameter.requires_grad_("lora_" in name and name.endswith(f".{adapter_name}.weight"))


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of `tensors` whose values hold a NaN or an infinity (checked before a LoRA is loaded or saved)."""
    return [key for key, value in tensors.items() if not bool(torch.isfinite(value).all())]


# ----- reading LoRA files --------------------------------------------------------------------------------------------
def _normalise_key(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in ("base_model.model.",) + prefixes:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    # diffusers/kohya-style names: lora.down/lora.up and lora_down/lora_up.
    key = key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
    key = key.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
    # PEFT state dicts saved with an adapter name in the key ("lora_A.default.weight").
    parts = key.split(".")
    if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") and parts[-1] == "weight":
        key = ".".join(parts[:-2] + ["weight"])
    return key


def _find_weight_file(folder: Path) -> tuple[Path, str]:
    """The LoRA weight file of a folder and its format ("peft" or "diffusers")."""
    if (folder / PEFT_WEIGHT_NAME).is_file():
        return folder / PEFT_WEIGHT_NAME, "peft"
    if (folder / LORA_WEIGHT_NAME).is_file():
        return folder / LORA_WEIGHT_NAME, "diffusers"
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0], "diffusers"
    if (folder / "adapter_model.bin").is_file() or list(folder.glob("*.bin")):
        raise ValueError(
            f"{folder} holds only pickled .bin weights; only safetensors are loaded (pickles can run code). Convert "
            "them with `safetensors.torch.save_file` first."
        )
    raise FileNotFoundError(
        f"No LoRA weights in {folder}: expected {PEFT_WEIGHT_NAME} (PEFT format) or {LORA_WEIGHT_NAME} (diffusers "
        f"format), found {[p.name for p in folder.iterdir()]}."
    )


def read_lora(
    path: Union[str, os.PathLike], denoiser_name: str = "transformer", denoiser: Optional[torch.nn.Module] = None
) -> tuple[dict, LoraConfig, str]:
    """
    Reads a LoRA from a PEFT folder, a diffusers LoRA folder or a `.safetensors` file.

    Returns the state dict with PEFT's key names relative to the denoiser (`blocks.0.attn.to_q.lora_A.weight`), a
    `LoraConfig` (from `adapter_config.json`, else the file's diffusers metadata, else rank inferred from the shapes
    and alpha from stored `.alpha` values or equal to the rank) and the format found.

    Args:
        path (`str` or `os.PathLike`): a folder or a `.safetensors` file.
        denoiser_name (`str`, defaults to `"transformer"`): the key prefix diffusers uses for this denoiser.
        denoiser (`torch.nn.Module`, *optional*): when given, the LoRA's modules and shapes are checked against it
            ([`check_lora_keys`]).

    Raises `ValueError` for an unreadable file, non-finite weights, or (with `denoiser`) a LoRA that does not fit.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        weight_file, fmt = _find_weight_file(path)
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors LoRA files are loaded (pickled files can run code).")
        weight_file, fmt = path, "diffusers"
    else:
        raise FileNotFoundError(f"LoRA path {path} does not exist.")

    try:
        raw = load_file(str(weight_file))
        with safe_open(str(weight_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{weight_file} is not a readable safetensors file ({error}).") from error
    prefixes = (f"{denoiser_name}.",)
    alphas = {}
    state_dict = {}
    for key, value in raw.items():
        if key.endswith(".alpha"):
            alphas[_normalise_key(key[: -len(".alpha")], prefixes)] = float(value)
            continue
        state_dict[_normalise_key(key, prefixes)] = value
    if not state_dict:
        raise ValueError(f"{weight_file} holds no LoRA weights.")
    nonfinite = nonfinite_keys(state_dict)
    if nonfinite:
        raise ValueError(
            f"{weight_file} has NaN or infinite values in {len(nonfinite)} tensor(s), e.g. {nonfinite[:3]}: a LoRA "
            "like this would turn every distilled weight into NaN."
        )
    if denoiser is not None:
        # Before the config's consistency checks: a LoRA for another architecture should be named as such.
        check_lora_keys(denoiser, state_dict, str(path))

    config_dict, base_model = None, None
    config_file = weight_file.parent / PEFT_CONFIG_NAME
    if fmt == "peft" and config_file.is_file():
        config_dict = json.loads(config_file.read_text())
        base_model = config_dict.get("base_model_name_or_path")
    else:
        raw_meta = metadata.get(f"{denoiser_name}.lora_adapter_metadata", metadata.get("lora_adapter_metadata"))
        config_dict = json.loads(raw_meta) if raw_meta else None
        if config_dict:
            # diffusers prefixes each metadata key with the component name ("transformer.r").
            config_dict = {k.removeprefix(f"{denoiser_name}."): v for k, v in config_dict.items()}
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state_dict if ".lora_" in key})
    if config_dict is not None:
        allowed = set(LoraConfig.__dataclass_fields__) - {"base_model_name_or_path", "revision"}
        config = LoraConfig(**{k: v for k, v in config_dict.items() if k in allowed})
    else:
        rank = max(value.shape[0] for key, value in state_dict.items() if ".lora_A." in key)
        alpha = next(iter(alphas.values())) if alphas else rank
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules)
    config.base_model_name_or_path = base_model
    ranks = {value.shape[0] for key, value in state_dict.items() if ".lora_A." in key}
    if not config.rank_pattern and ranks != {config.r}:
        raise ValueError(f"LoRA {path}: its config says rank {config.r} but its weights have rank(s) {sorted(ranks)}.")
    # Target exactly the modules the file has weights for: robust to configs with regexes or wider target lists.
    config.target_modules = modules
    config.inference_mode = True
    return state_dict, config, fmt


# Component names that prefix diffusers-format LoRA keys; one left on a key means the LoRA is for another denoiser.
_PIPELINE_COMPONENTS = {"unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3"}

# What a LoRA's module names say about the denoiser it was trained on, first match first. Names shared by several
# architectures (SD3's and Flux's double-stream `transformer_blocks`) give the likeliest; the widths tell them apart.
_ARCHITECTURE_MARKERS = (
    # Z-Image names its attention `attention` and its FFN layers w1, w2, w3 (the other families: attn, attn1, ff).
    ("attention.to_", "Z-Image (ZImageTransformer2DModel)"),
    ("feed_forward.w", "Z-Image (ZImageTransformer2DModel)"),
    # FLUX.2's single-stream blocks fuse q, k, v and the MLP input in one projection; Flux.1's keep them apart.
    ("to_qkv_mlp_proj", "FLUX.2 (Flux2Transformer2DModel)"),
    ("ff.linear_in", "FLUX.2 (Flux2Transformer2DModel)"),
    ("single_transformer_blocks.", "Flux.1 (FluxTransformer2DModel)"),
    ("x_embedder.", "Flux.1 (FluxTransformer2DModel)"),
    ("down_blocks.", "a UNet (UNet2DConditionModel: SD 1.x/2.x, SDXL)"),
    ("up_blocks.", "a UNet (UNet2DConditionModel: SD 1.x/2.x, SDXL)"),
    # Qwen-Image's FFNs; its attention-only LoRAs have SD3's module names (their widths tell them apart).
    ("img_mlp.", "Qwen-Image (QwenImageTransformer2DModel)"),
    ("txt_mlp.", "Qwen-Image (QwenImageTransformer2DModel)"),
    ("transformer_blocks.", "SD3/SD3.5 (SD3Transformer2DModel; joint blocks only)"),
)


def _attention_width(shapes: dict[str, int]) -> str:
    """`" with attention width N"`, N the width of the first `to_q` of `shapes` (module -> input width), or `""`."""
    widths = [width for name, width in shapes.items() if name.endswith("to_q")]
    return f" with attention width {widths[0]}" if widths else ""


def describe_lora_architecture(state_dict: dict) -> str:
    """The denoiser a LoRA (PEFT key names) was most likely trained on, from its module names and widths."""
    modules = {key.rsplit(".lora_", 1)[0] for key in state_dict if ".lora_A" in key}
    names = {
        module.split(".", 1)[1] if module.split(".", 1)[0] in _PIPELINE_COMPONENTS else module for module in modules
    }
    guess = next(
        (
            label
            for marker, label in _ARCHITECTURE_MARKERS
            if any(n.startswith(marker) or f".{marker}" in n for n in names)
        ),
        "an unknown architecture",
    )
    widths = {key.rsplit(".lora_", 1)[0]: value.shape[1] for key, value in state_dict.items() if ".lora_A" in key}
    return guess + _attention_width(widths)


def check_lora_keys(denoiser: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Raises a `ValueError` naming `source` when the LoRA's modules or shapes do not fit the denoiser."""
    linear_shapes = {
        name: (module.out_features, module.in_features)
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    # Injected PEFT layers wrap the original Linear as `base_layer`.
    linear_shapes.update(
        {name[: -len(".base_layer")]: shape for name, shape in linear_shapes.items() if name.endswith(".base_layer")}
    )
    missing, mismatched = [], []
    for key, value in state_dict.items():
        module, kind = key.rsplit(".lora_", 1)
        if module not in linear_shapes:
            missing.append(module)
            continue
        out_features, in_features = linear_shapes[module]
        if (kind.startswith("A") and value.shape[1] != in_features) or (
            kind.startswith("B") and value.shape[0] != out_features
        ):
            mismatched.append(f"{key} {tuple(value.shape)} vs layer {out_features}x{in_features}")
    if missing or mismatched:
        # Both architectures, so that a LoRA of another family is named as such (the widths tell sizes apart).
        architecture, name = describe_lora_architecture(state_dict), type(denoiser).__name__
        own = {module: shape[1] for module, shape in linear_shapes.items() if not module.endswith(".base_layer")}
        relation = "another model architecture than" if name not in architecture else "not the size of"
        details = [f"it looks like a LoRA for {architecture}: {relation} the pipeline's {name}{_attention_width(own)}"]
        if missing:
            names = sorted(set(missing))
            details.append(f"{len(names)} module(s) not in {type(denoiser).__name__}, e.g. {names[:3]}")
            components = sorted({name.split(".", 1)[0] for name in names} & _PIPELINE_COMPONENTS)
            if components:
                details.append(
                    f"its keys name the pipeline component(s) {components}: it is a LoRA for another model "
                    "architecture (pipeline family)"
                )
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:2]}")
        raise ValueError(f"LoRA {source} does not match the pipeline's denoiser: " + "; ".join(details) + ".")


def load_adapter_weights(
    denoiser: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, source: str
) -> None:
    """
    Loads `state_dict` (PEFT key names relative to the denoiser) into the existing adapter `adapter_name`, and raises
    a `ValueError` naming `source` when some of its LoRA weights found no place in the denoiser (PEFT only warns).

    Args:
        denoiser (`torch.nn.Module`): the denoiser carrying the adapter.
        state_dict (`dict[str, torch.Tensor]`): the adapter's weights.
        adapter_name (`str`): the adapter to load into.
        source (`str`): what the weights are, for the error message (e.g. `"Checkpoint out/checkpoint-2"`).
    """
    parameters = lora_parameters(denoiser, adapter_name)
    if any(isinstance(p, DTensor) for p in parameters.values()):
        # Sharded by FSDP2: `load_state_dict` cannot copy a whole tensor into a DTensor; each process copies its shard.
        by_key = {name.replace(f".{adapter_name}.weight", ".weight"): p for name, p in parameters.items()}
        unexpected = [k for k in state_dict if k.removeprefix("base_model.model.") not in by_key and "lora_" in k]
        if not unexpected:
            for key, value in state_dict.items():
                if key.removeprefix("base_model.model.") in by_key:
                    copy_full_(by_key[key.removeprefix("base_model.model.")], value)
    else:
        result = set_peft_model_state_dict(denoiser, state_dict, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(
            f"{source}: keys not loaded into the denoiser's adapter {adapter_name!r}, e.g. {unexpected[:3]}."
        )


def load_adapter(
    denoiser: torch.nn.Module, state_dict: dict, config: LoraConfig, adapter_name: str, source: str
) -> None:
    """Adds a frozen adapter named `adapter_name` to the denoiser and loads `state_dict` into it."""
    check_lora_keys(denoiser, state_dict, source)
    trainable = [(p, p.requires_grad) for p in denoiser.parameters()]
    layers = _tuner_layers(denoiser)
    active = {id(layer): list(layer.active_adapters) for layer in layers}
    # What the denoiser ran before (the student); nothing when no adapter existed yet.
    running = list(layers[0].active_adapters) if layers else []
    with warnings.catch_warnings():
        # Several adapters on one denoiser is the design here (student and teachers), not the accident PEFT warns of.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        denoiser.add_adapter(config, adapter_name=adapter_name)
    load_adapter_weights(denoiser, state_dict, adapter_name, f"LoRA {source}")
    # `add_adapter` activates the new adapter and marks it trainable: restore the previous state, keep it frozen.
    # Modules that only the new adapter targets got new LoRA layers with the new adapter active: they must run what
    # the rest of the denoiser runs (the student, absent there, so the base weights), or a teacher would leak into
    # every forward of the student on those modules.
    for layer in _tuner_layers(denoiser):
        layer.set_adapter(active.get(id(layer), running))
    for parameter, flag in trainable:
        parameter.requires_grad_(flag)
    for parameter in lora_parameters(denoiser, adapter_name).values():
        parameter.requires_grad_(False)


def adapter_state_dict(denoiser: torch.nn.Module, adapter_name: str = STUDENT_ADAPTER) -> dict[str, torch.Tensor]:
    """
    One adapter's weights with PEFT's key names (no adapter name in the keys), detached, contiguous, on CPU; whole
    under FSDP too (each weight gathered from every process with [`full_tensor`]: every process must call it).
    """
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    return {k: full_tensor(v.detach()).to("cpu", copy=True).contiguous() for k, v in state.items()}
