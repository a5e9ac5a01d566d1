"""One small class per pipeline family; `get_family` picks the right one for a pipeline."""

import importlib

import diffusers

from ..quiet import quiet_pipeline_imports
from .base import PipelineFamily, PromptEmbeddings, TextEncodersReleasedError
from .flux import FluxFamily
from .sd import SDFamily
from .sd3 import SD3Family


__all__ = [
    "FluxFamily",
    "PipelineFamily",
    "PromptEmbeddings",
    "SD3Family",
    "SDFamily",
    "TextEncodersReleasedError",
    "get_family",
]

# (diffusers pipeline class, the models it loads, module of this package, family class). A pipeline matches the first
# entry it is an instance of: subclasses before their parents.
FAMILIES = (
    ("StableDiffusion3Pipeline", "SD3, SD3.5", "sd3", "SD3Family"),
    ("FluxPipeline", "Flux.1-dev, Flux.1-schnell", "flux", "FluxFamily"),
    ("StableDiffusionPipeline", "SD 1.x, 2.x", "sd", "SDFamily"),
    ("StableDiffusionXLPipeline", "SDXL", "sdxl", "SDXLFamily"),
    ("QwenImagePipeline", "Qwen-Image", "qwen_image", "QwenImageFamily"),
    ("ZImagePipeline", "Z-Image", "z_image", "ZImageFamily"),
    ("Flux2Pipeline", "FLUX.2 [dev]", "flux2", "Flux2Family"),
    ("Flux2KleinPipeline", "FLUX.2 [klein]", "flux2", "Flux2Family"),
)


def supported_pipelines() -> str:
    """The supported pipeline classes and their models, for messages: `"StableDiffusion3Pipeline (SD3, SD3.5), ..."`"""
    return ", ".join(f"{pipeline} ({models})" for pipeline, models, _, _ in FAMILIES)


def family_class(name: str) -> type:
    """The family class of `FAMILIES` called `name` (e.g. `"SDXLFamily"`), imported on first use."""
    for _, _, module, class_name in FAMILIES:
        if class_name == name:
            return getattr(importlib.import_module(f".{module}", __name__), class_name)
    raise KeyError(f"No pipeline family called {name!r}; known: {sorted({entry[3] for entry in FAMILIES})}.")


def get_family(pipeline) -> PipelineFamily:
    """
    Returns the [`PipelineFamily`] of a diffusers pipeline (a family passes through unchanged).

    Supported: the pipelines of `FAMILIES` (see [`supported_pipelines`]).
    """
    if isinstance(pipeline, PipelineFamily):
        return pipeline
    for pipeline_class, _, _, class_name in FAMILIES:
        with quiet_pipeline_imports():  # the first import of each pipeline class
            cls = getattr(diffusers, pipeline_class)
        if isinstance(pipeline, cls):
            return family_class(class_name)(pipeline)
    raise TypeError(
        f"No pipeline family for {type(pipeline).__name__}: supported pipelines are {supported_pipelines()}. A new "
        "family needs a small `PipelineFamily` subclass in `diffusion_opd_trainer/pipelines/`."
    )
