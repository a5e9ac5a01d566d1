"""
Measures the toy world and its base model, and draws a sample sheet.

    python -m diffusion_opd_trainer.toy.report --picture docs/toy_samples.png

prints, per task and on the test prompts, the reward of the renderer's images, of the base model's samples (ODE, the
toy's default steps and guidance) and of shuffled prompt/image pairs (the renderer's images under another prompt of
the same task: chance for the prompt-dependent rewards), and writes a picture of prompts, ground truths and samples.
"""

import argparse
import json
import logging
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .font import GLYPH_HEIGHT
from .model import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, load_pipeline, sample
from .render import render, text_layout
from .rewards import _ink, preference_scores, reward_funcs
from .world import COLORS, TASKS, prompts


logger = logging.getLogger(__name__)


def flaw_rate(task: str, images: torch.Tensor, metadata: Optional[Sequence[str]] = None) -> float:
    """
    The fraction of `images` that show the task's flaw of the base model's training data (see `train_base.py`):
    - preference: a dull poster, preference reward below 0.5;
    - compositional: washed-out shapes, the 98th percentile of the pixels' chroma (max - min of RGB) below 70% of the
      most saturated asked colour's (shapes washed out by 0.4-0.6 keep 40-60% of it; needs `metadata`);
    - text: a banner, more ink in the rows above the text's place than in the rows of its place.
    """
    x = torch.as_tensor(images).float().clamp(0, 1)
    if task == "preference":
        return float((preference_scores(x) < 0.5).float().mean())
    if task == "compositional":
        chroma = (x.amax(1) - x.amin(1)).flatten(1).quantile(0.98, dim=1)
        asked = [max(np.ptp(COLORS[obj["color"]]) for obj in json.loads(spec)["objects"]) for spec in metadata]
        return float((chroma < 0.7 * torch.tensor(asked)).float().mean())
    _, _, top = text_layout(1, x.shape[-1])
    height = GLYPH_HEIGHT * max(1, x.shape[-1] // 16)
    flags = []
    for image in x.permute(0, 2, 3, 1).numpy():
        rows = _ink(image).sum(1)
        flags.append(rows[: max(0, top - 1)].sum() > rows[top : top + height].sum())
    return float(np.mean(flags))


def measure(
    pipe=None,
    split: str = "test",
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    max_prompts: Optional[int] = None,
) -> dict:
    """
    Per-task mean rewards of the renderer, the model and shuffled pairs, the preference reward of each task's
    renderer images (how much the other tasks' ground truths satisfy the preference), and how often the model's images
    show the task's training-data flaw ([`flaw_rate`]).

    Args:
        pipe (`StableDiffusion3Pipeline`, *optional*): the model; `None` skips the model's row.
        split (`str`, defaults to `"test"`): the prompt split.
        num_inference_steps (`int`), guidance_scale (`float`), seed (`int`): the sampler (see [`~toy.model.sample`]).
        max_prompts (`int`, *optional*): the first prompts of each task only.
    """
    funcs = reward_funcs()
    results: dict = {"renderer": {}, "shuffled": {}, "renderer_preference": {}}
    if pipe is not None:
        results["model"], results["model_flaw_rate"] = {}, {}
    for task in TASKS:
        dataset = prompts(task, split)
        if max_prompts is not None:
            dataset = dataset.select(range(min(max_prompts, len(dataset))))
        columns = {"prompts": list(dataset["prompt"]), "metadata": list(dataset["metadata"])}
        truth = render(dataset)
        results["renderer"][task] = float(np.mean(funcs[task](images=truth, **columns)))
        # A plain permutation, not a derangement: the few rows that keep their own image raise chance only slightly.
        order = np.random.default_rng(seed).permutation(len(dataset))
        results["shuffled"][task] = float(np.mean(funcs[task](images=truth[order], **columns)))
        results["renderer_preference"][task] = float(np.mean(funcs["preference"](images=truth)))
        if pipe is not None:
            images = sample(pipe, columns["prompts"], num_inference_steps, guidance_scale, seed)
            results["model"][task] = float(np.mean(funcs[task](images=images, **columns)))
            results["model_flaw_rate"][task] = flaw_rate(task, images, columns["metadata"])
    return results


def sample_sheet(
    pipe,
    per_task: int = 4,
    split: str = "test",
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    zoom: int = 4,
) -> Image.Image:
    """
    A picture with one row per prompt: the prompt, the renderer's ground truth, and the model's sample with its reward.

    Args:
        pipe (`StableDiffusion3Pipeline`): the model.
        per_task (`int`, defaults to 4): prompts per task (the first of the split).
        split (`str`, defaults to `"test"`), num_inference_steps (`int`), guidance_scale (`float`), seed (`int`):
            as in [`measure`].
        zoom (`int`, defaults to 4): nearest-neighbour magnification of the images.
    """
    funcs = reward_funcs()
    rows = []
    for task in TASKS:
        dataset = prompts(task, split).select(range(per_task))
        truth = render(dataset)
        prompt_list = list(dataset["prompt"])
        images = sample(pipe, prompt_list, num_inference_steps, guidance_scale, seed)
        scores = funcs[task](prompts=prompt_list, images=images, metadata=list(dataset["metadata"]))
        rows += [(task, p, t, s, r) for p, t, s, r in zip(prompt_list, truth, images, scores)]

    size = truth.shape[-1] * zoom
    text_width, pad = 330, 6
    sheet = Image.new("RGB", (text_width + 2 * size + 3 * pad, len(rows) * (size + pad) + pad + 16), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 2), "task: prompt", fill="black")
    draw.text((text_width + pad, 2), "renderer", fill="black")
    draw.text((text_width + size + 2 * pad, 2), "base model", fill="black")
    for i, (task, prompt, truth_image, model_image, score) in enumerate(rows):
        top = 16 + pad + i * (size + pad)
        draw.text((pad, top + size // 2 - 12), f"{task}:", fill="gray")
        draw.text((pad, top + size // 2), prompt, fill="black")
        draw.text((pad, top + size // 2 + 12), f"model reward {score:.2f}", fill="gray")
        for j, image in enumerate((truth_image, model_image)):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (text_width + pad + j * (size + pad), top))
    return sheet


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=None, help="a pipeline folder (default: the bundled base model)")
    parser.add_argument(
        "--lora", default=None, help="a LoRA folder or file (diffusers format) to load into the model, e.g. a teacher"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--picture", default=None, help="where to write the sample sheet (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    pipe = load_pipeline(args.model)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    start = time.perf_counter()
    results = measure(pipe, args.split, args.num_inference_steps, args.guidance_scale, args.seed)
    results["sampling"] = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    results["seconds"] = round(time.perf_counter() - start, 1)
    if args.picture:
        sample_sheet(
            pipe,
            split=args.split,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
        ).save(args.picture)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
