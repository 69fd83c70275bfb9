"""Distillation data between the teacher engines, the top-k store and the learners.

A training sequence is a `TopKRow` (distill.topk_store) whatever its source: token ids, a loss mask over
them and the teacher's top-k (or, for the sampled reverse KL, each token's teacher logprob) in the store's
token layout: entry j describes token j given tokens[:j], entry 0 predicts nothing. `collate` shifts it to
the learner layout (position t describes token t + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from posttrain.config import DataConfig
from posttrain.data.errors import DataError
from posttrain.data.sft_dataset import build_sft_dataset
from posttrain.distill.topk_store import TopKRow
from posttrain.rollout.engine import RolloutGroup


@dataclass
class Sequence:
    """A sequence to score: its token ids and target mask, where it came from (store `extra`)."""

    token_ids: list[int]
    loss_mask: np.ndarray  # bool [L], loss_mask[0] = 0
    extra: dict[str, Any]


def encode_sequences(data_cfg: Any, processing: Any, is_vl: bool) -> list[Sequence]:
    """Every training row as an SFT sample (prompt + response, targets on the assistant tokens), validated
    and encoded as `posttrain sft` does (no packing), in dataset order. Text only: the teacher scores token
    ids, so rows with images stop the run naming the row."""
    sft_cfg = DataConfig(
        train=data_cfg.train,
        max_length=data_cfg.max_length,
        overlong=data_cfg.overlong,
        bad_rows=data_cfg.bad_rows,
        packing=False,
    )
    data = build_sft_dataset(sft_cfg, processing, is_vl)
    out = []
    for i, item in enumerate(data.items):
        if item.images:
            raise DataError(f"training sequence {i} has images: distillation data must be text-only")
        ids = item.input_ids.tolist()
        out.append(Sequence(ids, item.labels != -100, {"sequence": i}))
    return out


def score_sequences(teacher: RolloutGroup, seqs: list[Sequence], k: int, batch_size: int) -> list[TopKRow]:
    """The teacher's top-k for each sequence, as store rows (indices 0..n-1 in the given order). With
    k = 0 each row's single entry is the token itself with the teacher's logprob of it (what the sampled
    reverse KL needs)."""
    rows: list[TopKRow] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        for s, (ids, logp, own) in zip(
            chunk, teacher.score_prompts([s.token_ids for s in chunk], k), strict=True
        ):
            tokens = np.asarray(s.token_ids, dtype=np.int32)
            if k == 0:
                ids, logp = tokens[:, None].copy(), own[:, None].copy()
                logp[0] = -np.inf
            rows.append(TopKRow(len(rows), tokens, s.loss_mask, ids, logp, s.extra))
    return rows


def capture(teacher: RolloutGroup, seqs: list[Sequence], writer: Any, k: int, batch_size: int) -> int:
    """Score every sequence with the teacher and append it to a TopKWriter; returns the tokens written."""
    tokens = 0
    for start in range(0, len(seqs), batch_size):
        for row in score_sequences(teacher, seqs[start : start + batch_size], k, batch_size):
            writer.add(row.token_ids, row.topk_ids, row.topk_logp, loss_mask=row.loss_mask, extra=row.extra)
            tokens += len(row.token_ids)
    return tokens


# ---------------------------------------------------------------------------------------- learner side


def collate(rows: list[TopKRow], pad_id: int, k: int, vl: bool = False) -> dict[str, torch.Tensor]:
    """A right-padded learner micro-batch: input_ids, attention_mask, loss_mask [B, T-1] and the teacher's
    top-k topk_ids / topk_logp [B, T-1, k] (the first k of each row's entries, which are sorted; padding:
    logprob -inf). `vl` adds the zero `mm_token_type_ids` a Qwen3-VL student takes with text-only rows."""
    b, width = len(rows), max(len(r.token_ids) for r in rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    loss_mask = torch.zeros((b, width - 1))
    ids = torch.zeros((b, width - 1, k), dtype=torch.long)
    logp = torch.full((b, width - 1, k), -torch.inf)
    for i, r in enumerate(rows):
        n = len(r.token_ids)
        input_ids[i, :n] = torch.from_numpy(r.token_ids.astype(np.int64))
        attention_mask[i, :n] = 1
        loss_mask[i, : n - 1] = torch.from_numpy(r.loss_mask[1:].astype(np.float32))
        ids[i, : n - 1] = torch.from_numpy(r.topk_ids[1:, :k].astype(np.int64))
        logp[i, : n - 1] = torch.from_numpy(r.topk_logp[1:, :k])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    batch |= {"topk_ids": ids, "topk_logp": logp}
    if vl:
        batch["mm_token_type_ids"] = torch.zeros((b, width), dtype=torch.long)
    return batch
