"""posttrain.rewards: reward functions for RL and a runtime that evaluates them without ever hanging.

    from posttrain.rewards import RewardRuntime

    with RewardRuntime(["math_accuracy", "think_format"], timeout_s=5) as runtime:
        result = runtime.score(completions, prompts, completion_ids, {"solution": solutions})
    result.values["math_accuracy"], result.total, result.valid, result.metrics

Rewards follow TRL's signature, `f(completions, **kwargs) -> list[float | None]`; verl's `compute_score`
works through an adapter. Importing this package loads neither torch nor math-verify.
"""

from posttrain.rewards.config import RewardsConfig, RewardSpec
from posttrain.rewards.registry import (
    ENTRY_POINT_GROUP,
    Batch,
    available_rewards,
    call_reward,
    load_reward,
    resolve_reward,
)
from posttrain.rewards.runtime import RewardPluginError, RewardResult, RewardRuntime
from posttrain.rewards.table import RewardLoadError, reward

__all__ = [
    "ENTRY_POINT_GROUP",
    "Batch",
    "RewardLoadError",
    "RewardPluginError",
    "RewardResult",
    "RewardRuntime",
    "RewardSpec",
    "RewardsConfig",
    "available_rewards",
    "call_reward",
    "load_reward",
    "resolve_reward",
    "reward",
]
