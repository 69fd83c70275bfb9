"""The engine side of the shm weight-transfer backend: a vLLM `WeightTransferEngine`, built by vLLM in
each worker of an engine started with `weight_transfer_config={"backend": "posttrain_shm"}` (registered
by posttrain.rollout.engine). Imported only in engine processes (it imports vLLM).

As vLLM's own checkpoint-format backends (ipc), `start_weight_update` begins vLLM's layerwise in-place
reload and `finish_weight_update` ends it; each `update_weights` loads one bucket straight from the
sender's shared memory (posttrain.weight_transfer) through the model's weight loaders (copied out first
when the sender reuses the slot), while a second thread digests the same bytes. The digests wait in
`receipt` for the engine's proof. Layers whose weights are not sent (a frozen vision tower) keep theirs:
vLLM warns once per such layer and sync, which `_QuietUnsentLayers` silences.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from posttrain.weight_transfer import Receipt, ShmRegion, ShmUpdateInfo
from posttrain.weights import bucket_digests, nbytes

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


@dataclass
class ShmInitInfo(WeightTransferInitInfo):
    """Nothing to agree on at init: each bucket names its region."""


@dataclass
class ShmBucket(ShmUpdateInfo, WeightTransferUpdateInfo):
    """`ShmUpdateInfo` as vLLM's typed update info."""


class _QuietUnsentLayers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()


class ShmWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmBucket]):
    init_info_cls = ShmInitInfo
    update_info_cls = ShmBucket

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.region: ShmRegion | None = None
        self.receipt = Receipt()
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="weight-digest")
        logging.getLogger(RELOAD_LOGGER).addFilter(_QuietUnsentLayers())

    def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.receipt = Receipt()
        with self.receipt.timed("start_s"):
            initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))  # CPU: nothing to synchronize

    def receive_weights(self, update_info: ShmBucket) -> None:
        clock = self.receipt.clock
        clock.lap("between_s")
        tensors = self._mapped(update_info).tensors(update_info)
        digests = self.hasher.submit(bucket_digests, [t for _, t in tensors])
        if update_info.reused:  # the slot is rewritten before vLLM has necessarily used every tensor
            tensors = [(n, t.clone()) for n, t in tensors]
        model: Any = self.model  # vLLM models define load_weights; nn.Module does not
        model.load_weights(tensors)
        clock.lap("load_s")
        self.receipt.add(update_info.names, digests.result(), sum(nbytes(t) for _, t in tensors))
        clock.lap("digest_wait_s")

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with self.receipt.timed("finish_s"):
            finalize_layerwise_reload(self.model, self.model_config)

    def _mapped(self, info: ShmBucket) -> ShmRegion:
        """The sender's region, mapped once and kept (a new sender or a larger region replaces it)."""
        if self.region is None or (self.region.path, self.region.size) != (info.region, info.region_bytes):
            self.shutdown()
            try:
                self.region = ShmRegion(info.region, info.region_bytes)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{info.region} not found: the shm backend needs the sender (learner rank 0) on this "
                    "engine's host"
                ) from None
        return self.region

    def shutdown(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None
