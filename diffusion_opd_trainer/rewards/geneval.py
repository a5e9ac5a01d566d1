"""
GenEval (Ghosh et al., 2023) on transformers: Mask2Former instance segmentation on COCO, CLIP ViT-L/14 colours, and
GenEval's rules on its JSONL metadata, without mmdet.

The rule engine is a pure function on detections, [`evaluate_geneval`]; [`GenEvalReward`] runs the models and feeds
it. Where GenEval's code leaves a choice open, the choice made here is written next to it ("Interpretation").

Metadata (one JSON object per prompt, GenEval's `evaluation_metadata.jsonl`):
`{"tag": "counting", "prompt": "a photo of three cats", "include": [{"class": "cat", "count": 3}],
"exclude": [{"class": "cat", "count": 4}]}`; an `include` clause may add `"color": "red"` and
`"position": ["left of", 0]` (this clause's objects must lie left of the objects that matched include clause 0).
"""

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import RewardModel, load_component, to_pil_images
from .clip import CLIP_L14_ID, clip_image_embeds, clip_text_embeds


logger = logging.getLogger(__name__)

__all__ = [
    "COLORS",
    "GENEVAL_CLASSES",
    "GenEvalReward",
    "GenEvalRules",
    "evaluate_geneval",
    "geneval_overall",
    "relative_position",
    "select_objects",
]

MASK2FORMER_ID = "facebook/mask2former-swin-small-coco-instance"

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS = ("left of", "right of", "above", "below")

# GenEval's class names (its `object_names.txt`), in COCO's 80-class order. Three differ from COCO's own names
# (`remote`, `mouse`, `keyboard`): GenEval's prompts disambiguate them. A detector with exactly 80 labels is mapped
# to these names by index, as GenEval maps mmdet's class indices.
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# COCO names (and their common variants in detector configs) -> GenEval names, for detectors without 80 labels.
_COCO_ALIASES = {
    "remote": "tv remote",
    "mouse": "computer mouse",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
}
# The colour classifier's prompt templates (GenEval's three), averaged per colour.
COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """
    Where box A lies relative to box B, as GenEval judges it: a subset of `{"left of", "right of", "above",
    "below"}` (image coordinates: y grows downwards).

    The offset between the boxes' centres is shrunk, on each axis, by `margin` times the sum of the two boxes' sizes
    on that axis (clamped at 0), then divided by the length of the original offset: a relation holds when its
    component exceeds 0.5. Overlapping or nearly aligned objects therefore have no relation on that axis, and a
    diagonal offset can hold two relations. Concentric boxes (or an offset within the margin on both axes) give the
    empty set.

    Args:
        box_a (`Sequence[float]`), box_b (`Sequence[float]`): `(x0, y0, x1, y1)` in pixels.
        margin (`float`, defaults to 0.1): GenEval's position threshold.
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - margin * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _parse_metadata(metadata: Union[str, dict]) -> dict:
    metadata = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
    if metadata.get("tag") not in TAGS:
        raise ValueError(f"GenEval metadata has tag {metadata.get('tag')!r}; expected one of {TAGS}.")
    return metadata


@dataclass(frozen=True)
class GenEvalRules:
    """
    GenEval's settings, as in its evaluation script.

    Args:
        threshold (`float`, defaults to 0.3): a detection counts when its score is strictly above this.
        counting_threshold (`float`, defaults to 0.9): the same cut-off for a `counting` prompt.
        max_objects (`int`, defaults to 16): detections kept per class.
        position_threshold (`float`, defaults to 0.1): the margin of [`relative_position`].
    """

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_threshold: float = 0.1


def select_objects(
    metadata: Union[str, dict], detections: Sequence[dict], rules: GenEvalRules = GenEvalRules()
) -> dict[str, list[dict]]:
    """
    GenEval's detection filter: per class, the detections scoring strictly above the threshold
    (`rules.counting_threshold` for a `counting` prompt, `rules.threshold` otherwise), by decreasing score, at most
    `rules.max_objects` of them.

    GenEval's optional non-maximum suppression (`max_overlap`) is off by default there and not implemented here.

    Returns:
        `dict[str, list[dict]]`: class name -> its kept detections (classes without any are absent).
    """
    metadata = _parse_metadata(metadata)
    cutoff = rules.counting_threshold if metadata["tag"] == "counting" else rules.threshold
    objects: dict[str, list[dict]] = {}
    # A stable sort: equal scores keep the detector's order, as GenEval's argsort of a reversed array nearly does.
    for detection in sorted(detections, key=lambda d: -float(d["score"])):
        if float(detection["score"]) > cutoff:
            kept = objects.setdefault(detection["label"], [])
            if len(kept) < rules.max_objects:
                kept.append(detection)
    return objects


def evaluate_geneval(
    metadata: Union[str, dict], detections: Sequence[dict], rules: GenEvalRules = GenEvalRules()
) -> tuple[bool, float]:
    """
    GenEval's rules on one image's detections: the binary GenEval verdict and the partial-credit training reward.

    Detections are filtered by [`select_objects`]. Then, in order, each `include` clause `{class, count, color?,
    position?}` passes when:
    - at least `count` objects of `class` are kept (the exact count of a counting prompt is enforced by its
      `exclude` clause, as in GenEval);
    - with `color`: the `count` highest-scoring of them all have that colour (their `color` key);
    - with `position: [relation, i]`: include clause `i` passed, and every one of this clause's `count` objects stands
      in `relation` ([`relative_position`]) to every object that clause `i` matched (its `count` best).
    An `exclude` clause `{class, count}` fails when `count` or more objects of `class` are kept.

    - **Binary score** (evaluation): every include clause passes and no exclude clause fails.
    - **Reward** (training, Flow-GRPO's partial credit): the mean over include clauses of each clause's credit. For a
      `counting` prompt a clause earns `max(0, 1 - |n - N| / N)`, `n` being the number of kept objects of its class
      (above the counting threshold): missing and extra objects both cost credit. Any other clause earns 1 if it
      passes, else 0. Exclude clauses do not enter the reward (the counting credit already penalises extras).

    Interpretation: a detection whose colour is needed but missing (no `color` key) does not have the colour.
    Metadata without include clauses gets a reward equal to its binary score.

    Args:
        metadata (`dict` or JSON `str`): one line of GenEval's `evaluation_metadata.jsonl`.
        detections (`Sequence[dict]`): every detection of the image, with `label` (a GenEval class name), `score`,
            `box` (`(x0, y0, x1, y1)`, pixels) and optionally `color` (one of [`COLORS`]).
        rules ([`GenEvalRules`], defaults to GenEval's settings): thresholds and the per-class cap.

    Returns:
        `tuple[bool, float]`: `(correct, reward)`.
    """
    metadata = _parse_metadata(metadata)
    objects = select_objects(metadata, detections, rules)
    counting = metadata["tag"] == "counting"
    correct = True
    credits: list[float] = []
    matched_groups: list[Optional[list[dict]]] = []
    for clause in metadata.get("include", []):
        count = int(clause["count"])
        found = objects.get(clause["class"], [])[:count]
        matched = len(found) >= count
        if matched and "color" in clause:
            matched = sum(obj.get("color") == clause["color"] for obj in found) >= count
        if matched and "position" in clause:
            relation, target = clause["position"]
            # Interpretation: a position pointing at a clause that does not exist (malformed metadata) fails.
            targets = matched_groups[target] if 0 <= target < len(matched_groups) else None
            matched = targets is not None and all(
                relation in relative_position(obj["box"], other["box"], rules.position_threshold)
                for obj in found
                for other in targets
            )
        matched_groups.append(found if matched else None)
        correct = correct and matched
        if counting:
            detected = len(objects.get(clause["class"], []))
            credits.append(max(0.0, 1.0 - abs(detected - count) / count))
        else:
            credits.append(1.0 if matched else 0.0)
    for clause in metadata.get("exclude", []):
        if len(objects.get(clause["class"], [])) >= int(clause["count"]):
            correct = False
    reward = float(np.mean(credits)) if credits else float(correct)
    return correct, reward


def geneval_overall(correct: Sequence[Optional[float]], tags: Sequence[str]) -> float:
    """GenEval's overall score: the mean over tags of each tag's accuracy (`None` entries are left out)."""
    per_tag: dict[str, list[float]] = {}
    for value, tag in zip(correct, tags):
        if value is not None:
            per_tag.setdefault(tag, []).append(float(value))
    return float(np.mean([np.mean(values) for values in per_tag.values()])) if per_tag else float("nan")


class GenEvalReward(RewardModel):
    """
    GenEval with transformers models: Mask2Former (COCO instance segmentation, the detector family of GenEval) finds
    the objects, CLIP ViT-L/14 names the colour of each masked object, [`evaluate_geneval`] applies the rules.

    The call returns the partial-credit reward (or the binary score with `strict=True`); `compute_metrics` returns both
    (`geneval`: binary, `geneval_reward`: partial credit), and the harness aggregates `geneval` as GenEval does (mean
    of per-tag accuracies). Each image needs its GenEval metadata in a `metadata` column (a dict or a JSON string);
    images without one get `None`.

    Detector post-processing follows mmdet's Mask2Former (GenEval's): the `max_per_image` best (query, class) pairs,
    each scored by its class probability times its mean mask probability, masks binarised at logit 0 at the image's
    size, boxes from the masks. Interpretation: mmdet resizes the image to fit 1333 x 800 before detection; here
    `detector_size` does the same, and `None` keeps the processor's own size (faster, slightly different scores).

    Colour: the object is cut out with its mask onto a grey (`#999999`) background, cropped to its box, and classified
    zero-shot against the ten colours, each colour's text embedding being the normalised mean of the three normalised
    templates of [`COLOR_TEMPLATES`] (`"a photo of a {color} {object}"`, ...), as GenEval does with open_clip.

    Args:
        detector (`str`, `os.PathLike` or `Mask2FormerForUniversalSegmentation`, defaults to
            `"facebook/mask2former-swin-small-coco-instance"`): the instance segmenter.
        detector_processor (*optional*): its image processor; defaults to `detector` when that is an id or a path.
        clip_model (`str`, `os.PathLike` or `CLIPModel`, defaults to `"openai/clip-vit-large-patch14"`).
        clip_processor (*optional*): its processor; defaults to `clip_model` when that is an id or a path.
        strict (`bool`, defaults to `False`): return the binary score instead of the partial-credit reward.
        threshold (`float`, defaults to 0.3), counting_threshold (`float`, defaults to 0.9), max_objects (`int`,
            defaults to 16), position_threshold (`float`, defaults to 0.1): GenEval's settings.
        max_per_image (`int`, defaults to 100): detections kept per image before thresholds (mmdet's `max_per_image`).
        detector_size (`tuple[int, int]`, *optional*, defaults to `(800, 1333)`): shortest and longest edge of the
            detector's input.
        batch_size (`int`, defaults to 8): images per detector pass.
        **kwargs: `device`, `dtype`, `name` of [`RewardModel`].
    """

    name = "geneval"

    def __init__(
        self,
        detector: Any = MASK2FORMER_ID,
        detector_processor: Any = None,
        clip_model: Any = CLIP_L14_ID,
        clip_processor: Any = None,
        strict: bool = False,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        position_threshold: float = 0.1,
        max_per_image: int = 100,
        detector_size: Optional[tuple[int, int]] = (800, 1333),
        batch_size: int = 8,
        **kwargs,
    ):
        super().__init__(batch_size=batch_size, **kwargs)
        for source, processor, what in (
            (detector, detector_processor, "detector"),
            (clip_model, clip_processor, "clip"),
        ):
            if processor is None and not isinstance(source, (str, os.PathLike)):
                raise ValueError(f"Pass the {what} processor along with a loaded {what} model.")
        self.detector_source = detector
        self.detector_processor_source = detector_processor if detector_processor is not None else detector
        self.clip_source = clip_model
        self.clip_processor_source = clip_processor if clip_processor is not None else clip_model
        self.strict = strict
        self.rules = GenEvalRules(threshold, counting_threshold, max_objects, position_threshold)
        self.max_per_image = max_per_image
        self.detector_size = detector_size
        self._color_classifiers: dict[str, torch.Tensor] = {}

    def load_models(self) -> None:
        import importlib.util

        from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, Mask2FormerForUniversalSegmentation

        if isinstance(self.detector_source, (str, os.PathLike)) and importlib.util.find_spec("scipy") is None:
            # transformers builds Mask2Former's training loss (a Hungarian matcher) in the constructor.
            raise ImportError('GenEval\'s Mask2Former needs scipy: pip install "diffusion-opd-trainer[geneval]".')
        self.detector = load_component(self.detector_source, Mask2FormerForUniversalSegmentation)
        self.detector_processor = load_component(self.detector_processor_source, AutoImageProcessor)
        self.clip_model = load_component(self.clip_source, CLIPModel)
        self.clip_processor = load_component(self.clip_processor_source, AutoProcessor)
        id2label = {int(key): value for key, value in self.detector.config.id2label.items()}
        if len(id2label) == len(GENEVAL_CLASSES):
            self.class_names = list(GENEVAL_CLASSES)
        else:
            self.class_names = [_COCO_ALIASES.get(id2label[i], id2label[i]) for i in range(len(id2label))]
        self._color_classifiers = {}

    # ----------------------------------------------------------------------------------------------- detection
    @torch.no_grad()
    def detect(self, images) -> list[list[dict]]:
        """
        Instance segmentation of a batch: per image, a list of `{label, score, box, mask}` (mask: `(H, W)` bool numpy
        array at the image's size), before any threshold.

        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`, or a list of PIL images).
        """
        self.load()
        pil_images = to_pil_images(images)
        size = None
        if self.detector_size is not None:
            size = {"shortest_edge": self.detector_size[0], "longest_edge": self.detector_size[1]}
        inputs = self.detector_processor(images=pil_images, return_tensors="pt", **({"size": size} if size else {}))
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        pixel_mask = inputs.get("pixel_mask")
        outputs = self.detector(
            pixel_values=pixel_values, pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device)
        )
        class_logits = outputs.class_queries_logits.float()  # (B, Q, K + 1), the last class is "no object"
        mask_logits = outputs.masks_queries_logits.float()  # (B, Q, h, w) at a quarter of the input size
        mask_logits = F.interpolate(mask_logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        results = []
        for index, image in enumerate(pil_images):
            # Crop away the padding the processor added, then resize to the image (mmdet's order of operations).
            if pixel_mask is not None:
                valid = pixel_mask[index].bool()
                height, width = int(valid.any(1).sum()), int(valid.any(0).sum())
            else:
                height, width = pixel_values.shape[-2:]
            logits = mask_logits[index, :, :height, :width]
            logits = F.interpolate(logits[None], size=image.size[::-1], mode="bilinear", align_corners=False)[0]
            results.append(self._instances(class_logits[index], logits))
        return results

    def _instances(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> list[dict]:
        num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
        probs = class_logits.softmax(-1)[:, :-1]
        top = min(self.max_per_image, num_queries * num_classes)
        scores, flat = probs.flatten().topk(top)
        labels = flat % num_classes
        # A query can rank with several classes: its mask, mask score and box are computed once.
        queries, inverse = (flat // num_classes).unique(return_inverse=True)
        logits = mask_logits[queries]
        masks = logits > 0
        # mmdet's instance score: class probability times the mean sigmoid of the mask over its own pixels.
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        scores = (scores * mask_scores[inverse]).tolist()
        # mmdet's mask2bbox: from the first to one past the last row / column holding a mask pixel; empty masks get
        # a zero box.
        rows, cols = masks.any(2), masks.any(1)
        height, width = rows.shape[1], cols.shape[1]
        boxes = torch.stack(
            [
                cols.float().argmax(1),
                rows.float().argmax(1),
                width - cols.flip(1).float().argmax(1),
                height - rows.flip(1).float().argmax(1),
            ],
            dim=1,
        ).float()
        boxes[~rows.any(1)] = 0.0
        boxes, masks = boxes.tolist(), masks.cpu().numpy()
        return [
            {"label": self.class_names[label], "score": score, "box": boxes[query], "mask": masks[query]}
            for label, score, query in zip(labels.tolist(), scores, inverse.tolist())
        ]

    # ----------------------------------------------------------------------------------------------- colours
    def _color_classifier(self, class_name: str) -> torch.Tensor:
        if class_name not in self._color_classifiers:
            texts = [
                template.format(color=color, object=class_name) for color in COLORS for template in COLOR_TEMPLATES
            ]
            tokens = self.clip_processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            embeds = clip_text_embeds(
                self.clip_model, tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            )
            embeds = F.normalize(embeds, dim=-1).view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._color_classifiers[class_name] = F.normalize(embeds, dim=-1)
        return self._color_classifiers[class_name]

    @torch.no_grad()
    def classify_colors(self, image: Image.Image, objects: Sequence[dict], class_name: str) -> list[str]:
        """The colour of each object (its `mask` on a grey background, cropped to its `box`), by CLIP zero-shot."""
        if not objects:
            return []
        image = image.convert("RGB")
        background = Image.new("RGB", image.size, color="#999")
        crops = []
        for obj in objects:
            mask = obj.get("mask")
            crop = image if mask is None else Image.composite(image, background, Image.fromarray(mask))
            crops.append(crop.crop(tuple(obj["box"][:4])))
        pixel_values = self.clip_processor.image_processor(images=crops, return_tensors="pt").pixel_values
        embeds = F.normalize(clip_image_embeds(self.clip_model, pixel_values.to(self.device, self.dtype)), dim=-1)
        return [COLORS[index] for index in (embeds @ self._color_classifier(class_name).T).argmax(-1).tolist()]

    # ----------------------------------------------------------------------------------------------- scoring
    def evaluate_images(
        self, images, metadata: Sequence[Union[str, dict, None]]
    ) -> list[Optional[tuple[bool, float]]]:
        """`(correct, reward)` per image (`None` where its metadata is `None`), detections and colours included."""
        pil_images = to_pil_images(images)
        detections = self.detect(pil_images)
        results = []
        for image, image_detections, meta in zip(pil_images, detections, metadata):
            if meta is None:
                results.append(None)
                continue
            meta = _parse_metadata(meta)
            objects = select_objects(meta, image_detections, self.rules)
            # Only the objects a colour clause looks at (its `count` best) are classified, as in GenEval.
            for clause in meta.get("include", []):
                if "color" in clause:
                    found = objects.get(clause["class"], [])[: int(clause["count"])]
                    for obj, color in zip(found, self.classify_colors(image, found, clause["class"])):
                        obj["color"] = color
            results.append(evaluate_geneval(meta, image_detections, self.rules))
        return results

    def _batch_outputs(self, images, metadata) -> list[Optional[tuple[bool, float]]]:
        if metadata is None:
            logger.warning("GenEval needs a `metadata` column (GenEval's JSONL metadata per prompt); got none.")
            return [None] * len(images)
        return self.evaluate_images(images, list(metadata))

    def score_batch(self, prompts, images, metadata=None, **columns) -> list[Optional[float]]:
        outputs = self._batch_outputs(images, metadata)
        return [None if out is None else float(out[0]) if self.strict else out[1] for out in outputs]

    def compute_metrics(self, prompts, images, **columns) -> dict[str, list[Optional[float]]]:
        outputs: list = []

        def batch(prompts_, images_, metadata=None, **rest):
            outputs.extend(self._batch_outputs(images_, metadata))
            return [None] * len(prompts_)

        self.map_batches(batch, prompts, images, **columns)
        return {
            self.name: [None if out is None else float(out[0]) for out in outputs],
            f"{self.name}_reward": [None if out is None else out[1] for out in outputs],
        }

    def aggregate(self, metric: str, values: list[Optional[float]], columns: dict[str, list]) -> float:
        if metric != self.name or "metadata" not in columns:
            return super().aggregate(metric, values, columns)
        tags = [None if meta is None else _parse_metadata(meta)["tag"] for meta in columns["metadata"]]
        return geneval_overall(values, tags)
