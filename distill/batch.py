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

from posttrain.distill.topk_store import TopKRow
from posttrain.rollout.engine import RolloutRequest, RolloutResult


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
    from posttrain.config import DataConfig
    from posttrain.data.errors import DataError
    from posttrain.data.sft_dataset import build_sft_dataset

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


def scoring_requests(
    token_ids: list[list[int]], k: int, images: list[Any] | None = None
) -> list[RolloutRequest]:
    """One prefill per sequence: the teacher's top-k (k = 0: only each token's own logprob) over every
    token given its prefix (vLLM `prompt_logprobs`); the one generated token is thrown away."""
    return [
        RolloutRequest(
            list(ids),
            max_tokens=1,
            temperature=0.0,
            logprobs=None,
            prompt_logprobs=k,
            images=(images[i] if images else None),
        )
        for i, ids in enumerate(token_ids)
    ]


def topk_arrays(result: RolloutResult, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, k] ids and logprobs, sorted by decreasing logprob, from one scoring result. vLLM reports the
    top k plus the scored token itself, so a position can have k + 1 entries: the k largest are kept.
    Entry 0 (no prefix) is absent: logprob -inf."""
    rows = result.prompt_top_logprobs
    if rows is None:
        raise RuntimeError("the teacher engine returned no prompt top-k logprobs")
    ids = np.zeros((len(rows), k), dtype=np.int32)
    logp = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for j, entries in enumerate(rows):
        if not entries:
            continue
        best = sorted(entries.items(), key=lambda e: (-e[1], e[0]))[:k]
        ids[j, : len(best)] = [t for t, _ in best]
        logp[j, : len(best)] = [v for _, v in best]
    return ids, logp


def token_logprobs(result: RolloutResult) -> np.ndarray:
    """[L] the teacher's logprob of each token given its prefix (entry 0: 0, it is never a target)."""
    values = result.prompt_logprobs or []
    return np.asarray([0.0 if v is None else v for v in values], dtype=np.float32)


def score_sequences(teacher: Any, seqs: list[Sequence], k: int, batch_size: int) -> list[TopKRow]:
    """The teacher's top-k for each sequence, as store rows (indices 0..n-1 in the given order). With
    k = 0 each row's single entry is the token itself with the teacher's logprob of it (what the sampled
    reverse KL needs)."""
    rows: list[TopKRow] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        for s, (ids, logp, own) in zip(
            chunk, score_tokens(teacher, [s.token_ids for s in chunk], k), strict=True
        ):
            tokens = np.asarray(s.token_ids, dtype=np.int32)
            if k == 0:
                ids, logp = tokens[:, None].copy(), own[:, None].copy()
                logp[0] = -np.inf
            rows.append(TopKRow(len(rows), tokens, s.loss_mask, ids, logp, s.extra))
    return rows


def score_tokens(
    teacher: Any, token_ids: list[list[int]], k: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sequence: the teacher's top-k ids [L, k] and logprobs [L, k] (sorted, entry 0 absent) and its
    logprob of each token itself [L] (entry 0: 0). Requests are split over the engines of the
    RolloutGroup `teacher` and run inside them (`_score_in_engine`)."""
    import ray

    from posttrain.rollout import split_evenly

    actors = teacher.workers.actors
    chunks = split_evenly(token_ids, len(actors), [len(ids) for ids in token_ids])
    refs = [a.__ray_call__.remote(_score_in_engine, c, k) for a, c in zip(actors, chunks, strict=True) if c]
    return [r for part in ray.get(refs) for r in part]


def _score_in_engine(
    engine: Any, token_ids: list[list[int]], k: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Runs in a RolloutEngine actor: one prefill per sequence with vLLM prompt logprobs, returned as
    arrays. The same numbers as `RolloutEngine.generate(scoring_requests(...))` (see `topk_arrays`) at
    about twice the speed on CPU: no detokenisation of the top-k tokens and vLLM's flat logprobs instead
    of a dict per position."""
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, flat_logprobs=True
    )
    outs = engine.llm.generate([{"prompt_token_ids": list(ids)} for ids in token_ids], params, use_tqdm=False)
    return [_flat_arrays(ids, out.prompt_logprobs, k) for ids, out in zip(token_ids, outs, strict=True)]


def _flat_arrays(ids: list[int], flat: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's FlatLogprobs of one prompt: position j > 0 holds k + 1 entries, the token itself first,
    then the top k by rank."""
    n = len(ids)
    top_ids = np.zeros((n, k), dtype=np.int32)
    top_logp = np.full((n, k), -np.inf, dtype=np.float32)
    own = np.zeros(n, dtype=np.float32)
    if n < 2:
        return top_ids, top_logp, own
    first = flat.start_indices[1]
    tokens = np.asarray(flat.token_ids[first:], dtype=np.int64)
    values = np.asarray(flat.logprobs[first:], dtype=np.float32)
    if tokens.size != (n - 1) * (k + 1) or (tokens.reshape(n - 1, k + 1)[:, 0] != np.asarray(ids[1:])).any():
        raise RuntimeError("unexpected vLLM prompt logprobs layout (expected the token, then its top k)")
    tokens, values = tokens.reshape(n - 1, k + 1), values.reshape(n - 1, k + 1)
    own[1:] = values[:, 0]
    top_ids[1:], top_logp[1:] = tokens[:, 1:], values[:, 1:]
    return top_ids, top_logp, own


def capture(teacher: Any, seqs: list[Sequence], writer: Any, k: int, batch_size: int) -> int:
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


def sorted_topk(row: TopKRow) -> TopKRow:
    """The row with each position's entries in decreasing logprob order (what `collate`'s slicing to a
    smaller k needs); stores written by this package are sorted already."""
    order = np.argsort(-row.topk_logp, axis=-1, kind="stable")
    return TopKRow(
        row.index,
        row.token_ids,
        row.loss_mask,
        np.take_along_axis(row.topk_ids, order, -1),
        np.take_along_axis(row.topk_logp, order, -1),
        row.extra,
    )
