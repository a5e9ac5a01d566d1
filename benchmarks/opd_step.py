"""Seconds per DiffusionOPDTrainer step (fused vs two-pass) and peak memory with 0, 1, 2 and 4 teachers.

    python -m benchmarks.opd_step [--steps 12] [--batch 8] [--inference_steps 10] [--threads 2]

Each configuration runs in its own process (peak resident memory is a per-process high-water mark). "0 teachers" is
the same step with the base model (adapters disabled) as the teacher: the cost of the method without any teacher
adapter. Runs on the tiny SD3 pipeline (4 layers) on CPU, or the GPU when there is one. Measure on a quiet machine.
"""

import argparse
import json
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig

from benchmarks._common import load_average, peak_rss_mib, run_isolated
from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.lora import DEFAULT_TARGET_MODULES, lora_parameters
from diffusion_opd_trainer.testing import DEFAULT_WORDS, save_random_lora, tiny_sd3_pipeline


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = tiny_sd3_pipeline(num_layers=4)
    if torch.cuda.is_available():
        pipe.to("cuda")
    num_teachers = max(1, args.teachers)
    prompts = [" ".join(DEFAULT_WORDS[i : i + 3]) for i in range(0, 40, 2)]
    tasks = [f"task{i % num_teachers}" for i in range(len(prompts))]
    with tempfile.TemporaryDirectory() as tmp:
        teachers = {
            f"task{i}": save_random_lora(pipe, f"{tmp}/t{i}", "peft", r=32, lora_alpha=64, seed=i, std=0.05)
            for i in range(num_teachers)
        }
        config = DiffusionOPDConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            num_inference_steps=args.inference_steps,
            guidance_scale=4.5,
            noise_level=0.0,
            rollout_schedule=args.schedule,
            max_steps=args.steps,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            log_level="error",
        )
        trainer = DiffusionOPDTrainer(
            pipe,
            teachers=teachers,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts, "task": tasks}),
            peft_config=LoraConfig(
                r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=DEFAULT_TARGET_MODULES["transformer"]
            ),
        )
        denoiser = trainer.unwrapped_denoiser
        if args.teachers == 0:
            # The base model as the teacher: no teacher adapter in memory.
            denoiser.delete_adapters([trainer.teachers["task0"].adapter_name])
            trainer.teachers["task0"].adapter_name = None
        teacher_bytes = sum(
            p.numel() * p.element_size()
            for t in trainer.teachers.values()
            if t.adapter_name
            for p in lora_parameters(denoiser, t.adapter_name).values()
        )
        base_bytes = sum(p.numel() * p.element_size() for n, p in denoiser.named_parameters() if "lora_" not in n)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry][2:]
    result = {
        "teachers": args.teachers,
        "schedule": args.schedule,
        "seconds_per_step": sum(times) / len(times),
        "wall": wall,
        "peak_rss_mib": peak_rss_mib(),
        "teacher_adapter_mib": teacher_bytes / 2**20,
        "base_denoiser_mib": base_bytes / 2**20,
    }
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teachers", type=int, default=1)
    parser.add_argument("--schedule", default="fused")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inference_steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    common = [
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--inference_steps",
        str(args.inference_steps),
        "--threads",
        str(args.threads),
    ]
    print(
        f"tiny SD3 (4 layers), {args.batch} prompts/step, {args.inference_steps} ODE steps (9 trained), CFG 4.5, "
        f"LoRA r32; load average before: {load_average():.2f}",
        flush=True,
    )
    rows = []
    for schedule in ("fused", "two_pass"):
        rows.append(run_isolated("benchmarks.opd_step", "--teachers", "2", "--schedule", schedule, *common))
    fused, two_pass = rows
    speedup = two_pass["seconds_per_step"] / fused["seconds_per_step"]
    print(
        f"seconds per step, 2 teachers: fused {fused['seconds_per_step']:.3f}, two-pass "
        f"{two_pass['seconds_per_step']:.3f} (speed-up {speedup:.2f}x)"
    )
    print(
        "| teachers | peak RSS (MiB) | teacher adapters (MiB) | base denoiser (MiB) | s/step (fused) |"
        + (" peak GPU (MiB) |" if "peak_gpu_mib" in fused else "")
    )
    for count in (0, 1, 2, 4):
        row = run_isolated("benchmarks.opd_step", "--teachers", str(count), "--schedule", "fused", *common)
        line = (
            f"| {count} | {row['peak_rss_mib']:.0f} | {row['teacher_adapter_mib']:.2f} | "
            f"{row['base_denoiser_mib']:.2f} | {row['seconds_per_step']:.3f} |"
        )
        if "peak_gpu_mib" in row:
            line += f" {row['peak_gpu_mib']:.0f} |"
        print(line, flush=True)
    print(f"load average after: {load_average():.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
