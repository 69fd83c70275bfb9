"""Reward configuration: which reward functions to run, how to weigh them, and how the runtime guards them.

Follows posttrain.config's conventions (unknown keys rejected, a docstring on every field). Imports only
pydantic so stage configs can embed `RewardsConfig` without loading any reward code.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import Strict


class RewardSpec(Strict):
    """One reward function and its weight in the total."""

    name: str
    """A built-in (`math_accuracy`, `think_format`, ...), an entry point in the group `posttrain.rewards`,
    `module:function`, or `path/to/file.py:function` (relative paths are from the working directory)."""
    label: str | None = None
    """Name in results and metrics (`reward/<label>/mean`). Default: the built-in or function name; set it
    to use one function twice with different `params`."""
    weight: float = 1.0
    """Factor of this reward in the weighted total."""
    kind: Literal["auto", "trl", "verl"] = "auto"
    """Calling convention. `trl`: `f(completions, **kwargs) -> list[float | None]` with `prompts`,
    `completion_ids` and every dataset column as keyword arguments. `verl`: `compute_score(data_source,
    solution_str, ground_truth, extra_info=None) -> float | dict`, called per sample. `auto`: `verl` when
    the function has `solution_str` and `ground_truth` parameters, else `trl`."""
    params: dict[str, Any] = {}
    """Extra keyword arguments for the function (e.g. `max_length` for `length_penalty`); they take
    precedence over dataset columns of the same name."""
    ground_truth: str = "solution"
    """Dataset column passed as `ground_truth` to `verl`-style functions."""

    @property
    def key(self) -> str:
        """The reported name: `label`, else the built-in / entry-point name or the function name."""
        return self.label or self.name.rpartition(":")[2]


class RewardsConfig(Strict):
    """Reward functions and the process pool that evaluates them."""

    rewards: list[RewardSpec] = Field(min_length=1)
    """Rewards to compute; each is reported separately and the total is their weighted sum."""
    pool_size: int = Field(2, ge=1)
    """Calls evaluated in parallel: a batch is split into this many chunks per reward. One more worker
    process stands by to replace a killed one without delay."""
    timeout_s: float = Field(10.0, gt=0)
    """Time limit of one call (one reward on one chunk); the worker is killed and replaced past it."""
    on_failure: Literal["exclude", "value"] = "exclude"
    """Samples whose reward timed out, raised, crashed its worker or returned an invalid value: `exclude`
    marks them not valid (leave them out of the loss); `value` scores them `failure_value`."""
    failure_value: float = 0.0
    """Reward given to failed samples when `on_failure: value`."""
    max_consecutive_failures: int = Field(3, ge=1)
    """Stop the run (`RewardPluginError`) once one reward has failed on every sample of this many
    consecutive batches."""

    @model_validator(mode="before")
    @classmethod
    def _names_as_specs(cls, data: Any) -> Any:
        """Allow the shorthand `rewards: [math_accuracy, think_format]`."""
        if isinstance(data, dict) and isinstance(data.get("rewards"), list):
            data = {**data, "rewards": [{"name": r} if isinstance(r, str) else r for r in data["rewards"]]}
        return data

    @model_validator(mode="after")
    def _unique_keys(self) -> RewardsConfig:
        keys = [spec.key for spec in self.rewards]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(
                f"rewards: more than one reward is reported as {', '.join(map(repr, repeated))}; "
                "give each a distinct `label`"
            )
        return self
