"""The learner's GPU-path choices, checked on CPU: the flash-attention fallback and SFT micro-batches that
keep packed samples apart under flash-attention."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from posttrain.objectives import StepStats

from helpers import sft_config


def test_flash_attention_without_flash_attn_falls_back_to_sdpa_with_one_log_line(
    tmp_path: Path, tiny_text_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from posttrain.learner import attention_kernel, load_model

    cfg = sft_config(tmp_path, tiny_text_model, attn_implementation="flash_attention_2")
    with caplog.at_level(logging.WARNING, logger="posttrain.learner"):
        model = load_model(cfg, str(tiny_text_model), False, "cpu")
    assert model.config._attn_implementation == "sdpa"
    (record,) = caplog.records
    assert "model.attn_implementation=flash_attention_2" in record.getMessage()
    assert attention_kernel("flash_attention_2", "cuda") == "sdpa"  # flash-attn is not installed here
    assert attention_kernel("eager", "cpu") == "eager"


class RecordingLearners:
    """Stands in for the learner group: keeps the micro-batches `train_step` would ship."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.shards: list[list[dict[str, Any]]] = []

    def __len__(self) -> int:
        return self.n

    def step(self, shards: list[list[dict[str, Any]]], norms: Any, objective: Any) -> StepStats:
        self.shards = shards
        return StepStats({"nll_sum": 0.0, "input_tokens": 1.0})


@pytest.mark.parametrize("attn", ["flash_attention_2", "sdpa"])
def test_sft_micro_batches_keep_packed_samples_apart(
    tmp_path: Path, tiny_text_model: Path, attn: str
) -> None:
    """flash-attention separates packed samples only in a one-row batch (transformers infers the boundaries
    from position ids at batch size 1): under it each micro-batch is one row whose positions restart per
    sample, which is where transformers' own boundary detection puts the cuts."""
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    from posttrain.data.processing import load_processing
    from posttrain.data.sft_dataset import build_sft_dataset
    from posttrain.sft.driver import train_step

    cfg = sft_config(tmp_path, tiny_text_model, attn_implementation=attn)
    data = build_sft_dataset(cfg.data, load_processing(tiny_text_model)[0], False)
    learners = RecordingLearners(2)
    train_step(learners, data, 0, cfg)  # type: ignore[arg-type]
    indices = data.batches(0, 8, cfg.train.seed)
    micro_batches = [batch for shard in learners.shards for batch in shard]
    assert len(micro_batches) == 2
    for j, batch in enumerate(micro_batches):
        items = [data.items[i] for i in indices[4 * j : 4 * j + 4]]
        assert "attention_mask" not in batch
        if attn == "sdpa":  # sdpa builds its block-diagonal mask from any batch's position ids
            assert batch["input_ids"].shape[0] == 4
            continue
        lengths = [n for it in items for n in it.seq_lens]
        assert len(lengths) > 4  # rows are packed, so samples would meet in one row
        assert batch["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
        assert _is_packed_sequence(batch["position_ids"], batch_size=1)
        (cu_seq_lens, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
        assert cu_seq_lens.tolist() == [sum(lengths[:k]) for k in range(len(lengths) + 1)]
