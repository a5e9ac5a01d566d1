"""Seconds per DiffusionOPDTrainer step (fused vs two-pass) and peak memory with 0, 1, 2 and 4 teachers.

    python -m benchmarks.opd_step [--steps 12] [--batch 8] [--inference_steps 10] [--threads 2]

Each configuration runs in its own process (peak resident memory is a per-process high-water mark). "0 teachers" is
the same step with the base model (adapters disabled) as the teacher: the cost of the method without any teacher
adapter. Runs on the tiny SD3 pipeline (4 layers) on CPU, or the GPU when there is one. Measure on a quiet machine.

    python -m benchmarks.opd_step --teacher_scaling [--repeats 5] [--width 384] [--layers 4] [--resolution 64]

How the fused step's time grows with the number of teachers in a batch (1, 2, 4; the teacher pass is one batched
forward, see `targets.teacher_means`), at a compute-bound size: the tiny SD3 pipeline with a wider transformer
(about 20M parameters at the defaults, printed). One process, one trainer holding 4 teachers; the configurations are
interleaved (1 2 4 1 2 4 ...) after one warm-up step each, so that a change of machine load hits them all alike, and
each is reported as the median and range of its step times, with its teacher pass's share (and on the CPU the
process' CPU seconds per step, which a busy machine inflates far less than wall time), beside the load average.
`--compare_per_task` adds 2 and 4 teachers run with one teacher forward per task (the unbatched pass) to the rotation.

    python -m benchmarks.opd_step --fused_vs_two_pass [--repeats 7] [--width 384] [--layers 4] [--resolution 64]

The fused schedule against the two-pass one, and against the bare compute, at the same compute-bound size (one
teacher, the whole batch its task). One process and one trainer: a micro-step of each schedule is the trainer's own
`training_step` (student rollout, teacher means, one backward per trained step; no optimizer step, gradients dropped
before each), the schedule switched between calls. The bare compute is the same denoiser calls without the trainer:
at each trained step a teacher forward (its adapter active, no gradient) and a student forward and backward of the
squared difference, at each untrained step a student forward without gradient, and a plain Euler step between them.
The three are interleaved (fused, two-pass, bare, fused, ...) after one warm-up each and reported as median and range
(and on the CPU the process' CPU seconds), beside the load average, with the two goals: two-pass / fused at least
1.2x (the rollout forwards the fused schedule saves), fused / bare at most 1.1x (the trainer's overhead). With more
threads than idle cores the CPU seconds are inflated too (the threads spin while waiting for each other): on a busy
machine, `--threads 1`.
"""

import argparse
import json
import sys
import tempfile
import time

import torch
from datasets import Dataset
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig

from benchmarks._common import load_average, load_averages, median_and_spread, peak_rss_mib, run_isolated
from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.lora import DEFAULT_TARGET_MODULES, active_adapter, lora_parameters
from diffusion_opd_trainer.testing import (
    DEFAULT_WORDS,
    save_random_lora,
    seeded,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)


PROMPTS = [" ".join(DEFAULT_WORDS[i : i + 3]) for i in range(0, 40, 2)]


def make_trainer(pipe, num_teachers: int, tmp: str, args, max_steps: int = 1) -> DiffusionOPDTrainer:
    """An OPD trainer (ODE, CFG 4.5, LoRA r32) with `num_teachers` random teachers, the prompts' tasks in turn."""
    tasks = [f"task{i % num_teachers}" for i in range(len(PROMPTS))]
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
        max_steps=max_steps,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        log_level="error",
    )
    return DiffusionOPDTrainer(
        pipe,
        teachers=teachers,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "task": tasks}),
        peft_config=LoraConfig(
            r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=DEFAULT_TARGET_MODULES["transformer"]
        ),
    )


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = tiny_sd3_pipeline(num_layers=4)
    if torch.cuda.is_available():
        pipe.to("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(pipe, max(1, args.teachers), tmp, args, max_steps=args.steps)
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


def compute_bound_pipeline(width: int, layers: int, resolution: int) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline (its text encoders and VAE) with a transformer of `width` (64-wide heads) and `layers`."""
    pipe = tiny_sd3_pipeline(resolution=resolution)
    with seeded(0):
        transformer = tiny_sd3_transformer(
            resolution // 2, layers, num_attention_heads=width // 64, attention_head_dim=64
        ).eval()
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def teacher_scaling(args) -> None:
    """The fused step's seconds with 1, 2 and 4 teachers in the batch, interleaved (see the module docstring)."""
    torch.set_num_threads(args.threads)
    pipe = compute_bound_pipeline(args.width, args.layers, args.resolution)
    if torch.cuda.is_available():
        pipe.to("cuda")
    size = sum(p.numel() for p in pipe.transformer.parameters())
    configs = [(1, True), (2, True), (4, True)]
    if args.compare_per_task:
        configs += [(2, False), (4, False)]
    with tempfile.TemporaryDirectory() as tmp:
        args.schedule = "fused"
        trainer = make_trainer(pipe, 4, tmp, args)
        model = trainer.model
        model.train()
        embeds = trainer.encode(PROMPTS[: args.batch])
        teacher_seconds = [0.0]
        teacher_means = trainer.teacher_means

        def timed_teacher_means(*inputs):
            synchronize()
            start = time.perf_counter()
            means = teacher_means(*inputs)
            synchronize()
            teacher_seconds[0] += time.perf_counter() - start
            return means

        trainer.teacher_means = timed_teacher_means

        def step(count: int, batched: bool) -> tuple[float, float, float]:
            # The batch's rows take the teachers in turn (a mixed batch); the student's gradient is dropped.
            tasks = [f"task{i % count}" for i in range(args.batch)]
            trainer.batch_teacher_forwards = batched
            model.zero_grad(set_to_none=True)
            teacher_seconds[0] = 0.0
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer._fused_step(model, embeds, tasks)
            synchronize()
            return time.perf_counter() - start, teacher_seconds[0], time.process_time() - cpu_start

        trained = len(trainer.args.trained_step_indices)
        tokens = (args.resolution // pipe.vae_scale_factor // 2) ** 2  # 2x2 patches of the latents
        print(
            f"SD3 transformer of {size / 1e6:.1f}M parameters (width {args.width}, {args.layers} layers, "
            f"{args.resolution}px: {tokens} image tokens), {args.batch} prompts/step, "
            f"{args.inference_steps} ODE steps ({trained} trained), CFG 4.5, LoRA r32 student and teachers, "
            f"{args.threads} threads, {'GPU' if torch.cuda.is_available() else 'CPU'}; {args.repeats} interleaved "
            f"repeats after one warm-up step each",
            flush=True,
        )
        print(f"load average before: {load_averages()}", flush=True)
        for config in configs:
            step(*config)
        times = {config: [] for config in configs}
        for _ in range(args.repeats):
            for config in configs:
                times[config].append(step(*config))
    print(f"load average after: {load_averages()}")
    # On the CPU, the process' CPU seconds too: a busy machine stretches wall time (time-slicing), far less CPU time.
    cpu = not torch.cuda.is_available()
    print(
        "| teachers | teacher pass | s/step (median) | min - max | spread | teacher pass s/step | vs 1 teacher |"
        + (" CPU s/step (median) | CPU vs 1 teacher |" if cpu else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if cpu else ""))
    medians = {
        config: [median_and_spread([v[k] for v in values])["median"] for k in range(3)]
        for config, values in times.items()
    }
    base = medians[(1, True)]
    for (count, batched), values in times.items():
        total = median_and_spread([value[0] for value in values])
        median = medians[(count, batched)]
        line = (
            f"| {count} | {'batched' if batched else 'per task'} | {total['median']:.3f} | {total['min']:.3f} - "
            f"{total['max']:.3f} | {100 * total['spread']:.0f}% | {median[1]:.3f} | {median[0] / base[0]:.2f}x |"
        )
        if cpu:
            line += f" {median[2]:.3f} | {median[2] / base[2]:.2f}x |"
        print(line)
    ratio = medians[(4, True)][0] / base[0]
    cpu_ratio = f", CPU time {medians[(4, True)][2] / base[2]:.2f}x" if cpu else ""
    print(f"4 teachers / 1 teacher: {ratio:.2f}x{cpu_ratio} (goal: at most 1.15x)")


def fused_vs_two_pass(args) -> dict:
    """
    Seconds of a fused and of a two-pass micro-step and of the bare compute, interleaved (see the module docstring);
    prints the table and the two ratios, and returns the timings.
    """
    torch.set_num_threads(args.threads)
    pipe = compute_bound_pipeline(args.width, args.layers, args.resolution)
    if torch.cuda.is_available():
        pipe.to("cuda")
    size = sum(p.numel() for p in pipe.transformer.parameters())
    guidance_scale = 4.5  # as `make_trainer`'s
    with tempfile.TemporaryDirectory() as tmp:
        args.schedule = "fused"
        trainer = make_trainer(pipe, 1, tmp, args)
        model, family = trainer.model, trainer.family
        model.train()
        prompts = PROMPTS[: args.batch]
        inputs = [{"prompt": prompt, "task": "task0"} for prompt in prompts]
        embeds = trainer.encode(prompts)
        teacher = trainer.teachers["task0"].adapter_name
        height, width = trainer.image_size
        trained = set(trainer.args.trained_step_indices)
        generator = torch.Generator(device=family.device).manual_seed(0)

        def schedule_step(schedule: str) -> None:
            trainer.args.rollout_schedule = schedule
            trainer.training_step(model, inputs)

        def bare_step() -> None:
            x = family.prepare_latents(len(prompts), height, width, generator)
            timesteps = family.set_timesteps(args.inference_steps, height, width)
            sigmas = family.scheduler.sigmas.tolist()
            for j, t in enumerate(timesteps):
                if j in trained:
                    with torch.no_grad(), active_adapter(family.denoiser, teacher):
                        target = family.predict(x, t, embeds, guidance_scale)
                    velocity = family.predict(x, t, embeds, guidance_scale, denoiser=model)
                    (velocity - target).pow(2).mean().backward()
                    velocity = velocity.detach()
                else:
                    with torch.no_grad():
                        velocity = family.predict(x, t, embeds, guidance_scale)
                x = x + (sigmas[j + 1] - sigmas[j]) * velocity

        variants = {
            "fused": lambda: schedule_step("fused"),
            "two_pass": lambda: schedule_step("two_pass"),
            "bare": bare_step,
        }

        def timed(run) -> tuple[float, float]:
            model.zero_grad(set_to_none=True)
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            synchronize()
            return time.perf_counter() - start, time.process_time() - cpu_start

        tokens = (args.resolution // pipe.vae_scale_factor // 2) ** 2  # 2x2 patches of the latents
        print(
            f"SD3 transformer of {size / 1e6:.1f}M parameters (width {args.width}, {args.layers} layers, "
            f"{args.resolution}px: {tokens} image tokens), {args.batch} prompts/step, {args.inference_steps} ODE "
            f"steps ({len(trained)} trained), CFG {guidance_scale}, LoRA r32 student and one teacher, "
            f"{args.threads} threads, {'GPU' if torch.cuda.is_available() else 'CPU'}; {args.repeats} interleaved "
            "repeats (fused, two-pass, bare) after one warm-up each",
            flush=True,
        )
        print(f"load average before: {load_averages()}", flush=True)
        for run in variants.values():
            timed(run)
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                times[name].append(timed(run))
    print(f"load average after: {load_averages()}")
    cpu = not torch.cuda.is_available()
    print("| micro-step | s (median) | min - max | spread |" + (" CPU s (median) |" if cpu else ""))
    print("|---|---|---|---|" + ("---|" if cpu else ""))
    wall = {name: median_and_spread([value[0] for value in values]) for name, values in times.items()}
    cpu_time = {name: median_and_spread([value[1] for value in values]) for name, values in times.items()}
    for name in variants:
        line = (
            f"| {name} | {wall[name]['median']:.3f} | {wall[name]['min']:.3f} - {wall[name]['max']:.3f} | "
            f"{100 * wall[name]['spread']:.0f}% |"
        )
        print(line + (f" {cpu_time[name]['median']:.3f} |" if cpu else ""))

    def ratio(numerator: str, denominator: str) -> str:
        of_medians = wall[numerator]["median"] / wall[denominator]["median"]
        per_round = median_and_spread([a[0] / b[0] for a, b in zip(times[numerator], times[denominator])])
        text = f"{of_medians:.2f}x (median of the rounds' ratios {per_round['median']:.2f}x)"
        if cpu:
            text += f", CPU time {cpu_time[numerator]['median'] / cpu_time[denominator]['median']:.2f}x"
        return text

    print(f"two-pass / fused: {ratio('two_pass', 'fused')} (goal: at least 1.2x)")
    print(f"fused / bare: {ratio('fused', 'bare')} (goal: at most 1.1x)")
    return {name: values for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teachers", type=int, default=1)
    parser.add_argument("--schedule", default="fused")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inference_steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher_scaling", action="store_true", help="1, 2, 4 teachers at a compute-bound size")
    parser.add_argument("--repeats", type=int, default=5, help="--teacher_scaling, --fused_vs_two_pass: timed rounds")
    parser.add_argument("--width", type=int, default=384, help="compute-bound modes: the transformer's width")
    parser.add_argument("--layers", type=int, default=4, help="compute-bound modes: the transformer's blocks")
    parser.add_argument("--resolution", type=int, default=64, help="compute-bound modes: the image size in pixels")
    parser.add_argument("--compare_per_task", action="store_true", help="--teacher_scaling: add the unbatched pass")
    parser.add_argument(
        "--fused_vs_two_pass", action="store_true", help="fused vs two-pass vs the bare compute, compute-bound size"
    )
    args = parser.parse_args()
    if args.teacher_scaling:
        teacher_scaling(args)
        return
    if args.fused_vs_two_pass:
        fused_vs_two_pass(args)
        return
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
