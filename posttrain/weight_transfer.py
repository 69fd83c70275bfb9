"""Learner -> engine weight transfer through vLLM 0.32's weight-transfer API: the sender, the engines'
control plane, and the wire format of our shared-memory backend.

vLLM (vllm/distributed/weight_transfer) builds, in each engine worker, the worker-side engine registered
under `weight_transfer_config={"backend": NAME}`; a trainer drives it with four calls on every engine:
`init_weight_transfer_engine(init_info)`, `start_weight_update()`, one `update_weights(update_info)` per
chunk, `finish_weight_update(weight_version)` (vLLM's `VLLMWeightSyncClient`). Three backends
(`rollout.weight_transfer`), one sender interface (`ModuleSender`, made by posttrain.learner.make_sender):

- `ipc` / `nccl`: vLLM's own, for CUDA: its trainer engines (posttrain/gpu_sender.py) send the learner's
  device buckets through CUDA IPC (learner and engine on one GPU) or an NCCL broadcast (between GPUs and
  nodes); posttrain's subclasses of vLLM's worker engines (posttrain/rollout/gpu_transfer.py) digest every
  received tensor on the GPU (`device_digest_parts`), for the same proof as `shm`.
- `shm`, ours, works on any host where learner rank 0 and the engines share memory:
  - the sender copies bucket k into slot k % slots of a POSIX shared-memory file (sized once, reused by
    every sync; the file is unlinked once every engine has mapped it, so nothing leaks if a process
    dies), while a second thread computes the bucket's digests from the source tensors and a third
    issues the engines' `update_weights` for bucket k-1 (a slot is rewritten only after every engine
    loaded it);
  - each engine (posttrain/rollout/shm_transfer.py) views its tensors in the mapping, digests them on a
    second thread while vLLM's weight loaders copy them into the model, and reports the digests.

The receiving side (`RolloutEngine`) and the proof (digests against the `SyncManifest`, then the logprob
probe) are posttrain.rollout's.
"""

from __future__ import annotations

import itertools
import mmap
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from posttrain.weights import Bucket, ModuleBuckets, SyncManifest, bucket_digests, nbytes, tensor_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch
    from ray import ObjectRef
    from ray.actor import ActorHandle

TransferBackend = Literal["shm", "ipc", "nccl"]
"""`rollout.weight_transfer`: the backend engines receive weights with."""
VLLM_BACKENDS: dict[str, str] = {"shm": "posttrain_shm", "ipc": "posttrain_ipc", "nccl": "posttrain_nccl"}
"""Our backend names -> the names registered with vLLM's WeightTransferEngineFactory."""
ENGINE_CLASSES: dict[str, tuple[str, str]] = {
    "shm": ("posttrain.rollout.shm_transfer", "ShmWeightTransferEngine"),
    "ipc": ("posttrain.rollout.gpu_transfer", "DigestingIpcEngine"),
    "nccl": ("posttrain.rollout.gpu_transfer", "DigestingNcclEngine"),
}
"""The worker-side engine of each backend (module, class), imported by vLLM when an engine starts."""
UpdatePayload = dict[str, Any] | list[dict[str, Any]]
"""vLLM's `WeightTransferUpdatePayload`: one update info, or one per engine worker."""
ALIGN = 64  # tensor offsets in a slot: a cache line, so every dtype's view is aligned
SHM_DIR = "/dev/shm"


class WeightSyncError(RuntimeError):
    """An engine did not end up serving weight `version`: bad checksum, probe mismatch, error, timeout."""

    def __init__(self, version: int, engine: str, reason: str) -> None:
        super().__init__(f"weight sync to version {version} failed on engine {engine}: {reason}")
        self.version, self.engine, self.reason = version, engine, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeightSyncError, (self.version, self.engine, self.reason))


# ------------------------------------------------------------------------------------- control plane


class EngineClient(Protocol):
    """vLLM's `VLLMWeightSyncClient`: the four calls a sender makes on the engines (each blocks until every
    engine has answered), the backend they receive with and how many engine workers receive (an NCCL
    group holds them all and the sender)."""

    backend: TransferBackend

    @property
    def receivers(self) -> int: ...

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: UpdatePayload) -> None: ...

    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


def gather_engine_calls(
    version: int, names: Sequence[str], calls: Sequence[ObjectRef[Any]], timeout_s: float
) -> list[Any]:
    """Every engine's answer, or one WeightSyncError naming the version and the first engine that failed,
    died or did not answer within `timeout_s` (and the others that failed)."""
    import ray

    ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
    done = set(ready)
    answers: list[Any] = []
    errors: list[WeightSyncError] = []
    for name, ref in zip(names, calls, strict=True):
        if ref not in done:
            errors.append(WeightSyncError(version, name, f"no answer within {timeout_s:g} s"))
            continue
        try:  # every finished call is read, so no engine's error goes unreported
            answers.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, WeightSyncError):
                errors.append(WeightSyncError(cause.version, cause.engine, cause.reason))
            else:
                errors.append(WeightSyncError(version, name, f"{type(e).__name__}: {e}"))
        except ray.exceptions.RayActorError as e:
            errors.append(WeightSyncError(version, name, f"engine died: {e}"))
    if errors:
        first = errors[0]
        if len(errors) > 1:
            others = ", ".join(e.engine for e in errors[1:])
            raise WeightSyncError(first.version, first.engine, f"{first.reason} (also failed: {others})")
        raise first
    return answers


def engine_init_infos(
    init_info: dict[str, Any], engines: int, workers_per_engine: int
) -> list[dict[str, Any]]:
    """Each engine's init info. vLLM numbers the NCCL ranks of one engine's workers from `rank_offset`;
    ours are separate engines (each its own data-parallel rank 0), so engine i's start after engine
    i-1's. Other backends' info goes to every engine as it is."""
    if "rank_offset" not in init_info:
        return [init_info] * engines
    first = int(init_info["rank_offset"])
    return [{**init_info, "rank_offset": first + i * workers_per_engine} for i in range(engines)]


@dataclass
class RayEngineClient:
    """An `EngineClient` over the engine actors of one group, for the sync to `version`: each call runs on
    every engine (RolloutEngine's methods of the same names) and fails as `gather_engine_calls` says."""

    actors: list[ActorHandle]
    names: list[str]
    version: int
    timeout_s: float
    backend: TransferBackend = "shm"
    workers_per_engine: int = 1

    @property
    def receivers(self) -> int:
        return len(self.actors) * self.workers_per_engine

    def _all(self, method: str, *args: Any) -> list[Any]:
        calls = [getattr(a, method).remote(*args) for a in self.actors]
        return gather_engine_calls(self.version, self.names, calls, self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        infos = engine_init_infos(init_info, len(self.actors), self.workers_per_engine)
        calls = [a.init_weight_transfer_engine.remote(i) for a, i in zip(self.actors, infos, strict=True)]
        gather_engine_calls(self.version, self.names, calls, self.timeout_s)

    def start_weight_update(self) -> None:
        self._all("start_weight_update", self.version)

    def update_weights(self, update_info: UpdatePayload) -> None:
        self._all("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", int(weight_version or self.version))


# -------------------------------------------------------------------------------------- shared memory


@dataclass
class ShmUpdateInfo:
    """One bucket for the shm backend (vLLM's `update_info`, as a dict of plain lists): tensor i is
    `dtype_names[i]` of `shapes[i]` at byte `offsets[i]` of the shared-memory file `region`. With
    `reused` the sender rewrites these bytes before the update finishes (a ring of slots), so the receiver
    copies them out first: vLLM's layerwise reload keeps a layer's tensors until the layer is complete,
    some (padded vocabularies) until the update finishes."""

    region: str
    region_bytes: int
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    offsets: list[int]
    reused: bool = False


class ShmRegion:
    """A shared-memory file mapped into this process: the sender creates it (space reserved at once, so a
    full /dev/shm fails here, not as SIGBUS later), receivers map it read-only. Mapped with MAP_POPULATE:
    its pages are touched once, not at every sync."""

    def __init__(self, path: str, size: int, create: bool = False) -> None:
        self.path, self.size = path, size
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL if create else os.O_RDONLY
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, size)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if create else 0)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, prot)
        finally:
            os.close(fd)
        self.linked = create  # only the creator removes the name

    @classmethod
    def create(cls, size: int) -> ShmRegion:
        """A new file in /dev/shm, or in the temp folder (page cache, slower) where /dev/shm is too small."""
        stat = os.statvfs(SHM_DIR) if os.path.isdir(SHM_DIR) else None
        folder = SHM_DIR if stat and stat.f_bavail * stat.f_frsize > size else tempfile.gettempdir()
        return cls(os.path.join(folder, f"posttrain-weights-{uuid.uuid4().hex}"), size, create=True)

    def array(self, offset: int, size: int) -> np.ndarray:
        import numpy as np

        return np.frombuffer(self.map, dtype=np.uint8, count=size, offset=offset)

    def tensors(self, info: ShmUpdateInfo) -> list[tuple[str, torch.Tensor]]:
        """The bucket's tensors as views of the mapping (read-only memory: nothing may write to them)."""
        import warnings

        import torch

        out = []
        for name, dtype, shape, offset in zip(
            info.names, info.dtype_names, info.shapes, info.offsets, strict=True
        ):
            dt = getattr(torch, dtype)
            count = dt.itemsize
            for d in shape:
                count *= d
            with warnings.catch_warnings():  # torch warns that the buffer is not writable
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(self.array(offset, count))
            out.append((name, raw.view(dt).reshape(shape)))
        return out

    def unlink(self) -> None:
        """Drop the name: the memory lives on while a process maps it, and goes with the last."""
        if self.linked:
            os.unlink(self.path)
            self.linked = False

    def close(self) -> None:
        import contextlib

        if self.linked:
            self.unlink()
        with contextlib.suppress(BufferError):  # views still alive: the mapping goes with the last
            self.map.close()


class Clock:
    """Seconds spent per named phase, summed over laps."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = self._now()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now


@dataclass
class Receipt:
    """What one engine worker's backend received in the current update, for the engine's proof: each
    tensor's digest, the bytes, and the update's seconds by phase."""

    digests: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    clock: Clock = field(default_factory=Clock)

    def add(self, names: Sequence[str], digests: Sequence[int], size: int) -> None:
        self.digests.update(zip(names, digests, strict=True))
        self.nbytes += size

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """The block's seconds as `phase`; the time since the previous phase as `between_s`."""
        self.clock.lap("between_s")
        yield
        self.clock.lap(phase)


def slot_layout(bucket: Bucket) -> tuple[list[int], int]:
    """Each tensor's offset in a slot (ALIGN-aligned) and the bytes the slot needs."""
    offsets, end = [], 0
    for _, t in bucket:
        offsets.append(end)
        end += -(-nbytes(t) // ALIGN) * ALIGN
    return offsets, end


def slot_bases(bucket_bytes: Sequence[int], slots: int | None) -> tuple[list[int], int]:
    """Where each bucket goes in the region, and the region's size: back to back (`slots` None), or in a
    ring of `slots` slots each as large as the largest bucket."""
    if slots is None:
        bases = list(itertools.accumulate(bucket_bytes, initial=0))
        return bases[:-1], bases[-1]
    slots = max(1, min(slots, len(bucket_bytes)))
    slot = max(bucket_bytes, default=0)
    return [(k % slots) * slot for k in range(len(bucket_bytes))], slots * slot


def aligned_size(sizes: Iterable[int]) -> int:
    return sum(-(-s // ALIGN) * ALIGN for s in sizes)


class ModuleSender(Protocol):
    """What a learner rank holds to push its module to the engines, one per backend, kept across syncs."""

    phases: dict[str, float]
    """Seconds of the last send, by phase (benchmarks read them)."""

    def send_module(
        self, weights: ModuleBuckets, client: EngineClient, version: int, slots: int | None
    ) -> SyncManifest | None:
        """Drive one update of every engine through `client` (every rank calls it: ZeRO-3 gathers are
        collective); the sending rank returns the manifest of what it sent, the others None. `slots`:
        buckets in flight (shm only; vLLM's backends double-buffer themselves)."""
        ...

    def close(self) -> None: ...


class GatherOnly:
    """The shm sender of a rank that does not send: it runs the ZeRO-3 gathers with the sending rank."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def send_module(
        self, weights: ModuleBuckets, client: EngineClient, version: int, slots: int | None
    ) -> SyncManifest | None:
        for _ in weights:
            pass
        return None

    def close(self) -> None:
        pass


class ShmSender:
    """The sender of the shm backend (the role of vLLM's `TrainerWeightTransferEngine`): one per learner
    (or driver), its region kept from one sync to the next and grown only when a larger one is needed."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}  # seconds of the last send, by phase (benchmarks read them)
        self.region: ShmRegion | None = None
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="weight-digest")
        self.caller = ThreadPoolExecutor(1, thread_name_prefix="weight-send")

    def send(
        self,
        buckets: Iterable[Bucket],
        bucket_bytes: Sequence[int],
        client: EngineClient,
        version: int,
        slots: int | None = None,
    ) -> SyncManifest:
        """Drive one update of every engine through `client`; `bucket_bytes`: each bucket's aligned size
        (`aligned_size`), known before the first is gathered; `slots`: buckets in flight (None: one per
        bucket, so the sender never waits for the engines). Returns the manifest of what was sent."""
        bases, size = slot_bases(bucket_bytes, slots)
        slots = len(bases) if slots is None else max(1, min(slots, len(bases)))
        clock = Clock()
        region = self._region(max(ALIGN, size))
        manifest = SyncManifest()
        in_flight: list[Future[None] | None] = [None] * slots
        client.start_weight_update()
        clock.lap("start_s")
        for k, bucket in enumerate(buckets):
            clock.lap("gather_s")
            previous = in_flight[k % slots]
            if previous is not None:
                previous.result()  # every engine has loaded what the slot held
            clock.lap("slot_wait_s")
            info = self._write(bucket, region, bases[k], manifest, reused=k + slots < len(bases))
            clock.lap("copy_digest_s")
            in_flight[k % slots] = self.caller.submit(client.update_weights, asdict(info))
        for pending in in_flight:
            if pending is not None:
                pending.result()
        clock.lap("engines_wait_s")
        client.finish_weight_update(str(version))
        clock.lap("finish_s")
        region.unlink()  # every engine has mapped it
        self.phases = clock.laps
        return manifest

    def send_module(
        self, weights: ModuleBuckets, client: EngineClient, version: int, slots: int | None
    ) -> SyncManifest:
        return self.send(weights, [aligned_size(s) for s in weights.sizes], client, version, slots)

    def _write(
        self, bucket: Bucket, region: ShmRegion, base: int, manifest: SyncManifest, reused: bool
    ) -> ShmUpdateInfo:
        """Copy `bucket` into the slot at `base` while the digests of its sources are computed alongside."""
        import numpy as np

        digests = self.hasher.submit(bucket_digests, [t for _, t in bucket])
        offsets, _ = slot_layout(bucket)
        for (_, t), offset in zip(bucket, offsets, strict=True):
            src = tensor_bytes(t)
            np.copyto(region.array(base + offset, src.size), src)
        for (name, t), digest in zip(bucket, digests.result(), strict=True):
            manifest.add(name, digest, nbytes(t))
        return ShmUpdateInfo(
            region.path,
            region.size,
            [n for n, _ in bucket],
            [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            [list(t.shape) for _, t in bucket],
            [base + o for o in offsets],
            reused,
        )

    def _region(self, size: int) -> ShmRegion:
        if self.region is None or self.region.size < size:
            if self.region is not None:
                self.region.close()
            self.region = ShmRegion.create(size)
        return self.region

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None


def send_buckets(
    sender: ShmSender, buckets: Sequence[Bucket], client: EngineClient, version: int
) -> SyncManifest:
    """Buckets already in memory (tests, a driver holding a model) through `sender`."""
    return sender.send(buckets, [slot_layout(b)[1] for b in buckets], client, version)
