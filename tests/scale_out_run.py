"""
Run under `accelerate launch --num_processes 2` on CPUs by tests/test_scale_out.py: a tiny two-teacher OPD run (FSDP2
or DDP, the first argument after the folder), with a checkpoint at every step, then `save_model` to `<folder>/final`.
Each process writes `<folder>/report-rank<r>.json`: the distributed type, whether the denoiser was sharded, the
teachers' tasks it trained on at each step, its teachers' weights before and after (gathered whole), the student's
checksum and its log history. `resume` as third argument resumes from `<folder>/checkpoint-1` instead of starting
afresh.

accelerate 1.15 enables FSDP only for GPU-like devices: with `ACCELERATE_USE_CPU=true` its `AcceleratorState` keeps the
CPU processes' DDP (`MULTI_CPU`) and ignores the launcher's FSDP settings. `--force-fsdp-on-cpu` (what the test
passes) makes the process state's type a GPU-like one before the trainer's `Accelerator` is made, so that accelerate
enables FSDP and its own FSDP2 preparation (`fully_shard` of each transformer block and of the denoiser) runs on the
CPU processes over gloo.
"""

import hashlib
import json
import logging
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset
from peft import LoraConfig

# The checksum test's tiny settings (run as a script, this file's folder is on the path).
from test_refactor_checksums import COMMON, LORA, PROMPTS
from torch.distributed.tensor import DTensor

from diffusion_opd_trainer import DiffusionOPDConfig, DiffusionOPDTrainer, EvaluationCallback
from diffusion_opd_trainer.lora import STUDENT_ADAPTER, adapter_checksum, full_tensor, lora_parameters
from diffusion_opd_trainer.testing import save_random_lora, tiny_sd3_pipeline


logger = logging.getLogger(__name__)

TASKS = ["a", "b"]
# Teacher "a" runs without CFG, "b" with it: their rows never share a forward, so a process whose batch holds one
# task runs other forwards than one whose batch holds both, unless the forwards are made the same on every process.
TEACHER_GUIDANCE = {"a": 1.0, "b": 2.0}


def brightness(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def teacher_weights(trainer) -> dict[str, str]:
    """Each teacher's weights gathered whole (a collective under FSDP), as a digest."""
    denoiser = trainer.unwrapped_denoiser
    return {
        task: weights_digest(
            {n: full_tensor(p.detach()) for n, p in lora_parameters(denoiser, teacher.adapter_name).items()}
        )
        for task, teacher in trainer.teachers.items()
    }


def build_trainer(output_dir: str, force_fsdp: bool) -> DiffusionOPDTrainer:
    # A checkpoint at each step, and an EMA updated at each step so that its gathers run too (the diffusers file then
    # holds the EMA's weights, the PEFT file the trained ones).
    settings = {**COMMON, "save_strategy": "steps", "save_steps": 1, "ema": True, "ema_decay": 0.5}
    settings["ema_update_interval"] = 1
    args = DiffusionOPDConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        teacher_guidance_scales=json.dumps(TEACHER_GUIDANCE),
        **settings,
    )
    # The process state as the config set it up (building the config resets it): CPU processes' DDP.
    state = PartialState()
    teachers = {
        task: save_random_lora(
            tiny_sd3_pipeline(), os.path.join(output_dir, f"teacher-{task}-rank{state.process_index}"), seed=i
        )
        for i, task in enumerate(TASKS, start=1)
    }
    if force_fsdp:
        # `AcceleratorState` enables FSDP for GPU-like types only; it then sets the process state's type to FSDP
        # itself, as on GPUs.
        assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    pipe = tiny_sd3_pipeline()
    # Evaluation at step 2 (the callback) and after training (`evaluate`): under FSDP every process samples.
    callback = EvaluationCallback(pipe, PROMPTS[:2], [brightness], eval_steps=2, num_inference_steps=2)
    return DiffusionOPDTrainer(
        pipe,
        teachers=teachers,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2, "task": ["a", "a", "a", "b"] * 2}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2], "task": TASKS}),
        eval_reward_funcs=brightness,
        peft_config=LoraConfig(**LORA),
        callbacks=[callback],
    )


def main(output_dir: str, mode: str, resume: bool, force_fsdp: bool) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    trainer = build_trainer(output_dir, force_fsdp)
    rank = trainer.accelerator.process_index
    steps_tasks = []
    teacher_tasks = trainer.teacher_tasks

    def record_tasks(columns, batch_size):
        tasks = teacher_tasks(columns, batch_size)
        steps_tasks.append(tasks)
        return tasks

    trainer.teacher_tasks = record_tasks
    before = teacher_weights(trainer)
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-1") if resume else None)
    denoiser = trainer.unwrapped_denoiser
    report = {
        "mode": mode,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "sharded": any(isinstance(p, DTensor) for p in denoiser.parameters()),
        "tasks": steps_tasks,
        "teachers_before": before,
        "teachers_after": teacher_weights(trainer),
        "teacher_checksums": {
            task: adapter_checksum(denoiser, teacher.adapter_name) for task, teacher in trainer.teachers.items()
        },
        "recorded_checksums": {task: teacher.checksum for task, teacher in trainer.teachers.items()},
        "student_checksum": adapter_checksum(denoiser, STUDENT_ADAPTER),
        "log_history": trainer.state.log_history,
        "evaluate": trainer.evaluate(),
        "callback": [
            result.metrics["eval"]
            for c in trainer.callback_handler.callbacks
            if isinstance(c, EvaluationCallback)
            for result in c.results
        ],
    }
    trainer.save_model(os.path.join(output_dir, "final"))
    with open(os.path.join(output_dir, f"report-rank{rank}.json"), "w") as file:
        json.dump(report, file)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    force = "--force-fsdp-on-cpu" in arguments
    arguments = [a for a in arguments if a != "--force-fsdp-on-cpu"]
    main(arguments[0], arguments[1], len(arguments) > 2 and arguments[2] == "resume", force)
