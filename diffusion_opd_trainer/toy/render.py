"""The toy world's renderer: specs to small RGB images.

Shapes are drawn four times larger and box-filtered down (anti-aliased edges, like a real image), on integer pixel
positions so that squares stay square. Glyphs are drawn pixel-exact at an integer scale, centred: at 32 px a glyph is
6x10 pixels with 2-pixel strokes, large enough to survive the VAE's 2x downsampling.
"""

import json
from collections.abc import Iterable, Sequence
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from .font import GLYPH_HEIGHT, GLYPH_WIDTH, GLYPHS
from .world import BACKGROUNDS, COLORS


__all__ = ["DEFAULT_RESOLUTION", "BACKGROUND_STYLES", "render", "render_spec", "text_layout"]

DEFAULT_RESOLUTION = 32
BACKGROUND_STYLES = ("white", "pastel", "vivid")
_SUPERSAMPLE = 4
_INK = (0.0, 0.0, 0.0)


def _to_uint8(color: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(round(255 * c)) for c in color)


def _object_size_range(num_objects: int, resolution: int) -> tuple[int, int]:
    # In pixels at 32 px: 10-12 for one or two objects, 8-10 for three and 7-9 for four (so that they fit without
    # touching). Shapes much smaller than this blur into the same blob after the VAE and a small model.
    unit = resolution / 32
    low, high = {1: (10, 12), 2: (10, 12), 3: (8, 10)}.get(num_objects, (7, 9))
    return int(round(low * unit)), int(round(high * unit))


def _place(
    sizes: list[int], rng: np.random.Generator, resolution: int, relation: Optional[str] = None
) -> tuple[list[tuple[int, int]], list[int]]:
    """Top-left corners and sizes of non-touching square boxes; with `relation`, box 0 stands so to box 1."""
    margin, gap = max(1, resolution // 32), max(2, resolution // 16)
    for _ in range(1000):
        corners = [
            (
                int(rng.integers(margin, resolution - margin - s + 1)),
                int(rng.integers(margin, resolution - margin - s + 1)),
            )
            for s in sizes
        ]
        boxes = [(x, y, x + s, y + s) for (x, y), s in zip(corners, sizes)]
        apart = all(
            a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
            for i, a in enumerate(boxes)
            for b in boxes[i + 1 :]
        )
        if apart and (relation is None or _relation_holds(boxes[0], boxes[1], relation, resolution)):
            return corners, sizes
    if min(sizes) > 4:  # a crowded draw: retry with smaller shapes rather than fail
        return _place([s - 1 for s in sizes], rng, resolution, relation)
    raise RuntimeError(f"Could not place {len(sizes)} objects at {resolution} px.")


def _relation_holds(a: tuple, b: tuple, relation: str, resolution: int) -> bool:
    # Clearly in the relation: a third of the image apart along its axis, and not much apart along the other.
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= resolution / 3 and abs(across) <= resolution / 6


def _background(spec: dict, style: Optional[str], rng: np.random.Generator, resolution: int) -> np.ndarray:
    if style is None:
        style = "vivid" if spec["task"] == "preference" else "white"
    if style == "white":
        return np.ones((resolution, resolution, 3), dtype=np.float32)
    if style == "pastel":
        # A flat, pale colour: what a lot of plain images look like, and what the preference reward rates low.
        tint = np.array(list(BACKGROUNDS.values())[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32)
        strength = rng.uniform(0.15, 0.35)
        return np.broadcast_to((1 - strength) + strength * tint, (resolution, resolution, 3)).copy()
    if style != "vivid":
        raise ValueError(f"Unknown background style {style!r}; use one of {BACKGROUND_STYLES}.")
    background = spec.get("background")
    if background is None:
        names = list(BACKGROUNDS)
        first, second = rng.choice(len(names), size=2, replace=False)
        background = {
            "colors": [names[first], names[second]],
            "direction": ["vertical", "horizontal"][rng.integers(2)],
        }
    start, end = (np.array(BACKGROUNDS[name], dtype=np.float32) for name in background["colors"])
    ramp = np.linspace(0.0, 1.0, resolution, dtype=np.float32)
    ramp = ramp[:, None, None] if background["direction"] == "vertical" else ramp[None, :, None]
    return np.broadcast_to(start + (end - start) * ramp, (resolution, resolution, 3)).copy()


def _faded(color: Sequence[float], fade: float) -> tuple[float, ...]:
    """`color` washed out toward white by `fade` (0: unchanged, 1: white)."""
    return tuple(c + (1.0 - c) * fade for c in color)


def _draw_objects(image: np.ndarray, spec: dict, rng: np.random.Generator, fade: float = 0.0) -> np.ndarray:
    resolution = image.shape[0]
    instances = [(obj["color"], obj["shape"]) for obj in spec["objects"] for _ in range(obj.get("count", 1))]
    low, high = _object_size_range(len(instances), resolution)
    sizes = [int(rng.integers(low, high + 1)) for _ in instances]
    corners, sizes = _place(sizes, rng, resolution, spec.get("relation"))
    k = _SUPERSAMPLE
    canvas = Image.fromarray((image * 255).round().astype(np.uint8)).resize((resolution * k,) * 2, Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for (color, shape), (x, y), size in zip(instances, corners, sizes):
        box = (x * k, y * k, (x + size) * k - 1, (y + size) * k - 1)
        fill = _to_uint8(_faded(COLORS[color], fade))
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # an upright isosceles triangle filling its box
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    canvas = canvas.resize((resolution, resolution), Image.BOX)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def text_layout(length: int, resolution: int) -> tuple[int, int, int]:
    """
    Where the renderer draws a string of `length` glyphs: `(scale, x0, y0)`, the integer scale of the 3x5 font and the
    top-left pixel of the first glyph. Glyph `i` starts at column `x0 + i * (GLYPH_WIDTH + 1) * scale`.
    """
    # Centred, always at the same place for a given length: the model has to learn the glyphs, not a layout.
    scale = max(1, resolution // 16)
    width = length * (GLYPH_WIDTH + 1) * scale - scale
    height = GLYPH_HEIGHT * scale
    return scale, (resolution - width) // 2, (resolution - height) // 2


def _draw_text(image: np.ndarray, text: str, fade: float = 0.0, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    scale, x0, y0 = text_layout(len(text), image.shape[0])
    resolution, width, height = image.shape[0], len(text) * (GLYPH_WIDTH + 1) * scale - scale, GLYPH_HEIGHT * scale
    # Off its place by `offset`, kept inside the image.
    x0 = int(np.clip(x0 + offset[0], 0, resolution - width))
    y0 = int(np.clip(y0 + offset[1], 0, resolution - height))
    ink_color = _faded(_INK, fade)
    for i, letter in enumerate(text):
        ink = np.kron(GLYPHS[letter], np.ones((scale, scale), dtype=np.float32)).astype(bool)
        x = x0 + i * (GLYPH_WIDTH + 1) * scale
        image[y0 : y0 + height, x : x + GLYPH_WIDTH * scale][ink] = ink_color
    return image


def render_spec(
    spec: Union[dict, str],
    resolution: int = DEFAULT_RESOLUTION,
    background: Optional[str] = None,
    rng: Optional[np.random.Generator] = None,
    fade: float = 0.0,
    text_offset: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """
    Draws one spec.

    Args:
        spec (`dict` or `str`): a world spec, or its JSON (a `metadata` value of [`prompts`]).
        resolution (`int`, defaults to 32): the image size in pixels (a multiple of 16).
        background (`str`, *optional*): `"white"`, `"pastel"` or `"vivid"`; by default white, and a vivid gradient
            (the spec's own, if it names one) for the preference task.
        rng (`np.random.Generator`, *optional*): draws the layout (and background); by default the spec's `seed`
            (0 if it has none), so that a spec always renders the same image.
        fade (`float`, defaults to 0): draws the shapes or the ink washed out toward white by this fraction, the
            lower-quality images of the base model's training mix (see `toy/train_base.py`); the world's ground truth
            is crisp (0).
        text_offset (`tuple[int, int]`, defaults to `(0, 0)`): draws a string this many pixels `(right, down)` off
            its place (kept inside the image), the misplaced texts of the base model's training mix; the world's
            ground truth is at [`text_layout`]'s place.

    Returns:
        `np.ndarray` of shape `(resolution, resolution, 3)`, float32 in `[0, 1]`.
    """
    if isinstance(spec, str):
        spec = json.loads(spec)
    if rng is None:
        rng = np.random.default_rng(spec.get("seed", 0))
    image = _background(spec, background, rng, resolution)
    if spec["task"] == "text":
        return _draw_text(image, spec["text"], fade, text_offset)
    return _draw_objects(image, spec, rng, fade)


def render(rows, resolution: int = DEFAULT_RESOLUTION) -> torch.Tensor:
    """
    The ground-truth images of prompt rows: what each prompt should look like.

    Args:
        rows (`datasets.Dataset`, `dict` of columns, or an iterable of specs / JSON strings):
            rows of [`prompts`] (their `metadata` column), or specs.
        resolution (`int`, defaults to 32): the image size in pixels.

    Returns:
        `torch.Tensor` of shape `(B, 3, resolution, resolution)`, float32 in `[0, 1]`.
    """
    if hasattr(rows, "column_names") or isinstance(rows, dict):
        specs: Iterable = rows["metadata"]
    else:
        specs = rows
    images = [render_spec(spec, resolution=resolution) for spec in specs]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
