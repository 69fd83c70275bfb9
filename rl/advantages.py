"""Group-relative advantages for GRPO-family RL: one reward per sample, `n` samples per prompt group.

Rewards are [G, n] (G groups); `valid` marks samples whose reward was computed. A failed sample gets
advantage 0 and stays out of every statistic, so one broken reward cannot shift its group's baseline.
Groups with fewer than two valid samples have no baseline and get 0 throughout.
"""

from __future__ import annotations

from typing import get_args

import torch

from posttrain.rl.config import Advantage

ESTIMATORS = get_args(Advantage)


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, estimator: str, eps: float = 1e-6
) -> torch.Tensor:
    """[G, n] advantages by `estimator`:

    - grpo: (r - group mean) / (group std + eps), unbiased std (Shao et al. 2024).
    - dr_grpo: r - group mean; dividing by the std would overweight groups that are almost all right or all
      wrong (Liu et al. 2025).
    - rloo: r minus the mean of the group's other valid samples = m/(m-1) (r - group mean).
    - reinforce_pp: REINFORCE++-baseline: group-centered, then whitened over the whole batch (Hu et al. 2025).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ESTIMATORS}")
    count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)
    scored = valid & (count >= 2)
    mean = torch.where(valid, rewards, 0.0).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(scored, rewards - mean, 0.0)  # the where also drops NaN rewards of failed samples
    if estimator == "grpo":
        std = (centered.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        return centered / (std + eps)
    if estimator == "rloo":
        return centered * count / (count - 1).clamp(min=1)
    if estimator == "reinforce_pp":
        return _whiten(centered, scored, eps)
    return centered


def _whiten(values: torch.Tensor, scored: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) over the scored samples of the whole batch; 0 elsewhere."""
    if not bool(scored.any()):  # no group has a baseline; std of nothing would warn
        return torch.zeros_like(values)
    picked = values[scored]
    return torch.where(scored, (values - picked.mean()) / (picked.std() + eps), 0.0)


def keep_informative_groups(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[G] bool: groups whose valid rewards are not all equal (DAPO dynamic sampling, Yu et al. 2025).

    A group where every sample scores the same has zero advantage everywhere and only dilutes the batch.
    """
    highest = torch.where(valid, rewards, -torch.inf).amax(dim=1)
    lowest = torch.where(valid, rewards, torch.inf).amin(dim=1)
    return highest > lowest
