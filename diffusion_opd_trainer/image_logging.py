"""
Images a person can look at: rollout and evaluation samples, each captioned with its prompt (and its reward, task or
step KL), sent to every logging integration of `report_to` that takes images (TensorBoard and Weights & Biases).

The writers and runs are the ones the Trainer's own integration callbacks opened: nothing here starts a run.
"""

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .rewards.base import to_uint8_images


logger = logging.getLogger(__name__)

__all__ = ["IMAGE_INTEGRATIONS", "MAX_IMAGES", "ImageCollector", "caption", "image_grid", "log_images"]

MAX_IMAGES = 16  # images per logged grid
IMAGE_INTEGRATIONS = ("tensorboard", "wandb")  # the `report_to` names that receive images
TILE_SIZE = 256  # longest side of a grid tile, in pixels (small images are enlarged, large ones reduced)
WANDB_MAX_SIZE = 512  # longest side of an image sent to W&B
CAPTION_LINES = 4  # text lines under each tile at most
_FONT_SIZE = 12
_PADDING = 4


def caption(prompt: str, *details: str) -> str:
    """A caption: the prompt, then each non-empty detail (`"reward 0.512"`, `"task ocr"`...) on its own line."""
    return "\n".join([str(prompt), *(d for d in details if d)])


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _printable(text: str, font) -> str:
    """`text` as `font` can draw it: the bitmap fallback font only knows Latin-1."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap of each paragraph of `text` to `width` pixels; at most `max_lines` lines (the last ends in
    an ellipsis when text was cut)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # a word wider than the tile: hard break
                cut = len(line)
                while cut > 1 and font.getlength(line[:cut]) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _resized(image: Image.Image, longest: int) -> Image.Image:
    """`image` with its longest side at `longest` pixels: enlarged by an integer factor without smoothing (a tiny
    image stays crisp), reduced with antialiasing."""
    size = max(image.size)
    if size < longest:
        factor = longest // size
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image
    if size > longest:
        scale = longest / size
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return image


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    columns: Optional[int] = None,
    tile_size: int = TILE_SIZE,
    max_caption_lines: int = CAPTION_LINES,
) -> Image.Image:
    """
    The images side by side in a grid, each with its caption written under it.

    Args:
        images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`): the images.
        captions (`Sequence[str]`): one caption per image (lines split at `"\\n"`, long lines wrapped).
        columns (`int`, *optional*): images per row; about the square root of `B` by default.
        tile_size (`int`, defaults to 256): the longest side of each image in the grid, in pixels.
        max_caption_lines (`int`, defaults to 4): text lines per caption at most.

    Returns:
        `PIL.Image.Image` (RGB).
    """
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions.")
    if len(images) == 0:
        raise ValueError("No images to put in a grid.")
    tiles = [_resized(Image.fromarray(array), tile_size) for array in to_uint8_images(images)]
    font = _font()
    line_height = font.getbbox("Ag")[3] + 2
    tile_width = max(tile.width for tile in tiles)
    text_width = max(tile_width, 96)
    cell_width = text_width + 2 * _PADDING
    wrapped = [_wrap(_printable(text, font), font, text_width, max_caption_lines) for text in captions]
    text_height = max(len(lines) for lines in wrapped) * line_height
    cell_height = max(tile.height for tile in tiles) + text_height + 3 * _PADDING
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, (tile, lines) in enumerate(zip(tiles, wrapped)):
        left, top = (index % columns) * cell_width, (index // columns) * cell_height
        grid.paste(tile, (left + _PADDING + (text_width - tile.width) // 2, top + _PADDING))
        y = top + 2 * _PADDING + max(t.height for t in tiles)
        for line in lines:
            draw.text((left + _PADDING, y), line, fill="black", font=font)
            y += line_height
    return grid


def _captions_markdown(captions: Sequence[str]) -> str:
    """The captions as a numbered Markdown list (TensorBoard's text tab renders Markdown), in grid order."""
    rows = []
    for number, text in enumerate(captions, start=1):
        first, *rest = text.split("\n")
        rows.append(f"{number}. {first}" + "".join(f" — {line}" for line in rest))
    return "\n".join(rows)


def _tensorboard_writers(trainer) -> list[Any]:
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    writers = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            if callback.tb_writer is None:
                # Not opened yet (images before `on_train_begin`): open it where `on_train_begin` would.
                if callback.logging_dir is None:
                    callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())
                callback._init_summary_writer(trainer.args)
            if callback.tb_writer is not None:
                writers.append(callback.tb_writer)
    return writers


def _wandb_runs(trainer) -> list[Any]:
    from transformers.integrations import WandbCallback

    runs = []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, WandbCallback):
            wandb = getattr(callback, "_wandb", None)
            run = getattr(wandb, "run", None) if wandb is not None else None
            if run is not None:
                runs.append((wandb, run))
    return runs


def log_images(
    trainer,
    tag: str,
    images: torch.Tensor,
    captions: Sequence[str],
    step: Optional[int] = None,
) -> list[str]:
    """
    Sends the first [`MAX_IMAGES`] images with their captions to the integrations of `trainer` that take images:
    TensorBoard gets one captioned grid ([`image_grid`]) under `tag` and the captions as text under
    `<tag>/captions`; Weights & Biases gets each image with its caption under `tag`, logged on the run the Trainer's
    `WandbCallback` opened, at `train/global_step`. Integrations that are not set up are skipped; so is every
    process but the main one.

    Args:
        trainer (`transformers.Trainer`): the trainer whose integration callbacks receive the images.
        tag (`str`): the name to log under, e.g. `"rollout/images"` or `"eval/images"`.
        images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`): the images.
        captions (`Sequence[str]`): one caption per image (see [`caption`]).
        step (`int`, *optional*): the step to log at; the trainer's `global_step` by default.

    Returns:
        `list[str]`: the integrations that received the images (`"tensorboard"`, `"wandb"`).
    """
    if not trainer.is_world_process_zero() or len(images) == 0:
        return []
    images = images[:MAX_IMAGES].detach().float().clamp(0, 1).cpu()
    captions = list(captions)[:MAX_IMAGES]
    step = trainer.state.global_step if step is None else step
    sent = []
    writers = _tensorboard_writers(trainer)
    if writers:
        grid = np.asarray(image_grid(images, captions))
        for writer in writers:
            writer.add_image(tag, grid, step, dataformats="HWC")
            writer.add_text(f"{tag}/captions", _captions_markdown(captions), step)
            writer.flush()
        sent.append("tensorboard")
    runs = _wandb_runs(trainer)
    if runs:
        arrays = [_resized(Image.fromarray(array), WANDB_MAX_SIZE) for array in to_uint8_images(images)]
        for wandb, run in runs:
            media = [wandb.Image(array, caption=text) for array, text in zip(arrays, captions)]
            run.log({tag: media, "train/global_step": step})
        sent.append("wandb")
    return sent


class ImageCollector:
    """
    Keeps the first [`MAX_IMAGES`] images of an evaluation with their captions; its `__call__` is the `on_batch`
    hook of [`~evaluation.evaluate`].
    """

    def __init__(self, limit: int = MAX_IMAGES):
        self.limit = limit
        self.images: list[torch.Tensor] = []
        self.captions: list[str] = []

    def __len__(self) -> int:
        return len(self.captions)

    def __call__(self, task: str, prompts: list[str], images: torch.Tensor, scores: dict[str, list]) -> None:
        room = self.limit - len(self)
        if room <= 0:
            return
        for i in range(min(room, len(prompts))):
            numbers = {name: column[i] for name, column in scores.items() if isinstance(column[i], (int, float))}
            values = ", ".join(f"{name} {score:.3f}" for name, score in numbers.items())
            self.captions.append(caption(prompts[i], f"task {task}" if task != "eval" else "", values))
            self.images.append(images[i].detach().float().cpu())

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.images) if self.images else torch.zeros(0, 3, 1, 1)
