"""The distillation objective of one micro-batch: a divergence of distill/losses.py on the target tokens,
aggregated over the global batch (token mean), plus an optional NLL term on the data's own tokens.

Pure (tensors in, loss and statistics out), so it is tested without DeepSpeed and the learner only adds
backward and the optimizer step. Layout (the learner layout of rl/batch.py): `input_ids` [B, T]; every
per-token tensor is [B, T-1], position t describing token t + 1: `loss_mask` (1 where token t + 1 is a
target) and the teacher's `topk_ids` / `topk_logp` [B, T-1, K]. For the estimator `sampled` K = 1 and the
one entry is token t + 1 itself with the teacher's log-probability of it.

The LM head computes, at the target positions only, the student's logprob of each token and (top-k) the
divergence over the teacher's buckets, which needs the student's whole row (`StudentRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.distill.config import LossConfig
from posttrain.distill.losses import divergence, reverse_kl_sampled
from posttrain.loss_head import TokenTerms
from posttrain.losses import token_logprobs
from posttrain.objectives import Loss, Norms, Tensors


@dataclass(frozen=True)
class StudentRows:
    """Row function (posttrain.loss_head): `logp`, the student's log-probability of the target token (a
    term when the loss has an NLL part, else a statistic), and for the top-k estimator `divergence`, the
    configured divergence from the teacher's top-k at that row."""

    loss: LossConfig

    def __call__(self, logits: Tensor, inputs: Tensors, stats: bool) -> tuple[Tensors, Tensors]:
        cfg = self.loss
        logp_in_loss = bool(cfg.nll_weight) or cfg.estimator == "sampled"
        terms: Tensors = {}
        statistics: Tensors = {}
        if logp_in_loss or stats:
            (terms if logp_in_loss else statistics)["logp"] = token_logprobs(logits, inputs["targets"])
        if cfg.estimator == "topk":
            teacher = (inputs["topk_ids"], inputs["topk_logp"])
            terms["divergence"] = divergence(cfg.type, logits, teacher, beta=cfg.beta)
        return terms, statistics


@dataclass(frozen=True)
class DistillObjective:
    """The divergence `loss` configures (the learner calls it per micro-batch)."""

    loss: LossConfig

    def terms(self, input_ids: Tensor, batch: Tensors, norms: Norms) -> TokenTerms:
        inputs = {"targets": input_ids[:, 1:]}
        if self.loss.estimator == "topk":
            inputs |= {"topk_ids": batch["topk_ids"], "topk_logp": batch["topk_logp"]}
        return TokenTerms(batch["loss_mask"] > 0, inputs, StudentRows(self.loss))

    def __call__(self, per_token: Tensors, input_ids: Tensor, batch: Tensors, norms: Norms) -> Loss:
        """(loss contribution of this micro-batch, summed statistics). `norms.tokens`: the target tokens
        of the whole optimizer step, so summing every micro-batch's and rank's contribution gives the global
        token mean however the batch is split."""
        loss_cfg = self.loss
        mask = batch["loss_mask"].to(torch.float32)
        logp = per_token["logp"]
        sampled = loss_cfg.estimator == "sampled"
        if sampled:  # one entry per position: the token itself and the teacher's logprob of it
            teacher_logp = torch.where(mask > 0, batch["topk_logp"][..., 0].float(), 0.0)
            token_loss = reverse_kl_sampled(logp, teacher_logp)
        else:
            token_loss = per_token["divergence"]
        stats = {
            "divergence_sum": (token_loss.detach() * mask).sum(),
            "nll_sum": -(logp.detach() * mask).sum(),
        }
        if not sampled:  # how much of the teacher's mass the top-k hold
            covered = torch.logsumexp(batch["topk_logp"].float(), dim=-1).exp().clamp(max=1.0)
            stats["teacher_topk_mass_sum"] = (covered * mask).sum()
        if loss_cfg.nll_weight:
            token_loss = token_loss - loss_cfg.nll_weight * logp
        stats["tokens"] = mask.sum()
        loss = (token_loss * mask).sum() / norms.tokens  # the token mean over the whole step
        return loss, {k: v.detach() for k, v in stats.items()}
