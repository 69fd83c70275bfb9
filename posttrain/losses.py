"""Pure tensor functions shared by the stages: token losses and learning-rate schedules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over positions whose label is not -100.

    `labels` are aligned with `logits` position by position (labels[t] is the token at t); the shift to
    next-token targets happens here. Returns (sum, number of target tokens). Summing rather than averaging
    lets the caller normalise by the token count of the whole global batch, which makes the loss
    independent of how the batch is split across learners and micro-batches.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]
    mask = targets != -100
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(), int(mask.sum())


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Fraction of the peak learning rate at optimizer step `step` (0-based): linear warmup, then
    constant / linear / cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay
