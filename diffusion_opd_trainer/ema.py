"""Exponential moving average of the trained LoRA weights."""

import contextlib

import torch

from .lora import copy_full_, full_tensor


class LoRAEMA:
    """
    EMA of a set of parameters, updated every `update_interval` optimizer steps:
    `shadow = decay * shadow + (1 - decay) * param`. The averages are whole tensors on every process, also when FSDP
    shards the parameters (each is gathered for an update: every process must call [`step`] and [`swapped_in`]).

    Args:
        parameters (`dict[str, torch.nn.Parameter]`): the trained parameters, by name.
        decay (`float`): the decay per update.
        update_interval (`int`): optimizer steps between updates.
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, update_interval: int):
        self.parameters = parameters
        self.decay = decay
        self.update_interval = update_interval
        self.shadow = {name: p.detach().clone().float() for name, p in parameters.items()}
        self.num_updates = 0

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Called after each optimizer step; updates the average every `update_interval` steps."""
        if global_step % self.update_interval:
            return
        for name, parameter in self.parameters.items():
            self.shadow[name].lerp_(full_tensor(parameter.detach()).float(), 1 - self.decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self):
        """Runs the block with the EMA weights in the parameters, then puts the trained weights back."""
        backup = {name: full_tensor(p.detach()).clone() for name, p in self.parameters.items()}
        try:
            for name, parameter in self.parameters.items():
                copy_full_(parameter, self.shadow[name].to(parameter.dtype))
            yield
        finally:
            for name, parameter in self.parameters.items():
                copy_full_(parameter, backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{name}": value.cpu().contiguous() for name, value in self.shadow.items()}
        state["num_updates"] = torch.tensor(self.num_updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.num_updates = int(state["num_updates"])
