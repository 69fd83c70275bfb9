"""Distillation's pure parts: the objective, batches, the top-k store stream, config rules and the
tokenizer check (`posttrain distill` end to end: tests/integration/test_distill.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from posttrain.config import ConfigError, validate
from posttrain.distill.batch import collate
from posttrain.distill.config import LossConfig
from posttrain.distill.losses import divergence, reverse_kl_sampled
from posttrain.distill.objective import DistillObjective
from posttrain.distill.topk_store import TopKRow, TopKStore, TopKWriter
from posttrain.objectives import Norms
from posttrain.rollout.engine import flat_prompt_logprobs

from helpers import objective_on_logits

V, K = 11, 3


def _row(i: int, n: int, rng: np.random.Generator, prompt: int = 2) -> TopKRow:
    tokens = rng.integers(0, V, n).astype(np.int32)
    ids = np.stack([rng.permutation(V)[:K] for _ in range(n)]).astype(np.int32)
    logp = np.sort(np.log(rng.dirichlet(np.ones(V))[:K]).astype(np.float32))[::-1].copy()
    logp = np.tile(logp, (n, 1))
    logp[0] = -np.inf
    mask = np.arange(n) >= prompt
    return TopKRow(i, tokens, mask, ids, logp, {"i": i})


LOSS = LossConfig(type="jsd", beta=0.3, top_k=K, estimator="topk", nll_weight=0.0)


def test_collate_shifts_the_store_layout_to_the_learner_layout() -> None:
    rng = np.random.default_rng(0)
    rows = [_row(0, 5, rng), _row(1, 7, rng)]
    b = collate(rows, pad_id=0, k=K)
    assert b["input_ids"].shape == (2, 7) and b["topk_ids"].shape == (2, 6, K)
    for i, r in enumerate(rows):
        n = len(r.token_ids)
        assert b["loss_mask"][i, : n - 1].tolist() == r.loss_mask[1:].astype(float).tolist()
        assert (b["topk_ids"][i, : n - 1].numpy() == r.topk_ids[1:]).all()
        assert (b["topk_logp"][i, : n - 1].numpy() == r.topk_logp[1:]).all()
        assert b["attention_mask"][i].sum() == n and b["loss_mask"][i, n - 1 :].sum() == 0
    assert torch.isneginf(b["topk_logp"][0, 4:]).all()  # padding: absent entries
    assert collate(rows, 0, 2)["topk_logp"].shape[-1] == 2  # a smaller k takes the best entries


def test_objective_is_the_global_token_mean_however_the_batch_is_split() -> None:
    rng = np.random.default_rng(1)
    rows = [_row(i, int(rng.integers(4, 9)), rng) for i in range(4)]
    tokens = float(sum(r.loss_mask[1:].sum() for r in rows))
    logits = {i: torch.randn(1, len(r.token_ids), V, dtype=torch.float64) for i, r in enumerate(rows)}

    def total(parts: list[list[int]]) -> torch.Tensor:
        out = torch.zeros((), dtype=torch.float64)
        for part in parts:
            b = collate([rows[i] for i in part], 0, K)
            width = b["input_ids"].shape[1]
            lg = torch.cat(
                [torch.nn.functional.pad(logits[i], (0, 0, 0, width - logits[i].shape[1])) for i in part]
            )
            out = out + objective_on_logits(DistillObjective(LOSS), lg, b["input_ids"], b, Norms(tokens))[0]
        return out

    whole, split = total([[0, 1, 2, 3]]), total([[0], [1, 2], [3]])
    assert torch.allclose(whole, split, atol=1e-12, rtol=0)
    # and it is the mean of the divergence over the target tokens, computed one sequence at a time
    per_seq = []
    for i, r in enumerate(rows):
        teacher = (
            torch.from_numpy(r.topk_ids[1:].astype(np.int64))[None],
            torch.from_numpy(r.topk_logp[1:])[None],
        )
        d = divergence("jsd", logits[i][:, :-1], teacher, beta=0.3)[0]
        per_seq.append(d[torch.from_numpy(r.loss_mask[1:])].sum())
    assert torch.allclose(whole, torch.stack(per_seq).sum() / tokens, atol=1e-12, rtol=0)


def test_sampled_estimator_and_nll_term() -> None:
    rng = np.random.default_rng(2)
    row = _row(0, 6, rng)
    teacher_lp = np.log(rng.uniform(0.1, 0.9, 6)).astype(np.float32)
    sampled = TopKRow(
        0, row.token_ids, row.loss_mask, row.token_ids[:, None].copy(), teacher_lp[:, None].copy(), {}
    )
    sampled.topk_logp[0] = -np.inf
    b = collate([sampled], 0, 1)
    logits = torch.randn(1, 6, V, requires_grad=True)
    cfg = LOSS.model_copy(update={"type": "reverse_kl", "estimator": "sampled"})
    loss, stats = objective_on_logits(DistillObjective(cfg), logits, b["input_ids"], b, Norms(4.0))
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    expected = (reverse_kl_sampled(logp, torch.from_numpy(teacher_lp[1:])[None]) * b["loss_mask"]).sum() / 4
    assert torch.allclose(loss, expected) and torch.isfinite(loss)
    nll_objective = DistillObjective(cfg.model_copy(update={"nll_weight": 0.5}))
    with_nll, _ = objective_on_logits(nll_objective, logits, b["input_ids"], b, Norms(4.0))
    assert torch.allclose(with_nll - loss, 0.5 * stats["nll_sum"] / 4)


def test_flat_vllm_logprobs_become_sorted_topk_arrays() -> None:
    ids = [5, 1, 2]
    flat = SimpleNamespace(
        start_indices=[0, 0, 3],
        token_ids=[1, 1, 4, 2, 7, 2],  # per position: the token itself, then the top 2
        logprobs=[-0.25, -0.25, -2.5, -1.5, -0.5, -1.5],
    )
    top_ids, top_logp, own = flat_prompt_logprobs(ids, flat, 2)
    assert top_ids.tolist() == [[0, 0], [1, 4], [7, 2]]
    assert np.isneginf(top_logp[0]).all() and top_logp[1:].tolist() == [[-0.25, -2.5], [-0.5, -1.5]]
    assert own.tolist() == [0.0, -0.25, -1.5]
    with pytest.raises(RuntimeError, match="layout"):
        flat_prompt_logprobs([5, 3, 2], flat, 2)


def test_store_stream_resumes_mid_shard_and_wraps_epochs(tmp_path: Path) -> None:
    from posttrain.distill.top_k import StoreStream

    rng = np.random.default_rng(3)
    teacher = {"tokenizer": {"vocab_size": V, "vocab_sha256": "x"}}
    with TopKWriter(tmp_path / "s", k=K, teacher=teacher, shard_rows=3) as w:
        for i in range(7):
            r = _row(i, 4, rng)
            w.add(r.token_ids, r.topk_ids, r.topk_logp, loss_mask=r.loss_mask, extra=r.extra)
    stream = StoreStream(TopKStore(tmp_path / "s"))
    whole = [r.index for r in stream.take(4)] + [r.index for r in stream.take(6)]
    assert whole == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2] and stream.position == 10
    again = StoreStream(TopKStore(tmp_path / "s"))
    again.seek(4)  # row 4 sits in the middle of shard 1 (rows 3-5)
    rows = again.take(6)
    assert [r.index for r in rows] == whole[4:]
    assert all(
        (a.topk_logp == b.topk_logp).all()
        for a, b in zip(rows, [TopKStore(tmp_path / "s").row(i) for i in whole[4:]], strict=True)
    )


MINIMAL: dict[str, Any] = {
    "output_dir": "o",
    "model": {"path": "m"},
    "teacher": {"path": "t"},
    "data": {"train": [{"path": "d"}]},
}


def test_config_rules_name_the_keys() -> None:
    cfg = validate("distill", MINIMAL)
    assert cfg.mode == "offline" and cfg.loss.type == "forward_kl" and str(cfg.store_dir) == "o/topk"
    with pytest.raises(ConfigError, match="loss.estimator=sampled needs mode=on_policy"):
        validate("distill", {**MINIMAL, "loss": {"type": "reverse_kl", "estimator": "sampled"}})
    with pytest.raises(ConfigError, match="mode=on_policy needs train.max_steps"):
        validate("distill", {**MINIMAL, "mode": "on_policy"})
    with pytest.raises(ConfigError, match=r"loss.top_k: Input should be less than or equal to 20"):
        validate("distill", {**MINIMAL, "loss": {"top_k": 32}})
    with pytest.raises(ConfigError, match=r"teacher.pth: unknown key; did you mean 'teacher.path'"):
        validate("distill", {**MINIMAL, "teacher": {"path": "t", "pth": 1}})
    with pytest.raises(ConfigError, match="teacher.path .* must end in /final"):
        validate("distill", {**MINIMAL, "teacher": {"path": "t", "init_from_sft": {"config": "c.yaml"}}})


def test_tokenizer_mismatch_names_both_models() -> None:
    from posttrain.distill.teacher import Student, check_tokenizers
    from posttrain.distill.topk_store import tokenizer_identity
    from posttrain.synthetic.models import build_tokenizer

    same, other = build_tokenizer(0), build_tokenizer(1)
    check_tokenizers(
        tokenizer_identity(same), "teacher-dir", Student("student-dir", build_tokenizer(0), False)
    )
    with pytest.raises(
        ConfigError, match="teacher teacher-dir and student student-dir have different tokenizers"
    ):
        check_tokenizers(tokenizer_identity(other), "teacher-dir", Student("student-dir", same, False))
