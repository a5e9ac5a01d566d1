"""Gradient variance of the two policy-gradient OPD estimators relative to the analytic step KL.

    python -m benchmarks.opd_gradient_variance [--rollouts 24] [--inference_steps 10] [--noise_levels 0.3 0.7 1.0]
    python -m benchmarks.opd_gradient_variance --toy [--teacher LORA_DIR --base_model PIPELINE_DIR]

For each noise level, the same `--rollouts` independent student rollouts (fixed seeds) give one gradient of the student
LoRA per loss type (`analytic`, `policy_gradient`, `score_function`). Reported: the total variance (trace of the
covariance over rollouts) of each estimator, its ratio to the analytic one, and the cosine between each estimator's
mean gradient and the analytic mean (all three share the expected gradient; the ratio is what the extra
score-function term costs). Default: the tiny random SD3 pipeline, one random teacher, one prompt. `--toy`: the
bundled toy model (CFG 3, the toy's LoRA shape), rollout `i` on the `i`-th training prompt of the teacher's task, and
the teacher LoRA given by `--teacher` (e.g. one the toy table trained) or a random one. On CPU.
"""

import argparse
import tempfile
from typing import Optional

import torch
from datasets import Dataset
from peft import LoraConfig

from benchmarks._common import load_average
from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer, toy
from diffusion_opd_trainer.lora import DEFAULT_TARGET_MODULES
from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline


LOSS_TYPES = ("analytic", "policy_gradient", "score_function")


class Setup:
    """The model, the student LoRA's shape, the prompts and the sampler of one measurement."""

    def __init__(self, use_toy: bool, task: str, base_model: Optional[str] = None):
        self.use_toy, self.base_model = use_toy, base_model
        # The toy table's student LoRA (r 32) and sampler (CFG 3) on the toy model; a small LoRA on the tiny one.
        self.rank, self.guidance_scale = (32, toy.DEFAULT_GUIDANCE_SCALE) if use_toy else (8, 1.0)
        self.prompts = [row["prompt"] for row in toy.prompts(task)] if use_toy else ["a red circle"]

    def pipeline(self):
        return toy.load_pipeline(self.base_model) if self.use_toy else tiny_sd3_pipeline()

    def prompt(self, rollout: int) -> str:
        return self.prompts[rollout % len(self.prompts)]


def gradients(
    setup: Setup, noise_level: float, loss_type: str, rollouts: int, inference_steps: int, teacher: str, tmp: str
):
    config = DiffusionOPDConfig(
        output_dir=tmp,
        per_device_train_batch_size=1,
        num_inference_steps=inference_steps,
        guidance_scale=setup.guidance_scale,
        noise_level=noise_level,
        loss_type=loss_type,
        report_to=[],
        disable_tqdm=True,
        log_level="error",
    )
    trainer = DiffusionOPDTrainer(
        setup.pipeline(),
        teachers={"t": teacher},
        args=config,
        train_dataset=Dataset.from_dict({"prompt": setup.prompts}),
        peft_config=LoraConfig(
            r=setup.rank,
            lora_alpha=2 * setup.rank,
            init_lora_weights="gaussian",
            target_modules=DEFAULT_TARGET_MODULES["transformer"],
        ),
    )
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = []
    for seed in range(rollouts):
        trainer.rollout_generator.manual_seed(seed)
        trainer.model.zero_grad(set_to_none=True)
        trainer.training_step(trainer.model, [{"prompt": setup.prompt(seed)}])
        grads.append(torch.cat([p.grad.flatten() for p in params]).double())
    return torch.stack(grads)


def random_teacher(setup: Setup, tmp: str) -> str:
    return save_random_lora(setup.pipeline(), f"{tmp}/teacher", "peft", seed=1, std=0.3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=24)
    parser.add_argument("--inference_steps", type=int, default=10)
    parser.add_argument("--noise_levels", type=float, nargs="+", default=[0.3, 0.7, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--toy", action="store_true", help="the bundled toy model instead of the tiny random one")
    parser.add_argument("--task", default="text", help="with --toy: the task whose training prompts are rolled out")
    parser.add_argument("--teacher", default=None, help="a teacher LoRA folder (default: a random LoRA)")
    parser.add_argument(
        "--base_model", default=None, help="with --toy: the toy pipeline folder the teacher was trained on"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup(args.toy, args.task, args.base_model)
    model = f"toy model, {args.task} prompts" if args.toy else "tiny SD3, one prompt"
    print(
        f"{args.rollouts} rollouts x {args.inference_steps} steps (all but the last trained), {model}, teacher "
        f"{args.teacher or 'random'}; load average {load_average():.2f}"
    )
    print("| noise | estimator | total variance | ratio to analytic | cos(mean, analytic mean) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher or random_teacher(setup, tmp)
        for noise in args.noise_levels:
            results = {
                lt: gradients(setup, noise, lt, args.rollouts, args.inference_steps, teacher, tmp) for lt in LOSS_TYPES
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
