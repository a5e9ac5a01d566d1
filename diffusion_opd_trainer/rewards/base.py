"""Shared plumbing of the reward models: lazy loading, device and dtype, batching, image conversion."""

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image


logger = logging.getLogger(__name__)

__all__ = ["RewardModel", "load_component", "slice_columns", "to_pil_images", "to_uint8_images"]


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """
    Quantises a batch of images in `[0, 1]` to `uint8`, as saving them to PNG would.

    Reward models are trained and evaluated on 8-bit images, so they score what a user would see, not the decoder's
    float output (the two differ by up to half a grey level, enough to move a JPEG size or an OCR read).

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`): the batch.

    Returns:
        `np.ndarray` of shape `(B, H, W, 3)`, dtype `uint8`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images of shape (B, 3, H, W), got {tuple(images.shape)}.")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def to_pil_images(images: Union[torch.Tensor, Sequence[Image.Image]]) -> list[Image.Image]:
    """Converts a `(B, 3, H, W)` tensor in `[0, 1]` (or a list of PIL images, returned as is) to RGB PIL images."""
    if isinstance(images, torch.Tensor):
        return [Image.fromarray(array) for array in to_uint8_images(images)]
    return [image.convert("RGB") for image in images]


def slice_columns(columns: dict[str, Any], start: int, stop: int, batch_size: int) -> dict[str, Any]:
    """
    The `[start:stop]` slice of every per-image column; other values (not one per image) pass through unchanged.

    Args:
        columns (`dict[str, Any]`): the extra keyword arguments of a reward call.
        start (`int`), stop (`int`): the slice.
        batch_size (`int`): the number of images of the whole call; a sequence of that length is a per-image column.
    """
    sliced = {}
    for key, value in columns.items():
        if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and len(value) == batch_size:
            sliced[key] = value[start:stop]
        else:
            sliced[key] = value
    return sliced


def load_component(source: Any, loader, **kwargs) -> Any:
    """
    Returns `source` if it is already a loaded object, else `loader.from_pretrained(source, **kwargs)`.

    Args:
        source (`str`, `os.PathLike` or object): a Hub id, a local folder, or a model / processor object.
        loader: a class with `from_pretrained` (e.g. `CLIPModel`, `AutoProcessor`).
    """
    if isinstance(source, (str, os.PathLike)):
        logger.info("Loading %s from %s", getattr(loader, "__name__", loader), source)
        return loader.from_pretrained(source, **kwargs)
    return source


class RewardModel:
    """
    Base class of the reward models: a callable with the library's reward signature,
    `reward(prompts=list[str], images=Tensor[B, 3, H, W] in [0, 1], **columns) -> list[float | None]`.

    Models are loaded on the first call (so building a trainer or a registry entry costs nothing), moved to `device`
    in `dtype`, and images are scored `batch_size` at a time. Extra keyword arguments (dataset columns, one value per
    image) are accepted; a subclass reads the ones it needs in [`~RewardModel.score_batch`] and ignores the others.

    Subclasses implement `load_models()` (build the models, once) and `score_batch(prompts, images, **columns)`.

    Args:
        device (`str` or `torch.device`, *optional*): where the models run; CUDA when available, else CPU.
        dtype (`torch.dtype`, defaults to `torch.float32`): the models' dtype. Scores are returned in float64 Python
            floats whatever the dtype; bf16 changes them by about 1e-2 relative.
        batch_size (`int`, defaults to 16): images per forward pass.
        name (`str`, *optional*): the name used in metrics (`rewards/<name>/mean`); the class' default otherwise.
    """

    name: str = "reward"

    def __init__(
        self,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: Optional[str] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        self._device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.batch_size = batch_size
        if name is not None:
            self.name = name
        self._loaded = False
        # Like a plain function, a reward reports its name through `__name__` too (the library's metric-name rule).
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, dtype={self.dtype})"

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return self._device

    def to(self, device: Union[str, torch.device]) -> "RewardModel":
        """Moves the reward (its models, if loaded) to `device`."""
        self._device = torch.device(device)
        if self._loaded:
            for module in self.modules():
                module.to(self._device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The `torch.nn.Module`s of this reward (loaded ones only)."""
        return [value for value in vars(self).values() if isinstance(value, torch.nn.Module)]

    def load(self) -> "RewardModel":
        """Loads the models now (otherwise done by the first call); returns `self`."""
        if not self._loaded:
            self.load_models()
            for module in self.modules():
                module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
            self._loaded = True
        return self

    def load_models(self) -> None:
        """Builds or loads the models; called once, before the first scoring. Rewards without models do nothing."""

    def score_batch(self, prompts: list[str], images: torch.Tensor, **columns) -> list[Optional[float]]:
        """Scores one batch of at most `batch_size` images."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: torch.Tensor, **columns) -> list[Optional[float]]:
        """
        Scores `images` (with their `prompts`).

        Args:
            prompts (`list[str]`): one prompt per image.
            images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`): the images.
            **columns: dataset columns, one value per image; unused ones are ignored.

        Returns:
            `list[float | None]`: one reward per image (`None` where the reward does not apply).
        """
        return self.map_batches(self.score_batch, prompts, images, **columns)

    @torch.no_grad()
    def map_batches(self, function, prompts: list[str], images: torch.Tensor, **columns) -> list[Optional[float]]:
        """Loads the models if needed; applies `function(prompts, images, **columns)` `batch_size` images at a time."""
        prompts = list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images.")
        self.load()
        scores: list[Optional[float]] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = min(start + self.batch_size, len(prompts))
            batch_columns = slice_columns(columns, start, stop, len(prompts))
            scores.extend(function(prompts[start:stop], images[start:stop], **batch_columns))
        return [None if score is None else float(score) for score in scores]

    def compute_metrics(self, prompts: list[str], images: torch.Tensor, **columns) -> dict[str, list[Optional[float]]]:
        """
        The values the evaluation harness reports: `{name: per-image values}`, by default the reward itself.

        Rewards whose training signal differs from their evaluation number (GenEval's partial credit, a rescaled
        PickScore) override this to return the evaluation number under `name` and the rest under other keys.
        """
        return {self.name: self(prompts=prompts, images=images, **columns)}

    def aggregate(self, metric: str, values: list[Optional[float]], columns: dict[str, list]) -> float:
        """
        Reduces one metric of [`~RewardModel.compute_metrics`] over an evaluation set: the mean, `None`s left out.

        Args:
            metric (`str`): the key of the metric.
            values (`list[float | None]`): its per-image values.
            columns (`dict[str, list]`): the evaluation set's columns (prompts under `"prompt"`), for rewards that
                aggregate by group (GenEval averages per tag).
        """
        kept = [value for value in values if value is not None]
        return float(np.mean(kept)) if kept else math.nan
