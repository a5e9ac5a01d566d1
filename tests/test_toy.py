"""The toy world: prompt sets, renderer, rewards, the bundled base model and its training script."""

import json
import os

import numpy as np
import pytest
import torch

from diffusion_opd_trainer import toy
from diffusion_opd_trainer.toy.font import GLYPHS
from diffusion_opd_trainer.toy.rewards import (
    compositional_reward,
    detect_objects,
    edit_distance,
    exact_text_reward,
    glyph_similarities,
    preference_scores,
    read_text,
    text_reward,
)


torch.set_num_threads(1)

# The base model's per-task mean reward on the first BAND_PROMPTS test prompts of each task (ODE, the toy's default
# steps and guidance, seed 0): the bands reported in docs/toy_world.md, between chance and the renderer.
BAND_PROMPTS = 24
BASE_MODEL_BANDS = {"compositional": (0.15, 0.45), "text": (0.15, 0.45), "preference": (0.55, 0.85)}


def _score(task, images, dataset, with_metadata=True):
    columns = {"metadata": list(dataset["metadata"])} if with_metadata else {}
    return np.array(toy.reward_funcs()[task](prompts=list(dataset["prompt"]), images=images, **columns))


def test_public_interface():
    assert toy.TASKS == ("compositional", "text", "preference")
    funcs = toy.reward_funcs()
    assert set(funcs) == set(toy.TASKS)
    assert {task: f.__name__ for task, f in funcs.items()} == {task: task for task in toy.TASKS}


@pytest.mark.parametrize("task", ["compositional", "text", "preference"])
def test_prompt_sets_are_disjoint_deterministic_and_parseable(task):
    train, test = toy.prompts(task, "train"), toy.prompts(task, "test")
    assert {"prompt", "task", "category", "metadata"} <= set(train.column_names)
    assert len(test) >= 40 and len(train) > 5 * len(test)
    assert not set(train["prompt"]) & set(test["prompt"])
    assert set(train["task"]) == {task}
    assert list(toy.prompts(task, "test")["metadata"]) == list(test["metadata"])
    for row in test:
        spec = json.loads(row["metadata"])
        parsed = toy.parse_prompt(row["prompt"])
        assert toy.caption(parsed) == row["prompt"]
        assert {k: spec[k] for k in parsed} == parsed
    assert set(toy.prompts(None, "test")["task"]) == set(toy.TASKS)


def test_prompts_fit_the_text_encoders():
    pipe_tokens = 12  # the toy pipeline's CLIP and T5 length
    from diffusion_opd_trainer.testing import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(toy.VOCABULARY, model_max_length=pipe_tokens)
    for task in toy.TASKS:
        for prompt in list(toy.prompts(task, "train")["prompt"]) + list(toy.prompts(task, "test")["prompt"]):
            assert len(tokenizer(prompt).input_ids) <= pipe_tokens, prompt


@pytest.mark.parametrize("task", ["compositional", "text", "preference"])
def test_renderer_scores_high_and_shuffled_pairs_low(task):
    dataset = toy.prompts(task, "test")
    images = toy.render(dataset)
    assert images.shape == (len(dataset), 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, toy.render(dataset))  # a row always renders the same image
    scores = _score(task, images, dataset)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.mean() >= 0.9
    # The rewards also work from the prompt alone.
    np.testing.assert_allclose(_score(task, images, dataset, with_metadata=False), scores)
    if task != "preference":  # the preference reward ignores the prompt
        shuffled = _score(task, images[np.random.default_rng(0).permutation(len(dataset))], dataset)
        # Dense partial credit: a wrong glyph still shares some strokes with the asked one (at most 0.3 of it).
        assert shuffled.mean() <= (0.35 if task == "text" else 0.25) and shuffled.mean() < scores.mean() - 0.6


def test_preference_conflicts_with_white_backgrounds():
    for task in ("compositional", "text"):
        assert np.mean(toy.preference_reward(images=toy.render(toy.prompts(task, "test")))) < 0.3
    # Smooth and bounded: noise and flat images score low, and gradients flow.
    assert preference_scores(torch.rand(4, 3, 32, 32)).max() < 0.5
    assert preference_scores(torch.full((2, 3, 32, 32), 0.5)).max() < 0.05
    images = toy.render(toy.prompts("preference", "test").select(range(4))).requires_grad_(True)
    preference_scores(images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_detector_and_ocr_read_the_renderer():
    spec = {"task": "compositional", "objects": [{"color": "red", "shape": "triangle", "count": 2}], "seed": 3}
    found = detect_objects(toy.render([spec])[0])
    assert [(o["color"], o["shape"]) for o in found] == [("red", "triangle")] * 2
    for text in ("c", "zx", "kfs", "jtt"):
        image = toy.render([{"task": "text", "text": text, "seed": 1}])[0]
        assert read_text(image) == text
    assert read_text(torch.ones(3, 32, 32)) == ""
    assert edit_distance("kfs", "kts") == 1 and edit_distance("", "abc") == 3
    # A prompt outside the grammar scores 0 rather than failing.
    assert toy.reward_funcs()["compositional"](prompts=["a dog"], images=torch.ones(1, 3, 32, 32)) == [0.0]


def test_text_reward_is_dense_per_glyph_similarity():
    image = toy.render([{"task": "text", "text": "kfs", "seed": 1}])[0]
    np.testing.assert_allclose(glyph_similarities(image, "kfs"), [1, 1, 1], atol=1e-6)
    # Found within a pixel of where the renderer draws it.
    np.testing.assert_allclose(glyph_similarities(torch.roll(image, 1, dims=2), "kfs"), [1, 1, 1], atol=1e-6)
    assert glyph_similarities(torch.ones(3, 32, 32), "kfs").tolist() == [0, 0, 0]
    # A wrong letter keeps only what it shares with the asked one: 0.23 on average over the font's pairs, 0.56 at most.
    wrong = [
        glyph_similarities(toy.render([{"task": "text", "text": a, "seed": 1}])[0], b)[0]
        for a in GLYPHS
        for b in GLYPHS
        if a != b
    ]
    assert max(wrong) <= 0.6 and np.mean(wrong) <= 0.3
    # Partial credit moves continuously: erasing the last glyph's strokes bit by bit lowers its score step by step.
    scores = []
    for cut in (0, 2, 4, 6):
        damaged = image.clone()
        damaged[:, 11 : 11 + 10, 21 : 21 + cut] = 1.0  # the third glyph's columns
        scores.append(glyph_similarities(damaged, "kfs")[2])
    assert scores[0] == 1.0 and all(a > b for a, b in zip(scores, scores[1:])), scores
    assert text_reward(['the text "kfs"'], image[None]) == [1.0]
    assert exact_text_reward(['the text "kfs"'], image[None]) == [1.0]


def _as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def test_faded_and_misplaced_drawings_score_low():
    # The flawed images of the base model's training mix (`faded_fraction`, `misplaced_fraction`): what RL on the
    # rewards should teach away. Washed-out shapes and text a few pixels off its place score low; both stay drawable.
    shapes = {"task": "compositional", "objects": [{"color": "red", "shape": "circle"}], "relation": None, "seed": 1}
    text = {"task": "text", "text": "kfs", "seed": 1}
    for spec, reward in ((shapes, compositional_reward), (text, text_reward)):
        crisp, faded = (_as_batch(toy.render_spec(spec, fade=f)) for f in (0.0, 0.5))
        prompt = [toy.caption(spec)]
        assert reward(prompt, crisp)[0] > 0.9 and reward(prompt, faded)[0] < 0.5
        assert faded.min() > 0.4  # washed out toward white, not a different colour
    prompt = [toy.caption(text)]
    moved = {
        offset: text_reward(prompt, _as_batch(toy.render_spec(text, text_offset=offset)))[0]
        for offset in ((1, 0), (0, 2), (0, -3), (0, -8), (40, 40))
    }
    assert moved[(1, 0)] == 1.0  # within the reader's one-pixel search
    assert max(moved[(0, 2)], moved[(0, -3)]) < 0.6 and moved[(0, -8)] < 0.2, moved  # -8: the banner
    corner = toy.render_spec(text, text_offset=(40, 40))
    assert (corner[-1] < 0.5).any() and moved[(40, 40)] < 0.3  # kept inside the image, at the bottom-right corner


def test_compositional_reward_gives_dense_partial_credit():
    def score(spec_objects, prompt_objects, relation=None):
        spec = {"task": "compositional", "objects": spec_objects, "relation": relation, "seed": 5}
        prompt = toy.caption({"task": "compositional", "objects": prompt_objects, "relation": relation})
        return compositional_reward([prompt], toy.render([spec]))[0]

    red_circle, red_square = {"color": "red", "shape": "circle"}, {"color": "red", "shape": "square"}
    blue_square = {"color": "blue", "shape": "square"}
    assert score([red_circle], [red_circle]) > 0.9  # the soft shape probability of a clean circle is about 0.9
    # The asked colour with the wrong shape earns the colour half; a wrong colour earns nothing and counts as extra.
    assert 0.4 < score([red_square], [red_circle]) < 0.6
    assert score([blue_square], [red_circle]) == 0.0
    # A relation is scored by how clearly it holds: right way round high, wrong way round low.
    right = score([red_circle, blue_square], [red_circle, blue_square], "left of")
    wrong = score([red_circle, blue_square], [blue_square, red_circle], "left of")
    assert right > 0.9 and wrong < 0.7  # the two objects are there either way: 2 of 3 requirements


@pytest.fixture(scope="module")
def base_pipe():
    return toy.load_pipeline()


def test_base_model_loads_offline(base_pipe, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(base_pipe, StableDiffusion3Pipeline)
    assert base_pipe.default_sample_size * base_pipe.vae_scale_factor == toy.DEFAULT_RESOLUTION
    image = base_pipe(
        "two red circles", num_inference_steps=2, guidance_scale=toy.DEFAULT_GUIDANCE_SCALE, output_type="np"
    ).images
    assert image.shape == (1, 32, 32, 3)
    # A plain call (T5 padded to 256 by default) samples what the model was trained for: 12 T5 tokens.
    images = [
        base_pipe('the text "kfz"', num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)
        for kwargs in ({}, {"max_sequence_length": 12})
    ]
    assert np.array_equal(np.asarray(images[0].images[0]), np.asarray(images[1].images[0]))
    weights = [
        os.path.join(root, name)
        for root, _, names in os.walk(toy.model.BASE_MODEL_DIR)
        for name in names
        if not name.endswith((".json", ".txt", ".model"))
    ]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    assert sum(os.path.getsize(name) for name in weights) <= 20 * 2**20


def test_base_model_is_mediocre(base_pipe):
    # Between chance and the renderer on every task (the RL headroom), in the bands the docs report.
    rewards = toy.model.evaluate_pipeline(base_pipe, max_prompts=BAND_PROMPTS)
    for task, (low, high) in BASE_MODEL_BANDS.items():
        assert low <= rewards[task] <= high, (task, rewards[task])


def test_training_script_smoke(tmp_path):
    from diffusion_opd_trainer.toy.train_base import main

    summary = main(["--output_dir", str(tmp_path), "--smoke", "--eval_prompts_per_task", "0"])
    assert summary["size_bytes"] > 0
    pipe = toy.load_pipeline(str(tmp_path))
    assert pipe.default_sample_size * pipe.vae_scale_factor == toy.DEFAULT_RESOLUTION


def test_flaw_rate_tells_the_training_flaws_from_the_ground_truth():
    from diffusion_opd_trainer.toy.report import flaw_rate

    flaws = {"compositional": {"fade": 0.4}, "text": {"text_offset": (0, -8)}, "preference": {"background": "white"}}
    for task, flaw in flaws.items():
        rows = toy.prompts(task, "test").select(range(12))
        metadata = list(rows["metadata"])
        flawed = torch.stack([_as_batch(toy.render_spec(spec, **flaw))[0] for spec in metadata])
        assert flaw_rate(task, toy.render(rows), metadata) == 0.0
        assert flaw_rate(task, flawed, metadata) >= (0.75 if task == "preference" else 1.0), task
