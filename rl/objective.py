"""The RL objective of one micro-batch: the pieces of rl/losses.py composed as `algorithm` configures.

Pure (tensors in, loss and statistics out), so it is tested without DeepSpeed and the learner only adds
backward and the optimizer step. Layout: `input_ids` [B, T]; every per-token tensor is [B, T-1], position
t holding the prediction of token t+1 (`response_mask` is 1 where that token is a sampled response token
that counts); `advantages` [B].
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.losses import next_token_logprobs
from posttrain.objectives import Loss, Norms, Tensors
from posttrain.rl.config import AlgorithmConfig
from posttrain.rl.losses import (
    aggregate,
    entropy_from_logits,
    importance_weights,
    kl_divergence,
    policy_loss,
)


@dataclass(frozen=True)
class RLObjective:
    """The policy-gradient objective of `algorithm` (the learner calls it per micro-batch)."""

    algo: AlgorithmConfig

    def __call__(self, logits: Tensor, input_ids: Tensor, batch: Tensors, norms: Norms) -> Loss:
        """(loss contribution of this micro-batch, summed statistics; keys ending in `_max` are maxima).

        `batch`: response_mask, advantages, engine_logprobs, optional old_logprobs (absent: the current
        weights are the old policy, so the first update is exactly on-policy) and ref_logprobs (KL in the
        loss). `norms`: tokens, seqs and norm_length of the whole update (see losses.aggregate) and the rollout
        temperature."""
        algo = self.algo
        mask = batch["response_mask"]
        logits = logits / norms.temperature  # the policy that sampled: π at the rollout temperature
        logp = next_token_logprobs(logits, input_ids)
        old = batch.get("old_logprobs", logp.detach())
        per_token, stats = policy_loss(
            logp,
            old,
            batch["advantages"],
            mask,
            algo.policy_loss,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            tau_pos=algo.sapo_tau_pos,
            tau_neg=algo.sapo_tau_neg,
        )
        engine = batch["engine_logprobs"]
        gap = (old - engine).abs() * mask
        stats = {**stats, "mismatch_sum": gap.sum(), "mismatch_max": gap.max()}
        if algo.importance_sampling:
            weights, is_stats = importance_weights(old, engine, mask, **algo.importance_sampling.model_dump())
            per_token = per_token * weights
            stats |= {k: v for k, v in is_stats.items() if k != "tokens"}
        if algo.kl_coef > 0 and not algo.kl_in_reward:
            kl = kl_divergence(logp, batch["ref_logprobs"], algo.kl_estimator)
            per_token = per_token + algo.kl_coef * kl
            stats["kl_sum"] = (kl.detach() * mask).sum()
        entropy = entropy_from_logits(logits[:, :-1].float())
        if algo.entropy_coef > 0:
            per_token = per_token - algo.entropy_coef * entropy
        stats["entropy_sum"] = (entropy.detach() * mask).sum()
        loss = aggregate(
            per_token,
            mask,
            algo.aggregation,
            num_tokens=norms.tokens,
            num_seqs=norms.seqs,
            norm_length=norms.norm_length,
        )
        return loss, {k: v.detach() for k, v in stats.items()}
