"""The distillation objective of one micro-batch: a divergence of distill/losses.py on the target tokens,
aggregated over the global batch (token mean), plus an optional NLL term on the data's own tokens.

Pure (tensors in, loss and statistics out), so it is tested without DeepSpeed and the learner only adds
backward and the optimizer step. Layout (the learner layout of rl/batch.py): `input_ids` [B, T]; every
per-token tensor is [B, T-1], position t describing token t + 1: `loss_mask` (1 where token t + 1 is a
target) and the teacher's `topk_ids` / `topk_logp` [B, T-1, K]. For the estimator `sampled` K = 1 and the
one entry is token t + 1 itself with the teacher's log-probability of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.distill.config import LossConfig
from posttrain.distill.losses import divergence, reverse_kl_sampled
from posttrain.losses import next_token_logprobs
from posttrain.objectives import Loss, Norms, Tensors


@dataclass(frozen=True)
class DistillObjective:
    """The divergence `loss` configures (the learner calls it per micro-batch)."""

    loss: LossConfig

    def __call__(self, logits: Tensor, input_ids: Tensor, batch: Tensors, norms: Norms) -> Loss:
        """(loss contribution of this micro-batch, summed statistics). `norms.tokens`: the target tokens
        of the whole optimizer step, so summing every micro-batch's and rank's contribution gives the global
        token mean however the batch is split."""
        loss_cfg = self.loss
        mask = batch["loss_mask"].to(torch.float32)
        student = logits[:, :-1]
        logp = next_token_logprobs(logits, input_ids)
        sampled = loss_cfg.estimator == "sampled"
        if sampled:  # one entry per position: the token itself and the teacher's logprob of it
            teacher_logp = torch.where(mask > 0, batch["topk_logp"][..., 0].float(), 0.0)
            per_token = reverse_kl_sampled(logp, teacher_logp)
        else:
            teacher = (batch["topk_ids"], batch["topk_logp"])
            per_token = divergence(loss_cfg.type, student, teacher, beta=loss_cfg.beta)
        stats = {
            "divergence_sum": (per_token.detach() * mask).sum(),
            "nll_sum": -(logp.detach() * mask).sum(),
        }
        if not sampled:  # how much of the teacher's mass the top-k hold
            covered = torch.logsumexp(batch["topk_logp"].float(), dim=-1).exp().clamp(max=1.0)
            stats["teacher_topk_mass_sum"] = (covered * mask).sum()
        if loss_cfg.nll_weight:
            per_token = per_token - loss_cfg.nll_weight * logp
        stats["tokens"] = mask.sum()
        loss = (per_token * mask).sum() / norms.tokens  # the token mean over the whole step
        return loss, {k: v.detach() for k, v in stats.items()}
