"""The bundled toy base model: loading it offline, sampling it, and scoring it on the world's test prompts."""

import logging
import os
import types
from typing import Optional, Union

import numpy as np
import torch

from ..quiet import quiet_loading_bars, quiet_pipeline_imports


logger = logging.getLogger(__name__)

__all__ = [
    "BASE_MODEL_DIR",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "DEFAULT_SHIFT",
    "evaluate_pipeline",
    "load_pipeline",
    "sample",
]

BASE_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_model")

# The toy model's sampling defaults (ODE): what its reported rewards were measured with. The scheduler's shift is
# also stored in the bundled scheduler config.
DEFAULT_NUM_INFERENCE_STEPS = 10
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_SHIFT = 3.0


def load_pipeline(
    path: Optional[str] = None, dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None
):
    """
    The toy world's base model as a `StableDiffusion3Pipeline`, loaded offline from the weights in the package.

    Its default `height`/`width` are the world's resolution (32 px), its tokenizers know the world's vocabulary (and
    spell any other word letter by letter), and its scheduler carries the toy's default shift. Its T5 prompt length
    is capped at the 12 tokens it was trained with, whatever `max_sequence_length` a call asks for.

    Args:
        path (`str`, *optional*): another pipeline folder (e.g. one written by `examples/train_toy_base_model.py`);
            defaults to the bundled model.
        dtype (`torch.dtype`, defaults to `torch.float32`): the dtype of every module.
        device (`str` or `torch.device`, *optional*): where to move the pipeline.

    Example:
        ```python
        >>> from diffusion_opd_trainer import toy
        >>> pipe = toy.load_pipeline()
        >>> image = pipe("two red circles", num_inference_steps=10, guidance_scale=3.0).images[0]  # 32x32 PIL image
        ```
    """
    with quiet_pipeline_imports():  # the first import of diffusers' pipeline classes
        from diffusers import StableDiffusion3Pipeline

    path = BASE_MODEL_DIR if path is None else path
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"No pipeline folder (model_index.json) at {path}.")
    with quiet_loading_bars():  # it loads in a second; the bars would be most of a short job's output
        pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    # The model was trained with T5 sequences as long as its tokenizer's maximum (12), but `pipe(...)` pads them to
    # `max_sequence_length=256` by default: 244 padding tokens that the model never saw swamp the prompt (text reward
    # 0.47 -> 0.01). Capping the length on this instance keeps plain diffusers calls right and the class unchanged.
    pipe._get_t5_prompt_embeds = types.MethodType(_capped_t5_prompt_embeds, pipe)
    if device is not None:
        pipe.to(device)
    return pipe


def _capped_t5_prompt_embeds(self, *args, max_sequence_length: int = 256, **kwargs):
    """`StableDiffusion3Pipeline._get_t5_prompt_embeds` with the length capped at the T5 tokenizer's maximum."""
    from diffusers import StableDiffusion3Pipeline

    if self.tokenizer_3 is not None:
        max_sequence_length = min(max_sequence_length, self.tokenizer_3.model_max_length)
    return StableDiffusion3Pipeline._get_t5_prompt_embeds(
        self, *args, max_sequence_length=max_sequence_length, **kwargs
    )


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """
    Samples the pipeline with the deterministic ODE (as the evaluation of the paper does), one seeded noise per prompt:
    the evaluation harness's sampler ([`~evaluation.sample_images`]) with the toy model's defaults.

    Args:
        pipe (`StableDiffusion3Pipeline`): the model.
        prompts (`list[str]`): the prompts.
        num_inference_steps (`int`, defaults to `DEFAULT_NUM_INFERENCE_STEPS`), guidance_scale (`float`, defaults to
            `DEFAULT_GUIDANCE_SCALE`): the sampler.
        seed (`int`, defaults to 0): the i-th prompt's noise is drawn from `seed + i`, so results do not depend on
            `batch_size`.
        batch_size (`int`, defaults to 64): prompts per forward.

    Returns:
        `torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`.
    """
    from ..evaluation import sample_images

    prompts = list(prompts)
    return sample_images(
        pipe,
        prompts,
        [seed + i for i in range(len(prompts))],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    ).cpu()


def evaluate_pipeline(
    pipe,
    split: str = "test",
    max_prompts: Optional[int] = None,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
) -> dict[str, float]:
    """
    Mean reward of the pipeline on each task's prompts (each prompt scored by its own task's reward).

    Args:
        pipe (`StableDiffusion3Pipeline`): the model.
        split (`str`, defaults to `"test"`): the prompt split.
        max_prompts (`int`, *optional*): the first prompts of each task only (the split is shuffled, so a prefix mixes
            categories); all by default.
        num_inference_steps (`int`), guidance_scale (`float`), seed (`int`): see [`sample`].

    Returns:
        `dict[str, float]`: task -> mean reward.
    """
    from .rewards import reward_funcs
    from .world import TASKS, prompts

    results = {}
    funcs = reward_funcs()
    for task in TASKS:
        dataset = prompts(task, split)
        if max_prompts is not None:
            dataset = dataset.select(range(min(max_prompts, len(dataset))))
        prompt_list, metadata = list(dataset["prompt"]), list(dataset["metadata"])
        images = sample(pipe, prompt_list, num_inference_steps, guidance_scale, seed)
        rewards = funcs[task](prompts=prompt_list, images=images, metadata=metadata)
        results[task] = float(np.mean(rewards))
        logger.info("%s: mean %s reward %.3f over %d prompts", split, task, results[task], len(dataset))
    return results
