"""
Rewards backed by optional packages: HPSv2.1 (through `open_clip`) and ImageReward (through `image-reward`).

Both packages pull torchvision (and pin versions of their own), so they are extras, imported on first use only.
"""

import logging
import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from .base import RewardModel, to_pil_images


logger = logging.getLogger(__name__)

__all__ = ["HPSv2Reward", "ImageRewardReward"]


class HPSv2Reward(RewardModel):
    """
    HPSv2.1 (Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on human preferences; the score is the cosine
    similarity of the image and prompt embeddings (about 0.25 to 0.33), as the HPSv2 package and Flow-GRPO compute it.
    Needs `pip install "diffusion-opd-trainer[hps]"` (`open_clip_torch`, which brings torchvision).

    Args:
        checkpoint (`str` or `os.PathLike`, defaults to `"xswu/HPSv2"`): a local `.pt` file, or a Hub repository
            holding `checkpoint_filename`. Read with `torch.load(weights_only=True)`.
        checkpoint_filename (`str`, defaults to `"HPS_v2.1_compressed.pt"`): the file in the Hub repository.
        architecture (`str`, defaults to `"ViT-H-14"`): the open_clip architecture of the checkpoint.
        **kwargs: `device`, `dtype`, `batch_size`, `name` of [`RewardModel`].
    """

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: Union[str, os.PathLike] = "xswu/HPSv2",
        checkpoint_filename: str = "HPS_v2.1_compressed.pt",
        architecture: str = "ViT-H-14",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.checkpoint, self.checkpoint_filename, self.architecture = checkpoint, checkpoint_filename, architecture

    def load_models(self) -> None:
        try:
            import open_clip
        except ImportError as error:
            raise ImportError('HPSv2 needs open_clip: pip install "diffusion-opd-trainer[hps]".') from error
        path = os.fspath(self.checkpoint)
        if not os.path.exists(path):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(path, self.checkpoint_filename)
        # No pretrained download: the checkpoint holds every weight of the model.
        model, _, self.preprocess = open_clip.create_model_and_transforms(self.architecture, pretrained=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(self.architecture)

    def score_batch(self, prompts, images, **columns) -> list[Optional[float]]:
        pixels = torch.stack([self.preprocess(image) for image in to_pil_images(images)]).to(self.device, self.dtype)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        image_embeds = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_embeds = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_embeds * text_embeds).sum(-1).tolist()


class ImageRewardReward(RewardModel):
    """
    ImageReward (Xu et al., 2023) through its package (`ImageReward.load`): a BLIP-based preference model, scores
    roughly standardised (mean 0, std 1 on its training set). Needs `pip install "diffusion-opd-trainer[imagereward]"`
    (`image-reward`).

    Args:
        model (`str`, defaults to `"ImageReward-v1.0"`): the name or local checkpoint given to `ImageReward.load`.
        **kwargs: `device`, `dtype`, `batch_size`, `name` of [`RewardModel`].
    """

    name = "image_reward"

    def __init__(self, model: str = "ImageReward-v1.0", **kwargs):
        super().__init__(**kwargs)
        self.model_name = model

    def load_models(self) -> None:
        try:
            import ImageReward
        except ImportError as error:
            raise ImportError(
                'ImageReward needs the image-reward package: pip install "diffusion-opd-trainer[imagereward]".'
            ) from error
        self.model = ImageReward.load(self.model_name, device=str(self.device))

    def score_batch(self, prompts, images, **columns) -> list[Optional[float]]:
        # The package scores one prompt against a list of images: group images by prompt.
        pil_images = to_pil_images(images)
        scores: list[Any] = [None] * len(prompts)
        for prompt in dict.fromkeys(prompts):
            indices = [i for i, p in enumerate(prompts) if p == prompt]
            values = self.model.score(prompt, [pil_images[i] for i in indices])
            values = values if isinstance(values, list) else [values]
            for index, value in zip(indices, values):
                scores[index] = float(value)
        return scores
