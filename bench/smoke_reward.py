"""The GPU smoke run's RL reward: the share of even token ids in a completion. It varies across a random
model's samples (exact match is 0 for all of them), so GRPO's advantages are non-zero and the two steps
really move the weights. A file of its own: the reward pool loads it by path, without bench/ on sys.path."""

from __future__ import annotations

from typing import Any


def even_tokens(completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float | None]:
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]
