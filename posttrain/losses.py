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
    import torch

    mask = labels[:, 1:] != -100
    picked = next_token_logprobs(logits, labels.clamp(min=0))
    return -torch.where(mask, picked, 0.0).sum(), int(mask.sum())


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1] | ≤ t) for every position, in fp32: [B, T-1]."""
    import torch.nn.functional as F

    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


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
