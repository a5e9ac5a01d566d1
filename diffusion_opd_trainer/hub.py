"""Writing trained LoRAs (diffusers and PEFT formats, atomically), model cards, and resolving Hub LoRA sources."""

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from huggingface_hub import ModelCard, ModelCardData, snapshot_download
from peft import LoraConfig
from safetensors.torch import save_file

from .lora import LORA_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME


logger = logging.getLogger(__name__)


def save_lora(
    output_dir: Union[str, os.PathLike],
    pipeline_class,
    denoiser_name: str,
    state_dict: dict[str, torch.Tensor],
    lora_config: LoraConfig,
    base_model: Optional[str] = None,
    peft_state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """
    Writes a LoRA as `pytorch_lora_weights.safetensors` (diffusers format, with the adapter metadata so that
    `pipe.load_lora_weights(output_dir)` restores the training scale even when alpha != r) and as a PEFT folder
    (`adapter_config.json` + `adapter_model.safetensors`).

    Files are written to a temporary folder first and moved into place one by one, so a crash mid-save never leaves a
    half-written weight file where a good one was.

    Args:
        output_dir (`str` or `os.PathLike`): the folder to write into (created if missing).
        pipeline_class: the pipeline class whose `save_lora_weights` writes the diffusers format.
        denoiser_name (`str`): `"transformer"` or `"unet"`.
        state_dict (`dict[str, torch.Tensor]`): the weights for the diffusers file (e.g. the EMA weights).
        lora_config (`LoraConfig`): the adapter's config.
        base_model (`str`, *optional*): the base model id, recorded in the PEFT config.
        peft_state_dict (`dict[str, torch.Tensor]`, *optional*): the weights of the PEFT copy when they differ from
            `state_dict` (the raw training weights when `state_dict` holds their EMA); defaults to `state_dict`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = lora_config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"]) if metadata.get("target_modules") else None
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as tmp:
        pipeline_class.save_lora_weights(
            tmp,
            **{f"{denoiser_name}_lora_layers": state_dict, f"{denoiser_name}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )
        peft_weights = state_dict if peft_state_dict is None else peft_state_dict
        save_file(
            {f"base_model.model.{k}": v.contiguous() for k, v in peft_weights.items()},
            os.path.join(tmp, PEFT_WEIGHT_NAME),
            metadata={"format": "pt"},
        )
        config = LoraConfig(**{k: v for k, v in lora_config.to_dict().items() if k in LoraConfig.__dataclass_fields__})
        config.base_model_name_or_path = base_model
        config.inference_mode = True
        config.save_pretrained(tmp)
        for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME):
            os.replace(os.path.join(tmp, name), output_dir / name)


def parse_hub_source(source: str) -> tuple[str, Optional[str], Optional[str]]:
    """Splits `owner/repo[/subfolder][@revision]` into `(repo_id, subfolder, revision)`."""
    revision = None
    if "@" in source:
        source, revision = source.rsplit("@", 1)
    parts = source.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{source!r} is neither an existing local path nor a Hub id of the form owner/repo.")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision


def download_lora(source: str, token: Optional[Union[str, bool]] = None) -> Path:
    """
    Fetches a LoRA from the Hub (or the local Hub cache when offline) and returns its local folder.

    Args:
        source (`str`): `owner/repo`, `owner/repo/subfolder`, optionally followed by `@revision`.
        token (`str` or `bool`, *optional*): a Hub token; never logged.
    """
    repo_id, subfolder, revision = parse_hub_source(source)
    patterns = [f"{subfolder}/*"] if subfolder else None
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token))
    folder = folder / subfolder if subfolder else folder
    if not folder.is_dir():
        raise FileNotFoundError(f"Hub LoRA {source}: no folder {subfolder!r} in {repo_id}@{revision or 'main'}.")
    return folder


def write_model_card(
    output_dir: Union[str, os.PathLike],
    *,
    base_model: Optional[str],
    method: str,
    description: str,
    tags: list[str],
    metrics: Optional[dict[str, float]] = None,
    model_name: Optional[str] = None,
    extra_sections: Optional[list[str]] = None,
) -> ModelCard:
    """
    Writes a diffusers model card (`README.md`) for a trained LoRA: metadata (`library_name: diffusers`, `base_model`,
    tags), the method, final metrics and a usage snippet.
    """
    data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        tags=["diffusers", "lora", "text-to-image", "diffusion-opd-trainer"] + list(tags),
        pipeline_tag="text-to-image",
        instance_prompt=None,
    )
    name = model_name or Path(output_dir).absolute().name
    lines = [f"# {name}", "", description, "", f"Trained with [diffusion-opd-trainer]: {method}.", ""]
    for section in extra_sections or []:
        lines += [section, ""]
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base_model or "<base model>"}", dtype=torch.bfloat16)',
        f'pipe.load_lora_weights("{name}")',
        'image = pipe("a photo of a cat", num_inference_steps=40, guidance_scale=4.5).images[0]',
        "```",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    card = ModelCard(content)
    card.save(os.path.join(output_dir, "README.md"))
    return card
