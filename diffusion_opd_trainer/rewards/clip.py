"""CLIP-based rewards: PickScore, CLIPScore and the LAION aesthetic predictor."""

import logging
import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPModel

from .base import RewardModel, load_component, to_pil_images


logger = logging.getLogger(__name__)

__all__ = [
    "AESTHETIC_HEAD_URL",
    "AestheticMLP",
    "AestheticReward",
    "CLIPRewardModel",
    "CLIPScoreReward",
    "PickScoreReward",
    "clip_image_embeds",
    "clip_text_embeds",
]

# The real checkpoints (see docs/rewards.md for the files each one needs).
PICKSCORE_MODEL_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14_ID = "openai/clip-vit-large-patch14"
# The improved aesthetic predictor's head, from its authors' repository (the file DDPO and Flow-GRPO load).
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


def clip_image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected (unnormalised) CLIP image embeddings, in float32."""
    # Calling the towers directly rather than `get_image_features` keeps one code path across transformers 4 (which
    # returns a tensor) and 5 (which returns a model output).
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled).float()


def clip_text_embeds(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The projected (unnormalised) CLIP text embeddings, in float32."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled).float()


class CLIPRewardModel(RewardModel):
    """
    Shared plumbing of the CLIP-based rewards: loads a `CLIPModel` and its processor, embeds images and prompts.

    Args:
        model (`str`, `os.PathLike` or `CLIPModel`): a Hub id, a local folder, or a loaded model.
        processor (`str`, `os.PathLike` or `CLIPProcessor`, *optional*): the processor (tokenizer + image
            processor); defaults to `model` when that is an id or a path.
        **kwargs: `device`, `dtype`, `batch_size`, `name` of [`RewardModel`].
    """

    def __init__(self, model: Union[str, os.PathLike, CLIPModel], processor: Any = None, **kwargs):
        super().__init__(**kwargs)
        if processor is None:
            if not isinstance(model, (str, os.PathLike)):
                raise ValueError("Pass the `processor` along with a loaded `model`.")
            processor = model
        self.model_source, self.processor_source = model, processor

    def load_models(self) -> None:
        self.model = load_component(self.model_source, CLIPModel)
        self.processor = load_component(self.processor_source, AutoProcessor)

    def _text_max_length(self) -> int:
        tokenizer_max = getattr(self.processor.tokenizer, "model_max_length", None) or 77
        return min(tokenizer_max, self.model.config.text_config.max_position_embeddings)

    def embed_images(self, images) -> torch.Tensor:
        """L2-normalised image embeddings `(B, D)` of a `(B, 3, H, W)` tensor in `[0, 1]` or a list of PIL images."""
        pixel_values = self.processor.image_processor(images=to_pil_images(images), return_tensors="pt").pixel_values
        embeds = clip_image_embeds(self.model, pixel_values.to(self.device, self.dtype))
        return F.normalize(embeds, dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings `(B, D)`; texts longer than the text tower are truncated."""
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._text_max_length(), return_tensors="pt"
        )
        embeds = clip_text_embeds(self.model, tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        return F.normalize(embeds, dim=-1)

    def cosine(self, prompts: list[str], images) -> torch.Tensor:
        """Cosine similarity `(B,)` between each image and its prompt, in float32."""
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)


class PickScoreReward(CLIPRewardModel):
    """
    PickScore (Kirstain et al., 2023): `logit_scale.exp() * cosine(image, prompt)` with the PickScore CLIP-H model.

    Raw values are around 17 to 24 (the paper's SD3.5-M student: 23.99). `compute_metrics` (the evaluation harness)
    always reports the raw value; the call itself returns `scale * raw`. Flow-GRPO trains on `raw / 26`
    (`scale=1/26`); with the default per-batch reward normalisation of GRPO the scale cancels out of the advantages.

    Args:
        model (`str`, `os.PathLike` or `CLIPModel`, defaults to `"yuvalkirstain/PickScore_v1"`): the scorer.
        processor (`str`, `os.PathLike` or `CLIPProcessor`, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`):
            its processor (PickScore's repository ships no processor: the CLIP-H one is used, as the authors do).
        scale (`float`, defaults to 1.0): the factor applied to the returned reward.
        **kwargs: `device`, `dtype`, `batch_size`, `name` of [`RewardModel`].
    """

    name = "pickscore"

    def __init__(
        self,
        model: Union[str, os.PathLike, CLIPModel] = PICKSCORE_MODEL_ID,
        processor: Any = PICKSCORE_PROCESSOR_ID,
        scale: float = 1.0,
        **kwargs,
    ):
        super().__init__(model, processor, **kwargs)
        self.scale = scale

    def raw_scores(self, prompts: list[str], images, **columns) -> list[float]:
        """The unscaled PickScore of each image of one batch."""
        logit_scale = self.model.logit_scale.float().exp()
        return (logit_scale * self.cosine(prompts, images)).tolist()

    def score_batch(self, prompts, images, **columns) -> list[Optional[float]]:
        return [self.scale * score for score in self.raw_scores(prompts, images)]

    def compute_metrics(self, prompts, images, **columns) -> dict[str, list[Optional[float]]]:
        return {self.name: self.map_batches(self.raw_scores, prompts, images, **columns)}


class CLIPScoreReward(CLIPRewardModel):
    """
    CLIPScore as the paper reports it: the cosine similarity of CLIP ViT-L/14's image and prompt embeddings (about 0.28
    to 0.30 for SD3.5-M), without Hessel et al.'s `2.5 * max(cos, 0)` rescaling.

    Args:
        model (`str`, `os.PathLike` or `CLIPModel`, defaults to `"openai/clip-vit-large-patch14"`): the CLIP model.
        processor (`str`, `os.PathLike` or `CLIPProcessor`, *optional*): its processor; defaults to `model`.
        **kwargs: `device`, `dtype`, `batch_size`, `name` of [`RewardModel`].
    """

    name = "clip_score"

    def __init__(self, model: Union[str, os.PathLike, CLIPModel] = CLIP_L14_ID, processor: Any = None, **kwargs):
        super().__init__(model, processor, **kwargs)

    def score_batch(self, prompts, images, **columns) -> list[Optional[float]]:
        return self.cosine(prompts, images).tolist()


class AestheticMLP(torch.nn.Module):
    """
    The head of the LAION improved aesthetic predictor (`sac+logos+ava1-l14-linearMSE`): an MLP without activations
    on the L2-normalised CLIP ViT-L/14 image embedding. Layer indices match the published state dict
    (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`).

    Args:
        input_dim (`int`, defaults to 768): the CLIP projection width (768 for ViT-L/14).
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def _load_head_state_dict(source: Union[str, os.PathLike], filename: Optional[str]) -> dict[str, torch.Tensor]:
    # The published head is a pickled `.pth`: `weights_only=True` restricts unpickling to tensors and plain
    # containers, so a tampered file cannot run code. Safetensors files are read directly.
    source = str(source)
    if source.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True, progress=False)
    if not os.path.exists(source):
        from huggingface_hub import hf_hub_download

        if filename is None:
            raise ValueError(f"Pass `head_filename` to read the aesthetic head from the Hub repository {source!r}.")
        source = hf_hub_download(source, filename)
    elif os.path.isdir(source):
        if filename is None:
            raise ValueError(f"Pass `head_filename` to read the aesthetic head from the folder {source!r}.")
        source = os.path.join(source, filename)
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(source)
    return torch.load(source, map_location="cpu", weights_only=True)


class AestheticReward(CLIPRewardModel):
    """
    The LAION improved aesthetic predictor (DDPO's and Flow-GRPO's `aesthetic_score`): CLIP ViT-L/14's L2-normalised
    image embedding through [`AestheticMLP`]. Scores run from about 1 to 10 (5 to 6.5 for SD3.5-M). The prompt is
    not used.

    Args:
        model (`str`, `os.PathLike` or `CLIPModel`, defaults to `"openai/clip-vit-large-patch14"`): the CLIP model.
        processor (`str`, `os.PathLike` or `CLIPProcessor`, *optional*): its processor; defaults to `model`.
        head (`str`, `os.PathLike`, `AestheticMLP` or state dict, defaults to the authors' GitHub file): the head: a
            loaded module, a state dict, a URL, a local `.pth` / `.safetensors` file, or a folder or Hub repository
            holding `head_filename`.
        head_filename (`str`, *optional*): the file inside a folder or Hub repository given as `head`.
        **kwargs: `device`, `dtype`, `batch_size`, `name` of [`RewardModel`].
    """

    name = "aesthetic"

    def __init__(
        self,
        model: Union[str, os.PathLike, CLIPModel] = CLIP_L14_ID,
        processor: Any = None,
        head: Union[str, os.PathLike, AestheticMLP, dict] = AESTHETIC_HEAD_URL,
        head_filename: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(model, processor, **kwargs)
        self.head_source, self.head_filename = head, head_filename

    def load_models(self) -> None:
        super().load_models()
        if isinstance(self.head_source, torch.nn.Module):
            self.head = self.head_source
            return
        state_dict = self.head_source
        if not isinstance(state_dict, dict):
            state_dict = _load_head_state_dict(state_dict, self.head_filename)
        self.head = AestheticMLP(input_dim=state_dict["layers.0.weight"].shape[1])
        self.head.load_state_dict(state_dict)

    def score_batch(self, prompts, images, **columns) -> list[Optional[float]]:
        embeds = self.embed_images(images)
        return self.head(embeds.to(self.dtype)).float().squeeze(-1).tolist()
