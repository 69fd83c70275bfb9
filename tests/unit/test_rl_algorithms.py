"""RL advantages and losses against values worked out by hand, plus gradient checks (pure CPU torch)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.rl.advantages import ESTIMATORS, group_advantages, keep_informative_groups
from posttrain.rl.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    entropy_from_logits,
    importance_weights,
    kl_divergence,
    policy_loss,
)

D = torch.float64
NAN = float("nan")


def tensor(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def close(actual: torch.Tensor, expected: object, atol: float = 1e-6) -> bool:
    return torch.allclose(actual, torch.as_tensor(expected, dtype=D), atol=atol, rtol=0)


# Group 0: rewards 1, 0, 1 and a failed sample (NaN reward). Mean 2/3, centered 1/3, -2/3, 1/3,
# unbiased std sqrt((1/9 + 4/9 + 1/9) / 2) = 1/sqrt(3). Group 1: all rewards equal.
REWARDS = tensor([[1.0, 0.0, 1.0, NAN], [0.5, 0.5, 0.5, 0.5]])
VALID = torch.tensor([[True, True, True, False], [True, True, True, True]])
S3 = math.sqrt(3.0)


@pytest.mark.parametrize(
    ("estimator", "expected_group0"),
    [
        ("grpo", [1 / S3, -2 / S3, 1 / S3, 0.0]),
        ("dr_grpo", [1 / 3, -2 / 3, 1 / 3, 0.0]),
        ("rloo", [0.5, -1.0, 0.5, 0.0]),  # 1 - mean(0, 1), 0 - mean(1, 1), 1 - mean(1, 0)
        # centered values of all 7 valid samples: 1/3, -2/3, 1/3, 0, 0, 0, 0: mean 0, std sqrt((6/9) / 6) = 1/3
        ("reinforce_pp", [1.0, -2.0, 1.0, 0.0]),
    ],
)
def test_group_advantages_by_hand(estimator: str, expected_group0: list[float]) -> None:
    advantages = group_advantages(REWARDS, VALID, estimator)
    assert close(advantages, [expected_group0, [0.0] * 4], atol=1e-5)


def test_rloo_is_the_explicit_leave_one_out_baseline() -> None:
    torch.manual_seed(0)
    rewards, valid = torch.rand(3, 5, dtype=D), torch.rand(3, 5) > 0.3
    valid[:, :2] = True
    advantages = group_advantages(rewards, valid, "rloo")
    for g in range(3):
        for i in range(5):
            others = [rewards[g, j] for j in range(5) if j != i and valid[g, j]]
            expected = rewards[g, i] - sum(others) / len(others) if valid[g, i] else 0.0
            assert close(advantages[g, i], expected)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_groups_without_a_baseline_get_zero(estimator: str) -> None:
    rewards = tensor([[NAN, 3.0, NAN], [NAN, NAN, NAN], [1.0, 2.0, 4.0]])
    valid = ~rewards.isnan()
    advantages = group_advantages(rewards, valid, estimator)
    assert (advantages[:2] == 0).all() and advantages.isfinite().all()
    assert (advantages[2] != 0).all()
    assert (group_advantages(rewards[:2], valid[:2], estimator) == 0).all()


def test_unknown_estimator_names_the_choices() -> None:
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(REWARDS, VALID, "ppo")


def test_keep_informative_groups() -> None:
    rewards = tensor([[1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], [1, 1, 0, 1], [0, 1, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    # 3: the only differing reward failed; 4: a single valid sample
    assert keep_informative_groups(rewards, valid).tolist() == [True, False, False, False]


# ---- KL and entropy


def test_kl_estimators_by_hand() -> None:
    logp, ref = tensor([[math.log(0.5), math.log(0.25)]]), tensor([[math.log(0.25), math.log(0.5)]])
    # x = logp - ref = +-log 2; k3 = exp(-x) + x - 1: 0.5 + 0.693147 - 1 and 2 - 0.693147 - 1
    assert close(kl_divergence(logp, ref, "k1"), [[0.693147, -0.693147]])
    assert close(kl_divergence(logp, ref, "k2"), [[0.240227, 0.240227]])
    assert close(kl_divergence(logp, ref, "k3"), [[0.193147, 0.306853]])


def test_kl_is_zero_on_policy_and_k3_never_negative() -> None:
    torch.manual_seed(1)
    logp, ref = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D)
    assert (kl_divergence(logp, ref, "k3") >= 0).all()
    for estimator in ("k1", "k2", "k3"):
        assert (kl_divergence(logp, logp.clone(), estimator) == 0).all()
    with pytest.raises(ValueError, match="k3"):
        kl_divergence(logp, ref, "k4")


def test_entropy_from_logits() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 7, dtype=D)
    reference = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert close(entropy_from_logits(logits), reference, atol=1e-12)
    assert close(entropy_from_logits(torch.zeros(1, 2, 11, dtype=D)), [[math.log(11)] * 2], atol=1e-12)
    peaked = entropy_from_logits(tensor([[[1000.0, 0.0, -1000.0]]]))
    assert peaked.isfinite().all() and close(peaked, [[0.0]])
    assert entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16)).dtype == torch.float32


# ---- policy losses


@pytest.mark.parametrize("kind", POLICY_LOSSES)
def test_on_policy_step_is_the_plain_policy_gradient(kind: str) -> None:
    torch.manual_seed(3)
    logp = torch.randn(3, 5, dtype=D).requires_grad_()
    mask = tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    advantages = tensor([1.5, -0.7, 0.3])
    num_tokens = float(mask.sum())
    loss, stats = policy_loss(logp, logp.detach().clone(), advantages, mask, kind)
    total = aggregate(loss, mask, "token_mean", num_tokens=num_tokens, num_seqs=3, norm_length=5)
    (grad,) = torch.autograd.grad(total, logp)
    assert torch.allclose(grad, -advantages[:, None] * mask / num_tokens)
    assert stats["ratio_sum"] == stats["tokens"] == num_tokens and stats["ratio_max"] == 1
    assert stats["clip_low_count"] == stats["clip_high_count"] == 0


def test_ppo_clipping_by_hand() -> None:
    # clip range [0.8, 1.28] (DAPO clip-higher); the last token of each row is padding
    ratios = tensor([[0.5, 0.9, 1.1, 1.5, 3.0], [0.5, 0.9, 1.1, 1.5, 0.1]])
    mask = tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    logp = ratios.log().requires_grad_()
    advantages = tensor([1.0, -2.0])
    loss, stats = policy_loss(logp, torch.zeros_like(ratios), advantages, mask, "ppo", clip_high=0.28)
    # A = 1: -min(r, clip(r)); A = -2: 2 max(r, clip(r))
    assert close(loss[:, :4], [[-0.5, -0.9, -1.1, -1.28], [1.6, 1.8, 2.2, 3.0]])
    (grad,) = torch.autograd.grad((loss * mask).sum(), logp)  # -r A where unclipped, 0 where clipped
    assert close(grad, [[-0.5, -0.9, -1.1, 0.0, 0.0], [0.0, 1.8, 2.2, 3.0, 0.0]])
    assert stats["clip_low_count"] == 1 and stats["clip_high_count"] == 1
    assert close(stats["ratio_sum"], 8.0) and close(stats["ratio_max"], 1.5) and stats["tokens"] == 8


def test_per_token_advantages_match_per_sequence_ones() -> None:
    torch.manual_seed(4)
    logp, old = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    mask, advantages = torch.ones(2, 3, dtype=D), tensor([0.4, -1.2])
    for kind in POLICY_LOSSES:
        per_sequence, _ = policy_loss(logp, old, advantages, mask, kind)
        per_token, _ = policy_loss(logp, old, advantages[:, None].expand(2, 3), mask, kind)
        assert torch.equal(per_sequence, per_token)


GSPO_LOG_RATIOS = tensor([[1.6, 0.9, 5.0], [0.5, 2.0, 1.0]]).log()  # geometric means 1.2 and 1
GSPO_MASK = tensor([[1, 1, 0], [1, 1, 1]])


def gspo_example(clip_high: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    logp = GSPO_LOG_RATIOS.clone().requires_grad_()
    zeros, advantages = torch.zeros(2, 3, dtype=D), tensor([1.0, -1.0])
    return logp, *policy_loss(logp, zeros, advantages, GSPO_MASK, "gspo", clip_high=clip_high)


def test_gspo_ratio_is_the_geometric_mean_and_every_token_gets_its_gradient() -> None:
    logp, loss, stats = gspo_example(clip_high=0.3)
    assert close(loss * GSPO_MASK, [[-1.2, -1.2, 0.0], [1.0, 1.0, 1.0]])
    (grad,) = torch.autograd.grad((loss * GSPO_MASK).sum(), logp)  # -s_i A_i on every token
    assert close(grad, [[-1.2, -1.2, 0.0], [1.0, 1.0, 1.0]])
    assert close(stats["ratio_sum"], 2 * 1.2 + 3 * 1.0) and stats["clip_high_count"] == 0


def test_gspo_token_advantages_steer_each_token_separately() -> None:
    # GSPO-token: d/dlogp_t of -s_{i,t} A_t is -s_i A_t, not the sequence average of A
    logp = GSPO_LOG_RATIOS.clone().requires_grad_()
    advantages = tensor([[1.0, 3.0, 0.0], [-1.0, 0.0, 2.0]])
    loss, _ = policy_loss(logp, torch.zeros(2, 3, dtype=D), advantages, GSPO_MASK, "gspo", clip_high=0.3)
    (grad,) = torch.autograd.grad((loss * GSPO_MASK).sum(), logp)
    assert close(grad, [[-1.2, -3.6, 0.0], [1.0, 0.0, -2.0]])


def test_gspo_clips_whole_sequences() -> None:
    logp, loss, stats = gspo_example(clip_high=0.1)
    assert close(loss[0, :2], [-1.1, -1.1])
    (grad,) = torch.autograd.grad((loss * GSPO_MASK).sum(), logp)
    assert close(grad[0], [0.0, 0.0, 0.0]) and stats["clip_high_count"] == 2


def test_gspo_token_form_has_the_sequence_level_gradient() -> None:
    torch.manual_seed(5)
    logp = (0.1 * torch.randn(4, 6, dtype=D)).requires_grad_()
    old, advantages = 0.1 * torch.randn(4, 6, dtype=D), tensor([1.0, -0.5, 2.0, -1.5])
    mask = (torch.rand(4, 6) > 0.3).to(D)
    mask[:, 0] = 1
    loss, _ = policy_loss(logp, old, advantages, mask, "gspo", clip_low=3e-2, clip_high=4e-2)
    ours = aggregate(loss, mask, "seq_mean_token_mean", num_tokens=1, num_seqs=4, norm_length=1)
    # the paper's objective, written directly on differentiable sequence ratios
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    paper = -torch.min(s * advantages, s.clamp(1 - 3e-2, 1 + 4e-2) * advantages).mean()
    assert torch.allclose(ours, paper)
    assert torch.allclose(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(paper, logp)[0])


# f(r) = sigmoid(tau (r - 1)) 4 / tau, loss = -f(r) A, d loss / d logp = -A 4 sigma (1 - sigma) r:
# A = +1, tau_pos = 1:     r = 1: sigma = 0.5 -> loss -2, grad -1
#                          r = 2: sigma(1) = 0.731059 -> loss -2.924234, grad -1.572895
#                          r = 0.5: sigma(-0.5) = 0.377541 -> loss -1.510163, grad -0.470007
# A = -1, tau_neg = 1.05:  r = 1: loss 4 / 1.05 / 2 = 1.904762, grad 1
#                          r = 2: sigma(1.05) = 0.740775 -> loss 2.822000, grad 1.536220
#                          r = 0.5: sigma(-0.525) = 0.371685 -> loss 1.415938, grad 0.467070
def test_sapo_soft_gate_by_hand() -> None:
    logp = tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]]).log().requires_grad_()
    loss, stats = policy_loss(logp, torch.zeros(2, 3, dtype=D), tensor([1.0, -1.0]), torch.ones(2, 3), "sapo")
    assert close(loss, [[-2.0, -2.924234, -1.510163], [1.904762, 2.822000, 1.415938]])
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert close(grad, [[-1.0, -1.572895, -0.470007], [1.0, 1.536220, 0.467070]])
    # the larger negative temperature damps off-policy negative updates more than positive ones
    assert (grad[1, 1:].abs() < grad[0, 1:].abs()).all()
    assert stats["clip_high_count"] == 1 and stats["clip_low_count"] == 1  # informational: r = 2 and r = 0.5


def test_unknown_policy_loss_names_the_choices() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="gspo"):
        policy_loss(x, x, torch.zeros(1), x, "grpo")


# ---- aggregation


def test_aggregate_by_hand() -> None:
    per_token, mask = tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    counts = {"num_tokens": 5.0, "num_seqs": 2.0, "norm_length": 4.0}
    assert close(aggregate(per_token, mask, "token_mean", **counts), 18 / 5)
    assert close(aggregate(per_token, mask, "seq_mean_token_mean", **counts), (3 / 2 + 15 / 3) / 2)
    assert close(aggregate(per_token, mask, "seq_mean_token_sum_norm", **counts), 18 / (2 * 4))
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(per_token, mask, "sum", **counts)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("splits", [[2, 4], [1, 2, 3]])
def test_aggregate_sums_over_micro_batches(mode: str, splits: list[int]) -> None:
    torch.manual_seed(6)
    per_token, mask = torch.randn(6, 7, dtype=D), (torch.rand(6, 7) > 0.4).to(D)
    mask[5] = 0  # a sequence without tokens still counts as a sequence
    counts = {"num_tokens": float(mask.sum()), "num_seqs": 6.0, "norm_length": 7.0}
    whole = aggregate(per_token, mask, mode, **counts)
    parts = zip(per_token.split(splits), mask.split(splits), strict=True)
    assert torch.allclose(torch.stack([aggregate(p, m, mode, **counts) for p, m in parts]).sum(), whole)


# ---- gradient checks


@pytest.mark.parametrize("kind", POLICY_LOSSES)
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_gradcheck_policy_losses(kind: str, mode: str) -> None:
    torch.manual_seed(7)
    logp, old = (0.3 * torch.randn(3, 4, dtype=D)).requires_grad_(), 0.3 * torch.randn(3, 4, dtype=D)
    mask, advantages = tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]]), tensor([1.0, -0.8, 0.5])

    def objective(x: torch.Tensor) -> torch.Tensor:
        loss, _ = policy_loss(x, old, advantages, mask, kind, clip_high=0.28)
        return aggregate(loss, mask, mode, num_tokens=9, num_seqs=3, norm_length=4)

    assert torch.autograd.gradcheck(objective, (logp,))


def test_gradcheck_kl_entropy_aggregate() -> None:
    torch.manual_seed(8)
    logp, ref = torch.randn(2, 3, dtype=D, requires_grad=True), torch.randn(2, 3, dtype=D, requires_grad=True)
    for estimator in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda a, b, e=estimator: kl_divergence(a, b, e), (logp, ref))
    assert torch.autograd.gradcheck(entropy_from_logits, (torch.randn(2, 3, 5, dtype=D, requires_grad=True),))
    mask = tensor([[1, 0, 1], [1, 1, 1]])
    for mode in AGGREGATIONS:
        assert torch.autograd.gradcheck(
            lambda x, m=mode: aggregate(x, mask, m, num_tokens=5, num_seqs=2, norm_length=3), (logp,)
        )


# ---- train/inference importance weights

# old/engine ratios: row 0: 9, 3, 1 (geometric mean 3); row 1: 0.5, 2 (geometric mean 1) and padding 10
IS_LOG_RATIOS = tensor([[9.0, 3.0, 1.0], [0.5, 2.0, 10.0]]).log()
IS_MASK = tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    ("level", "mode", "expected", "clipped", "ratio_sum"),
    [
        ("token", "truncate", [[2, 2, 1], [0.5, 2, 2]], 2, 15.5),
        ("token", "mask", [[0, 0, 1], [1, 1, 0]], 2, 15.5),
        ("sequence", "truncate", [[2, 2, 2], [1, 1, 1]], 3, 11.0),
        ("sequence", "mask", [[0, 0, 0], [1, 1, 1]], 3, 11.0),
    ],
)
def test_importance_weights_by_hand(
    level: str, mode: str, expected: list[list[float]], clipped: int, ratio_sum: float
) -> None:
    engine = torch.zeros(2, 3, dtype=D)
    old = IS_LOG_RATIOS.clone().requires_grad_()
    weights, stats = importance_weights(old, engine, IS_MASK, level=level, mode=mode, cap=2.0)
    assert close(weights, expected) and not weights.requires_grad
    assert stats["tis_clipped_count"] == clipped and stats["tokens"] == 5
    assert close(stats["tis_ratio_sum"], ratio_sum)


def test_importance_weights_reject_unknown_options() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="sequence"):
        importance_weights(x, x, x, level="batch")
    with pytest.raises(ValueError, match="truncate"):
        importance_weights(x, x, x, mode="clip")
