"""One small class per pipeline family; `get_family` picks the right one for a pipeline."""

from ..quiet import quiet_pipeline_imports
from .base import PipelineFamily, PromptEmbeddings
from .flux import FluxFamily
from .sd import SDFamily
from .sd3 import SD3Family


__all__ = ["FluxFamily", "PipelineFamily", "PromptEmbeddings", "SD3Family", "SDFamily", "get_family"]


def get_family(pipeline) -> PipelineFamily:
    """
    Returns the [`PipelineFamily`] of a diffusers pipeline (a family passes through unchanged).

    Supported: `StableDiffusion3Pipeline` (SD3, SD3.5), `FluxPipeline` (Flux.1-dev, Flux.1-schnell) and
    `StableDiffusionPipeline` (SD 1.x, 2.x).
    """
    with quiet_pipeline_imports():  # the first import of each pipeline class
        from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    if isinstance(pipeline, PipelineFamily):
        return pipeline
    if isinstance(pipeline, StableDiffusion3Pipeline):
        return SD3Family(pipeline)
    if isinstance(pipeline, FluxPipeline):
        return FluxFamily(pipeline)
    if isinstance(pipeline, StableDiffusionPipeline):
        return SDFamily(pipeline)
    raise TypeError(
        f"No pipeline family for {type(pipeline).__name__}: supported pipelines are StableDiffusion3Pipeline (SD3, "
        "SD3.5), FluxPipeline (Flux.1-dev, Flux.1-schnell) and StableDiffusionPipeline (SD 1.x, 2.x). A new family "
        "needs a small `PipelineFamily` subclass in `diffusion_opd_trainer/pipelines/`."
    )
