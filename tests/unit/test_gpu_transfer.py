"""The ipc / nccl weight transfer on the CPU, against vLLM 0.32's own code: the backends registered with
its factory, the init and update infos we build (or make vLLM build from our source) parsed by its
dataclasses, its NCCL worker engine receiving through our digesting stand-in, a non-sending learner rank
running vLLM's trainer engine, and the config rules (the GPU runs: bench/gpu_smoke.py weight_sync_ipc)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.distributed.weight_transfer import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.ipc_engine import (
    IPCTrainerInitInfo,
    IPCWeightTransferEngine,
    IPCWeightTransferInitInfo,
    IPCWeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
)

from posttrain.config import ConfigError, load_config
from posttrain.gpu_sender import DigestingSource, VllmSender, trainer_init_info
from posttrain.rollout.engine import transfer_backend
from posttrain.rollout.gpu_transfer import DigestingIpcEngine, DigestingNcclEngine
from posttrain.weight_transfer import Receipt, engine_init_infos
from posttrain.weights import ModuleBuckets, device_digest

ROOT = Path(__file__).resolve().parents[2]


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(40, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.embed_tokens.requires_grad_(False)  # a frozen part: left out of later syncs
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights: Any) -> set[str]:
        self.loaded.update((n, t.clone()) for n, t in weights)
        return set(self.loaded)


class Client:
    """An EngineClient that records the calls (no engines behind it)."""

    backend = "nccl"
    receivers = 2

    def __init__(self) -> None:
        self.calls: list[str] = []

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.calls.append("init")

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: Any) -> None:
        self.calls.append("update")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish")


@pytest.mark.parametrize(
    ("backend", "engine_cls", "base"),
    [
        ("ipc", DigestingIpcEngine, IPCWeightTransferEngine),
        ("nccl", DigestingNcclEngine, NCCLWeightTransferEngine),
    ],
)
def test_backends_are_registered_with_vllms_factory(backend: str, engine_cls: type, base: type) -> None:
    name = transfer_backend(backend)  # type: ignore[arg-type]
    assert name == f"posttrain_{backend}" and transfer_backend(backend) == name  # type: ignore[arg-type]
    loaded = WeightTransferEngineFactory._registry[name]()
    assert loaded is engine_cls and issubclass(loaded, base)
    assert loaded.update_info_cls is base.update_info_cls  # vLLM's own wire format


def test_init_infos_parse_with_vllms_dataclasses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("posttrain.gpu_sender.rendezvous_address", lambda: ("10.0.0.1", 29555))
    model = Model()
    weights = ModuleBuckets(model, bucket_mb=1 / 2**10, gather=False)  # 1 KiB buckets
    ipc = trainer_init_info("ipc", 0, weights, receivers=1)
    assert isinstance(ipc, IPCTrainerInitInfo) and ipc.packed and ipc.is_sender
    assert ipc.packed_buffer_size_bytes == 40 * 8 * 4  # the embedding: larger than a bucket
    assert IPCWeightTransferInitInfo(packed=ipc.packed).packed  # what vLLM's IPC trainer sends at init
    nccl = trainer_init_info("nccl", 0, weights, receivers=3)
    assert isinstance(nccl, NCCLTrainerInitInfo) and nccl.world_size == 4 and nccl.packed
    assert (nccl.packed_buffer_size_bytes, nccl.packed_num_buffers) == (1024, 2)
    gathered = ModuleBuckets(model, bucket_mb=1, gather=True)
    assert trainer_init_info("nccl", 0, gathered, 3).packed_num_buffers == 1  # type: ignore[attr-defined]
    # vLLM's trainer sends rank_offset 1 to every worker; our client gives each engine its own ranks
    worker = NCCLWeightTransferInitInfo(
        master_address=nccl.master_address,
        master_port=nccl.master_port,
        rank_offset=1,
        world_size=4,
        packed=True,
    )
    per_engine = engine_init_infos(worker_init_payload(worker), engines=3, workers_per_engine=1)
    parsed = [NCCLWeightTransferInitInfo(**info) for info in per_engine]
    assert [p.rank_offset for p in parsed] == [1, 2, 3] and {p.world_size for p in parsed} == {4}
    assert engine_init_infos({"packed": True}, engines=2, workers_per_engine=1) == [{"packed": True}] * 2


def test_source_metadata_matches_iteration_as_vllms_nccl_sender_checks() -> None:
    weights = ModuleBuckets(Model(), bucket_mb=1 / 2**10, gather=False, on_device=True)
    source = DigestingSource(weights, digest=True)
    meta = source.metadata()
    sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))  # raises on a mismatch
    assert [n for n, _ in sent] == weights.names == [m.name for m in meta]
    update = NCCLWeightTransferUpdateInfo(  # as vLLM's NCCL sender builds it from the metadata
        names=[m.name for m in meta],
        dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
        shapes=[list(m.shape) for m in meta],
    )
    assert all(getattr(torch, d) == t.dtype for d, (_, t) in zip(update.dtype_names, sent, strict=True))
    manifest = source.manifest()
    assert manifest.checksums == {n: device_digest(t) for n, t in sent}
    assert manifest.nbytes == sum(t.numel() * t.element_size() for _, t in sent)
    frozen_out = DigestingSource(ModuleBuckets(Model(), 1, gather=False, include_frozen=False), True)
    assert "embed_tokens.weight" not in [m.name for m in frozen_out.metadata()]


def test_ipc_update_info_keeps_vllms_schema() -> None:
    info = IPCWeightTransferUpdateInfo(
        names=["a", "b"], dtype_names=["bfloat16", "float32"], shapes=[[2, 3], [4]],
        ipc_handles={"GPU-uuid": ("rebuild", "args")}, tensor_sizes=[12, 16],
    )  # fmt: skip
    assert set(asdict(info)) == {
        "names",
        "dtype_names",
        "shapes",
        "ipc_handles",
        "ipc_handles_pickled",
        "tensor_sizes",
    }


class Broadcast:
    """A stand-in NCCL group that "receives" the sender's tensors in order."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    def broadcast(self, t: torch.Tensor, src: int, stream: Any = None) -> None:
        t.copy_(self.tensors.pop(0))


def test_vllms_nccl_receive_goes_through_the_digesting_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = [("layers.0.weight", torch.randn(8, 8).bfloat16()), ("layers.0.bias", torch.randn(8))]
    model = Model()
    engine = DigestingNcclEngine.__new__(DigestingNcclEngine)  # vLLM's receive code, no worker behind it
    engine.model, engine.device, engine.packed = model, torch.device("cpu"), False
    engine.model_update_group = Broadcast([t for _, t in sent])  # type: ignore[assignment]
    engine.receipt = Receipt()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)  # vLLM's unpacked receive asks for it
    update = {"names": [n for n, _ in sent], "dtype_names": ["bfloat16", "float32"], "shapes": [[8, 8], [8]]}
    engine.receive_weights(engine.parse_update_info(update))
    assert engine.model is model  # restored
    assert all(torch.equal(model.loaded[n], t) for n, t in sent)
    assert engine.receipt.digests == {n: device_digest(t) for n, t in sent}
    assert engine.receipt.nbytes == 8 * 8 * 2 + 8 * 4 and "load_s" in engine.receipt.clock.laps


def test_a_non_sending_rank_runs_vllms_nccl_trainer_through_the_gathers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("posttrain.gpu_sender.rendezvous_address", lambda: ("127.0.0.1", 29555))
    weights = ModuleBuckets(Model(), bucket_mb=1 / 2**10, gather=False, on_device=True)
    iterated: list[str] = []
    original = ModuleBuckets.__iter__

    def counting(self: ModuleBuckets) -> Any:
        for bucket in original(self):
            iterated.extend(n for n, _ in bucket)
            yield bucket

    monkeypatch.setattr(ModuleBuckets, "__iter__", counting)
    client = Client()
    sender = VllmSender("nccl", rank=1)
    assert sender.send_module(weights, client, 1, None) is None
    assert iterated == weights.names and client.calls == []  # only rank 0 talks to the engines
    assert set(sender.phases) == {"init_s", "send_s", "digest_s"}
    sender.close()


def rl(*overrides: str) -> Any:
    return load_config("rl", ROOT / "configs/tiny/rl.yaml", list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["rollout.weight_transfer=ipc"],
            r"rollout\.weight_transfer: ipc moves weights between CUDA devices",
        ),
        (["rollout.weight_transfer=nccl"], r"rollout\.weight_transfer: nccl .*device is cpu"),
        (["rollout.weight_transfer=ipc", "device=cuda"], r"ipc .*needs rollout\.colocate: true"),
        (
            ["rollout.weight_transfer=nccl", "device=cuda", "rollout.colocate=true", "learners.zero_stage=1"],
            r"nccl cannot connect a learner and an engine on the same GPU",
        ),
        (["rollout.weight_transfer=gloo"], r"rollout\.weight_transfer"),
    ],
)
def test_backends_that_cannot_work_are_rejected_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rl(*overrides)


def test_working_backend_configs() -> None:
    assert rl().rollout.weight_transfer == "shm"  # the default, on any device
    colocated = ["rollout.colocate=true", "learners.zero_stage=1", "device=cuda"]
    assert rl("rollout.weight_transfer=ipc", *colocated).rollout.weight_transfer == "ipc"
    assert rl("rollout.weight_transfer=nccl", "device=cuda").rollout.weight_transfer == "nccl"
    assert (
        rl("rollout.weight_transfer=nccl", "device=auto").rollout.weight_transfer == "nccl"
    )  # resolved at start
    with pytest.raises(ConfigError, match=r"rollout\.weight_transfer: nccl"):
        load_config("distill", ROOT / "configs/tiny/distill.yaml", ["rollout.weight_transfer=nccl"])
