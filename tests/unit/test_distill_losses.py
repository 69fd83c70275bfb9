"""Distillation divergences against values worked out by hand and against direct full-vocabulary and
explicit-bucket formulas, plus gradient checks (pure CPU torch)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from posttrain.distill.losses import (
    DIVERGENCES,
    divergence,
    full_forward_kl,
    full_jsd,
    full_reverse_kl,
    reverse_kl_sampled,
    topk_forward_kl,
    topk_jsd,
)
from posttrain.rl.losses import aggregate, policy_loss

D = torch.float64
INF = math.inf
TopK = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def close(actual: torch.Tensor, expected: object, atol: float = 1e-6) -> bool:
    return torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def log_probs(*probs: float) -> torch.Tensor:
    """[1, 1, V] log-probabilities, usable as logits too."""
    return torch.tensor([[probs]], dtype=D).log()


def random_pair(seed: int, vocab: int, dtype: torch.dtype = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits [2, 3, vocab]; the teacher is peakier, as a stronger model tends to be."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 3, vocab, generator=g, dtype=dtype)
    return student, 2.5 * torch.randn(2, 3, vocab, generator=g, dtype=dtype)


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logp, ids = torch.log_softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    return ids, logp


def kl_direct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def jsd_direct(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    m = beta * p + (1 - beta) * q
    return beta * kl_direct(p, m) + (1 - beta) * kl_direct(q, m)


def explicit_buckets(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K + 1)-way teacher and student distributions written out: the top-k probabilities, then the sum of
    the probabilities of all other tokens."""
    ids, _ = teacher_topk(teacher_logits, k)
    outside = torch.ones_like(teacher_logits).scatter(-1, ids, 0.0)

    def buckets(probs: torch.Tensor) -> torch.Tensor:
        return torch.cat([probs.gather(-1, ids), (probs * outside).sum(-1, keepdim=True)], -1)

    return buckets(torch.softmax(teacher_logits, -1)), buckets(torch.softmax(student_logits, -1))


# ---- by hand on a 3-token vocabulary
# teacher P = (1/2, 1/4, 1/4), student Q = (1/8, 3/8, 1/2)
P3, Q3 = log_probs(0.5, 0.25, 0.25), log_probs(0.125, 0.375, 0.5)
TOP1 = torch.tensor([[[0]]]), P3[..., :1]


def test_full_divergences_by_hand() -> None:
    # KL(P||Q) = 1/2 ln 4 + 1/4 ln(2/3) + 1/4 ln(1/2); KL(Q||P) = 1/8 ln(1/4) + 3/8 ln(3/2) + 1/2 ln 2
    assert close(full_forward_kl(Q3, P3), [[0.418494]])
    assert close(full_reverse_kl(Q3, P3), [[0.325336]])
    # M = (5/16, 5/16, 3/8): KL(P||M) = 1/2 ln(8/5) + 1/4 ln(4/5) + 1/4 ln(2/3) = 0.077850,
    # KL(Q||M) = 1/8 ln(2/5) + 3/8 ln(6/5) + 1/2 ln(4/3) = 0.097675
    assert close(full_jsd(Q3, P3, 0.5), [[0.087762]])


def test_top1_divergences_by_hand() -> None:
    # buckets {0}, {1, 2}: P = (1/2, 1/2), Q = (1/8, 7/8)
    assert close(topk_forward_kl(Q3, *TOP1), [[0.413339]])  # 1/2 ln 4 + 1/2 ln(4/7), below 0.418494
    assert close(topk_jsd(Q3, *TOP1, 1.0), [[0.316377]])  # 1/8 ln(1/4) + 7/8 ln(7/4), below 0.325336
    # M = (5/16, 11/16): 1/2 (1/2 ln(8/5) + 1/2 ln(8/11)) + 1/2 (1/8 ln(2/5) + 7/8 ln(14/11))
    assert close(topk_jsd(Q3, *TOP1, 0.5), [[0.086128]])
    # with the tail bucket the two remaining tokens are one bucket: the top-2 value is the full one
    top2 = torch.tensor([[[0, 1]]]), P3[..., :2]
    assert close(topk_forward_kl(Q3, *top2), full_forward_kl(Q3, P3), atol=1e-12)
    assert close(topk_jsd(Q3, *top2, 0.5), full_jsd(Q3, P3, 0.5), atol=1e-12)


def test_without_the_tail_nothing_is_renormalised() -> None:
    assert close(topk_forward_kl(Q3, *TOP1, tail=False), [[math.log(2)]])  # 1/2 ln(1/2 / 1/8)
    # not a divergence: a teacher token the student already over-predicts gives a negative value
    student = log_probs(0.9, 0.05, 0.05)
    assert close(topk_forward_kl(student, TOP1[0], log_probs(0.1), tail=False), [[0.1 * math.log(0.1 / 0.9)]])


# ---- against direct formulas


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_full_references_match_direct_formulas(beta: float) -> None:
    student, teacher = random_pair(0, 7)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    assert close(full_forward_kl(student, teacher), kl_direct(p, q), atol=1e-12)
    assert close(full_reverse_kl(student, teacher), kl_direct(q, p), atol=1e-12)
    assert close(full_jsd(student, teacher, beta), jsd_direct(p, q, beta), atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_matches_explicit_buckets(k: int) -> None:
    student, teacher = random_pair(1, 7)
    ids, logp = teacher_topk(teacher, k)
    p, q = explicit_buckets(student, teacher, k)
    assert close(topk_forward_kl(student, ids, logp), kl_direct(p, q), atol=1e-12)
    # the teacher's tail can only be 1 - sum(top-k): rounding there, divided by a small p_tail, is ~1e-12
    assert close(topk_jsd(student, ids, logp, 1.0), kl_direct(q, p), atol=1e-10)
    for beta in (0.2, 0.5, 0.8):
        assert close(topk_jsd(student, ids, logp, beta), jsd_direct(p, q, beta), atol=1e-12)


TOPK_AND_FULL: list[tuple[TopK, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = [
    (topk_forward_kl, full_forward_kl),
    (lambda s, i, lp: topk_jsd(s, i, lp, 0.3), lambda s, t: full_jsd(s, t, 0.3)),
    (lambda s, i, lp: topk_jsd(s, i, lp, 1.0), full_reverse_kl),
]


@pytest.mark.parametrize(("topk", "full"), TOPK_AND_FULL)
def test_topk_grows_monotonically_to_the_full_value(topk: TopK, full: Callable[..., torch.Tensor]) -> None:
    vocab = 16
    student, teacher = random_pair(2, vocab)
    reference = full(student, teacher)
    values = [topk(student, *teacher_topk(teacher, k)) for k in (1, 2, 4, 8, vocab)]
    for coarse, fine in zip(values, values[1:], strict=False):
        assert (coarse <= fine + 1e-12).all()
    assert (values[0] < reference).all()
    assert close(values[-1], reference, atol=1e-12)


def test_beta_limits() -> None:
    student, teacher = random_pair(3, 9)
    ids, logp = teacher_topk(teacher, 3)
    forward, reverse = full_forward_kl(student, teacher), full_reverse_kl(student, teacher)
    assert close(full_jsd(student, teacher, 0.0), forward, atol=1e-12)
    assert close(full_jsd(student, teacher, 1.0), reverse, atol=1e-12)
    topk_forward, topk_reverse = topk_forward_kl(student, ids, logp), topk_jsd(student, ids, logp, 1.0)
    assert close(topk_jsd(student, ids, logp, 0.0), topk_forward, atol=1e-12)
    # the endpoints are the normalised limits; the value itself vanishes like beta (or 1 - beta)
    eps = 1e-8
    assert torch.allclose(full_jsd(student, teacher, eps) / eps, forward, rtol=1e-5)
    assert torch.allclose(full_jsd(student, teacher, 1 - eps) / eps, reverse, rtol=1e-5)
    assert torch.allclose(topk_jsd(student, ids, logp, eps) / eps, topk_forward, rtol=1e-5)
    assert torch.allclose(topk_jsd(student, ids, logp, 1 - eps) / eps, topk_reverse, rtol=1e-5)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            topk_jsd(student, ids, logp, beta)


def test_divergence_dispatches_by_name() -> None:
    student, teacher = random_pair(4, 6)
    ids, logp = teacher_topk(teacher, 2)
    assert torch.equal(divergence("forward_kl", student, teacher), full_forward_kl(student, teacher))
    assert torch.equal(divergence("reverse_kl", student, teacher), full_reverse_kl(student, teacher))
    assert torch.equal(divergence("jsd", student, teacher, beta=0.3), full_jsd(student, teacher, 0.3))
    assert torch.equal(divergence("forward_kl", student, (ids, logp)), topk_forward_kl(student, ids, logp))
    assert torch.equal(divergence("reverse_kl", student, (ids, logp)), topk_jsd(student, ids, logp, 1.0))
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd"}
    with pytest.raises(ValueError, match="reverse_kl"):
        divergence("tvd", student, teacher)


# ---- edge cases: empty tail, absent entries, padding


def finite_with_gradient(value: torch.Tensor, student: torch.Tensor) -> bool:
    (grad,) = torch.autograd.grad(value.sum(), student)
    return bool(value.isfinite().all() and grad.isfinite().all())


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_no_nan_when_the_teacher_tail_is_empty(dtype: torch.dtype, beta: float) -> None:
    student = torch.randn(1, 3, 5, dtype=dtype, requires_grad=True)
    ids = torch.tensor([[[0, 1], [2, 3], [4, 0]]])
    # tail mass exactly 0; mass summing past 1 by rounding; all of it on one token
    logp = torch.tensor([[[math.log(0.75), math.log(0.25)], [0.0, -30.0], [0.0, -INF]]], dtype=dtype)
    assert finite_with_gradient(topk_jsd(student, ids, logp, beta), student)
    # k = V: the student's tail bucket is empty too, and the value is the full one
    full_ids, full_logp = teacher_topk(torch.randn(1, 3, 5, dtype=dtype), 5)
    value = topk_jsd(student, full_ids, full_logp, beta)
    assert finite_with_gradient(value, student)
    teacher = full_logp.gather(-1, full_ids.argsort(-1))
    assert close(value, full_jsd(student, teacher, beta), atol=1e-5)


def test_absent_teacher_entries_are_ignored_whatever_their_ids() -> None:
    student, teacher = random_pair(5, 8)
    ids, logp = teacher_topk(teacher, 2)
    # a third entry that is -inf: padding reusing id 0 (maybe a top-k id) or a real zero-probability token
    for pad_id in (ids[..., :1], torch.full_like(ids[..., :1], 7)):
        padded_ids, padded_logp = (
            torch.cat([ids, pad_id], -1),
            torch.cat([logp, torch.full_like(logp[..., :1], -INF)], -1),
        )
        for beta in (0.0, 0.5, 1.0):
            expected = topk_jsd(student, ids, logp, beta)
            assert close(topk_jsd(student, padded_ids, padded_logp, beta), expected, atol=1e-12)
    student.requires_grad_()
    all_absent = torch.full_like(logp, -INF)  # the whole teacher mass in the tail: both distributions are (1)
    value = topk_jsd(student, ids, all_absent, 0.5)
    assert finite_with_gradient(value, student) and close(value, torch.zeros(2, 3), atol=1e-12)


def test_masked_padding_changes_nothing() -> None:
    student, teacher = random_pair(6, 6)
    student.requires_grad_()
    ids, logp = teacher_topk(teacher, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=D)
    # padding as a collator might leave it: id 0 repeated with logp 0 (sums to 3) or -inf
    padded_ids, padded_logp = ids.clone(), logp.clone()
    padded_ids[1, 1:] = 0
    padded_logp[1, 1], padded_logp[1, 2] = 0.0, -INF
    for beta in (0.0, 0.5, 1.0):
        clean = topk_jsd(student, ids, logp, beta)
        padded = topk_jsd(student, padded_ids, padded_logp, beta)
        assert padded.isfinite().all()
        losses = [
            aggregate(x, mask, "token_mean", num_tokens=4, num_seqs=2, norm_length=3) for x in (clean, padded)
        ]
        assert torch.equal(losses[0], losses[1])
        (grad,) = torch.autograd.grad(losses[1], student)
        assert grad.isfinite().all() and (grad[1, 1:] == 0).all()


# ---- gradients


GRADCHECK_CASES: dict[str, TopK] = {
    "forward_kl": topk_forward_kl,
    "forward_kl_no_tail": lambda s, i, lp: topk_forward_kl(s, i, lp, tail=False),
    "jsd_0": lambda s, i, lp: topk_jsd(s, i, lp, 0.0),
    "jsd_0.3": lambda s, i, lp: topk_jsd(s, i, lp, 0.3),
    "jsd_1": lambda s, i, lp: topk_jsd(s, i, lp, 1.0),
}


@pytest.mark.parametrize("k", [2, 5])  # 5 = V: the student's tail bucket is empty
@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck_topk(name: str, k: int) -> None:
    student, teacher = random_pair(7, 5)
    ids, logp = teacher_topk(teacher, k)
    logp[0, 0, -1] = -INF  # one absent entry
    student = student[:, :2].clone().requires_grad_()
    fn = GRADCHECK_CASES[name]
    assert torch.autograd.gradcheck(lambda s: fn(s, ids[:, :2], logp[:, :2]), (student,))


def test_gradcheck_full() -> None:
    student, teacher = random_pair(8, 5)
    student, teacher = student.requires_grad_(), teacher.requires_grad_()
    assert torch.autograd.gradcheck(full_forward_kl, (student, teacher))
    assert torch.autograd.gradcheck(full_reverse_kl, (student, teacher))
    for beta in (0.0, 0.4, 1.0):
        assert torch.autograd.gradcheck(lambda s, t, b=beta: full_jsd(s, t, b), (student, teacher))


# ---- on-policy reverse KL from sampled tokens


def test_reverse_kl_sampled_value_is_k1() -> None:
    student_logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=D)
    teacher_logp = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=D)
    assert close(reverse_kl_sampled(student_logp, teacher_logp), [[math.log(2), -math.log(2)]], atol=1e-12)


def test_reverse_kl_sampled_has_the_exact_gradient_in_expectation() -> None:
    # every token of a 6-token vocabulary, weighted by its probability under the student (no sampling)
    student, teacher = random_pair(9, 6)
    student.requires_grad_()
    student_logp, teacher_logp = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    estimate = (student_logp.exp().detach() * reverse_kl_sampled(student_logp, teacher_logp)).sum(-1)
    exact = full_reverse_kl(student, teacher)
    assert close(estimate, exact, atol=1e-12)
    (estimate_grad,) = torch.autograd.grad(estimate.sum(), student)
    (exact_grad,) = torch.autograd.grad(exact.sum(), student)
    assert close(estimate_grad, exact_grad, atol=1e-12)


def test_reverse_kl_sampled_as_a_loss_or_as_advantages() -> None:
    student_logp = torch.randn(2, 4, dtype=D).requires_grad_()
    teacher_logp = torch.randn(2, 4, dtype=D).requires_grad_()
    mask = torch.ones(2, 4, dtype=D)
    direct = reverse_kl_sampled(student_logp, teacher_logp)
    as_loss = torch.autograd.grad(direct.sum(), (student_logp, teacher_logp), allow_unused=True)
    assert as_loss[1] is None  # the teacher is a constant
    pg, _ = policy_loss(student_logp, student_logp.detach(), -direct.detach(), mask, "ppo")
    (as_advantages,) = torch.autograd.grad(pg.sum(), student_logp)
    assert close(as_loss[0], as_advantages, atol=1e-12)
    assert close(as_loss[0], (student_logp - teacher_logp).detach(), atol=1e-12)
