"""Calling reward functions on a batch: names, weights, per-task routing, `None` handling."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch

from .rewards import get_reward, reward_name


RewardFuncs = Union[Callable, str, Sequence[Union[Callable, str]], Mapping[str, Union[Callable, str]]]


class RewardSet:
    """
    The reward functions of a trainer, called with the library's reward signature
    `f(prompts=list[str], images=Tensor[B, 3, H, W] in [0, 1], **other_columns) -> list[float | None]`.

    Args:
        reward_funcs (callable, registry name, list of them, or `dict[task, callable or name]`):
            A list is summed with `weights` (joint multi-reward RL). A dict routes each prompt to its own task's reward
            (the batch must have a `task` column); every prompt then has exactly one reward.
        weights (`list[float]`, *optional*): weights of a list of rewards; 1 each by default.
    """

    def __init__(self, reward_funcs: RewardFuncs, weights: Optional[Sequence[float]] = None):
        self.routed = isinstance(reward_funcs, Mapping)
        if self.routed:
            if not reward_funcs:
                raise ValueError("`reward_funcs` is an empty dict.")
            self.names = [str(task) for task in reward_funcs]
            self.funcs = [get_reward(f) for f in reward_funcs.values()]
            if weights is not None:
                raise ValueError("`reward_weights` cannot be used with a task -> reward dict (one reward per prompt).")
            weights = [1.0] * len(self.funcs)
        else:
            funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
            if not funcs:
                raise ValueError("`reward_funcs` is empty: GRPO needs at least one reward function.")
            self.funcs = [get_reward(f) for f in funcs]
            self.names = [reward_name(f) for f in self.funcs]
            if len(set(self.names)) != len(self.names):
                # Same-named rewards would share a metric: number them.
                self.names = [f"{name}_{i}" for i, name in enumerate(self.names)]
            if weights is None:
                weights = [1.0] * len(self.funcs)
            if len(weights) != len(self.funcs):
                raise ValueError(
                    f"`reward_weights` has {len(weights)} values for {len(self.funcs)} reward functions {self.names}."
                )
        self.weights = torch.tensor([float(w) for w in weights])

    def __len__(self) -> int:
        return len(self.funcs)

    def check_tasks(self, tasks: Sequence[str], where: str) -> None:
        """Raises a `ValueError` if a routed reward set has no reward for one of `tasks`."""
        if not self.routed:
            return
        missing = sorted(set(tasks) - set(self.names))
        if missing:
            raise ValueError(f"{where} has task(s) {missing} with no reward function; rewards exist for {self.names}.")

    def __call__(self, prompts: list[str], images: torch.Tensor, columns: dict[str, list[Any]]) -> torch.Tensor:
        """
        Scores a batch. Returns a `[B, F]` float tensor (F reward functions), NaN where a function returned `None` or
        (routed) where a prompt belongs to another task.
        """
        batch_size = len(prompts)
        rewards = torch.full((batch_size, len(self.funcs)), float("nan"))
        images = images.detach().float().clamp(0, 1).cpu()
        for column, func in enumerate(self.funcs):
            if self.routed:
                if "task" not in columns:
                    raise ValueError("Per-task rewards need a `task` column in the dataset.")
                index = [i for i, task in enumerate(columns["task"]) if task == self.names[column]]
                if not index:
                    continue
            else:
                index = list(range(batch_size))
            sub_columns = {k: [v[i] for i in index] for k, v in columns.items()}
            values = func(prompts=[prompts[i] for i in index], images=images[index], **sub_columns)
            values = list(values)
            if len(values) != len(index):
                raise ValueError(
                    f"Reward {self.names[column]!r} returned {len(values)} values for {len(index)} images."
                )
            for i, value in zip(index, values):
                rewards[i, column] = float("nan") if value is None else float(value)
        return rewards

    def total(self, rewards: torch.Tensor) -> torch.Tensor:
        """The weighted sum over reward functions, ignoring NaNs (a sample with no reward at all gets NaN)."""
        weighted = rewards * self.weights.to(rewards.device)
        total = torch.nansum(weighted, dim=1)
        total[torch.isnan(rewards).all(dim=1)] = float("nan")
        return total

    def metrics(self, rewards: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """`rewards/<name>/mean` and `/std` of each reward function over the samples it scored."""
        out = {}
        for column, name in enumerate(self.names):
            values = rewards[:, column]
            values = values[~torch.isnan(values)]
            if values.numel():
                out[f"{prefix}rewards/{name}/mean"] = values.mean().item()
                out[f"{prefix}rewards/{name}/std"] = values.std().item() if values.numel() > 1 else 0.0
        return out
