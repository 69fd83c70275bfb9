"""The shm weight-transfer backend's pure parts, in one process: a sender's buckets through shared memory
to an in-process receiver (what rollout/shm_transfer.py does inside vLLM, minus vLLM), the digests that
prove them, and frozen parameters left out (the engine side: tests/integration/test_rollout.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from posttrain.weight_transfer import (
    GatherOnly,
    ShmRegion,
    ShmSender,
    ShmUpdateInfo,
    send_buckets,
    slot_bases,
    slot_layout,
)
from posttrain.weights import ModuleBuckets, SyncManifest, bucket_digests, iter_buckets


@dataclass
class Receiver:
    """An EngineClient that is its own engine: maps the sender's region, copies each bucket out (as vLLM's
    weight loaders do) and digests what it read."""

    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    regions: dict[str, ShmRegion] = field(default_factory=dict)
    reused: list[bool] = field(default_factory=list)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.calls.append("init")

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        info = ShmUpdateInfo(**update_info)
        self.reused.append(info.reused)
        if info.region not in self.regions:
            self.regions[info.region] = ShmRegion(info.region, info.region_bytes)
        tensors = self.regions[info.region].tensors(info)
        self.received.update(zip(info.names, bucket_digests([t for _, t in tensors]), strict=True))
        self.loaded.update((n, t.clone()) for n, t in tensors)
        self.calls.append("update")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append(f"finish {weight_version}")


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).bfloat16()),
        ("model.layers.0.self_attn.k_proj.weight", torch.randn(8, 16, generator=g)),
        ("model.layers.0.mlp.gate_proj.weight", torch.randn(3, 16, generator=g)),  # 192 B: not aligned
        ("model.norm.weight", torch.ones(16)),
    ]


def test_shm_round_trip_reuses_one_region_and_unlinks_it() -> None:
    tensors = named_tensors()
    buckets = list(iter_buckets(tensors, bucket_mb=1.1 / 1024))  # several buckets of whole groups
    assert len(buckets) > 2
    sender, receiver = ShmSender(), Receiver()
    manifest = send_buckets(sender, buckets, receiver, version=3)
    assert receiver.reused == [False] * len(buckets)  # one place per bucket: nothing is overwritten
    assert receiver.calls == ["start", *["update"] * len(buckets), "finish 3"]
    for name, t in tensors:
        assert torch.equal(receiver.loaded[name], t) and receiver.loaded[name].dtype == t.dtype
    assert manifest.compare(receiver.received) is None
    assert manifest.nbytes == sum(t.numel() * t.element_size() for _, t in tensors)
    region = sender.region
    assert region is not None and not os.path.exists(region.path)  # unlinked once the receiver mapped it
    assert slot_bases([128, 64, 192], None) == ([0, 128, 192], 384)  # back to back
    assert slot_bases([128, 64, 192], 2) == ([0, 192, 0], 384)  # a ring of the largest bucket
    for slots in (1, 2):  # a ring smaller than the model: the sender waits for each slot's load
        receiver.loaded.clear()
        sender.send(buckets, [slot_layout(b)[1] for b in buckets], receiver, 4, slots)
        assert all(torch.equal(receiver.loaded[n], t) for n, t in tensors)
        assert (sender.region is region) == (slots == 1)  # reused while large enough, else grown
        # every bucket but the last `slots` is overwritten before the update finishes: the receiver copies
        assert receiver.reused[-len(buckets) :] == [k + slots < len(buckets) for k in range(len(buckets))]
    sender.close()


def test_checksum_mismatch_and_missing_tensors_are_named() -> None:
    tensors = named_tensors()
    manifest = SyncManifest()
    for (name, t), digest in zip(tensors, bucket_digests([t for _, t in tensors]), strict=True):
        manifest.add(name, digest, t.numel() * t.element_size())
    received = dict(manifest.checksums)
    assert manifest.compare(received) is None
    flipped = tensors[2][1].clone()
    flipped.view(torch.int32)[0] ^= 1  # one bit of one element
    received["model.layers.0.self_attn.k_proj.weight"] = bucket_digests([flipped])[0]
    problem = manifest.compare(received) or ""
    assert "checksum mismatch on 1 tensor(s), e.g. model.layers.0.self_attn.k_proj.weight" in problem
    del received["model.norm.weight"]
    assert "missing ['model.norm.weight']" in (manifest.compare(received) or "")


class Tower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Linear(8, 8)
        self.lm = torch.nn.Linear(8, 8)


def test_frozen_parameters_are_sent_once_then_proved_by_the_engines_digests() -> None:
    model = Tower()
    model.visual.requires_grad_(False)
    full = ModuleBuckets(model, bucket_mb=1, gather=False)
    assert full.frozen == {"visual.weight", "visual.bias"} and len(full.names) == 4
    sender, receiver = ShmSender(), Receiver()
    first = sender.send_module(full, receiver, 1, None)
    assert first is not None and set(first.checksums) == set(full.names)
    held = dict(receiver.received)  # what the engine verified
    receiver.received.clear()
    partial = ModuleBuckets(model, bucket_mb=1, gather=False, include_frozen=False)
    later = sender.send_module(partial, receiver, 2, None)
    assert later is not None and set(later.checksums) == {"lm.weight", "lm.bias"} == set(receiver.received)
    later.held = {n: first.checksums[n] for n in full.frozen}
    assert later.compare(receiver.received, held) is None
    assert "not held from an earlier verified sync, e.g. visual" in (
        later.compare(receiver.received, {}) or ""
    )
    assert GatherOnly().send_module(partial, receiver, 3, None) is None  # a non-sending rank only iterates
    sender.close()


def test_each_rank_gets_the_sender_of_the_engines_backend() -> None:
    from posttrain.learner import make_sender

    assert isinstance(make_sender("shm", 0), ShmSender) and isinstance(make_sender("shm", 1), GatherOnly)
    from posttrain.gpu_sender import VllmSender

    for backend in ("ipc", "nccl"):
        for rank in (0, 1):  # every rank takes part: IPC gathers every rank's handles
            sender = make_sender(backend, rank)
            assert isinstance(sender, VllmSender) and (sender.backend, sender.rank) == (backend, rank)


def test_lora_module_is_refused() -> None:
    model = torch.nn.Module()
    model.add_module("q_proj", torch.nn.Module())
    model.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2)))
    named = torch.nn.Module()
    named.add_module("layer", model)
    with pytest.raises(ValueError, match="LoRA adapters"):
        ModuleBuckets(named, 1, gather=False)
