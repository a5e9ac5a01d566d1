"""The order in which prompts reach the trainers: complete groups, repeated rollouts, optional task round-robin."""

from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch.utils.data import Sampler


# Offsets that keep the independent per-rollout draws (window start, shared group noise, teacher rows) apart.
SDE_WINDOW_STREAM, GROUP_NOISE_STREAM, TEACHER_ROWS_STREAM = 0, 500_009, 700_001


def rollout_draw_generator(seed: int, rollout_index: int, stream: int) -> torch.Generator:
    """
    A CPU generator for one kind of draw (`stream`) of rollout number `rollout_index`: a function of the training seed
    and the rollout index only, so that every process, and a resumed run, draws the same.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + rollout_index + stream)


class PromptSampler(Sampler[int]):
    """
    Yields dataset indices so that each *global micro-batch* (what all processes sample in one training step,
    `micro_batch_size = per_device_train_batch_size * num_processes` images) holds complete groups of
    `group_size` copies of a prompt, and each cycle of `gradient_accumulation_steps` micro-batches is repeated
    `num_iterations` times (the trainer reuses the rollouts of the repeats instead of sampling again).

    The accelerate data loader hands process `r` the `r`-th per-device slice of each global micro-batch, so a group
    may span processes; the trainers gather rewards before normalising.

    Args:
        num_samples (`int`): the dataset size.
        micro_batch_size (`int`): images per global micro-batch (a multiple of `group_size`).
        group_size (`int`, defaults to 1): copies of each prompt, consecutive (GRPO's `num_generations`).
        gradient_accumulation_steps (`int`, defaults to 1): micro-batches per optimizer step.
        num_iterations (`int`, defaults to 1): optimizer steps per rollout cycle.
        tasks (`Sequence[str]`, *optional*): the task of each row; with `round_robin`, each micro-batch holds one
            task's prompts and tasks take turns.
        round_robin (`bool`, defaults to `False`): one task per micro-batch, in turn (needs `tasks`).
        seed (`int`, defaults to 0): shuffling seed (combined with the epoch).
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        group_size: int = 1,
        gradient_accumulation_steps: int = 1,
        num_iterations: int = 1,
        tasks: Optional[Sequence[str]] = None,
        round_robin: bool = False,
        seed: int = 0,
    ):
        if micro_batch_size % group_size:
            raise ValueError(f"micro_batch_size {micro_batch_size} is not a multiple of group_size {group_size}.")
        if round_robin and tasks is None:
            raise ValueError("Round-robin task mixing needs a `task` column.")
        self.num_samples = num_samples
        self.prompts_per_micro_batch = micro_batch_size // group_size
        self.group_size = group_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.num_iterations = num_iterations
        self.tasks = list(tasks) if tasks is not None else None
        self.round_robin = round_robin
        self.seed = seed
        self.epoch = 0
        if len(self._micro_batches(torch.Generator().manual_seed(seed))) < gradient_accumulation_steps:
            raise ValueError(
                f"The dataset ({num_samples} prompts) is too small for one optimizer step: it needs "
                f"{self.prompts_per_micro_batch * gradient_accumulation_steps} prompts"
                + (" of each task" if round_robin else "")
                + "."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _micro_batches(self, generator: torch.Generator) -> list[list[int]]:
        size = self.prompts_per_micro_batch
        if not self.round_robin:
            order = torch.randperm(self.num_samples, generator=generator).tolist()
            return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        per_task: dict[str, list[list[int]]] = {}
        for task in dict.fromkeys(self.tasks):
            rows = [i for i, t in enumerate(self.tasks) if t == task]
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            per_task[task] = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        # Tasks take turns while every task still has a full micro-batch (keeps the mix balanced).
        rounds = min(len(batches) for batches in per_task.values())
        return [per_task[task][r] for r in range(rounds) for task in per_task]

    def _cycles(self) -> list[list[list[int]]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = self._micro_batches(generator)
        steps = self.gradient_accumulation_steps
        return [batches[i : i + steps] for i in range(0, len(batches) - steps + 1, steps)]

    def __iter__(self) -> Iterator[int]:
        for cycle in self._cycles():
            for _ in range(self.num_iterations):
                for micro_batch in cycle:
                    for index in micro_batch:
                        yield from [index] * self.group_size

    def __len__(self) -> int:
        cycles = self._cycles()
        return (
            len(cycles)
            * self.num_iterations
            * self.gradient_accumulation_steps
            * (self.prompts_per_micro_batch * self.group_size)
        )


class RolloutBuffer:
    """
    Keeps each accumulation slot's rollout for `num_iterations` optimizer steps, in step with [`PromptSampler`].

    Micro-step `s` uses slot `s % gradient_accumulation_steps`, and samples afresh when
    `(s // gradient_accumulation_steps) % num_iterations == 0` (or when the slot is empty, e.g. after a resume).
    """

    def __init__(self, gradient_accumulation_steps: int, num_iterations: int):
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.num_iterations = num_iterations
        self.slots: list = [None] * gradient_accumulation_steps
        self.micro_step = 0

    def reset(self, global_step: int) -> None:
        self.micro_step = global_step * self.gradient_accumulation_steps
        self.slots = [None] * self.gradient_accumulation_steps

    def get(self, make, global_step: int):
        """The slot's rollout, made by `make()` when a fresh one is due; `global_step` re-syncs after a resume."""
        if self.micro_step // self.gradient_accumulation_steps != global_step:
            self.reset(global_step)
        slot = self.micro_step % self.gradient_accumulation_steps
        fresh = (self.micro_step // self.gradient_accumulation_steps) % self.num_iterations == 0
        self.micro_step += 1
        if fresh or self.slots[slot] is None:
            self.slots[slot] = make()
            return self.slots[slot], True
        return self.slots[slot], False
