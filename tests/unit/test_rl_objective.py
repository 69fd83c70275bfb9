"""The composed RL objective and the rollout → learner batch layout, without Ray or DeepSpeed."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ConfigError, validate
from posttrain.data.prompts import EvalPrompt
from posttrain.objectives import Norms
from posttrain.rl.batch import Experience, Scored, collate, loss_positions, response_logprobs
from posttrain.rl.config import AlgorithmConfig
from posttrain.rl.objective import RLObjective
from posttrain.rollout import RolloutSample
from posttrain.rollout.episodes import Episode, Prompt

from helpers import next_token_logprobs, objective_on_logits


def _experience(
    prompt: list[int], response: list[int], advantage: float = 0.0, valid: bool = True, **sample: object
) -> Experience:
    source = EvalPrompt(prompt, "p", "1", "thinking", 0)
    lps = [-0.1 * (j + 1) for j in range(len(response))]
    s = RolloutSample(list(response), "", lps, str(sample.pop("finish", "stop")), **sample)  # type: ignore[arg-type]
    scored = Scored(Episode(Prompt(source, prompt), s, 0), 0, {}, 0.0, valid)
    return Experience(scored, 0.0, advantage)


def test_collate_places_response_tokens_in_learner_layout() -> None:
    a = _experience([5, 6, 7], [8, 9], advantage=1.5)
    b = _experience([5], [4, 3, 2], advantage=-0.5, forced=[1])
    batch = collate([a, b], pad_id=0, mask_truncated=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    # position t predicts token t+1: a's response starts at position 2, b's at 0 (forced token 1 masked)
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]
    assert batch["engine_logprobs"][0].tolist() == pytest.approx([0, 0, -0.1, -0.2])
    assert batch["advantages"].tolist() == [1.5, -0.5]
    assert "old_logprobs" not in batch and "ref_logprobs" not in batch
    assert response_logprobs(a.episode, batch["engine_logprobs"][0]) == pytest.approx([-0.1, -0.2])


def test_invalid_and_truncated_trajectories_carry_no_loss() -> None:
    t = _experience([1, 2], [3, 4], finish="length")
    assert loss_positions(t, mask_truncated=False) == [1, 2]
    assert loss_positions(t, mask_truncated=True) == []
    invalid = _experience([1, 2], [3, 4], valid=False)
    assert loss_positions(invalid, mask_truncated=False) == []


def _algo(**changes: object) -> AlgorithmConfig:
    return AlgorithmConfig.model_validate(changes)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "gspo", "sapo", "dr_grpo"])
def test_first_update_is_on_policy(kind: str) -> None:
    """Step-0 identity: without old logprobs the ratio is exactly 1, nothing is clipped, KL to an
    identical reference is 0, and the gradient is the plain policy gradient -A ∇logp / N."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)
    lp = next_token_logprobs(logits / 0.7, ids).detach()  # the engine reports the tempered policy's logprobs
    batch = {"response_mask": mask, "advantages": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    batch |= {"engine_logprobs": lp.clone(), "ref_logprobs": lp.clone()}
    norms = Norms(tokens=5.0, seqs=2.0, norm_length=3.0, temperature=0.7)
    algo = _algo(type=kind, kl_coef=0.1)
    loss, stats = objective_on_logits(RLObjective(algo), logits, ids, batch, norms)
    assert stats["ratio_sum"].item() == stats["tokens"].item() == 5.0
    assert stats["ratio_max"].item() == 1.0
    assert stats["clip_low_count"].item() == stats["clip_high_count"].item() == 0.0
    assert stats["kl_sum"].item() == 0.0 and stats["mismatch_max"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    surrogate = _plain_policy_gradient_loss(logits, ids, batch, norms, algo.aggregation)
    (expected,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(grad, expected, atol=1e-12)


def _plain_policy_gradient_loss(logits, ids, batch, norms, aggregation):  # type: ignore[no-untyped-def]
    """-A · logp (of the policy at the rollout temperature), aggregated as configured, written out directly."""
    lp = next_token_logprobs(logits / norms.temperature, ids)
    per_token = -batch["advantages"][:, None] * lp * batch["response_mask"]
    if aggregation == "token_mean":
        return per_token.sum() / norms.tokens
    if aggregation == "seq_mean_token_sum_norm":
        return per_token.sum() / (norms.seqs * norms.norm_length)
    return (per_token.sum(-1) / batch["response_mask"].sum(-1)).sum() / norms.seqs


def test_importance_weights_and_entropy_bonus_enter_the_loss() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 6, requires_grad=True)
    ids = torch.randint(0, 6, (1, 4))
    mask = torch.ones(1, 3)
    batch = {"response_mask": mask, "advantages": torch.tensor([1.0])}
    batch["engine_logprobs"] = torch.full((1, 3), -30.0)  # the engine thought these tokens unlikely
    norms = Norms(tokens=3.0, seqs=1.0, norm_length=3.0)
    plain, _ = objective_on_logits(RLObjective(_algo(type="dapo")), logits, ids, batch, norms)
    capped_objective = RLObjective(_algo(type="dapo", importance_sampling={"cap": 2.0}))
    capped, stats = objective_on_logits(capped_objective, logits, ids, batch, norms)
    assert stats["tis_clipped_count"].item() == 3.0
    assert capped.item() == pytest.approx(2.0 * plain.item())
    assert stats["mismatch_max"].item() > 20
    bonus_objective = RLObjective(_algo(type="dapo", entropy_coef=0.5))
    bonus, st = objective_on_logits(bonus_objective, logits, ids, batch, norms)
    assert bonus.item() == pytest.approx(plain.item() - 0.5 * st["entropy_sum"].item() / 3, rel=1e-6)


def test_algorithm_presets_and_overrides() -> None:
    dapo = AlgorithmConfig(type="dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.dynamic_sampling, dapo.aggregation) == (
        0.2,
        0.28,
        True,
        "token_mean",
    )
    gspo = AlgorithmConfig(type="gspo", clip_high=1e-3)
    assert (gspo.policy_loss, gspo.clip_low, gspo.clip_high) == ("gspo", 3e-4, 1e-3)
    assert AlgorithmConfig(type="dr_grpo").aggregation == "seq_mean_token_sum_norm"
    assert AlgorithmConfig(type="sapo").policy_loss == "sapo"


def test_rl_config_errors_name_the_keys() -> None:
    raw = {
        "output_dir": "x",
        "model": {"path": "m"},
        "data": {"prompts": [{"path": "p"}]},
        "rewards": {"rewards": ["exact_match"]},
        "train": {"prompts_per_step": 6, "mini_batches": 4},
    }
    with pytest.raises(
        ConfigError, match=r"train.prompts_per_step \(6\) must be a multiple of train.mini_batches"
    ):
        validate("rl", raw)
    raw["train"] = {"prompts_per_step": 4, "micro_batch_size": 5}
    with pytest.raises(ConfigError, match=r"4 × 8 / 1 = 32 sequences per update.*\(5 × 1\)"):
        validate("rl", raw)
    raw["train"] = {"prompts_per_step": 4, "micro_batch_size": 8}
    raw["algorithm"] = {"type": "ppo2"}
    with pytest.raises(ConfigError, match="algorithm.type"):
        validate("rl", raw)
    raw["algorithm"] = {"kl_coeff": 0.1}
    with pytest.raises(ConfigError, match="did you mean 'algorithm.kl_coef'"):
        validate("rl", raw)
    raw["algorithm"] = {}
    raw["init_from_sft"] = {"config": "configs/tiny/sft.yaml"}
    with pytest.raises(ConfigError, match="must end in /final"):
        validate("rl", raw)
