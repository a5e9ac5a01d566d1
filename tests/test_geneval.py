"""GenEval's rule engine on hand-made detections (every tag, near-threshold cases) and the reward on tiny models."""

import importlib.util
import json

import numpy as np
import pytest
import torch


torch.set_num_threads(1)

from diffusion_opd_trainer.rewards.geneval import (  # noqa: E402
    COLORS,
    GENEVAL_CLASSES,
    GenEvalReward,
    GenEvalRules,
    evaluate_geneval,
    geneval_overall,
    relative_position,
    select_objects,
)


# transformers' Mask2Former builds its training loss (scipy's Hungarian matcher) in its constructor.
requires_scipy = pytest.mark.skipif(
    importlib.util.find_spec("scipy") is None, reason="Mask2Former needs scipy (extra `geneval`)"
)


def det(label, score, box=(0, 0, 10, 10), color=None):
    out = {"label": label, "score": score, "box": list(box)}
    if color is not None:
        out["color"] = color
    return out


SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
COUNT3 = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
COLOR = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}
POSITION = {
    "tag": "position",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}],
}


# ----------------------------------------------------------------------------------------------- single / two objects
@pytest.mark.parametrize(
    "detections, expected",
    [
        ([det("cat", 0.31)], (True, 1.0)),
        ([det("cat", 0.30)], (False, 0.0)),  # the threshold is strict: 0.3 itself is not a detection
        ([det("cat", 0.2999)], (False, 0.0)),
        ([det("dog", 0.99)], (False, 0.0)),
        ([det("cat", 0.9), det("cat", 0.8)], (True, 1.0)),  # extra objects are fine outside counting prompts
        ([], (False, 0.0)),
    ],
)
def test_single_object(detections, expected):
    assert evaluate_geneval(SINGLE, detections) == expected


def test_two_object_partial_credit():
    assert evaluate_geneval(TWO, [det("cat", 0.5), det("dog", 0.4)]) == (True, 1.0)
    assert evaluate_geneval(TWO, [det("cat", 0.5), det("dog", 0.2)]) == (False, 0.5)
    assert evaluate_geneval(TWO, [det("dog", 0.5)]) == (False, 0.5)
    assert evaluate_geneval(TWO, [det("bird", 0.9)]) == (False, 0.0)


# ----------------------------------------------------------------------------------------------- counting
@pytest.mark.parametrize(
    "scores, expected_correct, expected_reward",
    [
        ([0.95] * 3, True, 1.0),
        ([0.95] * 3 + [0.89], True, 1.0),  # below the counting threshold: not counted, not an extra
        ([0.95] * 3 + [0.9], True, 1.0),  # 0.9 itself is not above the counting threshold
        ([0.95] * 3 + [0.901], False, 1 - 1 / 3),  # an extra object fails the exclude clause and costs credit
        ([0.95] * 2, False, 1 - 1 / 3),
        ([0.95] * 2 + [0.5], False, 1 - 1 / 3),  # 0.5 passes the detection threshold, not the counting one
        ([0.95] * 5, False, 1 - 2 / 3),
        ([0.95] * 6, False, 0.0),
        ([0.95] * 7, False, 0.0),  # credit is clipped at 0
        ([0.95] * 40, False, 0.0),  # at most 16 kept per class
        ([], False, 0.0),
    ],
)
def test_counting(scores, expected_correct, expected_reward):
    correct, reward = evaluate_geneval(COUNT3, [det("cat", s) for s in scores])
    assert correct is expected_correct
    assert reward == pytest.approx(expected_reward, abs=1e-12)


def test_counting_threshold_only_for_counting_prompts():
    # The same 0.5-score cat is a detection for a single-object prompt and not for a counting prompt.
    assert evaluate_geneval(SINGLE, [det("cat", 0.5)])[0] is True
    one_cat = {"tag": "counting", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": 2}]}
    assert evaluate_geneval(one_cat, [det("cat", 0.5)]) == (False, 0.0)
    assert evaluate_geneval(one_cat, [det("cat", 0.95)]) == (True, 1.0)


def test_max_objects_cap():
    objects = select_objects(SINGLE, [det("cat", 0.5 + i / 100) for i in range(20)])
    assert len(objects["cat"]) == 16
    assert [o["score"] for o in objects["cat"]] == sorted((0.5 + i / 100 for i in range(4, 20)), reverse=True)
    # An exclude clause counts kept objects only: 16 kept, so "fewer than 17" holds even with 20 detected.
    meta = {
        "tag": "single_object",
        "include": [{"class": "cat", "count": 1}],
        "exclude": [{"class": "cat", "count": 17}],
    }
    assert evaluate_geneval(meta, [det("cat", 0.9)] * 20) == (True, 1.0)
    meta["exclude"][0]["count"] = 16
    assert evaluate_geneval(meta, [det("cat", 0.9)] * 20) == (False, 1.0)


# ----------------------------------------------------------------------------------------------- colours
def test_colors():
    assert evaluate_geneval(COLOR, [det("cat", 0.8, color="red")]) == (True, 1.0)
    assert evaluate_geneval(COLOR, [det("cat", 0.8, color="blue")]) == (False, 0.0)
    # Only the `count` best objects are looked at: a red cat behind a better-scored blue one does not count.
    assert evaluate_geneval(COLOR, [det("cat", 0.8, color="blue"), det("cat", 0.5, color="red")]) == (False, 0.0)
    assert evaluate_geneval(COLOR, [det("cat", 0.8, color="red"), det("cat", 0.5, color="blue")]) == (True, 1.0)
    assert evaluate_geneval(COLOR, [det("cat", 0.8)]) == (False, 0.0)  # colour unknown
    assert evaluate_geneval(COLOR, [det("cat", 0.25, color="red")]) == (False, 0.0)  # not detected
    two_red = {"tag": "colors", "include": [{"class": "cat", "count": 2, "color": "red"}]}
    assert evaluate_geneval(two_red, [det("cat", 0.8, color="red"), det("cat", 0.7, color="red")]) == (True, 1.0)
    assert evaluate_geneval(two_red, [det("cat", 0.8, color="red"), det("cat", 0.7, color="pink")]) == (False, 0.0)


def test_color_attribution():
    red_cat_blue_dog = [det("cat", 0.8, color="red"), det("dog", 0.7, color="blue")]
    assert evaluate_geneval(COLOR_ATTR, red_cat_blue_dog) == (True, 1.0)
    assert evaluate_geneval(COLOR_ATTR, [det("cat", 0.8, color="red"), det("dog", 0.7, color="red")]) == (False, 0.5)
    assert evaluate_geneval(COLOR_ATTR, [det("cat", 0.8, color="blue"), det("dog", 0.7, color="red")]) == (False, 0.0)
    assert evaluate_geneval(COLOR_ATTR, [det("cat", 0.8, color="red")]) == (False, 0.5)


# ----------------------------------------------------------------------------------------------- position
def test_relative_position_hand_computed():
    a = (0, 0, 10, 10)  # centre (5, 5), size (10, 10): the margin on each axis is 0.1 * (10 + 10) = 2
    # Horizontal offset dx: the shrunk offset is |dx| - 2, a relation needs (|dx| - 2) / |dx| > 0.5, i.e. |dx| > 4.
    assert relative_position(a, (4.1, 0, 14.1, 10)) == {"left of"}
    assert relative_position(a, (3.9, 0, 13.9, 10)) == set()
    assert relative_position((4.1, 0, 14.1, 10), a) == {"right of"}
    assert relative_position(a, (0, 4.1, 10, 14.1)) == {"above"}  # y grows downwards
    assert relative_position((0, 4.1, 10, 14.1), a) == {"below"}
    assert relative_position(a, a) == set()
    assert relative_position(a, (1, 1, 9, 9)) == set()  # concentric
    # Diagonal: point boxes (no margin), offset (-10, -10): each component is 10 / sqrt(200) = 0.707 > 0.5.
    assert relative_position((0, 0, 0, 0), (10, 10, 10, 10)) == {"left of", "above"}
    # Mostly horizontal: offset (-10, -4): dx = -0.93, dy = -0.37 -> only "left of".
    assert relative_position((0, 0, 0, 0), (10, 4, 10, 4)) == {"left of"}
    # Margin scales with the boxes: wide boxes (size 40 each) need |dx| > 2 * 0.1 * 80 = 16.
    assert relative_position((0, 0, 40, 10), (15, 0, 55, 10)) == set()
    assert relative_position((0, 0, 40, 10), (17, 0, 57, 10)) == {"left of"}
    assert relative_position((0, 0, 40, 10), (17, 0, 57, 10), margin=0.2) == set()


def test_position():
    cat, dog = (0, 0, 10, 10), (50, 0, 60, 10)
    assert evaluate_geneval(POSITION, [det("cat", 0.9, cat), det("dog", 0.9, dog)]) == (True, 1.0)
    assert evaluate_geneval(POSITION, [det("cat", 0.9, dog), det("dog", 0.9, cat)]) == (False, 0.5)
    # Without its target the position clause fails, whatever the cat's position.
    assert evaluate_geneval(POSITION, [det("cat", 0.9, cat)]) == (False, 0.0)
    assert evaluate_geneval(POSITION, [det("dog", 0.9, dog)]) == (False, 0.5)
    # Near the margin (boxes 10 wide: left of needs a centre offset beyond 4 pixels).
    assert evaluate_geneval(POSITION, [det("cat", 0.9, (0, 0, 10, 10)), det("dog", 0.9, (4.1, 0, 14.1, 10))])[0]
    assert not evaluate_geneval(POSITION, [det("cat", 0.9, (0, 0, 10, 10)), det("dog", 0.9, (3.9, 0, 13.9, 10))])[0]
    # Only the best-scored cat is checked, against the best-scored dog.
    detections = [det("cat", 0.9, cat), det("cat", 0.5, (100, 0, 110, 10)), det("dog", 0.9, dog)]
    assert evaluate_geneval(POSITION, detections) == (True, 1.0)
    detections = [det("cat", 0.5, cat), det("cat", 0.9, (100, 0, 110, 10)), det("dog", 0.9, dog)]
    assert evaluate_geneval(POSITION, detections) == (False, 0.5)


def test_metadata_as_json_and_bad_tag():
    line = json.dumps(SINGLE)
    assert evaluate_geneval(line, [det("cat", 0.5)]) == (True, 1.0)
    with pytest.raises(ValueError, match="tag"):
        evaluate_geneval({"tag": "shapes", "include": []}, [])


def test_thresholds_are_settings():
    assert evaluate_geneval(SINGLE, [det("cat", 0.25)]) == (False, 0.0)
    assert evaluate_geneval(SINGLE, [det("cat", 0.25)], GenEvalRules(threshold=0.2)) == (True, 1.0)
    assert evaluate_geneval(COUNT3, [det("cat", 0.85)] * 3, GenEvalRules(counting_threshold=0.8)) == (True, 1.0)
    only_two = select_objects(SINGLE, [det("cat", 0.5)] * 5, GenEvalRules(max_objects=2))
    assert len(only_two["cat"]) == 2


def test_geneval_overall_is_mean_of_tag_means():
    # single_object: 1/2, counting: 1/1 -> (0.5 + 1) / 2, not the image mean 2/3.
    assert geneval_overall([1.0, 0.0, 1.0, None], ["single_object", "single_object", "counting", "colors"]) == 0.75


# ----------------------------------------------------------------------------------------------- the model wrapper
def _reward(**kwargs):
    from diffusion_opd_trainer.rewards.testing import tiny_clip, tiny_mask2former

    detector, detector_processor = tiny_mask2former()
    clip_model, clip_processor = tiny_clip()
    return GenEvalReward(
        detector=detector,
        detector_processor=detector_processor,
        clip_model=clip_model,
        clip_processor=clip_processor,
        **{"detector_size": None, **kwargs},
    )


def test_instance_postprocessing_hand_computed():
    reward = GenEvalReward(
        detector=object(), detector_processor=object(), clip_model=object(), clip_processor=object()
    )
    reward.class_names, reward.max_per_image = ["cat", "dog"], 3
    # Two queries, two classes (+ "no object"): softmax rows [0.5, 0.25, 0.25] and [0.1, 0.7, 0.2].
    class_logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.7, 0.2]]))
    mask_logits = torch.full((2, 4, 6), -5.0)
    mask_logits[0, 1:3, 2:5] = 2.0  # rows 1-2, columns 2-4 -> box (2, 1, 5, 3)
    mask_logits[1, 0, 0] = 1.0  # one pixel -> box (0, 0, 1, 1)
    instances = reward._instances(class_logits, mask_logits)
    # Top 3 (query, class) pairs by probability: (1, dog) 0.7, (0, cat) 0.5, (0, dog) 0.25.
    sig2, sig1 = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-1.0))
    assert [i["label"] for i in instances] == ["dog", "cat", "dog"]
    assert [i["score"] for i in instances] == pytest.approx([0.7 * sig1, 0.5 * sig2, 0.25 * sig2], rel=1e-5)
    assert instances[0]["box"] == [0.0, 0.0, 1.0, 1.0]
    assert instances[1]["box"] == [2.0, 1.0, 5.0, 3.0]
    assert instances[1]["mask"].sum() == 6 and instances[1]["mask"].shape == (4, 6)


@requires_scipy
def test_reward_end_to_end_on_tiny_models():
    reward = _reward(batch_size=2)
    reward.load()
    cat = GENEVAL_CLASSES.index("cat")
    # Make every query a confident "cat": the pipeline must then find a cat and no dog.
    with torch.no_grad():
        reward.detector.class_predictor.bias.zero_()
        reward.detector.class_predictor.bias[cat] = 30.0
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    metadata = [SINGLE, {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, None]
    prompts = ["a photo of a cat", "a photo of a dog", "no metadata"]
    assert reward(prompts=prompts, images=images, metadata=metadata) == [1.0, 0.0, None]
    detections = reward.detect(images[:1])[0]
    # max_per_image = 100 (query, class) pairs out of 10 queries x 80 classes; the 10 best are the queries' cats.
    assert len(detections) == 100
    assert [d["label"] for d in detections[:10]] == ["cat"] * 10
    assert {d["label"] for d in detections if d["score"] > 0.3} == {"cat"}
    assert all(d["mask"].shape == (40, 56) for d in detections)
    for d in detections:  # boxes are the masks' extents
        if d["mask"].any():
            rows, cols = np.where(d["mask"])
            assert d["box"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]

    # Colours: the classifier's answer is the argmax of CLIP similarities with the mean of the three templates.
    image = reward_images_to_pil(images[:1])[0]
    colors = reward.classify_colors(image, detections[:2], "cat")
    assert all(color in COLORS for color in colors)
    metrics = reward.compute_metrics(prompts, images, metadata=[COLOR, COUNT3, None])
    assert set(metrics) == {"geneval", "geneval_reward"}
    assert metrics["geneval"][2] is None and all(v in (0.0, 1.0) for v in metrics["geneval"][:2])
    assert all(0.0 <= v <= 1.0 for v in metrics["geneval_reward"][:2])
    # The colour clause's verdict agrees with the classifier on the best cat.
    best_cat = max((d for d in detections if d["score"] > 0.3), key=lambda d: d["score"])
    expected = reward.classify_colors(image, [best_cat], "cat")[0] == "red"
    assert metrics["geneval"][0] == float(expected)
    strict = _reward(strict=True)
    strict.load()
    strict.detector.load_state_dict(reward.detector.state_dict())
    assert strict(prompts=prompts, images=images, metadata=[COLOR, COUNT3, None]) == metrics["geneval"]


@requires_scipy
def test_detector_resize_keeps_image_coordinates():
    reward = _reward(detector_size=(64, 96))  # a 40 x 56 image is resized to 64 x 96 (rounded to 32) and back
    masks = [d["mask"] for d in reward.detect(torch.rand(1, 3, 40, 56))[0]]
    assert len(masks) == 100 and all(mask.shape == (40, 56) for mask in masks)


def reward_images_to_pil(images):
    from diffusion_opd_trainer.rewards import to_pil_images

    return to_pil_images(images)


@requires_scipy
def test_color_classifier_matches_hand_computation():
    import torch.nn.functional as F
    from PIL import Image

    reward = _reward()
    reward.load()
    image = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 10:25] = True
    obj = {"label": "cat", "score": 0.9, "box": [10.0, 5.0, 25.0, 15.0], "mask": mask}
    # By hand: masked onto grey 153, cropped to the box, embedded; texts: three templates per colour, averaged.
    array = np.asarray(image).copy()
    array[~mask] = 153
    crop = Image.fromarray(array).crop((10, 5, 25, 15))
    pixels = reward.clip_processor.image_processor(images=[crop], return_tensors="pt").pixel_values
    model = reward.clip_model
    image_embed = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    sims = []
    for color in COLORS:
        texts = [f"a photo of a {color} cat", f"a photo of a {color}-colored cat", f"a photo of a {color} object"]
        tokens = reward.clip_processor.tokenizer(texts, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        text = F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1)
        sims.append(float(image_embed[0] @ text))
    assert reward.classify_colors(image, [obj], "cat") == [COLORS[int(np.argmax(sims))]]
