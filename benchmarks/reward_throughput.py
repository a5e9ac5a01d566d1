"""
Scoring throughput (images per second) of each reward on the tiny random models, on CPU.

    python benchmarks/reward_throughput.py [--num-images 64] [--resolution 64] [--threads 1] [--batch-size 16]

The tiny models (`diffusion_opd_trainer.rewards.testing`) exercise the real code paths (processors, post-processing,
OCR decoding, GenEval's rules and colour classification) with negligible network cost: the numbers measure the
plumbing around the models, an upper bound on what the real models reach, not their speed.
"""

import argparse
import logging
import time

import torch

from diffusion_opd_trainer.rewards import (
    AestheticMLP,
    AestheticReward,
    CLIPScoreReward,
    GenEvalReward,
    JpegCompressibility,
    JpegIncompressibility,
    OCRReward,
    PickScoreReward,
)
from diffusion_opd_trainer.rewards.geneval import GENEVAL_CLASSES
from diffusion_opd_trainer.rewards.testing import tiny_clip, tiny_mask2former, tiny_trocr


logger = logging.getLogger(__name__)

GENEVAL_METADATA = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
    {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]},
    {"tag": "colors", "include": [{"class": "cat", "count": 2, "color": "red"}]},
    {
        "tag": "color_attr",
        "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}],
    },
]


def build_rewards(batch_size: int, ocr_tokens: int) -> dict:
    clip_model, clip_processor = tiny_clip()
    trocr, trocr_processor = tiny_trocr()
    detector, detector_processor = tiny_mask2former()
    # Random weights would end most work early: the OCR decoder would stop at once and no object would pass GenEval's
    # threshold. Biasing the outputs makes the OCR read `ocr_tokens` characters and every query a confident "cat",
    # so decoding, colour classification and the rules all run as they do on real images.
    bias = torch.zeros(trocr.config.decoder.vocab_size)
    bias[trocr_processor.tokenizer.convert_tokens_to_ids("h")] = 100.0
    trocr.decoder.output_projection.register_forward_hook(lambda module, inputs, output: output + bias)
    with torch.no_grad():
        detector.class_predictor.bias.zero_()
        detector.class_predictor.bias[GENEVAL_CLASSES.index("cat")] = 30.0
    common = {"device": "cpu", "batch_size": batch_size}
    return {
        "jpeg_compressibility": JpegCompressibility(**common),
        "jpeg_incompressibility": JpegIncompressibility(**common),
        "pickscore": PickScoreReward(model=clip_model, processor=clip_processor, **common),
        "clip_score": CLIPScoreReward(model=clip_model, processor=clip_processor, **common),
        "aesthetic": AestheticReward(model=clip_model, processor=clip_processor, head=AestheticMLP(16), **common),
        "ocr": OCRReward(model=trocr, processor=trocr_processor, max_new_tokens=ocr_tokens, **common),
        "geneval": GenEvalReward(
            detector=detector,
            detector_processor=detector_processor,
            clip_model=clip_model,
            clip_processor=clip_processor,
            detector_size=None,
            **common,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best one is reported")
    parser.add_argument("--ocr-tokens", type=int, default=16, help="characters the OCR decoder is made to read")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.num_images, 3, args.resolution, args.resolution, generator=generator)
    prompts = [f'a photo of a cat and a sign saying "hello {i}"' for i in range(args.num_images)]
    columns = {"metadata": [GENEVAL_METADATA[i % len(GENEVAL_METADATA)] for i in range(args.num_images)]}

    logger.info(
        "%d images of %dx%d, batch size %d, %d thread(s), torch %s",
        args.num_images,
        args.resolution,
        args.resolution,
        args.batch_size,
        args.threads,
        torch.__version__,
    )
    logger.info("%-24s %12s %12s", "reward", "images/s", "ms/image")
    for name, reward in build_rewards(args.batch_size, args.ocr_tokens).items():
        reward(
            prompts=prompts[: args.batch_size],
            images=images[: args.batch_size],
            **{key: value[: args.batch_size] for key, value in columns.items()},
        )  # warm-up: loads, first-call allocations
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            reward(prompts=prompts, images=images, **columns)
            best = min(best, time.perf_counter() - start)
        logger.info("%-24s %12.1f %12.2f", name, args.num_images / best, 1000 * best / args.num_images)


if __name__ == "__main__":
    main()
