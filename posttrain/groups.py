"""Typed groups over Ray actors: the learner group (DeepSpeed ranks) and the frozen reference.

Drivers call verbs (`step`, `logprobs`, `generate`, `save`, `export`, `send_weights`); which actor
method runs, with which share of the batch, and how the ranks' answers are combined is decided here,
once. A batch is split over ranks by `shard_batches`: contiguous even shares (equal when the rank count
divides the items, as ZeRO-3's lockstep needs), each share cut into collated micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from posttrain.config import TrainingStage
from posttrain.learner import Batch, Learner, Reference, ResidentMemory
from posttrain.objectives import Norms, Objective, StepStats, reduce_ranks
from posttrain.weight_transfer import RayEngineClient
from posttrain.weights import SyncManifest
from posttrain.workers import COLOCATED_GPU_SHARE, SharedPlacement, WorkerGroup, resolve_device, split_evenly

if TYPE_CHECKING:
    from torch import Tensor

T = TypeVar("T")
Shards = list[list[Batch]]
"""Per rank, its micro-batches."""


def shard_batches(
    items: Sequence[T],
    ranks: int,
    micro_batch_size: int,
    collate: Callable[[list[T]], Batch],
    sort_key: Callable[[T], int] | None = None,
) -> Shards:
    """`items` in contiguous even shares per rank; each share (sorted by `sort_key` when given: less
    padding per micro-batch) cut into micro-batches of `micro_batch_size` and collated. Without
    `sort_key`, results gathered rank by rank come back in the items' order."""
    shards = []
    for share in split_evenly(list(items), ranks):
        if sort_key is not None:
            share = sorted(share, key=sort_key)
        shards.append(
            [collate(share[k : k + micro_batch_size]) for k in range(0, len(share), micro_batch_size)]
        )
    return shards


class LogprobSource(Protocol):
    """Anything that scores sequences: the learners, or the frozen reference."""

    def __len__(self) -> int: ...

    def logprobs(self, shards: Shards, base_model: bool, temperature: float) -> list[Tensor]: ...


def _gathered_logprobs(
    workers: WorkerGroup, shards: Shards, base_model: bool, temperature: float
) -> list[Tensor]:
    """[T-1] next-token logprob rows of every sequence, in shard order (rank by rank)."""
    per_rank = workers.call_each("logprobs", [(s, base_model, temperature) for s in shards])
    return [row for rank_out in per_rank for batch in rank_out for row in batch]


class LearnerGroup:
    """`learners.num_learners` Learner actors: one DeepSpeed data-parallel group."""

    def __init__(
        self,
        cfg: TrainingStage,
        model_path: str,
        is_vl: bool,
        total_steps: int,
        placement: SharedPlacement | None = None,
    ) -> None:
        """`placement`: rank i shares bundle i (and its GPU) with engine i (`rollout.colocate`)."""
        lc = cfg.learners
        self.workers = WorkerGroup(
            Learner,
            lc.num_learners,
            num_cpus=lc.cpus_per_learner,
            num_gpus=COLOCATED_GPU_SHARE if placement else lc.gpus_per_learner,
            device=resolve_device(cfg.device),
            name="learner",
            init_args=(cfg.stage, cfg.model_dump(mode="json"), model_path, is_vl, total_steps),
            placement=placement,
        )

    def __len__(self) -> int:
        return len(self.workers)

    def step(self, shards: Shards, norms: Norms, objective: Objective) -> StepStats:
        """One optimizer step of `objective` over every rank's micro-batches."""
        return reduce_ranks(self.workers.call_each("step", [(s, norms, objective) for s in shards]))

    def logprobs(self, shards: Shards, base_model: bool = False, temperature: float = 1.0) -> list[Tensor]:
        return _gathered_logprobs(self.workers, shards, base_model, temperature)

    def batch_logprobs(self, batch: Batch) -> Tensor:
        """[B, T-1] next-token logprobs of one batch (every rank runs it, as ZeRO-3 needs)."""
        return self.workers.call("logprobs", [batch])[0][0]

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """Next-token logprobs of one sequence."""
        import torch

        ids = torch.tensor([token_ids])
        row = self.batch_logprobs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
        return [float(x) for x in row]

    def generate(self, shards: list[list[Batch]], max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
        """Greedy completions of left-padded prompt batches, rank by rank (equal shares under ZeRO-3)."""
        per_rank = self.workers.call_each("generate", [(s, max_new_tokens, eos_token_id) for s in shards])
        return [ids for rank_out in per_rank for ids in rank_out]

    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        self.workers.call("save", directory, client_state)

    def load(self, directory: str) -> None:
        self.workers.call("load", directory)

    def export(self, directory: str, merge_lora: bool) -> None:
        self.workers.call("export", directory, merge_lora)

    def num_parameters(self) -> dict[str, int]:
        counts: dict[str, int] = self.workers.call("num_parameters")[0]
        return counts

    def send_weights(
        self, client: RayEngineClient, bucket_mb: float, slots: int | None, include_frozen: bool
    ) -> SyncManifest:
        """Send the weights to the engines behind `client` (rank 0 sends, every rank gathers); the
        manifest of what was sent."""
        args = (client, client.version, bucket_mb, slots, include_frozen)
        return next(o for o in self.workers.call("send_weights", *args) if o is not None)

    def offload_states(self) -> list[ResidentMemory]:
        """Every rank moves its optimizer states to host memory (colocation: the engine generates next)."""
        return self.workers.call("offload_states")

    def reload_states(self) -> list[ResidentMemory]:
        """Every rank moves them back (the learners train next)."""
        return self.workers.call("reload_states")

    def shutdown(self) -> None:
        self.workers.shutdown()


class ReferenceGroup:
    """The frozen reference policy of RL's KL term: `reference.num_workers` actors holding the starting
    model (no DeepSpeed, no optimizer)."""

    def __init__(
        self,
        cfg: TrainingStage,
        model_path: str,
        is_vl: bool,
        num_workers: int,
        cpus_per_worker: float,
        gpus_per_worker: float,
    ) -> None:
        self.workers = WorkerGroup(
            Reference,
            num_workers,
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            device=resolve_device(cfg.device),
            name="reference",
            init_args=(cfg.stage, cfg.model_dump(mode="json"), model_path, is_vl),
            config_key="reference",
        )

    def __len__(self) -> int:
        return len(self.workers)

    def logprobs(self, shards: Shards, base_model: bool = True, temperature: float = 1.0) -> list[Tensor]:
        return _gathered_logprobs(self.workers, shards, base_model, temperature)

    def shutdown(self) -> None:
        self.workers.shutdown()
