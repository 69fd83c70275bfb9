"""The engine side of the ipc and nccl backends: vLLM's own worker engines (`IPCWeightTransferEngine`,
`NCCLWeightTransferEngine`), built by vLLM in each worker of an engine started with
`weight_transfer_config={"backend": "posttrain_ipc" | "posttrain_nccl"}`, with one addition: every tensor
they hand to the model's weight loaders is digested on the GPU first (`device_digest_parts`, the function
the sender digests with), so the engine proves the update as with shm (posttrain/rollout/shm_transfer.py).
Imported only in engine processes (it imports vLLM).

vLLM's engines call `self.model.load_weights(...)` once per received chunk; during `receive_weights` the
model is stood in for by `DigestingModel`, which queues each tensor's digest and forwards the tensors, so
how vLLM receives (IPC handles, packed NCCL broadcasts on its own streams) stays vLLM's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

from posttrain.weight_transfer import Receipt
from posttrain.weights import device_digest_parts, device_digests, nbytes


class DigestingModel:
    """The model as vLLM's receive code sees it: `load_weights` queues each tensor's digest (on the
    stream the tensor was received on) and forwards the tensors to the model; everything else is the
    model's."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.parts: list[torch.Tensor] = []

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Any:
        pairs = list(weights)
        for name, t in pairs:
            self.names.append(name)
            self.sizes.append(nbytes(t))
            self.parts.append(device_digest_parts(t))
        loader: Any = self.model  # vLLM models define load_weights; nn.Module does not
        return loader.load_weights(pairs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class Digesting(WeightTransferEngine[Any, Any]):
    """Put before one of vLLM's worker engines in the bases: the engine, digesting what it loads
    (`receipt`). While vLLM receives, `self.model` is a DigestingModel; the digests are read once the
    receive has drained its streams."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receipt = Receipt()

    def start_weight_update(self) -> None:
        self.receipt = Receipt()
        with self.receipt.timed("start_s"):
            super().start_weight_update()  # type: ignore[safe-super]  # a vLLM engine follows in the MRO

    def receive_weights(self, update_info: Any) -> None:
        self.receipt.clock.lap("between_s")
        model = self.model
        stand_in = DigestingModel(model)
        self.model = stand_in  # type: ignore[assignment]  # duck-typed: vLLM calls load_weights only
        try:
            super().receive_weights(update_info)  # type: ignore[safe-super]
        finally:
            self.model = model
        self.receipt.clock.lap("load_s")
        self.receipt.add(stand_in.names, device_digests(stand_in.parts, stand_in.sizes), sum(stand_in.sizes))
        self.receipt.clock.lap("digest_wait_s")

    def finish_weight_update(self) -> None:
        with self.receipt.timed("finish_s"):
            super().finish_weight_update()  # type: ignore[safe-super]


class DigestingIpcEngine(Digesting, IPCWeightTransferEngine):
    """vLLM's IPC engine, digesting what it loads."""


class DigestingNcclEngine(Digesting, NCCLWeightTransferEngine):
    """vLLM's NCCL engine, digesting what it loads."""
