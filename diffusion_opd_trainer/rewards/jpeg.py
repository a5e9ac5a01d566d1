"""DDPO's JPEG compressibility rewards: the size of the image encoded as JPEG, in kilobytes."""

import io
from typing import Optional

import torch
from PIL import Image

from .base import RewardModel, to_uint8_images


__all__ = ["JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb"]


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> list[float]:
    """
    The JPEG-encoded size of each image in kilobytes (1 kB = 1000 bytes), as DDPO measures it.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`): the images (quantised to 8 bits first).
        quality (`int`, defaults to 95): the JPEG quality (DDPO's value).
    """
    sizes = []
    for array in to_uint8_images(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


class JpegIncompressibility(RewardModel):
    """
    DDPO's `jpeg_incompressibility`: the JPEG size of the image in kB (more detail, more noise: larger).

    No model: `device`, `dtype` are accepted for a uniform interface and unused.

    Args:
        quality (`int`, defaults to 95): the JPEG quality.
        batch_size (`int`, defaults to 64): images per batch.
        **kwargs: `name` (the metric name, defaults to `"jpeg_incompressibility"`), `device` and `dtype` of
            [`RewardModel`].
    """

    name = "jpeg_incompressibility"
    sign = 1.0

    def __init__(self, quality: int = 95, batch_size: int = 64, **kwargs):
        super().__init__(batch_size=batch_size, **kwargs)
        self.quality = quality

    def score_batch(self, prompts: list[str], images: torch.Tensor, **columns) -> list[Optional[float]]:
        return [self.sign * size for size in jpeg_size_kb(images, self.quality)]


class JpegCompressibility(JpegIncompressibility):
    """
    DDPO's `jpeg_compressibility`: minus the JPEG size of the image in kB (smoother, simpler images score higher).

    Args:
        quality (`int`, defaults to 95): the JPEG quality.
        batch_size (`int`, defaults to 64): images per batch.
        **kwargs: `name` (the metric name, defaults to `"jpeg_compressibility"`), `device` and `dtype` of
            [`RewardModel`].
    """

    name = "jpeg_compressibility"
    sign = -1.0
