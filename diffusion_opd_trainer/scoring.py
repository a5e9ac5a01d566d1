"""Calling reward functions on a batch: names, weights, per-task routing, `None` handling, output checks."""

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real
from typing import Any, Optional, Union

import numpy as np
import torch

from .rewards import get_reward, reward_name


logger = logging.getLogger(__name__)

# Rewards beyond this overflow the float32 standard deviation of the advantages (its squares pass 3.4e38).
_LARGEST_REWARD = 1e18


class RewardError(RuntimeError):
    """A reward function raised, or returned something that is not one score per image; names the reward."""

    def __init__(self, reward: str, message: str):
        super().__init__(message)
        self.reward = reward


def _scores(name: str, values: Any, expected: int) -> list[float]:
    """A reward's output as one float per image (NaN for `None`), or a `RewardError` saying what is wrong with it."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise RewardError(
                name,
                f"Reward {name!r} returned an array of shape {tuple(values.shape)}; expected one value per image "
                f"(shape ({expected},)).",
            )
        if values.dtype in (torch.bool, np.bool_):
            raise RewardError(name, f"Reward {name!r} returned booleans; return a number per image (e.g. 1.0/0.0).")
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise RewardError(name, f"Reward {name!r} returned a {type(values).__name__}; expected a list of numbers.")
    values = list(values)  # any iterable of scores (a tuple, a generator) is fine, as before these checks
    if len(values) != expected:
        raise RewardError(name, f"Reward {name!r} returned {len(values)} values for {expected} images.")
    scores = []
    for i, value in enumerate(values):
        if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and np.size(value) == 1:
            value = value.item()
        if value is None:
            scores.append(math.nan)
        elif isinstance(value, bool):
            raise RewardError(
                name, f"Reward {name!r} returned a boolean ({value}) for image {i}; return a number (e.g. 1.0/0.0)."
            )
        elif isinstance(value, Real):
            scores.append(float(value))
        else:
            raise RewardError(
                name,
                f"Reward {name!r} returned {value!r} ({type(value).__name__}) for image {i}; expected a number or "
                "None.",
            )
    return scores


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
        self._warned: set[tuple[str, str]] = set()

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
            name = self.names[column]
            sub_columns = {k: [v[i] for i in index] for k, v in columns.items()}
            try:
                values = func(prompts=[prompts[i] for i in index], images=images[index], **sub_columns)
            except Exception as error:
                raise RewardError(name, f"Reward {name!r} raised {type(error).__name__}: {error}") from error
            scores = torch.tensor(_scores(name, values, len(index)), dtype=rewards.dtype)
            self._warn_if_uninformative(name, scores)
            # An infinite score would make every advantage of the batch NaN: it counts as unscored instead.
            rewards[index, column] = torch.where(torch.isinf(scores), math.nan, scores)
        return rewards

    def _warn_if_uninformative(self, name: str, scores: torch.Tensor) -> None:
        """Warns (once per reward and kind) about a batch that cannot teach anything, or values that overflow."""
        finite = scores[torch.isfinite(scores)]
        problems = []
        if torch.isinf(scores).any():
            problems.append(
                (
                    "inf",
                    f"returned an infinite value for {int(torch.isinf(scores).sum())} image(s) (counted as unscored)",
                )
            )
        if finite.numel() == 0:
            problems.append(("none", f"returned no finite value for any of the {scores.numel()} images of a batch"))
        elif scores.numel() > 1 and finite.numel() == scores.numel() and bool((finite == finite[0]).all()):
            problems.append(
                (
                    "equal",
                    f"gave all {scores.numel()} images of a batch the same value "
                    f"({finite[0].item():g}): no learning signal",
                )
            )
        if finite.numel() and finite.abs().max() > _LARGEST_REWARD:
            problems.append(
                (
                    "large",
                    f"returned values up to {finite.abs().max().item():.3g}, too large for the "
                    "float32 advantages (their std overflows): rescale the reward",
                )
            )
        for kind, message in problems:
            if (name, kind) not in self._warned:
                self._warned.add((name, kind))
                logger.warning("Reward %r %s. Said once per reward.", name, message)

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
