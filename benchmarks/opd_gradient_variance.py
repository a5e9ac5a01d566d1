"""Gradient variance of the two policy-gradient OPD estimators relative to the analytic step KL.

    python -m benchmarks.opd_gradient_variance [--rollouts 24] [--inference_steps 10] [--noise_levels 0.3 0.7 1.0]

For each noise level, the same `--rollouts` independent student rollouts (one prompt each, fixed seeds) give one
gradient of the student LoRA per loss type (`analytic`, `policy_gradient`, `score_function`). Reported: the total
variance (trace of the covariance over rollouts) of each estimator, its ratio to the analytic one, and the cosine
between each estimator's mean gradient and the analytic mean (all three share the expected gradient; the ratio is what
the extra score-function term costs). Tiny SD3 pipeline, one random teacher, on CPU.
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig

from benchmarks._common import load_average
from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer
from diffusion_opd_trainer.lora import DEFAULT_TARGET_MODULES
from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline


LOSS_TYPES = ("analytic", "policy_gradient", "score_function")


def gradients(noise_level: float, loss_type: str, rollouts: int, inference_steps: int, teacher: str, tmp: str):
    config = DiffusionOPDConfig(
        output_dir=tmp,
        per_device_train_batch_size=1,
        num_inference_steps=inference_steps,
        guidance_scale=1.0,
        noise_level=noise_level,
        loss_type=loss_type,
        report_to=[],
        disable_tqdm=True,
        log_level="error",
    )
    trainer = DiffusionOPDTrainer(
        tiny_sd3_pipeline(),
        teachers={"t": teacher},
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle"]}),
        peft_config=LoraConfig(
            r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=DEFAULT_TARGET_MODULES["transformer"]
        ),
    )
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    rows = [{"prompt": "a red circle"}]
    grads = []
    for seed in range(rollouts):
        trainer.rollout_generator.manual_seed(seed)
        trainer.model.zero_grad(set_to_none=True)
        trainer.training_step(trainer.model, rows)
        grads.append(torch.cat([p.grad.flatten() for p in params]).double())
    return torch.stack(grads)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=24)
    parser.add_argument("--inference_steps", type=int, default=10)
    parser.add_argument("--noise_levels", type=float, nargs="+", default=[0.3, 0.7, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.rollouts} rollouts x {args.inference_steps} steps (all but the last trained), tiny SD3, one random "
        f"teacher; load average {load_average():.2f}"
    )
    print("| noise | estimator | total variance | ratio to analytic | cos(mean, analytic mean) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        teacher = save_random_lora(tiny_sd3_pipeline(), f"{tmp}/teacher", "peft", seed=1, std=0.3)
        for noise in args.noise_levels:
            results = {
                lt: gradients(noise, lt, args.rollouts, args.inference_steps, teacher, tmp) for lt in LOSS_TYPES
            }
            analytic_var = results["analytic"].var(dim=0).sum().item()
            analytic_mean = results["analytic"].mean(dim=0)
            for loss_type, grads in results.items():
                variance = grads.var(dim=0).sum().item()
                cosine = torch.nn.functional.cosine_similarity(grads.mean(dim=0), analytic_mean, dim=0).item()
                print(
                    f"| {noise} | {loss_type} | {variance:.3e} | {variance / analytic_var:.4g} | {cosine:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
