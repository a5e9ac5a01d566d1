"""Flow-GRPO's per-prompt stat tracking: a reward baseline from each prompt's history of rewards."""

from collections import defaultdict, deque

import torch


__all__ = ["PerPromptStatTracker"]


class PerPromptStatTracker:
    """
    Keeps the last `buffer_size` rewards of every prompt and gives each new reward the mean and std of its prompt's
    history (the new rewards included), as Flow-GRPO's `per_prompt_stat_tracking` does.

    A prompt that recurs over steps gets a baseline averaged over more samples than its current group, which lowers
    the variance of its advantages; a prompt seen once gets its group's mean and std.

    Args:
        buffer_size (`int`, defaults to 64): rewards kept per prompt (the newest).
    """

    def __init__(self, buffer_size: int = 64):
        if buffer_size < 1:
            raise ValueError(f"`buffer_size` must be >= 1, got {buffer_size}.")
        self.buffer_size = buffer_size
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Adds this batch's rewards to their prompts' histories, then returns the per-image history mean and std
        (population std, as numpy's default). NaN rewards (unscored images) are not recorded.

        Args:
            prompts (`list[str]`): one prompt per reward.
            rewards (`torch.Tensor` of shape `(B,)`): the rewards.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: mean and std, each of shape `(B,)`, float64.
        """
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards.")
        values = rewards.detach().double().cpu()
        for prompt, value in zip(prompts, values.tolist()):
            if value == value:  # not NaN
                self.history[prompt].append(value)
        stats = {}
        for prompt in set(prompts):
            past = torch.tensor(list(self.history[prompt]), dtype=torch.float64)
            if len(past) == 0:
                stats[prompt] = (float("nan"), float("nan"))
            else:
                stats[prompt] = (past.mean().item(), past.std(unbiased=False).item())
        mean = torch.tensor([stats[p][0] for p in prompts], dtype=torch.float64)
        std = torch.tensor([stats[p][1] for p in prompts], dtype=torch.float64)
        return mean, std

    def clear(self) -> None:
        """Forgets every prompt's history."""
        self.history.clear()
