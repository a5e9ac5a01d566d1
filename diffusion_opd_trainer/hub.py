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
from .quiet import quiet_lora_saving


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
        with quiet_lora_saving():
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


MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "lora_model_card.md"

FLOW_GRPO_CITATION = """@article{liu2025flowgrpo,
    title         = {{Flow-GRPO: Training Flow Matching Models via Online RL}},
    author        = {Jie Liu and Gongye Liu and Jiajun Liang and Yangguang Li and Jiaheng Liu and Xintao Wang and
                     Pengfei Wan and Di Zhang and Wanli Ouyang},
    year          = 2025,
    eprint        = {2505.05470},
    archivePrefix = {arXiv},
    primaryClass  = {cs.CV}
}"""
DIFFUSION_OPD_CITATION = """@article{diffusionopd2026,
    title         = {{DiffusionOPD: A Unified Perspective of On-Policy Distillation in Diffusion Models}},
    year          = 2026,
    eprint        = {2605.15055},
    archivePrefix = {arXiv},
    primaryClass  = {cs.CV}
}"""

# Trainer bookkeeping, not results: left out of the card's metrics table.
_BOOKKEEPING_METRICS = {"epoch", "step", "total_flos", "learning_rate", "grad_norm", "step_time"}
_BOOKKEEPING_SUFFIXES = ("_runtime", "_per_second")
_BOOKKEEPING_PREFIXES = ("timing/",)


def _card_metrics(metrics: Optional[dict[str, float]]) -> dict[str, str]:
    kept = {}
    for name, value in (metrics or {}).items():
        if (
            name in _BOOKKEEPING_METRICS
            or name.endswith(_BOOKKEEPING_SUFFIXES)
            or name.startswith(_BOOKKEEPING_PREFIXES)
            or not isinstance(value, (int, float))
        ):
            continue
        kept[name] = f"{value:.4g}" if isinstance(value, float) else str(value)
    return kept


def write_model_card(
    output_dir: Union[str, os.PathLike],
    *,
    base_model: Optional[str],
    method: str,
    tags: list[str],
    metrics: Optional[dict[str, float]] = None,
    model_name: Optional[str] = None,
    extra_sections: Optional[list[str]] = None,
    guidance_scale: float = 4.5,
    num_inference_steps: int = 40,
    citations: Optional[list[str]] = None,
) -> ModelCard:
    """
    Writes a diffusers model card (`README.md`) for a trained LoRA from the package's template, as TRL does: metadata
    (`library_name: diffusers`, `base_model`, tags), one sentence on the method, the method's sections, the final
    metrics (without the trainer's bookkeeping: `epoch`, `total_flos`, `learning_rate`, run times...), a usage
    snippet with the training CFG, and the BibTeX of the method's papers.

    Args:
        output_dir (`str` or `os.PathLike`): where to write `README.md`.
        base_model (`str`, *optional*): the base pipeline's model id; "unknown" in the text when `None`.
        method (`str`): the method, completing "trained with ...".
        tags (`list[str]`): tags besides the library's own.
        metrics (`dict[str, float]`, *optional*): the final metrics.
        model_name (`str`, *optional*): the card's title and the name in the usage snippet; the folder's otherwise.
        extra_sections (`list[str]`, *optional*): Markdown sections of the method (teachers, settings...).
        guidance_scale (`float`, defaults to 4.5), num_inference_steps (`int`, defaults to 40): the usage snippet's
            sampler (the training CFG and the evaluation steps).
        citations (`list[str]`, *optional*): BibTeX entries.
    """
    data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        tags=["diffusers", "lora", "text-to-image", "diffusion-opd-trainer"] + list(tags),
        pipeline_tag="text-to-image",
        instance_prompt=None,
    )
    card = ModelCard.from_template(
        data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name or Path(output_dir).absolute().name,
        base_model=base_model or "unknown",
        method=method,
        sections=list(extra_sections or []),
        metrics=_card_metrics(metrics),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        citations=list(citations or []),
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card
