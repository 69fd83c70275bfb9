"""Pure tensor functions shared by the stages: token losses and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from posttrain.loss_head import Tensors


def fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    import torch

    return x.to(torch.promote_types(x.dtype, torch.float32))


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in fp32 at least; at temperature 1 the logits themselves (x / 1 is x: no
    [rows, V] copy to hold, in forward or in backward)."""
    logits = fp32_at_least(logits)
    return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[...]: log softmax(logits)[target] of each row of `logits` [..., V], in fp32 at least."""
    import torch

    logp = torch.log_softmax(fp32_at_least(logits), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class NextTokenLogprobs:
    """The row function (see posttrain.loss_head) of the learner's logprobs and SFT's NLL: `logp`, each
    row's target token's log-probability under softmax(logits / temperature)."""

    temperature: float = 1.0

    def __call__(self, logits: torch.Tensor, inputs: Tensors, stats: bool) -> tuple[Tensors, Tensors]:
        return {"logp": token_logprobs(tempered(logits, self.temperature), inputs["targets"])}, {}


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
