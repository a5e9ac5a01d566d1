"""One small adapter per pipeline family; `get_adapter` picks the right one for a pipeline."""

from .base import DiffusionAdapter, PromptEmbeddings
from .sd import SDAdapter
from .sd3 import SD3Adapter


__all__ = ["DiffusionAdapter", "PromptEmbeddings", "SD3Adapter", "SDAdapter", "get_adapter"]


def get_adapter(pipeline) -> DiffusionAdapter:
    """
    Returns the [`DiffusionAdapter`] for a diffusers pipeline.

    Supported: `StableDiffusion3Pipeline` (SD3, SD3.5) and `StableDiffusionPipeline` (SD 1.x, 2.x).
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    if isinstance(pipeline, DiffusionAdapter):
        return pipeline
    if isinstance(pipeline, StableDiffusion3Pipeline):
        return SD3Adapter(pipeline)
    if isinstance(pipeline, StableDiffusionPipeline):
        return SDAdapter(pipeline)
    raise TypeError(
        f"No adapter for {type(pipeline).__name__}: supported pipelines are StableDiffusion3Pipeline and "
        "StableDiffusionPipeline. A new family needs a small `DiffusionAdapter` subclass in "
        "`diffusion_opd_trainer/models/`."
    )
