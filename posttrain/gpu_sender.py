"""The ipc / nccl sender: vLLM 0.32's trainer-side weight-transfer engines (`WeightTransferTrainerFactory`)
fed with a learner's `ModuleBuckets`, each tensor digested on the GPU as it goes. Imported only in learner
processes (it imports torch and vLLM); the interface it implements and the control plane:
posttrain.weight_transfer; the receiving engines: posttrain/rollout/gpu_transfer.py.

- ipc (learner rank i and engine i share GPU i): packed into one reusable IPC buffer holding a bucket (or
  the largest tensor); every rank exports its own buffer, rank 0 sends the handles merged, and each engine
  opens the one on its GPU.
- nccl (engines on other GPUs or nodes): one NCCL group of rank 0 and every engine worker, set up at the
  first send and kept; packed broadcasts of about one bucket.

Either way ZeRO-3 parameters are gathered bucket by bucket on every rank (the gathers are collective),
the frozen ones are left out as `ModuleBuckets` says, and rank 0 digests what it sends for the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from vllm.distributed.weight_transfer import (
    ParamMeta,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferTrainerFactory,
)
from vllm.distributed.weight_transfer.base import TrainerInitInfo
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

from posttrain.weight_transfer import Clock, EngineClient, TransferBackend
from posttrain.weights import ModuleBuckets, SyncManifest, device_digest_parts, device_digests, nbytes
from posttrain.workers import rendezvous_address


class DigestingSource(WeightSource):
    """`weights` as vLLM's `WeightSource`: its tensors one by one, bucket by bucket (gathered under ZeRO-3
    while the bucket is iterated), each queued for its digest with `digest` (the sending rank)."""

    def __init__(self, weights: ModuleBuckets, digest: bool) -> None:
        self.weights, self.digest = weights, digest
        self.parts: list[torch.Tensor] = []
        self.sent: list[tuple[str, int]] = []

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, dtype, shape) for name, dtype, shape in self.weights.metadata()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.parts, self.sent = [], []
        for bucket in self.weights:
            for name, t in bucket:
                if self.digest:
                    self.parts.append(device_digest_parts(t))
                    self.sent.append((name, nbytes(t)))
                yield name, t

    def manifest(self) -> SyncManifest:
        """What the last pass sent (one host sync for every digest)."""
        manifest = SyncManifest()
        digests = device_digests(self.parts, [size for _, size in self.sent])
        for (name, size), digest in zip(self.sent, digests, strict=True):
            manifest.add(name, digest, size)
        return manifest


def trainer_init_info(
    backend: TransferBackend, rank: int, weights: ModuleBuckets, receivers: int
) -> TrainerInitInfo:
    """vLLM's trainer init info: packed transfers in buffers of about one bucket. IPC's single buffer
    must hold the largest tensor too. NCCL double-buffers live parameters, but gathered (ZeRO-3) ones go
    through one buffer: vLLM packs each buffer on its own stream, and a gathered tensor freed after being
    packed on another stream than it was allocated on could be reused before that copy ran."""
    bucket = int(weights.bucket_mb * 2**20)
    if backend == "ipc":
        largest = max((size for sizes in weights.sizes for size in sizes), default=0)
        return IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=max(bucket, largest))
    address, port = rendezvous_address()
    return NCCLTrainerInitInfo(
        master_address=address,
        master_port=port,
        world_size=1 + receivers,
        rank=rank,
        packed=True,
        packed_buffer_size_bytes=bucket,
        packed_num_buffers=1 if weights.gather else 2,
    )


class VllmSender:
    """The `ModuleSender` of ipc and nccl on learner rank `rank` (every rank holds one): vLLM's trainer
    engine, built at the first send (NCCL's rendezvous with every engine worker) and kept."""

    def __init__(self, backend: TransferBackend, rank: int) -> None:
        assert backend in ("ipc", "nccl"), backend
        self.backend, self.rank = backend, rank
        self.engine: TrainerWeightTransferEngine | None = None
        self.phases: dict[str, float] = {}

    def send_module(
        self, weights: ModuleBuckets, client: EngineClient, version: int, slots: int | None
    ) -> SyncManifest | None:
        clock = Clock()
        source = DigestingSource(weights, digest=self.rank == 0)
        engine = self._engine(weights, client, source)
        clock.lap("init_s")
        engine.client, engine.source = client, source  # this sync's version and buckets
        try:
            engine.send_weights()  # start, the buckets, finish: every engine has loaded them
        except BaseException:
            self.close()  # an NCCL group that failed midway is unusable: the next send sets up a new one
            raise
        clock.lap("send_s")
        manifest = source.manifest() if self.rank == 0 else None
        clock.lap("digest_s")
        self.phases = clock.laps
        return manifest

    def _engine(
        self, weights: ModuleBuckets, client: EngineClient, source: DigestingSource
    ) -> TrainerWeightTransferEngine:
        if self.engine is None:
            info = trainer_init_info(self.backend, self.rank, weights, client.receivers)
            self.engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
