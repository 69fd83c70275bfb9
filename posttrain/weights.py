"""Model weights as buckets of whole tensors with HF names: the sender side of a weight sync.

A (possibly ZeRO-3 partitioned, possibly DeepSpeed- or PEFT-wrapped) module becomes buckets of about
`bucket_mb` (a larger tensor is a bucket of its own; q/k/v and gate/up stay together), gathering one
bucket's parameters at a time; each tensor's checksum goes into a `SyncManifest` the receiver compares
against. On CPU a bucket travels through the Ray object store as a `WireBucket` (raw bytes: one copy in,
read back zero-copy). The receiving side (engines, probes, strategies) is posttrain.rollout.weight_sync.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from ray import ObjectRef
    from ray.util.queue import Queue

Bucket = list[tuple[str, "torch.Tensor"]]
"""A list of (HF parameter name, CPU tensor)."""

CHECKSUM_CHUNK = 1 << 20
"""Elements per checksum step (an 8 MiB float64 buffer): larger steps cost less Python per byte."""

_RAMPS: dict[tuple[int, str], torch.Tensor] = {}


def tensor_checksum(t: torch.Tensor, chunk: int = CHECKSUM_CHUNK) -> float:
    """Float64 sum of a tensor's elements plus a position-weighted sum, sum_i x_i * (i + 1) / n (so
    swapped or offsetting changes within the tensor show too). Each chunk is converted into one reused
    float64 buffer and weighted by a cached ramp (a dot product), so no tensor-sized temporaries."""
    import torch

    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    key = (chunk, str(flat.device))
    ramp = _RAMPS.get(key)
    if ramp is None:
        ramp = _RAMPS[key] = torch.arange(1, chunk + 1, dtype=torch.float64, device=flat.device)
    buf = torch.empty(min(chunk, n), dtype=torch.float64, device=flat.device)
    total = weighted = 0.0
    with torch.no_grad():
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            part = buf[:m]
            part.copy_(flat[start : start + m])
            s = float(part.sum())
            total += s
            weighted += start * s + float(torch.dot(part, ramp[:m]))  # sum_j x_(start+j) * (start+j+1)
    return total + weighted / n


@dataclass
class SyncManifest:
    """What the sender shipped: per tensor name, its checksum (and the total bytes)."""

    checksums: dict[str, float] = field(default_factory=dict)
    nbytes: int = 0
    rel_tol: float = 1e-9

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.checksums[name] = tensor_checksum(tensor)
        self.nbytes += tensor.numel() * tensor.element_size()

    @property
    def checksum(self) -> float:
        return sum(self.checksums.values())

    def compare(self, received: dict[str, float]) -> str | None:
        """None when `received` (name -> checksum) matches, else a description of the first problems."""
        missing = sorted(set(self.checksums) - set(received))
        extra = sorted(set(received) - set(self.checksums))
        bad = [
            n
            for n, c in self.checksums.items()
            if n in received and not math.isclose(c, received[n], rel_tol=self.rel_tol, abs_tol=1e-9)
        ]
        if not (missing or extra or bad):
            return None
        parts = []
        if bad:
            n = bad[0]
            parts.append(
                f"checksum mismatch on {len(bad)} tensor(s), e.g. {n}: {received[n]!r} != {self.checksums[n]!r}"
            )
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        return "; ".join(parts)


class WireBucket:
    """A bucket as it travels through the Ray object store: each tensor as a flat NumPy uint8 view of its
    bytes, which Ray serialises out of band (`ray.put` copies the bytes into the store once) and a reader
    gets back zero-copy, as a read-only view of the store's shared memory. A plain torch tensor would
    instead be pickled through `torch.save` and copied again on both sides."""

    __slots__ = ("items",)

    def __init__(self, bucket: Bucket) -> None:
        import torch

        self.items: list[tuple[str, np.ndarray, str, tuple[int, ...]]] = []
        for name, t in bucket:
            t = t.detach().to("cpu").contiguous()
            dtype = str(t.dtype).removeprefix("torch.")
            self.items.append((name, t.reshape(-1).view(torch.uint8).numpy(), dtype, tuple(t.shape)))

    def unpack(self) -> Bucket:
        import warnings

        import torch

        out: Bucket = []
        for name, data, dtype, shape in self.items:
            with warnings.catch_warnings():  # read-only store memory: nothing here writes to it
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(data)
            out.append((name, raw.view(getattr(torch, dtype)).reshape(shape)))
        return out


def unpack_bucket(obj: WireBucket | Bucket) -> Bucket:
    """A bucket from what `ray.get` returned: a `WireBucket`, or a plain bucket (list of name, tensor)."""
    return obj.unpack() if isinstance(obj, WireBucket) else obj


def put_bucket(bucket: Bucket) -> ObjectRef[WireBucket]:
    """`ray.put` one bucket in wire form; returns the ObjectRef."""
    import ray

    return ray.put(WireBucket(bucket))


def _param_groups(names: list[str]) -> list[list[int]]:
    """Indices grouped by parent-of-parent module (q/k/v or gate/up projections land in one group, as vLLM
    fuses them): a bucket boundary never splits a group."""
    groups: list[list[int]] = []
    last = None
    for i, n in enumerate(names):
        key = n.rsplit(".", 2)[0]
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(i)
    return groups


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: float = 64
) -> Iterator[Bucket]:
    """Chunk (name, tensor) pairs into buckets of about `bucket_mb` MB (CPU copies, detached)."""
    limit = bucket_mb * 2**20
    bucket: Bucket = []
    size = 0
    for name, t in named_tensors:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def _hf_name(name: str) -> str:
    """A PEFT-wrapped or DeepSpeed-wrapped name back to the plain HF one."""
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def module_state_buckets(
    module: torch.nn.Module, bucket_mb: float = 64, gather: bool | None = None, copy: bool = True
) -> Iterator[Bucket]:
    """The full state of a DeepSpeed engine's module (or any torch module) as buckets of CPU tensors with
    HF names. Under ZeRO-3 (`gather`, default: detected from `ds_id` on the parameters) each bucket's
    parameters are gathered with `deepspeed.zero.GatheredParameters` and released before the next, so
    peak memory is one bucket, not the model. Every rank must iterate it (the gathers are collective).

    Tied parameters are listed under each name (vLLM needs `lm_head.weight` with tied embeddings). A
    PEFT-wrapped module is refused (see `sync_lora_from_learners`).

    `copy=False` yields parameters that are already whole, contiguous CPU tensors as detached views of
    the live parameters instead of copies: only for a caller that is done with each bucket before the
    parameters change (the learner helpers below checksum it and `ray.put`, itself a copy, at once).
    Gathered ZeRO-3 parameters are always copied (they are released after their bucket).
    """
    import torch

    named = list(module.named_parameters(remove_duplicate=False))
    if any(".lora_" in n for n, _ in named):
        raise ValueError(
            "module has LoRA adapters: sync the adapter with sync_lora_from_learners (engines with "
            "enable_lora=True), or merge it first; base weights alone would serve the wrong policy"
        )
    if gather is None:
        gather = any(hasattr(p, "ds_id") for _, p in named)
    names = [_hf_name(n) for n, _ in named]
    limit = bucket_mb * 2**20
    current: list[int] = []
    size = 0

    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    def emit(idx: list[int]) -> Bucket:
        params = [named[i][1] for i in idx]
        if gather:
            import deepspeed

            ctx: Any = deepspeed.zero.GatheredParameters(params, enabled=True)
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx, torch.no_grad():
            snapshot = copy or gather
            return [(names[i], named[i][1].detach().to("cpu", copy=snapshot).contiguous()) for i in idx]

    for group in _param_groups(names):
        gbytes = sum(numel(named[i][1]) * named[i][1].element_size() for i in group)
        if current and size + gbytes > limit:
            yield emit(current)
            current, size = [], 0
        current.extend(group)
        size += gbytes
    if current:
        yield emit(current)


def put_buckets(
    buckets: Iterable[Bucket], manifest: SyncManifest | None = None
) -> list[ObjectRef[WireBucket]]:
    """Put each bucket into the Ray object store in wire form (adding its tensors to `manifest`); return
    the refs."""
    refs = []
    for b in buckets:
        if manifest is not None:
            for name, t in b:
                manifest.add(name, t)
        refs.append(put_bucket(b))
    return refs


STREAM_PUT_TIMEOUT_S = 600.0
"""A sender never blocks forever on an engine's full queue (a dead engine surfaces as an error)."""


def put_module_buckets(
    module: torch.nn.Module, bucket_mb: float, zero3: bool, sender: bool
) -> tuple[list[ObjectRef[WireBucket]], SyncManifest] | None:
    """Every rank iterates (ZeRO-3 gathers are collective); the `sender` rank puts each bucket into the
    object store and returns (refs, manifest), the others None."""
    manifest = SyncManifest()
    refs = []
    for bucket in module_state_buckets(module, bucket_mb, gather=zero3, copy=False):
        if sender:
            refs.extend(put_buckets([bucket], manifest))
    return (refs, manifest) if sender else None


def stream_module_buckets(
    module: torch.nn.Module, queues: Sequence[Queue], bucket_mb: float, zero3: bool, sender: bool
) -> SyncManifest | None:
    """Every rank iterates; the `sender` rank puts each bucket into the object store and its ref into
    every engine's queue as soon as it is gathered (a full queue blocks: at most `maxsize` buckets per
    engine in flight), then `None` as the end marker; returns the manifest (sender only)."""
    manifest = SyncManifest()
    for bucket in module_state_buckets(module, bucket_mb, gather=zero3, copy=False):
        if sender:
            for name, t in bucket:
                manifest.add(name, t)
            ref = put_bucket(bucket)
            del bucket
            for q in queues:
                q.put([ref], block=True, timeout=STREAM_PUT_TIMEOUT_S)
    if not sender:
        return None
    for q in queues:
        q.put(None, block=True, timeout=STREAM_PUT_TIMEOUT_S)
    return manifest
