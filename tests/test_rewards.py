"""Rewards: exact scoring logic (JPEG, PickScore, CLIPScore, aesthetic, OCR) and end-to-end runs on tiny models."""

import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


torch.set_num_threads(1)

from diffusion_opd_trainer.rewards import (  # noqa: E402
    AestheticMLP,
    AestheticReward,
    CLIPScoreReward,
    GenEvalReward,
    JpegCompressibility,
    JpegIncompressibility,
    OCRReward,
    PickScoreReward,
    extract_quoted_text,
    get_reward,
    levenshtein,
    list_rewards,
    ocr_reward,
    register_reward,
    reward_name,
    to_uint8_images,
)
from diffusion_opd_trainer.rewards.ocr import PaddleOCRBackend  # noqa: E402
from diffusion_opd_trainer.rewards.testing import tiny_clip, tiny_trocr  # noqa: E402


PROMPTS = ["a red circle", "two blue squares", "a cat on the left of a dog", 'a sign saying "open"']


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=0)


# ----------------------------------------------------------------------------------------------- conversion
def test_to_uint8_rounds_and_clamps():
    images = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 1.0, 1.5, -0.2]).view(1, 3, 1, 2)
    array = to_uint8_images(images)
    assert array.shape == (1, 1, 2, 3) and array.dtype == np.uint8
    assert array[0, 0, :, :].T.flatten().tolist() == [0, 0, 1, 255, 255, 0]


# ----------------------------------------------------------------------------------------------- JPEG
def test_jpeg_sizes_hand_computed_and_ordered():
    flat = torch.full((1, 3, 64, 64), 0.5)
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, ramp, noise])
    sizes = JpegIncompressibility()(prompts=["x"] * 3, images=images, task=["a", "b", "c"])
    for size, image in zip(sizes, to_uint8_images(images)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        assert size == len(buffer.getvalue()) / 1000
    assert sizes[0] < sizes[1] < sizes[2]
    assert JpegCompressibility()(prompts=["x"] * 3, images=images) == [-s for s in sizes]
    assert JpegIncompressibility(quality=50)(prompts=["x"], images=noise)[0] < sizes[2]


# ----------------------------------------------------------------------------------------------- CLIP rewards
def _forward_logits(model, processor, prompts, images):
    """PickScore by the model's own forward: logits_per_image = logit_scale.exp() * cosine(image, text)."""
    pil = [Image.fromarray(a) for a in to_uint8_images(images)]
    inputs = processor(text=prompts, images=pil, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal()


def test_pickscore_matches_clip_forward(clip, images):
    model, processor = clip
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))  # PickScore's trained temperature: exp(logit_scale) = 100
    reward = PickScoreReward(model=model, processor=processor, batch_size=3)
    scores = reward(prompts=PROMPTS, images=images, extra_column=[1, 2, 3, 4])
    expected = _forward_logits(model, processor, PROMPTS, images)
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    # By hand: 100 * <image / |image|, text / |text|> from the towers' features.
    pil = [Image.fromarray(a) for a in to_uint8_images(images)]
    with torch.no_grad():
        image = model.get_image_features(**processor.image_processor(images=pil, return_tensors="pt"))
        text = model.get_text_features(**processor.tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    image, text = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text))
    by_hand = [100.0 * float(i @ t) / float(i.norm() * t.norm()) for i, t in zip(image, text)]
    assert scores == pytest.approx(by_hand, abs=1e-4)
    # Batch size does not change scores; the training scale multiplies them; metrics report the raw value.
    assert PickScoreReward(model=model, processor=processor, batch_size=1)(PROMPTS, images) == pytest.approx(scores)
    scaled = PickScoreReward(model=model, processor=processor, scale=1 / 26)
    assert scaled(PROMPTS, images) == pytest.approx([s / 26 for s in scores], abs=1e-6)
    assert scaled.compute_metrics(PROMPTS, images)["pickscore"] == pytest.approx(scores, abs=1e-5)


def test_clip_score_is_cosine(clip, images):
    model, processor = clip
    scores = CLIPScoreReward(model=model, processor=processor)(prompts=PROMPTS, images=images)
    expected = _forward_logits(model, processor, PROMPTS, images) / model.logit_scale.exp()
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(-1 <= s <= 1 for s in scores)


def _head_by_hand(state, embeds):
    x = F.normalize(embeds, dim=-1)
    for index in (0, 2, 4, 6, 7):  # no activations between the layers, dropout off in eval
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x.squeeze(-1)


def test_aesthetic_head_from_pth_and_safetensors(clip, images, tmp_path):
    from safetensors.torch import save_file

    model, processor = clip
    torch.manual_seed(1)
    state = AestheticMLP(input_dim=16).state_dict()
    torch.save(state, tmp_path / "head.pth")
    save_file(state, tmp_path / "head.safetensors")
    pil = [Image.fromarray(a) for a in to_uint8_images(images)]
    with torch.no_grad():
        embeds = model.get_image_features(**processor(images=pil, return_tensors="pt"))
    embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
    expected = _head_by_hand(state, embeds).tolist()
    for head in (tmp_path / "head.pth", str(tmp_path / "head.safetensors"), state):
        reward = AestheticReward(model=model, processor=processor, head=head)
        assert reward(prompts=PROMPTS, images=images) == pytest.approx(expected, abs=1e-5)
    folder = AestheticReward(model=model, processor=processor, head=tmp_path, head_filename="head.pth")
    assert folder(PROMPTS, images) == pytest.approx(expected, abs=1e-5)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_aesthetic_head_refuses_arbitrary_pickles(clip, tmp_path):
    model, processor = clip
    with open(tmp_path / "evil.pth", "wb") as file:
        pickle.dump({"layers.0.weight": _Payload()}, file, protocol=2)
    reward = AestheticReward(model=model, processor=processor, head=tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        reward.load()


def test_lazy_loading_and_devices(clip):
    model, processor = clip
    reward = PickScoreReward(model=model, processor=processor, device="cpu", dtype=torch.float32, batch_size=2)
    assert not reward._loaded and reward.device == torch.device("cpu")
    # Real ids are only read on the first call: building a reward by name touches no file.
    assert get_reward("pickscore").model_source == "yuvalkirstain/PickScore_v1"
    assert get_reward("pickscore").processor_source == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    with pytest.raises(ValueError, match="processor"):
        CLIPScoreReward(model=model)


# ----------------------------------------------------------------------------------------------- OCR
@pytest.mark.parametrize(
    "a, b, distance",
    [("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("abc", "abc", 0)],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


@pytest.mark.parametrize(
    "recognized, target, reward",
    [
        ("hello", "hello", 1.0),
        ("HeLLo", "hello", 1.0),  # case-insensitive
        ("he llo\nworld", "Hello World", 1.0),  # spaces and lines removed on both sides
        ("xx hello yy", "hello", 1.0),  # contained: distance 0
        ("helo", "hello", 0.8),  # one deletion out of 5
        ("jello", "hello", 0.8),
        ("", "hello", 0.0),
        ("a completely different and long text", "hello", 0.0),  # distance clamped to len(target)
        ("abcd", "abxy", 0.5),
    ],
)
def test_ocr_reward_rules(recognized, target, reward):
    assert ocr_reward(recognized, target) == pytest.approx(reward)


def test_ocr_target_extraction():
    assert extract_quoted_text('a sign saying "Open 24h" on a door') == "Open 24h"
    assert extract_quoted_text('a "first" and a "second"') == "first"
    assert extract_quoted_text("a poster with \u201cHello\u201d on it") == "Hello"
    assert extract_quoted_text("the cat's toy") is None
    assert ocr_reward("anything", "  ") is None


class _FakeBackend:
    def __init__(self, texts):
        self.texts, self.seen = texts, []

    def load(self, device, dtype):
        pass

    def recognize(self, images):
        self.seen.append(len(images))
        return [self.texts.pop(0) for _ in range(len(images))]


def test_ocr_reward_plumbing():
    backend = _FakeBackend(["OPEN", "cl0sed"])
    reward = OCRReward(backend=backend)
    prompts = ['a sign saying "open"', "no text here", 'a shop sign "Closed"']
    images = torch.zeros(3, 3, 8, 8)
    assert reward(prompts=prompts, images=images, task=["ocr"] * 3) == [1.0, None, pytest.approx(1 - 1 / 6)]
    assert backend.seen == [2]  # the image without a target is not read
    # A dataset column overrides the prompt's quotes.
    backend = _FakeBackend(["abc"])
    assert OCRReward(backend=backend)(prompts=["x"], images=images[:1], ocr_text=["abd"]) == [pytest.approx(2 / 3)]


def test_ocr_trocr_end_to_end():
    model, processor = tiny_trocr()
    h = processor.tokenizer.convert_tokens_to_ids("h")
    bias = torch.zeros(model.config.decoder.vocab_size)
    bias[h] = 100.0
    # Force the tiny decoder to read "hhhhh" (5 new tokens) whatever the image.
    model.decoder.output_projection.register_forward_hook(lambda module, inputs, output: output + bias)
    reward = OCRReward(model=model, processor=processor, max_new_tokens=5, batch_size=2)
    images = torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    assert reward.recognize(images) == ["hhhhh"] * 3
    prompts = ['say "hh"', 'say "hi"', 'say "hhh hhh"']
    assert reward(prompts=prompts, images=images) == pytest.approx([1.0, 0.0, 1 - 1 / 6])


def test_paddleocr_backend_formats():
    class OCR2:  # PaddleOCR 2.x: ocr() -> [[ [box, (text, confidence)], ... ]]
        def ocr(self, array, cls=False):
            assert array.dtype == np.uint8 and array.shape == (8, 8, 3)
            return [[[None, ("Hello", 0.9)], [None, ("World", 0.8)]]]

    class OCR3:  # PaddleOCR 3.x: predict() -> [{"rec_texts": [...], ...}]
        def predict(self, array):
            return [{"rec_texts": ["Hello", "World"], "rec_scores": [0.9, 0.8]}]

    class Empty:
        def ocr(self, array, cls=False):
            return [None]

    images = torch.zeros(1, 3, 8, 8)
    for ocr in (OCR2(), OCR3()):
        reward = OCRReward(backend=PaddleOCRBackend(ocr=ocr))
        assert reward(prompts=['"hello world"'], images=images) == [1.0]
    assert OCRReward(backend=PaddleOCRBackend(ocr=Empty()))(prompts=['"hi"'], images=images) == [0.0]


def test_paddleocr_missing_names_the_extra():
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        reward = OCRReward(backend="paddleocr")
        with pytest.raises(ImportError, match=r"diffusion-opd-trainer\[ocr\]"):
            reward(prompts=['"a"'], images=torch.zeros(1, 3, 8, 8))
    else:
        pytest.skip("paddleocr is installed")


@pytest.mark.parametrize(
    "name, module, extra", [("hpsv2", "open_clip", "hps"), ("image_reward", "ImageReward", "imagereward")]
)
def test_optional_rewards_name_their_extra(name, module, extra):
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    reward = get_reward(name)
    assert reward.name == name
    with pytest.raises(ImportError, match=rf"diffusion-opd-trainer\[{extra}\]"):
        reward(prompts=["a"], images=torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------- registry
def test_registry_names_and_factories():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "pickscore", "clip_score", "aesthetic", "ocr"} <= set(
        list_rewards()
    )
    assert {"geneval", "geneval_strict"} <= set(list_rewards())
    reward = get_reward("jpeg_compressibility", quality=80)
    assert isinstance(reward, JpegCompressibility) and reward.quality == 80
    assert get_reward("jpeg_compressibility") is not reward  # a new instance per call
    strict = get_reward("geneval_strict")
    assert isinstance(strict, GenEvalReward) and strict.strict and strict.name == "geneval_strict"
    assert get_reward("geneval").strict is False

    def brightness(prompts, images, **kwargs):
        return images.mean(dim=(1, 2, 3)).tolist()

    assert get_reward(brightness) is brightness
    register_reward("test_brightness", lambda: brightness)
    assert get_reward("test_brightness") is brightness
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_brightness", lambda: brightness)
    register_reward("test_brightness", lambda: brightness, overwrite=True)
    with pytest.raises(KeyError, match="Unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(TypeError):
        get_reward(3)


def test_reward_name_rule():
    def my_reward(prompts, images, **kwargs):
        return [0.0] * len(prompts)

    assert reward_name(my_reward) == "my_reward"
    assert reward_name(my_reward, key="geneval") == "geneval"
    assert reward_name(JpegCompressibility()) == "jpeg_compressibility"
    assert reward_name(JpegCompressibility(name="jpeg")) == "jpeg"
    assert reward_name(JpegCompressibility(name="jpeg")) == JpegCompressibility(name="jpeg").__name__
    assert reward_name("pickscore") == "pickscore"
    assert reward_name(lambda prompts, images: []) == "<lambda>"
