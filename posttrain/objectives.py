"""What the learner's one step optimises: an objective, the global counts it normalises by, and the
statistics it returns.

An objective is a typed, picklable value (a dataclass holding its own config) with two calls per
micro-batch. `objective.terms(input_ids, batch, norms)` says what the LM head computes per position (a
`loss_head.TokenTerms`: the positions that carry loss and a row function of a chunk's logits), and
`objective(per_token, input_ids, batch, norms) -> (loss, stats)` makes the loss of those per-position values
(name -> [B, T-1], 0 off the positions), so no objective sees the full logits. `batch` holds the keys the
model's forward does not take and `loss` is this micro-batch's share of the global loss (already divided by
the global counts in `norms`, so any split over ranks and micro-batches sums to the same value). Stages
define their objectives (rl/objective.py, distill/objective.py) and pass them to the learner group; Ray
carries each by reference to its module, so the learner never imports a stage. NLL, SFT's, lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from posttrain.loss_head import Tensors, TokenTerms
from posttrain.losses import NextTokenLogprobs

if TYPE_CHECKING:
    from torch import Tensor

Loss = tuple["Tensor", Tensors]
"""(this micro-batch's share of the loss, summed statistics)."""


@dataclass(frozen=True)
class Norms:
    """Counts of the whole optimizer step (every rank and micro-batch), which per-micro-batch losses are
    divided by: loss tokens, sequences, the fixed length of Dr. GRPO-style aggregation, and the sampling
    temperature the policy's logits are scaled by (RL)."""

    tokens: float
    seqs: float = 1.0
    norm_length: float = 1.0
    temperature: float = 1.0


class Objective(Protocol):
    def terms(self, input_ids: Tensor, batch: Tensors, norms: Norms) -> TokenTerms: ...

    def __call__(self, per_token: Tensors, input_ids: Tensor, batch: Tensors, norms: Norms) -> Loss: ...


@dataclass(frozen=True)
class NLL:
    """Next-token negative log-likelihood on the positions whose label is not -100 (SFT)."""

    def terms(self, input_ids: Tensor, batch: Tensors, norms: Norms) -> TokenTerms:
        targets = batch["labels"][:, 1:]  # labels[t] is the token at t
        return TokenTerms(targets != -100, {"targets": targets}, NextTokenLogprobs())

    def __call__(self, per_token: Tensors, input_ids: Tensor, batch: Tensors, norms: Norms) -> Loss:
        import torch

        nll = -per_token["logp"].sum()
        padded = torch.tensor(float(input_ids.numel()))
        return nll * (1.0 / norms.tokens), {"nll_sum": nll.detach(), "input_tokens": padded}


def merge_stat(key: str, a: float, b: float) -> float:
    """The one reduction of a statistic over micro-batches, ranks and updates: keys ending in `_max`
    are maxima, every other key a sum (means are taken by the stage from the summed counts)."""
    return max(a, b) if key.endswith("_max") else a + b


def merge_stats(into: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    for key, value in stats.items():
        into[key] = merge_stat(key, into[key], float(value)) if key in into else float(value)
    return into


@dataclass
class StepStats:
    """One optimizer step's result across Ray: summed objective statistics (and `loss`), the gradient
    norm before clipping, the learning rate the step used (equal on every rank) and the step's peak
    memory in GiB (see posttrain.memory; over ranks, the largest)."""

    sums: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    lr: float = 0.0
    peak_gib: float = 0.0


def reduce_ranks(per_rank: list[StepStats]) -> StepStats:
    """The step as a whole: statistics merged over ranks; grad_norm and lr (the same on every rank after
    DeepSpeed's all-reduce) averaged; the peak memory of the rank that needed most, which is what has to
    fit on every device."""
    sums: dict[str, float] = {}
    for stats in per_rank:
        merge_stats(sums, stats.sums)
    n = len(per_rank)
    grad_norm, lr = sum(s.grad_norm for s in per_rank) / n, sum(s.lr for s in per_rank) / n
    return StepStats(sums, grad_norm, lr, max(s.peak_gib for s in per_rank))
