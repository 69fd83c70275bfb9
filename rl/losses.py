"""Per-token RL losses for GRPO-family training: policy objectives, KL, entropy, aggregation, and
train/inference importance weights.

Per-token tensors are [B, T]; `mask` is 1 on the response tokens that count. Losses are returned per
token and reduced by `aggregate`, which divides by counts of the whole global batch so that micro-batches
and data-parallel ranks can simply sum their contributions. Statistics are detached sums for the same
reason: the caller adds them up over all parts and divides once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch

from posttrain.rl.config import Aggregation, ISLevel, ISMode, KLEstimator, PolicyLoss

KL_ESTIMATORS = get_args(KLEstimator)
POLICY_LOSSES = get_args(PolicyLoss)
AGGREGATIONS = get_args(Aggregation)
IS_LEVELS = get_args(ISLevel)
IS_MODES = get_args(ISMode)


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {tuple(choices)}")


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: mean over each sequence's masked tokens; 0 for a sequence without any."""
    return (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


def kl_divergence(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """[B, T] per-token estimate of KL(policy || reference) from samples of the policy (Schulman 2020,
    "Approximating KL divergence"): k1 = log ratio (unbiased, high variance, can be negative),
    k2 = half its square, k3 = exp(-x) + x - 1 with x = logp - ref_logp (unbiased and never negative)."""
    _check_choice(estimator, KL_ESTIMATORS, "KL estimator")
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss [B, T] and detached ratio statistics. `advantages` is [B] or [B, T].

    - ppo: token ratio with the clipped surrogate; clip_high > clip_low is DAPO's clip-higher.
    - gspo: one ratio per sequence, the geometric mean of its token ratios, clipped as a whole (Zheng et
      al. 2025, arXiv 2507.18071). Written in the paper's GSPO-token form sg[s_i] * exp(logp - sg[logp]):
      same value, and every token of a sequence gets the sequence-level gradient s_i * A_i.
    - sapo: the hard clip becomes a soft gate f(r) = sigmoid(tau * (r - 1)) * 4 / tau on the token ratio,
      tau = tau_pos where A > 0 and tau_neg where A < 0; loss = -f(r) * A (Gao et al. 2025, arXiv
      2511.20347, defaults tau_pos = 1.0, tau_neg = 1.05). f'(1) = 1, so on-policy it is the plain policy
      gradient; the larger tau_neg damps off-policy negative updates faster.
    """
    _check_choice(kind, POLICY_LOSSES, "policy loss")
    mask = mask.to(logp.dtype)
    advantages = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages
    ratio = _gspo_token_ratio(logp, old_logp, mask) if kind == "gspo" else torch.exp(logp - old_logp)
    if kind == "sapo":
        loss = -_soft_gate(ratio, advantages, tau_pos, tau_neg) * advantages
    else:
        clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
        loss = -torch.min(ratio * advantages, clipped * advantages)
    return loss, _ratio_stats(ratio.detach(), advantages, mask, clip_low, clip_high)


def _gspo_token_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    sequence_ratio = torch.exp(_sequence_mean(logp - old_logp, mask)).detach()
    return sequence_ratio.unsqueeze(-1) * torch.exp(logp - logp.detach())


def _soft_gate(ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    tau = torch.where(advantages > 0, tau_pos, tau_neg)
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau


def _ratio_stats(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float
) -> dict[str, torch.Tensor]:
    """Sums over masked tokens; a clip counts where the clipped branch of the surrogate is the active one."""
    counted = mask > 0
    return {
        "clip_low_count": (counted & (advantages < 0) & (ratio < 1 - clip_low)).sum(),
        "clip_high_count": (counted & (advantages > 0) & (ratio > 1 + clip_high)).sum(),
        "ratio_sum": (ratio * mask).sum(),
        "ratio_max": torch.where(counted, ratio, 0.0).amax(),
        "tokens": mask.sum(),
    }


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, T] entropy of softmax(logits [B, T, V]) as logsumexp(z) - E_p[z], which never takes log(0).
    Low-precision logits are computed in fp32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_seqs: float,
    norm_length: float,
) -> torch.Tensor:
    """This micro-batch's share of the loss over the whole global batch; summing the shares of all
    micro-batches and ranks gives the global value. `num_tokens` (masked tokens) and `num_seqs` count the
    global batch.

    - token_mean: every token weighs the same (DAPO).
    - seq_mean_token_mean: mean over each sequence's tokens, then over sequences (GRPO).
    - seq_mean_token_sum_norm: token sums over num_seqs * norm_length, a constant, so that a sequence's
      weight does not depend on its length (Dr.GRPO).
    """
    _check_choice(mode, AGGREGATIONS, "aggregation")
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * mask).sum() / num_tokens
    if mode == "seq_mean_token_mean":
        return _sequence_mean(per_token, mask).sum() / num_seqs
    return (per_token * mask).sum() / (num_seqs * norm_length)


def importance_weights(
    old_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Detached [B, T] weights correcting for the inference engine sampling from a slightly different
    distribution than the trainer computes (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"). The ratio old/engine is per token, or per sequence as the geometric mean
    of its token ratios. mode truncate: min(ratio, cap) (truncated IS); mask: 1 where 1/cap <= ratio <= cap
    else 0 (masked IS). Stats: tis_clipped_count (masked tokens truncated or zeroed), tis_ratio_sum, tokens.
    """
    _check_choice(level, IS_LEVELS, "importance-sampling level")
    _check_choice(mode, IS_MODES, "importance-sampling mode")
    mask = mask.to(old_logp.dtype)
    log_ratio = (old_logp - engine_logp).detach()
    if level == "sequence":
        log_ratio = _sequence_mean(log_ratio, mask).unsqueeze(-1).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    if mode == "truncate":
        weights, corrected = ratio.clamp(max=cap), ratio > cap
    else:
        kept = (ratio >= 1 / cap) & (ratio <= cap)
        weights, corrected = kept.to(ratio.dtype), ~kept
    stats = {
        "tis_clipped_count": (corrected & (mask > 0)).sum(),
        "tis_ratio_sum": (ratio * mask).sum(),
        "tokens": mask.sum(),
    }
    return weights, stats
