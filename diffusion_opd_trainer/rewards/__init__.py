"""
Reward functions with the library's signature, `reward(prompts=list[str], images=Tensor[B, 3, H, W] in [0, 1],
**columns) -> list[float | None]`, and a registry naming them.

| name                     | class                    | model (default)                                        |
|--------------------------|--------------------------|--------------------------------------------------------|
| `jpeg_compressibility`   | `JpegCompressibility`    | none                                                   |
| `jpeg_incompressibility` | `JpegIncompressibility`  | none                                                   |
| `pickscore`              | `PickScoreReward`        | `yuvalkirstain/PickScore_v1` (+ CLIP-H processor)      |
| `clip_score`             | `CLIPScoreReward`        | `openai/clip-vit-large-patch14`                        |
| `aesthetic`              | `AestheticReward`        | `openai/clip-vit-large-patch14` + LAION MLP head       |
| `ocr`                    | `OCRReward`              | `microsoft/trocr-base-printed` (or PaddleOCR)          |
| `geneval`                | `GenEvalReward`          | `facebook/mask2former-swin-small-coco-instance` + CLIP |
| `geneval_strict`         | `GenEvalReward(strict)`  | same, binary score                                     |
| `hpsv2`                  | `HPSv2Reward`            | `xswu/HPSv2` (`HPS_v2.1_compressed.pt`), extra `hps`   |
| `image_reward`           | `ImageRewardReward`      | `ImageReward-v1.0`, extra `imagereward`                |

See `docs/rewards.md`.
"""

from .base import RewardModel, to_pil_images, to_uint8_images
from .clip import AestheticMLP, AestheticReward, CLIPRewardModel, CLIPScoreReward, PickScoreReward
from .extras import HPSv2Reward, ImageRewardReward
from .geneval import GenEvalReward, GenEvalRules, evaluate_geneval, geneval_overall, relative_position
from .jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from .ocr import OCRReward, extract_quoted_text, levenshtein, ocr_reward
from .registry import get_reward, list_rewards, register_reward, reward_name


__all__ = [
    "AestheticMLP",
    "AestheticReward",
    "CLIPRewardModel",
    "CLIPScoreReward",
    "GenEvalReward",
    "GenEvalRules",
    "HPSv2Reward",
    "ImageRewardReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "OCRReward",
    "PickScoreReward",
    "RewardModel",
    "evaluate_geneval",
    "extract_quoted_text",
    "geneval_overall",
    "get_reward",
    "jpeg_size_kb",
    "levenshtein",
    "list_rewards",
    "ocr_reward",
    "register_reward",
    "relative_position",
    "reward_name",
    "to_pil_images",
    "to_uint8_images",
]


def _geneval_strict(**kwargs) -> GenEvalReward:
    return GenEvalReward(strict=True, **kwargs)


for _name, _factory in (
    ("jpeg_compressibility", JpegCompressibility),
    ("jpeg_incompressibility", JpegIncompressibility),
    ("pickscore", PickScoreReward),
    ("clip_score", CLIPScoreReward),
    ("aesthetic", AestheticReward),
    ("ocr", OCRReward),
    ("geneval", GenEvalReward),
    ("geneval_strict", _geneval_strict),
    ("hpsv2", HPSv2Reward),
    ("image_reward", ImageRewardReward),
):
    register_reward(_name, _factory)
