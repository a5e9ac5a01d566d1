"""The text-rendering (OCR) reward of Flow-GRPO and DiffusionOPD, with a PaddleOCR and a transformers backend."""

import logging
import os
import re
from typing import Any, Optional, Union

import numpy as np
import torch

from .base import RewardModel, load_component, to_pil_images, to_uint8_images


logger = logging.getLogger(__name__)

__all__ = [
    "OCRReward",
    "PaddleOCRBackend",
    "TransformersOCRBackend",
    "extract_quoted_text",
    "levenshtein",
    "normalize_ocr_text",
    "ocr_reward",
]

TROCR_MODEL_ID = "microsoft/trocr-base-printed"

# Straight double quotes, or typographic ones (a prompt pasted from a word processor).
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions, each costing 1) between `a` and `b`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalize_ocr_text(text: str) -> str:
    """Lower case, whitespace removed: the comparison is blind to case and to how the OCR splits words and lines."""
    return re.sub(r"\s+", "", text).lower()


def extract_quoted_text(prompt: str) -> Optional[str]:
    """
    The text a prompt asks to render: its first double-quoted span (`'a sign saying "Open 24h"'` -> `"Open 24h"`).

    Single quotes are not read as delimiters (they are apostrophes far more often). Returns `None` without quotes.
    """
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def ocr_reward(recognized: str, target: str) -> Optional[float]:
    """
    `1 - min(d, len(target)) / len(target)`, with `d` the Levenshtein distance between the recognised text and the
    target after [`normalize_ocr_text`], and `d = 0` when the target appears inside the recognised text (the image
    may hold more text than asked for).

    Returns `None` when the normalised target is empty (nothing to read: the reward does not apply).
    """
    recognized, target = normalize_ocr_text(recognized), normalize_ocr_text(target)
    if not target:
        return None
    distance = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1.0 - distance / len(target)


class TransformersOCRBackend:
    """
    Text recognition with a transformers `VisionEncoderDecoderModel` (TrOCR by default), no remote code.

    TrOCR reads one line of printed text from the whole image: it suits the short quoted texts of the OCR task, which
    fill a good part of the image, but it is not a scene-text detector (PaddleOCR detects text boxes first).

    Args:
        model (`str`, `os.PathLike` or `VisionEncoderDecoderModel`, defaults to `"microsoft/trocr-base-printed"`).
        processor (`str`, `os.PathLike` or processor, *optional*): defaults to `model` when that is an id or a path.
        max_new_tokens (`int`, defaults to 32): the longest read.
        num_beams (`int`, defaults to 1): beam search width (greedy by default: deterministic and fastest).
    """

    def __init__(
        self,
        model: Any = TROCR_MODEL_ID,
        processor: Any = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
    ):
        if processor is None:
            if not isinstance(model, (str, os.PathLike)):
                raise ValueError("Pass the `processor` along with a loaded OCR `model`.")
            processor = model
        self.model_source, self.processor_source = model, processor
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        self.model = load_component(self.model_source, VisionEncoderDecoderModel)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.processor = load_component(self.processor_source, AutoProcessor)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def recognize(self, images: torch.Tensor) -> list[str]:
        pixel_values = self.processor(images=to_pil_images(images), return_tensors="pt").pixel_values
        generated = self.model.generate(
            pixel_values.to(self.device, self.dtype),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
        )
        return self.processor.batch_decode(generated, skip_special_tokens=True)


class PaddleOCRBackend:
    """
    Text recognition with PaddleOCR (the paper's and Flow-GRPO's OCR), English, no angle classifier: detected text
    boxes are read and joined in PaddleOCR's reading order. Needs `pip install "diffusion-opd-trainer[ocr]"`
    (`paddleocr` and `paddlepaddle` or `paddlepaddle-gpu`); PaddleOCR 2.x (`ocr.ocr`) and 3.x (`ocr.predict`) both
    work.

    Args:
        lang (`str`, defaults to `"en"`): the recognition language.
        ocr (*optional*): an already built `paddleocr.PaddleOCR` instance (its other options are yours).
    """

    def __init__(self, lang: str = "en", ocr: Any = None):
        self.lang, self.ocr = lang, ocr

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.ocr is not None:
            return
        try:
            import paddleocr
        except ImportError as error:
            raise ImportError(
                "The PaddleOCR backend needs `paddleocr` and `paddlepaddle`: "
                'pip install "diffusion-opd-trainer[ocr]" (or `backend="transformers"`).'
            ) from error
        major = int(str(getattr(paddleocr, "__version__", "2")).split(".")[0])
        if major >= 3:
            self.ocr = paddleocr.PaddleOCR(
                lang=self.lang,
                use_doc_orientation_classify=False,
                use_doc_unwarping=False,
                use_textline_orientation=False,
                device="gpu" if device.type == "cuda" else "cpu",
            )
        else:
            self.ocr = paddleocr.PaddleOCR(
                use_angle_cls=False, lang=self.lang, use_gpu=device.type == "cuda", show_log=False
            )

    def _read_one(self, array: np.ndarray) -> str:
        if hasattr(self.ocr, "predict"):  # PaddleOCR 3.x: one result per image, texts in `rec_texts`
            results = self.ocr.predict(array)
            return "".join(text for result in results for text in result["rec_texts"])
        result = self.ocr.ocr(array, cls=False)  # PaddleOCR 2.x: [[box, (text, confidence)], ...] per image
        lines = result[0] if result and result[0] else []
        return "".join(line[1][0] for line in lines)

    def recognize(self, images: torch.Tensor) -> list[str]:
        # PaddleOCR expects BGR arrays (OpenCV's order).
        return [self._read_one(np.ascontiguousarray(array[..., ::-1])) for array in to_uint8_images(images)]


class OCRReward(RewardModel):
    """
    The text-rendering reward: `1 - min(Levenshtein, len(target)) / len(target)` between the text read in the image
    and the target (see [`ocr_reward`]), the target being the first double-quoted text of the prompt (or the
    `ocr_text` column, when the dataset has one). Images whose prompt has no target get `None`.

    Args:
        backend (`str` or backend object, defaults to `"transformers"`): `"transformers"` (TrOCR, no extra
            dependency), `"paddleocr"` (the paper's, an optional extra), or an object with `load(device, dtype)` and
            `recognize(images) -> list[str]`.
        model (*optional*): for the transformers backend, the `VisionEncoderDecoderModel` (id, path or object).
        processor (*optional*): its processor.
        max_new_tokens (`int`, defaults to 32): the transformers backend's longest read.
        **kwargs: `device`, `dtype`, `batch_size`, `name` of [`RewardModel`].
    """

    name = "ocr"

    def __init__(
        self,
        backend: Union[str, Any] = "transformers",
        model: Any = TROCR_MODEL_ID,
        processor: Any = None,
        max_new_tokens: int = 32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if backend == "transformers":
            backend = TransformersOCRBackend(model, processor, max_new_tokens=max_new_tokens)
        elif backend == "paddleocr":
            backend = PaddleOCRBackend()
        elif isinstance(backend, str):
            raise ValueError(f"Unknown OCR backend {backend!r}: use 'transformers', 'paddleocr' or a backend object.")
        self.backend = backend

    def load_models(self) -> None:
        self.backend.load(self.device, self.dtype)

    def to(self, device) -> "OCRReward":
        super().to(device)
        # The backend holds the model (not an attribute of the reward): move it, or let the next load place it.
        if self._loaded and isinstance(getattr(self.backend, "model", None), torch.nn.Module):
            self.backend.model.to(self.device)
            self.backend.device = self.device
        return self

    def recognize(self, images: torch.Tensor) -> list[str]:
        """The raw text read in each image (loads the backend if needed)."""
        self.load()
        texts = []
        for start in range(0, len(images), self.batch_size):
            texts.extend(self.backend.recognize(images[start : start + self.batch_size]))
        return texts

    def score_batch(self, prompts, images, ocr_text=None, **columns) -> list[Optional[float]]:
        targets = list(ocr_text) if ocr_text is not None else [extract_quoted_text(prompt) for prompt in prompts]
        rewards: list[Optional[float]] = [None] * len(prompts)
        # Only images with a target are read: OCR is the expensive part.
        todo = [index for index, target in enumerate(targets) if target]
        if todo:
            texts = self.backend.recognize(images[todo])
            for index, text in zip(todo, texts):
                rewards[index] = ocr_reward(text, targets[index])
        return rewards
