"""The SFT training set: every row of every training split validated, encoded and (text models) packed;
deterministic batches; right-padded micro-batches.

Packed text rows carry `position_ids` that restart at 0 per sample and no `attention_mask`: transformers
(5.19, sdpa/eager) then derives a block-diagonal causal mask from the position ids, but only when the
forward also gets `use_cache=False` (an empty DynamicCache disables the detection). flash_attention_2
detects packing only for batch size 1, hence `collate(..., flatten=True)`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from posttrain.config import DataConfig, DatasetSpec
from posttrain.data.chat import IGNORE_INDEX, Item, encode_all
from posttrain.data.errors import DataError
from posttrain.data.order import epoch_order
from posttrain.data.processing import pad_id, tokenizer_of
from posttrain.data.rows import MAX_REASONS, load_samples

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("posttrain.data")
ToolsOf = Callable[[DatasetSpec], list[dict[str, Any]] | None]
"""A dataset → the tool schemas its rows declare (the stage's tool loader: data loads no plugins)."""


@dataclass
class DataStats:
    rows: int = 0
    skipped: int = 0
    dropped: int = 0
    truncated: int = 0
    samples: int = 0
    items: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    modes: dict[str, int] = field(default_factory=lambda: {"thinking": 0, "non_thinking": 0})
    skip_reasons: list[str] = field(default_factory=list)


def concat(items: list[Item]) -> Item:
    """Text items side by side in one row (their positions restart, so they do not attend to each other)."""
    import numpy as np

    return Item(
        np.concatenate([it.input_ids for it in items]),
        np.concatenate([it.labels for it in items]),
        [n for it in items for n in it.seq_lens],
        [m for it in items for m in it.modes],
    )


def pack(items: list[Item], max_length: int) -> list[Item]:
    """Best-fit-decreasing into rows of at most `max_length` tokens; deterministic (ties by index)."""
    import bisect

    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted so bisect finds the tightest fit
    for i in order:
        n = len(items[i].input_ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (space - n, row))
    return [concat([items[i] for i in row]) for row in rows]


def positions(seq_lens: list[int], width: int) -> np.ndarray:
    """0..n-1 per sample, then 0..k-1 over the padding so it is a segment of its own."""
    import numpy as np

    return np.concatenate([np.arange(n) for n in [*seq_lens, width - sum(seq_lens)]])


def collate(
    items: list[Item], pad_id: int, image_processor: Any = None, flatten: bool = False
) -> dict[str, torch.Tensor]:
    """A right-padded micro-batch. Text: input_ids, labels, position_ids (no attention_mask: see module
    doc). VL: input_ids, labels, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw.
    `flatten` puts a text micro-batch in one unpadded row (what flash_attention_2 needs to see packing)."""
    import numpy as np
    import torch

    if flatten:
        if image_processor is not None:
            raise ValueError("flatten is for text batches; VL rows rely on their attention_mask")
        items = [concat(items)]
    width = max(len(it.input_ids) for it in items)
    input_ids = np.full((len(items), width), pad_id, dtype=np.int64)
    labels = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
    for b, it in enumerate(items):
        input_ids[b, : len(it.input_ids)] = it.input_ids
        labels[b, : len(it.labels)] = it.labels
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    if image_processor is None:
        batch["position_ids"] = torch.from_numpy(np.stack([positions(it.seq_lens, width) for it in items]))
        return batch
    return batch | _vision_inputs(items, width, image_processor)


def _vision_inputs(items: list[Item], width: int, image_processor: Any) -> dict[str, torch.Tensor]:
    import numpy as np
    import torch

    lengths = np.array([len(it.input_ids) for it in items])
    mm_token_type_ids = np.zeros((len(items), width), dtype=np.int64)
    for b, it in enumerate(items):
        assert it.mm_token_type_ids is not None, "VL items come from encode_sample(is_vl=True)"
        mm_token_type_ids[b, : lengths[b]] = it.mm_token_type_ids
    out = {
        "attention_mask": torch.from_numpy((np.arange(width)[None] < lengths[:, None]).astype(np.int64)),
        "mm_token_type_ids": torch.from_numpy(mm_token_type_ids),
    }
    images = [image for it in items for image in it.images]
    if images:  # pixels are made here, not stored: a few KB per image instead of a float tensor
        pixels = image_processor(images=images, return_tensors="pt")
        if pixels["image_grid_thw"].tolist() != [g for it in items for g in it.image_grid_thw]:
            raise RuntimeError("image grids differ from those used to expand the image tokens")
        out |= {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
    return out


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens that carry loss after the causal shift (the learner normalises by their global sum)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class SFTData:
    """Encoded (and packed) training rows, their stats, and deterministic batching."""

    items: list[Item]
    stats: DataStats
    pad_id: int
    image_processor: Any = None  # set for VL: pixels are computed at collate time

    def __len__(self) -> int:
        return len(self.items)

    def num_steps(self, global_batch_size: int, epochs: float = 1.0) -> int:
        """Optimizer steps for `epochs` passes (the last step may reach into the next epoch)."""
        return max(1, math.ceil(len(self.items) * epochs / global_batch_size))

    def batches(self, step: int, global_batch_size: int, seed: int) -> list[int]:
        """Item indices of optimizer step `step`: positions [step·G, (step+1)·G) of the epoch orders laid end
        to end. A pure function of (seed, step), so resuming at a step needs no data state."""
        n = len(self.items)
        start = step * global_batch_size
        return [
            int(epoch_order(n, seed, pos // n)[pos % n]) for pos in range(start, start + global_batch_size)
        ]

    def collate(self, indices: list[int], flatten: bool = False) -> dict[str, torch.Tensor]:
        return collate([self.items[i] for i in indices], self.pad_id, self.image_processor, flatten)

    def loss_tokens(self, indices: list[int]) -> int:
        """Loss tokens of these items, equal to count_loss_tokens of their collated batch."""
        return sum(self.items[i].loss_tokens for i in indices)

    def padding_fraction(self, micro_batch_size: int, seed: int = 0) -> float:
        """Share of padding in collated micro-batches over epoch 0 (an estimate of later epochs)."""
        lengths = [len(self.items[i].input_ids) for i in epoch_order(len(self.items), seed, 0)]
        chunks = [lengths[i : i + micro_batch_size] for i in range(0, len(lengths), micro_batch_size)]
        return 1 - sum(lengths) / sum(max(c) * len(c) for c in chunks)


def build_sft_dataset(
    data_cfg: DataConfig, processing: Any, is_vl: bool, tools_of: ToolsOf = lambda spec: None
) -> SFTData:
    """Validate every row of every training set (rows without a `tools` column declaring the schemas
    `tools_of` gives their dataset), then encode, then pack text samples."""
    stats, samples = DataStats(), []
    for spec in data_cfg.train:
        found, rows, reasons = load_samples(spec, data_cfg.bad_rows, tools=tools_of(spec))
        samples += found
        stats.rows, stats.skipped = stats.rows + rows, stats.skipped + len(reasons)
        stats.skip_reasons += reasons[: MAX_REASONS - len(stats.skip_reasons)]
    items = []
    for item, status in encode_all(samples, processing, is_vl, data_cfg):
        stats.dropped += status == "dropped"
        stats.truncated += status == "truncated"
        items += [item] if item is not None else []
    if stats.dropped or stats.truncated:
        log.warning(
            "%d samples dropped, %d truncated (data.max_length=%d)",
            stats.dropped,
            stats.truncated,
            data_cfg.max_length,
        )
    if not items:
        raise DataError(f"no training samples left: all {stats.dropped} were longer than data.max_length")
    stats.samples, stats.tokens = len(items), sum(len(it.input_ids) for it in items)
    stats.loss_tokens = sum(it.loss_tokens for it in items)
    stats.modes |= Counter(m for it in items for m in it.modes)
    if data_cfg.packing and is_vl:
        log.info("data.packing applies to text models; VL samples are padded per micro-batch")
    elif data_cfg.packing:
        items = pack(items, data_cfg.max_length)
    stats.items = len(items)
    return SFTData(
        items, stats, pad_id(tokenizer_of(processing)), processing.image_processor if is_vl else None
    )
