"""The RL objective of one micro-batch: the pieces of rl/losses.py composed as `algorithm` configures.

Pure (tensors in, loss and statistics out), so it is tested without DeepSpeed and the learner only adds
backward and the optimizer step. Layout: `input_ids` [B, T]; every per-token tensor is [B, T-1], position
t holding the prediction of token t+1 (`response_mask` is 1 where that token is a sampled response token
that counts); `advantages` [B]. The LM head computes, at the response positions only, the logprob of each
token under the policy at the rollout temperature and its entropy (`PolicyRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.loss_head import TokenTerms
from posttrain.losses import tempered, token_logprobs
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
class PolicyRows:
    """Row function (posttrain.loss_head): `logp`, the target's log-probability under the policy that
    sampled (softmax of logits / temperature), and `entropy` of that policy: a term when it is in the loss,
    else a statistic (no graph, and the backward never computes it)."""

    temperature: float
    entropy_in_loss: bool

    def __call__(self, logits: Tensor, inputs: Tensors, stats: bool) -> tuple[Tensors, Tensors]:
        logits = tempered(logits, self.temperature)
        terms = {"logp": token_logprobs(logits, inputs["targets"])}
        if self.entropy_in_loss:
            return terms | {"entropy": entropy_from_logits(logits)}, {}
        return terms, {"entropy": entropy_from_logits(logits)} if stats else {}


@dataclass(frozen=True)
class RLObjective:
    """The policy-gradient objective of `algorithm` (the learner calls it per micro-batch)."""

    algo: AlgorithmConfig

    def terms(self, input_ids: Tensor, batch: Tensors, norms: Norms) -> TokenTerms:
        rows = PolicyRows(norms.temperature, entropy_in_loss=self.algo.entropy_coef > 0)
        return TokenTerms(batch["response_mask"] > 0, {"targets": input_ids[:, 1:]}, rows)

    def __call__(self, per_token: Tensors, input_ids: Tensor, batch: Tensors, norms: Norms) -> Loss:
        """(loss contribution of this micro-batch, summed statistics; keys ending in `_max` are maxima).

        `batch`: response_mask, advantages, engine_logprobs, optional old_logprobs (absent: the current
        weights are the old policy, so the first update is exactly on-policy) and ref_logprobs (KL in the
        loss). `norms`: tokens, seqs and norm_length of the whole update (see losses.aggregate) and the rollout
        temperature."""
        algo = self.algo
        mask = batch["response_mask"]
        logp, entropy = per_token["logp"], per_token["entropy"]
        old = batch.get("old_logprobs", logp.detach())
        token_loss, stats = policy_loss(
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
            token_loss = token_loss * weights
            stats |= {k: v for k, v in is_stats.items() if k != "tokens"}
        if algo.kl_coef > 0 and not algo.kl_in_reward:
            kl = kl_divergence(logp, batch["ref_logprobs"], algo.kl_estimator)
            token_loss = token_loss + algo.kl_coef * kl
            stats["kl_sum"] = (kl.detach() * mask).sum()
        if algo.entropy_coef > 0:
            token_loss = token_loss - algo.entropy_coef * entropy
        stats["entropy_sum"] = (entropy.detach() * mask).sum()
        loss = aggregate(
            token_loss,
            mask,
            algo.aggregation,
            num_tokens=norms.tokens,
            num_seqs=norms.seqs,
            norm_length=norms.norm_length,
        )
        return loss, {k: v.detach() for k, v in stats.items()}
