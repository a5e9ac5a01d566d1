"""Names for reward functions, so configs and the command line can say `reward_funcs=["pickscore", "ocr"]`."""

from collections.abc import Callable
from typing import Any, Optional, Union


__all__ = ["get_reward", "list_rewards", "register_reward", "reward_name"]

RewardFunc = Callable[..., list]

_REGISTRY: dict[str, Callable[..., RewardFunc]] = {}


def register_reward(name: str, factory: Callable[..., RewardFunc], overwrite: bool = False) -> None:
    """
    Registers `factory` (a class or a function returning a reward callable) under `name`.

    Factories are called by [`get_reward`], with its keyword arguments: registering costs nothing, and model-backed
    rewards load their weights on their first call, not before.

    Args:
        name (`str`): the name (`reward_funcs=[name]`).
        factory (`Callable[..., RewardFunc]`): builds the reward.
        overwrite (`bool`, defaults to `False`): replace an existing entry instead of raising.

    Example:
    ```python
    >>> from diffusion_opd_trainer.rewards import PickScoreReward, register_reward
    >>> register_reward("pickscore_flow_grpo", lambda **kw: PickScoreReward(scale=1 / 26, **kw))
    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A reward name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"A reward named {name!r} is already registered; pass `overwrite=True` to replace it.")
    if not callable(factory):
        raise TypeError(f"The factory of reward {name!r} is not callable: {factory!r}.")
    _REGISTRY[name] = factory


def list_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def get_reward(name_or_callable: Union[str, RewardFunc], **kwargs: Any) -> RewardFunc:
    """
    Resolves a reward: a registered name is built (a new instance per call, with `kwargs`), a callable is returned
    as is.

    Args:
        name_or_callable (`str` or callable): a registered name ([`list_rewards`]) or a reward function.
        **kwargs: passed to the factory of a named reward (e.g. `device`, `dtype`, `batch_size`, `model`).
    """
    if isinstance(name_or_callable, str):
        if name_or_callable not in _REGISTRY:
            raise KeyError(f"Unknown reward {name_or_callable!r}. Registered rewards: {', '.join(list_rewards())}.")
        reward = _REGISTRY[name_or_callable](**kwargs)
        # A registered alias (e.g. "geneval_strict") names its metrics after itself, whatever its class' default.
        if getattr(reward, "name", None) != name_or_callable and hasattr(reward, "name") and "name" not in kwargs:
            try:
                reward.name = name_or_callable
                reward.__name__ = name_or_callable
            except AttributeError:
                pass
        return reward
    if callable(name_or_callable):
        if kwargs:
            raise ValueError("Keyword arguments only apply to rewards given by name.")
        return name_or_callable
    raise TypeError(f"A reward is a registered name or a callable, got {type(name_or_callable).__name__}.")


def reward_name(func: Any, key: Optional[str] = None) -> str:
    """
    The metric name of a reward: the dict key when the reward came from a `{task: reward}` dict, else the
    reward's `name`, else its `__name__`, else its class name.

    Args:
        func: the reward (a name, a [`RewardModel`], a function or any callable).
        key (`str`, *optional*): its key in a `reward_funcs` dict.
    """
    if key is not None:
        return str(key)
    if isinstance(func, str):
        return func
    for attribute in ("name", "__name__"):
        value = getattr(func, attribute, None)
        if isinstance(value, str) and value:
            return value
    return type(func).__name__
