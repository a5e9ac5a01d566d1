"""Seconds per DiffusionGRPOTrainer step, peak memory, and the share of a step spent in rollout, reward and training.

    python -m benchmarks.grpo_step [--steps 20] [--batch 8] [--generations 4] [--inference_steps 10] [--threads 2]

Runs on the tiny SD3 pipeline on CPU (or the GPU when there is one). Measure on a quiet machine.
"""

import argparse
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig

from benchmarks._common import load_average, peak_rss_mib
from diffusion_opd_trainer import DiffusionGRPOConfig, DiffusionGRPOTrainer
from diffusion_opd_trainer.testing import DEFAULT_WORDS, tiny_sd3_pipeline


def jpeg_like_reward(prompts, images, **kwargs):
    # Cheap and image-dependent: the benchmark measures the trainer, not a reward model.
    return images.std(dim=(1, 2, 3)).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--inference_steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.04)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()

    pipe = tiny_sd3_pipeline()
    if torch.cuda.is_available():
        pipe.to("cuda")
    prompts = [" ".join(DEFAULT_WORDS[i : i + 3]) for i in range(0, 30, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        config = DiffusionGRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            num_generations=args.generations,
            num_inference_steps=args.inference_steps,
            guidance_scale=4.5,
            beta=args.beta,
            max_steps=args.steps + 2,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        trainer = DiffusionGRPOTrainer(
            pipe,
            reward_funcs=jpeg_like_reward,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            peft_config=LoraConfig(
                r=32,
                lora_alpha=64,
                init_lora_weights="gaussian",
                target_modules=[
                    "to_q",
                    "to_k",
                    "to_v",
                    "to_out.0",
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "to_add_out",
                ],
            ),
        )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "step_time" in entry][2:]  # skip warm-up steps
    mean = lambda key: sum(entry[key] for entry in logs) / len(logs)  # noqa: E731
    step, rollout = mean("step_time"), mean("timing/rollout")
    reward, train = mean("timing/reward"), mean("timing/train")
    prompts = args.batch // args.generations
    print(
        f"tiny SD3 pipeline, {args.batch} images/step ({prompts} prompts x {args.generations}),"
        f" {args.inference_steps} SDE steps, CFG 4.5, beta {args.beta}, {args.threads} threads"
    )
    print(f"load average before: {load_before:.2f}, after: {load_average():.2f}")
    print(f"seconds per step: {step:.3f}  (wall {wall:.1f} s for {args.steps + 2} steps)")
    print(
        f"  rollout {rollout:.3f} s ({100 * rollout / step:.0f}%), reward {reward:.4f} s "
        f"({100 * reward / step:.1f}%), training {train:.3f} s ({100 * train / step:.0f}%)"
    )
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak process memory (RSS): {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
