"""The toy world's three rewards, procedural stand-ins for GenEval, OCR and a preference model.

All three follow the library's reward signature, `f(prompts=..., images=..., **columns) -> list[float]`, return values
in `[0, 1]`, and need no download. The two prompt-dependent ones read the spec from the `metadata` column of
[`~toy.prompts`] when it is there, and parse the prompt otherwise.
"""

import json
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from .font import GLYPH_HEIGHT, GLYPH_WIDTH, GLYPHS
from .render import text_layout
from .world import COLORS, parse_prompt


__all__ = [
    "compositional_reward",
    "detect_objects",
    "edit_distance",
    "exact_text_reward",
    "glyph_similarities",
    "preference_reward",
    "preference_scores",
    "read_text",
    "reward_funcs",
    "text_reward",
]

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_COLOR_NAMES = list(COLORS)
# A pixel belongs to its nearest palette colour when within this RGB distance of it (the closest pair is 0.42 apart):
# anti-aliased edges, pale blends with the background and off-palette backgrounds stay unlabelled.
_COLOR_RADIUS = 0.3
_EXTRA_OBJECT_PENALTY = 0.5


def _as_numpy_images(images) -> np.ndarray:
    """`(B, H, W, 3)` float32 in [0, 1] from a `(B, 3, H, W)` tensor or array."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    return np.clip(images.transpose(0, 2, 3, 1), 0.0, 1.0)


def _specs(prompts: Sequence[str], metadata: Optional[Sequence]) -> list[Optional[dict]]:
    if metadata is None:
        return [parse_prompt(prompt) for prompt in prompts]
    return [json.loads(m) if isinstance(m, str) else m for m in metadata]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an `(N, 2)` array of (row, col)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        components.append(np.array(pixels))
    return components


def _coverage(pixels: np.ndarray, color: np.ndarray) -> np.ndarray:
    """How much of each pixel a shape of `color` covers, reading the pixel as a blend of `color` and white."""
    direction = 1.0 - color
    alpha = 1.0 - ((pixels - color) @ direction) / max(float(direction @ direction), 1e-6)
    return np.clip(alpha, 0.0, 1.0)


def _shape_features(alpha: np.ndarray) -> tuple[float, float]:
    """
    The two shape features of a coverage map (a window around one blob): the row skewness of its mass and how much it
    fills the corners of its bounding box.

    Coverage, not the thresholded blob, so that the features survive blur (a blurred small circle thresholds to a
    square-ish blob): an upright triangle has its mass low (row skewness about -0.57, 0 for the others); a square
    fills the corners of its bounding box (about 1), a circle leaves them empty (about 0.2).
    """
    total = alpha.sum()
    rows = np.arange(alpha.shape[0], dtype=np.float32) + 0.5
    cols = np.arange(alpha.shape[1], dtype=np.float32) + 0.5
    profile = alpha.sum(1) / total
    mean = (profile * rows).sum()
    std = np.sqrt((profile * (rows - mean) ** 2).sum()) + 1e-6
    skewness = float((profile * (rows - mean) ** 3).sum() / std**3)
    inside = alpha > 0.5
    if not inside.any():
        return skewness, 0.0
    r0, r1 = np.nonzero(inside.any(1))[0][[0, -1]]
    c0, c1 = np.nonzero(inside.any(0))[0][[0, -1]]
    v = (rows[:, None] - (r0 + r1 + 1) / 2) / ((r1 + 1 - r0) / 2)
    u = (cols[None, :] - (c0 + c1 + 1) / 2) / ((c1 + 1 - c0) / 2)
    corners = (np.abs(u) > 0.55) & (np.abs(v) > 0.55) & (np.abs(u) < 1) & (np.abs(v) < 1)
    return skewness, float(alpha[corners].mean()) if corners.any() else 0.0


def _shape_probabilities(skewness: float, corner_fill: float) -> dict[str, float]:
    """Soft versions of the shape rule (triangle if skewness < -0.25, else square if corner fill > 0.5)."""
    triangle = 1.0 / (1.0 + np.exp((skewness + 0.25) / 0.08))
    square = (1.0 - triangle) / (1.0 + np.exp(-(corner_fill - 0.5) / 0.08))
    return {"triangle": float(triangle), "square": float(square), "circle": float(1.0 - triangle - square)}


def _shape_of(skewness: float, corner_fill: float) -> str:
    """Circle, square or triangle from a shape's two features (see [`_shape_features`])."""
    if skewness < -0.25:
        return "triangle"
    return "square" if corner_fill > 0.5 else "circle"


def detect_objects(image, min_area: Optional[int] = None) -> list[dict]:
    """
    A procedural object detector: colour segmentation, connected components and simple shape features.

    Each pixel takes the nearest palette colour within a fixed RGB radius (else it is background); each 4-connected
    blob of one colour at least `min_area` pixels large is an object, classified by its shape features.

    Args:
        image (`torch.Tensor` or `np.ndarray` of shape `(3, H, W)`): an image in `[0, 1]`.
        min_area (`int`, *optional*): the smallest object in pixels; by default 12 at 32 px, scaled with the area.

    Returns:
        `list[dict]`: one dict per object with `color`, `shape`, `shape_probabilities` (soft versions of the shape
        rule, for dense rewards), `x`, `y` (centroid in pixels) and `area`.
    """
    pixels = _as_numpy_images(image)[0]
    height, width, _ = pixels.shape
    if min_area is None:
        min_area = max(4, round(12 * height * width / 32**2))
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)
    nearest = distances.argmin(-1)
    labelled = distances.min(-1) <= _COLOR_RADIUS
    objects = []
    for index, name in enumerate(_COLOR_NAMES):
        blobs = [blob for blob in _components(labelled & (nearest == index)) if len(blob) >= min_area]
        coverage = _coverage(pixels, _PALETTE[index])
        for i, blob in enumerate(blobs):
            # The coverage window around the blob, without the pixels of any other object (of any colour).
            others = labelled & (nearest != index)
            for other in blobs[:i] + blobs[i + 1 :]:
                others[other[:, 0], other[:, 1]] = True
            r0, c0 = np.maximum(blob.min(0) - 2, 0)
            r1, c1 = blob.max(0) + 3
            window = np.where(others[r0:r1, c0:c1], 0.0, coverage[r0:r1, c0:c1])
            features = _shape_features(window)
            probabilities = _shape_probabilities(*features)
            objects.append(
                {
                    "color": name,
                    "shape": _shape_of(*features),
                    "shape_probabilities": probabilities,
                    "x": float(blob[:, 1].mean()),
                    "y": float(blob[:, 0].mean()),
                    "area": len(blob),
                }
            )
    return objects


def _relation_score(objects: list[dict], first: dict, second: dict, relation: str, margin: float) -> float:
    """
    GenEval's rule made continuous: some detection of the first object's colour should lie on the named side of some
    detection of the second's, along the named axis by more than `margin` and more than across it. The best pair
    scores a logistic of how far it clears that bar (0.5 exactly on it, about 0.9 two pixels past it at 32 px).
    """
    scale = margin / 2
    best = 0.0
    for a in objects:
        if a["color"] != first["color"]:
            continue
        for b in objects:
            if b is a or b["color"] != second["color"]:
                continue
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]
            along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
                relation
            ]
            clearance = along - max(margin, abs(across))
            best = max(best, float(1.0 / (1.0 + np.exp(-clearance / scale))))
    return best


def _count_score(found: float, asked: int) -> float:
    return max(0.0, 1.0 - abs(found - asked) / asked)


def _compositional_score(image: np.ndarray, spec: Optional[dict]) -> float:
    if spec is None or "objects" not in spec:
        return 0.0
    objects = detect_objects(image.transpose(2, 0, 1))
    wanted = spec["objects"]
    # GenEval-style counting credit, 1 - |found - asked| / asked, half on the objects of the asked colour and half on
    # the soft number of them that have the asked shape, so that the right colour with a blurry shape earns part ...
    scores = []
    for obj in wanted:
        of_color = [o for o in objects if o["color"] == obj["color"]]
        shaped = sum(o["shape_probabilities"][obj["shape"]] for o in of_color)
        asked = obj.get("count", 1)
        scores.append(0.5 * _count_score(len(of_color), asked) + 0.5 * _count_score(shaped, asked))
    # ... a relation is one more requirement, scored by how clearly it holds ...
    if spec.get("relation"):
        scores.append(_relation_score(objects, wanted[0], wanted[1], spec["relation"], margin=image.shape[1] / 16))
    # ... and objects of colours nobody asked for divide the score, so that drawing every colour does not pay.
    requested = {obj["color"] for obj in wanted}
    extras = sum(o["color"] not in requested for o in objects)
    return float(np.mean(scores)) / (1.0 + _EXTRA_OBJECT_PENALTY * extras)


def compositional_reward(prompts: Sequence[str], images, metadata: Optional[Sequence] = None, **kwargs) -> list[float]:
    """
    GenEval-like reward of the compositional task: are the asked objects there, in the asked counts and colours, in
    the asked relative position, and nothing else?

    Dense partial credit, so that GRPO sees a reward that moves with every improvement: per requested object, GenEval's
    counting credit `1 - |found - asked| / asked`, half on the detected objects of the asked colour and half on the
    soft number of them with the asked shape (shape probabilities from the detector's features); plus, for a relation,
    a logistic of how clearly the best pair of objects of the two colours stands in it (GenEval's margin rule made
    continuous); the mean is divided by `1 + 0.5 * extras`, where extras are detected objects of a colour the prompt
    did not ask for.

    Args:
        prompts (`list[str]`): the prompts (parsed when `metadata` is not given).
        images (`torch.Tensor` of shape `(B, 3, H, W)`): images in `[0, 1]`.
        metadata (`list[str]`, *optional*): the JSON specs of [`~toy.prompts`].

    Returns:
        `list[float]`: one score in `[0, 1]` per image (0 for a prompt outside the compositional grammar).
    """
    pixels = _as_numpy_images(images)
    return [_compositional_score(image, spec) for image, spec in zip(pixels, _specs(prompts, metadata))]


compositional_reward.__name__ = "compositional"


# ----- text ----------------------------------------------------------------------------------------------------------
# A cell matches a glyph when their mean absolute difference is below this (glyphs differ in >= 5 of 15 cells, 0.33).
_MATCH_THRESHOLD = 0.25


def _ink(image: np.ndarray) -> np.ndarray:
    """Ink strength in [0, 1]: dark and unsaturated pixels (coloured shapes and backgrounds are not ink)."""
    luminance = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    chroma = image.max(-1) - image.min(-1)
    return np.clip((0.6 - luminance) / 0.3, 0.0, 1.0) * (chroma < 0.35)


def _split_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a 1-D mask as (start, stop)."""
    runs, start = [], None
    for i, value in enumerate(list(mask) + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    return runs


def read_text(image) -> str:
    """
    Reads the glyph string of an image by template matching; unreadable glyphs come out as `"?"`.

    The ink's row band gives the glyph height (hence the scale); columns with ink split the band into glyphs (a run
    as wide as several glyphs is cut evenly); each glyph is averaged down to the font's 3x5 grid and matched to the
    nearest template.

    Args:
        image (`torch.Tensor` or `np.ndarray` of shape `(3, H, W)`): an image in `[0, 1]`.
    """
    ink = _ink(_as_numpy_images(image)[0])
    mask = ink > 0.5
    rows = _split_runs(mask.sum(1) > 0)
    if not rows:
        return ""
    # The tallest band of inked rows is the text line; specks elsewhere are ignored.
    top, bottom = max(rows, key=lambda run: (run[1] - run[0], -run[0]))
    scale = (bottom - top) / GLYPH_HEIGHT
    if scale < 0.6:
        return ""
    band = ink[top:bottom]
    pitch = (GLYPH_WIDTH + 1) * scale
    text = []
    for start, stop in _split_runs((band > 0.5).sum(0) > 0):
        count = max(1, int(round((stop - start + scale) / pitch)))
        edges = np.linspace(start, stop + scale, count + 1)
        for left, right in zip(edges[:-1], edges[1:]):
            cell = band[:, int(round(left)) : max(int(round(left)) + 1, int(round(right - scale)))]
            if cell.shape[1] < 1:
                continue
            grid = _resample(cell, GLYPH_HEIGHT, GLYPH_WIDTH)
            distances = {letter: np.abs(grid - glyph).mean() for letter, glyph in GLYPHS.items()}
            letter = min(distances, key=distances.get)
            text.append(letter if distances[letter] < _MATCH_THRESHOLD else "?")
    return "".join(text)


def _resample(cell: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average a 2-D array onto a `height x width` grid."""
    rows = np.linspace(0, cell.shape[0], height + 1)
    cols = np.linspace(0, cell.shape[1], width + 1)
    out = np.zeros((height, width), dtype=np.float32)
    for i in range(height):
        r0, r1 = int(np.floor(rows[i])), max(int(np.floor(rows[i])) + 1, int(np.ceil(rows[i + 1])))
        for j in range(width):
            c0, c1 = int(np.floor(cols[j])), max(int(np.floor(cols[j])) + 1, int(np.ceil(cols[j + 1])))
            out[i, j] = cell[r0:r1, c0:c1].mean()
    return out


def edit_distance(a: str, b: str) -> int:
    """The Levenshtein distance between two strings."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def glyph_similarities(image, text: str) -> np.ndarray:
    """
    How close each asked glyph is to being drawn, at its place: per-glyph similarity, an OCR model's per-character
    confidence in miniature.

    The string is looked for where the renderer draws it (centred at the font's integer scale), at the best of the
    offsets of up to one pixel in each direction (wider searches let a glyph match the halves of two neighbours).
    Each glyph cell's ink is averaged down to the font's 3x5 grid `g` and compared with the asked letter's template
    `T`: `max(0, 1 - mean|g - T| / mean(T))`, i.e. 1 for the exact glyph, 0 for a blank cell, and for another letter
    what the two share (0.23 on average over this font's pairs, 0.56 at most). Every cell of every glyph moves the
    score, so an image that is almost right scores almost 1, where a hard reading would flip between right and wrong.

    Args:
        image (`torch.Tensor` or `np.ndarray` of shape `(3, H, W)`): an image in `[0, 1]`.
        text (`str`): the asked string.

    Returns:
        `np.ndarray` of shape `(len(text),)`, in `[0, 1]`.
    """
    ink = _ink(_as_numpy_images(image)[0])
    scale, x0, y0 = text_layout(len(text), ink.shape[0])
    pad = 1
    ink = np.pad(ink, pad)
    height, width, pitch = GLYPH_HEIGHT * scale, GLYPH_WIDTH * scale, (GLYPH_WIDTH + 1) * scale
    templates = np.stack([GLYPHS[letter] for letter in text])  # (L, 5, 3)
    best = None
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            top, left = pad + y0 + dy, pad + x0 + dx
            cells = np.stack(
                [ink[top : top + height, left + i * pitch : left + i * pitch + width] for i in range(len(text))]
            )
            grids = cells.reshape(len(text), GLYPH_HEIGHT, scale, GLYPH_WIDTH, scale).mean((2, 4))
            distance = np.abs(grids - templates).mean((1, 2)) / templates.mean((1, 2))
            similarity = np.clip(1.0 - distance, 0.0, 1.0)
            if best is None or similarity.sum() > best.sum():
                best = similarity
    return best


def _score_texts(prompts: Sequence[str], images, metadata: Optional[Sequence], score) -> list[float]:
    """`score(image (3, H, W), asked string)` of every image, 0 for a prompt that asks for no text."""
    scores = []
    for image, spec in zip(_as_numpy_images(images), _specs(prompts, metadata)):
        target = (spec or {}).get("text")
        scores.append(float(score(image.transpose(2, 0, 1), target)) if target else 0.0)
    return scores


def text_reward(prompts: Sequence[str], images, metadata: Optional[Sequence] = None, **kwargs) -> list[float]:
    """
    OCR-like reward of the text task: the mean over the asked glyphs of their similarity to the asked letter at its
    place ([`glyph_similarities`]). Dense partial credit: an edit distance over hard readings of a 3-glyph string has
    four levels and flips on a few pixels, which leaves GRPO a reward that is mostly noise; this one grows with every
    cell of every glyph that gets closer to the asked one.

    Args:
        prompts (`list[str]`): the prompts (parsed for the quoted string when `metadata` is not given).
        images (`torch.Tensor` of shape `(B, 3, H, W)`): images in `[0, 1]`.
        metadata (`list[str]`, *optional*): the JSON specs of [`~toy.prompts`].

    Returns:
        `list[float]`: one score in `[0, 1]` per image (0 for a prompt that asks for no text).
    """
    return _score_texts(prompts, images, metadata, lambda image, target: glyph_similarities(image, target).mean())


def exact_text_reward(prompts: Sequence[str], images, metadata: Optional[Sequence] = None, **kwargs) -> list[float]:
    """
    The hard OCR score, Flow-GRPO's convention: `1 - min(d, L) / L`, with `d` the edit distance between the asked
    string (of length `L`) and the string read by [`read_text`], and `d = 0` when the read string contains the asked
    one. A coarse check of [`text_reward`] (four levels for three glyphs), not a training reward.
    """

    def score(image: np.ndarray, target: str) -> float:
        read = read_text(image)
        distance = 0 if target in read else edit_distance(read, target)
        return 1.0 - min(distance, len(target)) / len(target)

    return _score_texts(prompts, images, metadata, score)


exact_text_reward.__name__ = "exact_text"
text_reward.__name__ = "text"


# ----- preference ----------------------------------------------------------------------------------------------------
def preference_reward(prompts: Optional[Sequence[str]] = None, images=None, **kwargs) -> list[float]:
    """
    Aesthetic-like preference of the toy world, the same for every prompt: vivid, colour-rich, clean images score high.

    `r = C^0.5 * K^0.2 * S^0.3`, a smooth product of
    - saturation `C = 1 - exp(-(m / 0.3)^4)`, `m` the mean chroma (max - min of RGB) over the image: a white
      background (m ~ 0.1) rates near 0, a pale tint (m ~ 0.25) about 0.5, a saturated one (m > 0.4) near 1;
    - colour spread `K = 1 - exp(-s / 0.08)`, `s` the RGB standard deviation over pixels (a flat image rates 0);
    - smoothness `S = exp(-TV / 0.1)`, `TV` the mean absolute difference of neighbouring pixels, so that noise and
      clutter do not pay.
    It partly conflicts with the other tasks, whose images (and detectors) want a white background.

    Args:
        prompts (`list[str]`, *optional*): ignored (the preference is prompt-independent).
        images (`torch.Tensor` of shape `(B, 3, H, W)`): images in `[0, 1]`.

    Returns:
        `list[float]`: one score in `[0, 1]` per image.
    """
    return preference_scores(images).tolist()


preference_reward.__name__ = "preference"


def preference_scores(images: torch.Tensor) -> torch.Tensor:
    """[`preference_reward`] as a differentiable `(B,)` tensor (float32, on the device of `images`)."""
    x = torch.as_tensor(images).float().clamp(0, 1)
    if x.ndim == 3:
        x = x[None]
    chroma = (x.amax(1) - x.amin(1)).mean((1, 2))
    spread = (x.var((2, 3), unbiased=False).mean(1) + 1e-12).sqrt()
    total_variation = 0.5 * (
        (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2, 3)) + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean((1, 2, 3))
    )
    saturation = 1 - torch.exp(-((chroma / 0.3) ** 4))
    colour_spread = 1 - torch.exp(-spread / 0.08)
    smoothness = torch.exp(-total_variation / 0.1)
    return saturation**0.5 * colour_spread**0.2 * smoothness**0.3


def reward_funcs() -> dict:
    """
    The toy world's reward per task: `{"compositional": ..., "text": ..., "preference": ...}`, ready for
    `DiffusionGRPOTrainer(reward_funcs=...)` (each prompt scored by its own task's reward).
    """
    return {"compositional": compositional_reward, "text": text_reward, "preference": preference_reward}
