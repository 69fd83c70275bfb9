"""Per-token distillation divergences between a teacher's and a student's next-token distributions.

Every function returns [B, T] values for the caller to mask and reduce (e.g. with
`posttrain.rl.losses.aggregate`), so padding positions only have to give finite values, never a
particular one. Student logits are [B, T, V] over the full vocabulary; logits at position t predict token
t + 1. The teacher comes in one of three forms:

- full logits [B, T, V] (online distillation): `full_forward_kl`, `full_reverse_kl`, `full_jsd`;
- its top-k (offline, see `topk_store`): `topk_ids` [B, T, K] int64 and `topk_logp` [B, T, K], the
  teacher's log-probabilities, not renormalised (their exp sums to <= 1). An entry with logp = -inf is
  absent (padding), whatever its id; the ids of present entries must be distinct;
- the log-probability of each sampled token only (on-policy): `reverse_kl_sampled`.

Top-k divergences compare two (K + 1)-way distributions: the teacher's top-k tokens, each its own bucket,
and one tail bucket holding the rest of the vocabulary (teacher: 1 - sum exp(topk_logp); student: its mass
outside those ids). Merging tokens into buckets can only lose information, so for every f-divergence here
(KL either way, JSD) the top-k value is a lower bound of the full-vocabulary one, grows as k grows (top-k
sets are nested) and equals it at k = V.

Computation is in float32 at least; log-probabilities below the dtype's smallest normal number are floored
there when they are the second argument of a KL, so a bucket the reference distribution gives no mass
(e.g. a tail that rounds to 0) costs a large finite amount rather than inf or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import get_args

import torch

from posttrain.distill.config import Divergence

DIVERGENCES = get_args(Divergence)


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {tuple(choices)}")


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must lie in [0, 1], got {beta}")


def _promote(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(_promote(logits), dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) summed over the last dim from log-probabilities. Terms with a = 0 are 0 (as xlogy), and
    they are computed on safe stand-ins so that no inf * 0 reaches the gradient."""
    a = log_a.exp()
    present = a > 0
    floor = math.log(torch.finfo(log_b.dtype).tiny)
    safe_a = torch.where(present, log_a, 0.0)
    safe_b = torch.where(present, log_b.clamp(min=floor), 0.0)
    return (a * (safe_a - safe_b)).sum(dim=-1)


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD between teacher P and student Q given as log-probabilities over the last dim."""
    _check_beta(beta)
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    weighted = torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)])
    absent = weighted.isneginf().all(dim=0)  # logsumexp over two -inf has a NaN gradient
    log_m = torch.logsumexp(weighted.masked_fill(absent, 0.0), dim=0)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def reverse_kl_sampled(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """[B, T] on-policy reverse KL(student || teacher) from tokens sampled by the student: the value is the
    k1 estimate student_logp - teacher_logp (unbiased, can be negative), the gradient is the score-function
    estimate (student_logp - teacher_logp) * grad student_logp. Averaged over y ~ student that gradient is
    exactly the gradient of the full-vocabulary KL at this position, with the prefix held fixed (no credit
    to earlier tokens, i.e. discount 0, as in on-policy distillation; Agarwal et al. 2024, Thinking
    Machines 2025). The plain k1 value as a loss would have the wrong gradient (mean zero).

    Two equivalent ways to train on it: use the result directly as the per-token loss, or feed
    `-reverse_kl_sampled(...).detach()` as per-token advantages to a policy-gradient loss (on-policy the
    gradients agree). No gradient flows to the teacher.
    """
    log_ratio = (student_logp - teacher_logp).detach()
    return log_ratio + log_ratio * (student_logp - student_logp.detach())


def full_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[B, T] KL(teacher || student) over the full vocabulary (mode-covering: the student must put mass
    wherever the teacher does). Both logits [B, T, V] over the same vocabulary."""
    return _kl(_logprobs(teacher_logits), _logprobs(student_logits))


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[B, T] KL(student || teacher) over the full vocabulary (mode-seeking)."""
    return _kl(_logprobs(student_logits), _logprobs(teacher_logits))


def full_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """[B, T] generalised Jensen-Shannon divergence over the full vocabulary; see `topk_jsd` for the
    convention (teacher P, student Q, beta = 0 / 1 are forward / reverse KL)."""
    return _jsd(_logprobs(teacher_logits), _logprobs(student_logits), beta)


def _tail_logsumexp(logits: torch.Tensor, topk_ids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B, T, 1] logsumexp of the logits outside the present top-k ids; -inf where there are none, with a
    zero (not NaN) gradient there."""
    hits = torch.zeros_like(logits).scatter_add_(-1, topk_ids, present.to(logits.dtype))
    in_topk = hits > 0
    empty = in_topk.all(dim=-1, keepdim=True)
    rest = logits.masked_fill(in_topk, -math.inf).masked_fill(empty, 0.0)
    return torch.logsumexp(rest, dim=-1, keepdim=True).masked_fill(empty, -math.inf)


def _buckets(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities [B, T, K (+ 1)] of the top-k buckets (and the tail bucket).
    The student's tail is logsumexp over its other logits minus logsumexp over all, never log(1 - sum q),
    which loses all precision when the top-k hold nearly all of the student's mass."""
    logits = _promote(student_logits)
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    teacher = topk_logp.to(logits.dtype)
    present = teacher > -math.inf
    log_p = torch.where(present, teacher, -math.inf)
    log_q = torch.where(present, logits.gather(-1, topk_ids) - log_z, -math.inf)
    if not tail:
        return log_p, log_q
    covered = torch.logsumexp(log_p, dim=-1, keepdim=True).clamp(max=0.0)  # rounding can exceed 1
    log_p_tail = torch.log(-torch.expm1(covered))
    log_q_tail = _tail_logsumexp(logits, topk_ids, present) - log_z
    return torch.cat([log_p, log_p_tail], dim=-1), torch.cat([log_q, log_q_tail], dim=-1)


def topk_forward_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, *, tail: bool = True
) -> torch.Tensor:
    """[B, T] KL(teacher || student) over the teacher's top-k buckets plus the tail bucket:
    sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail).

    tail=False drops the tail term and renormalises nothing: sum_k p_k log(p_k / q_k). That is no longer
    a divergence (it can be negative); as a function of the student it is the cross-entropy to the
    teacher's top-k mass, minimised by q_k = p_k / sum_j p_j, so the student learns to put no mass outside
    the teacher's top-k. With the tail term the minimum is the teacher's own tail mass there.
    """
    return _kl(*_buckets(student_logits, topk_ids, topk_logp, tail))


def topk_jsd(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, beta: float
) -> torch.Tensor:
    """[B, T] generalised Jensen-Shannon divergence over the (K + 1) top-k and tail buckets (GKD, Agarwal
    et al. 2024, eq. 1), with P = teacher, Q = student, M = beta P + (1 - beta) Q:
    JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M).

    The same convention as TRL's `GKDTrainer.generalized_jsd_loss`, including its endpoints: the formula
    is 0 at beta = 0 and 1, so those are defined as the normalised limits, JSD_beta / beta -> KL(P || Q)
    (forward KL) as beta -> 0 and JSD_beta / (1 - beta) -> KL(Q || P) (reverse KL) as beta -> 1. The value
    is therefore discontinuous at both ends, and near them it is about beta (or 1 - beta) times the KL it
    approaches: learning rates do not carry over between beta = 0 and a small positive beta. Reverse KL
    over buckets is large where the teacher gives a bucket ~0 mass that the student does not (a tail that
    rounds to 0); 0 < beta < 1 keeps every term bounded by -log(beta) or -log(1 - beta).
    """
    return _jsd(*_buckets(student_logits, topk_ids, topk_logp, tail=True), beta)


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    beta: float = 0.5,
) -> torch.Tensor:
    """[B, T] divergence `name` (one of DIVERGENCES) from the teacher's full logits [B, T, V] or its top-k
    as (topk_ids, topk_logp), so a driver picks the loss by config alone. forward_kl and reverse_kl are
    JSD at beta = 0 and 1; `beta` matters only for jsd. Top-k always includes the tail bucket."""
    _check_choice(name, DIVERGENCES, "divergence")
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(name, beta)
    if isinstance(teacher, torch.Tensor):
        return full_jsd(student_logits, teacher, beta)
    return topk_jsd(student_logits, *teacher, beta)
