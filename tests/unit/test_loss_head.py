"""The chunked loss path (posttrain.loss_head) against the full-logits computation it replaced: the same
loss, statistics and gradients (of the hidden states and of the LM head's weight) for SFT's, RL's and
distillation's objectives in fp64, whatever the chunking; no tensor of all positions' logits is ever made;
and through a real HF forward (plain and LoRA) whose head is replaced for the call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.distill.config import LossConfig
from posttrain.distill.losses import divergence, reverse_kl_sampled
from posttrain.distill.objective import DistillObjective
from posttrain.loss_head import ChunkedHead, TokenTerms, per_token
from posttrain.losses import NextTokenLogprobs
from posttrain.objectives import NLL, Norms, Objective
from posttrain.rl.config import AlgorithmConfig
from posttrain.rl.losses import aggregate, entropy_from_logits, importance_weights, kl_divergence, policy_loss
from posttrain.rl.objective import RLObjective

from helpers import next_token_logprobs

B, T, H, V, K = 3, 9, 5, 37, 4
CHUNK = 4  # rows per chunk: several chunks, the last one short
D = torch.float64
Tensors = dict[str, torch.Tensor]


# ------------------------------------------------------------- the full-logits objectives, as they were


def full_nll(logits: torch.Tensor, ids: torch.Tensor, batch: Tensors, norms: Norms) -> tuple[Any, Tensors]:
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    nll = -torch.where(mask, next_token_logprobs(logits, labels.clamp(min=0)), 0.0).sum()
    return nll * (1.0 / norms.tokens), {"nll_sum": nll, "input_tokens": torch.tensor(float(ids.numel()))}


def full_rl(algo: AlgorithmConfig) -> Callable[..., tuple[Any, Tensors]]:
    def objective(
        logits: torch.Tensor, ids: torch.Tensor, batch: Tensors, norms: Norms
    ) -> tuple[Any, Tensors]:
        mask = batch["response_mask"]
        logits = logits / norms.temperature
        logp = next_token_logprobs(logits, ids)
        old = batch.get("old_logprobs", logp.detach())
        per_token, stats = policy_loss(
            logp, old, batch["advantages"], mask, algo.policy_loss, clip_low=algo.clip_low,
            clip_high=algo.clip_high, tau_pos=algo.sapo_tau_pos, tau_neg=algo.sapo_tau_neg,
        )  # fmt: skip
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
        entropy = entropy_from_logits(logits[:, :-1])
        if algo.entropy_coef > 0:
            per_token = per_token - algo.entropy_coef * entropy
        stats["entropy_sum"] = (entropy.detach() * mask).sum()
        loss = aggregate(per_token, mask, algo.aggregation, num_tokens=norms.tokens, num_seqs=norms.seqs,
                         norm_length=norms.norm_length)  # fmt: skip
        return loss, stats

    return objective


def full_distill(cfg: LossConfig) -> Callable[..., tuple[Any, Tensors]]:
    def objective(
        logits: torch.Tensor, ids: torch.Tensor, batch: Tensors, norms: Norms
    ) -> tuple[Any, Tensors]:
        mask = batch["loss_mask"].to(torch.float32)
        logp = next_token_logprobs(logits, ids)
        sampled = cfg.estimator == "sampled"
        if sampled:
            teacher_logp = torch.where(mask > 0, batch["topk_logp"][..., 0].float(), 0.0)
            per_token = reverse_kl_sampled(logp, teacher_logp)
        else:
            teacher = (batch["topk_ids"], batch["topk_logp"])
            per_token = divergence(cfg.type, logits[:, :-1], teacher, beta=cfg.beta)
        stats = {
            "divergence_sum": (per_token.detach() * mask).sum(),
            "nll_sum": -(logp.detach() * mask).sum(),
        }
        if not sampled:
            covered = torch.logsumexp(batch["topk_logp"].float(), dim=-1).exp().clamp(max=1.0)
            stats["teacher_topk_mass_sum"] = (covered * mask).sum()
        if cfg.nll_weight:
            per_token = per_token - cfg.nll_weight * logp
        stats["tokens"] = mask.sum()
        return (per_token * mask).sum() / norms.tokens, stats

    return objective


# ------------------------------------------------------------------------------------ batches and runs


def ids_and_mask(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, T] and a loss mask [B, T-1]: a prompt per row, a row with no loss at all."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T - 1, dtype=D)
    mask[0, :3] = 0
    mask[1, :] = 0
    mask[2, 5:] = 0
    return ids, mask


def sft_batch(seed: int) -> tuple[torch.Tensor, Tensors]:
    ids, mask = ids_and_mask(seed)
    labels = ids.clone()
    labels[:, 1:][mask == 0] = -100
    return ids, {"labels": labels}


def rl_batch(seed: int, old: bool) -> tuple[torch.Tensor, Tensors]:
    ids, mask = ids_and_mask(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    logprob = lambda: -2 * torch.rand(B, T - 1, generator=gen, dtype=D) * mask  # noqa: E731
    batch = {"response_mask": mask, "advantages": torch.randn(B, generator=gen, dtype=D)}
    batch |= {"engine_logprobs": logprob(), "ref_logprobs": logprob()}
    return ids, batch | ({"old_logprobs": logprob()} if old else {})


def distill_batch(seed: int, sampled: bool) -> tuple[torch.Tensor, Tensors]:
    ids, mask = ids_and_mask(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if sampled:
        teacher_logp = -2 * torch.rand(B, T - 1, 1, generator=gen, dtype=D)
        return ids, {"loss_mask": mask, "topk_ids": ids[:, 1:, None], "topk_logp": teacher_logp}
    topk_ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(B * (T - 1))])
    topk_logp = torch.log_softmax(torch.randn(B * (T - 1), K + 1, generator=gen, dtype=D), -1)[:, :K]
    topk_logp[mask.flatten() == 0] = -torch.inf  # padding positions hold no teacher entries
    shape = (B, T - 1, K)
    return ids, {"loss_mask": mask, "topk_ids": topk_ids.view(shape), "topk_logp": topk_logp.view(shape)}


def head_and_hidden(dtype: torch.dtype = D) -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
    return head, torch.randn(B, T, H, dtype=dtype, requires_grad=True)


def chunked(objective: Objective, head: torch.nn.Linear, hidden: torch.Tensor, ids: torch.Tensor,
            batch: Tensors, norms: Norms, chunk_rows: int = CHUNK) -> tuple[Any, Tensors]:  # fmt: skip
    loss_head = ChunkedHead(head, objective.terms(ids, batch, norms), chunk_rows)
    return objective(loss_head.unpack(loss_head(hidden)), ids, batch, norms)


def assert_same_as_full_logits(objective: Objective, full: Callable[..., tuple[Any, Tensors]], ids: torch.Tensor,
                               batch: Tensors, norms: Norms, chunk_rows: int = CHUNK) -> None:  # fmt: skip
    """Loss, every statistic and both gradients equal (fp64: to reassociation, far below 1e-6)."""
    head, hidden = head_and_hidden()
    loss, stats = chunked(objective, head, hidden, ids, batch, norms, chunk_rows)
    new_grads = torch.autograd.grad(loss, (hidden, head.weight))
    full_loss, full_stats = full(head(hidden), ids, batch, norms)
    full_grads = torch.autograd.grad(full_loss, (hidden, head.weight))
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-10, abs=1e-12)
    assert stats.keys() == full_stats.keys()
    for key in stats:
        assert stats[key].item() == pytest.approx(full_stats[key].item(), rel=1e-10, abs=1e-12), key
    for new, old in zip(new_grads, full_grads, strict=True):
        assert torch.allclose(new, old, rtol=1e-10, atol=1e-12)


NORMS = Norms(tokens=12.0, seqs=3.0, norm_length=6.0)


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("chunk_rows", [1, CHUNK, 1000])
def test_nll_equals_the_full_logits_nll(chunk_rows: int) -> None:
    ids, batch = sft_batch(0)
    assert_same_as_full_logits(NLL(), full_nll, ids, batch, NORMS, chunk_rows)


RL_CASES = {
    "grpo": ({}, 1.0, False),
    "dapo_entropy_tempered_is_kl": (
        {"type": "dapo", "entropy_coef": 0.01, "kl_coef": 0.1, "importance_sampling": {"cap": 1.5}}, 0.7, True,
    ),
    "gspo_entropy_k2": ({"type": "gspo", "entropy_coef": 0.05, "kl_coef": 0.2, "kl_estimator": "k2"}, 1.3, True),
    "sapo_masked_is": ({"type": "sapo", "importance_sampling": {"mode": "mask", "level": "sequence"}}, 0.8, True),
    "dr_grpo_k1": ({"type": "dr_grpo", "kl_coef": 0.05, "kl_estimator": "k1"}, 1.0, False),
}  # fmt: skip


@pytest.mark.parametrize("case", RL_CASES)
def test_rl_objective_equals_the_full_logits_objective(case: str) -> None:
    """Entropy in the loss and only in the statistics, temperatures other than 1, old logprobs or none."""
    changes, temperature, old = RL_CASES[case]
    algo = AlgorithmConfig.model_validate(changes)
    ids, batch = rl_batch(1, old)
    norms = Norms(tokens=12.0, seqs=3.0, norm_length=6.0, temperature=temperature)
    assert_same_as_full_logits(RLObjective(algo), full_rl(algo), ids, batch, norms)


DISTILL_CASES = {
    "topk_forward_kl": {"type": "forward_kl"},
    "topk_reverse_kl": {"type": "reverse_kl"},
    "topk_jsd_with_nll": {"type": "jsd", "beta": 0.3, "nll_weight": 0.5},
    "sampled_reverse_kl": {"type": "reverse_kl", "estimator": "sampled"},
    "sampled_reverse_kl_with_nll": {"type": "reverse_kl", "estimator": "sampled", "nll_weight": 0.2},
}


@pytest.mark.parametrize("case", DISTILL_CASES)
def test_distill_objective_equals_the_full_logits_objective(case: str) -> None:
    cfg = LossConfig.model_validate({"top_k": K, **DISTILL_CASES[case]})
    ids, batch = distill_batch(2, sampled=cfg.estimator == "sampled")
    assert_same_as_full_logits(DistillObjective(cfg), full_distill(cfg), ids, batch, NORMS)


class LargestAllocation(TorchDispatchMode):
    """The most elements of any new storage an operator returns inside the block, autograd's backward
    included (views and in-place results share their input's storage and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_no_tensor_holds_every_positions_logits() -> None:
    """Forward and backward of the RL objective with the entropy in the loss: nothing larger than a
    chunk's logits or the weight's gradient, while the loss positions' logits would be 12 × V."""
    algo = AlgorithmConfig(entropy_coef=0.01)
    ids, batch = rl_batch(3, old=False)
    head, hidden = head_and_hidden()
    with LargestAllocation() as largest:
        loss, _ = chunked(RLObjective(algo), head, hidden, ids, batch, NORMS)
        loss.backward()
    assert largest.numel <= max(CHUNK, H) * V < int(batch["response_mask"].sum()) * V


def test_statistics_have_no_graph_and_no_positions_give_zeros() -> None:
    ids, batch = rl_batch(4, old=False)
    head, hidden = head_and_hidden()
    loss_head = ChunkedHead(head, RLObjective(AlgorithmConfig()).terms(ids, batch, NORMS), CHUNK)
    values = loss_head.unpack(loss_head(hidden))
    assert values["logp"].requires_grad and not values["entropy"].requires_grad
    assert (values["entropy"][batch["response_mask"] == 0] == 0).all() and (
        values["entropy"][0, 3:] > 0
    ).all()
    nothing = TokenTerms(
        torch.zeros(B, T - 1, dtype=torch.bool), {"targets": ids[:, 1:]}, NextTokenLogprobs()
    )
    empty_head = ChunkedHead(head, nothing, CHUNK)
    logp = empty_head.unpack(empty_head(hidden))["logp"]
    hidden_grad, weight_grad = torch.autograd.grad(logp.sum(), (hidden, head.weight))
    assert (logp == 0).all() and (hidden_grad == 0).all() and (weight_grad == 0).all()


def test_bf16_head_gets_a_bf16_gradient_within_bf16_rounding() -> None:
    """Each chunk's share of the weight's gradient is a bf16 GEMM (rounded once) summed in fp32: within a
    few bf16 roundings of the fp64 gradient, as the full-logits bf16 path's one GEMM is."""
    ids, batch = sft_batch(5)
    head, hidden = head_and_hidden(torch.bfloat16)
    loss, _ = chunked(NLL(), head, hidden, ids, batch, NORMS)
    (grad,) = torch.autograd.grad(loss, head.weight)
    (full_grad,) = torch.autograd.grad(full_nll(head(hidden), ids, batch, NORMS)[0], head.weight)
    exact_head = torch.nn.Linear(H, V, bias=False, dtype=D)
    exact_head.weight.data = head.weight.data.to(D)
    (exact,) = torch.autograd.grad(
        full_nll(exact_head(hidden.to(D)), ids, batch, NORMS)[0], exact_head.weight
    )
    assert grad.dtype == torch.bfloat16
    error, full_error = (grad.to(D) - exact).abs().max(), (full_grad.to(D) - exact).abs().max()
    assert error <= 4 * full_error and error <= 0.01 * exact.abs().max()


def test_non_linear_head_is_refused_naming_the_lora_key() -> None:
    ids, batch = sft_batch(6)
    with pytest.raises(TypeError, match="model.lora.target_modules"):
        ChunkedHead(torch.nn.Identity(), NLL().terms(ids, batch, NORMS), CHUNK)  # type: ignore[arg-type]


@pytest.mark.parametrize("lora", [False, True])
def test_hf_forward_with_the_head_replaced_equals_its_logits(lora: bool) -> None:
    """A tiny Qwen3 (tied embeddings), plain and LoRA-wrapped: NLL and every trainable parameter's
    gradient through `per_token` equal those of the model's own logits; the head's forward is restored."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(7)
    config = Qwen3Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)  # fmt: skip
    model: Any = Qwen3ForCausalLM(config).to(D)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    ids, batch = sft_batch(8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = [p for p in model.parameters() if p.requires_grad]
    request = NLL().terms(ids, batch, NORMS)
    loss, _ = NLL()(per_token(model, inputs, request, chunk_mib=CHUNK * V * 4 / 2**20), ids, batch, NORMS)
    grads = torch.autograd.grad(loss, params)
    full_loss, _ = full_nll(model(**inputs).logits, ids, batch, NORMS)
    full_grads = torch.autograd.grad(full_loss, params)
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-10)
    assert all(torch.allclose(g, f, rtol=1e-9, atol=1e-12) for g, f in zip(grads, full_grads, strict=True))
    assert "forward" not in model.get_output_embeddings().__dict__
