"""Learner -> rollout-engine weight sync: buckets, checksums, probes, and the logprob mismatch metric.

The learner side turns its (possibly ZeRO-3 partitioned) module into buckets of whole tensors with HF
names, each about `bucket_mb` (a larger tensor is a bucket of its own; q/k/v and gate/up stay together),
gathering one bucket's parameters at a time. On CPU the buckets travel through the Ray object store as
`WireBucket`s (raw bytes: one copy in, read back zero-copy); the engine streams them into vLLM's in-place
reload in one pass and checksums each tensor it received.

    sync_from_learners(learners, engines, version, bucket_mb, probe_ids)          # all buckets put, then load
    stream_sync_from_learners(learners, engines, version, bucket_mb, max_inflight) # pipelined, bounded
    sync_lora_from_learners(learners, engines, version, root, probe_ids)          # adapter only

Each ends with every engine proving the version: received checksums == the learner's manifest, and the
engine's prompt logprobs of `probe_ids` == the learners' `token_logprobs` (atol 1e-4); any failure or
timeout raises WeightSyncError(version, engine, reason), and an engine whose weights were touched by a
failed sync refuses to generate until a sync succeeds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

STREAM_PUT_TIMEOUT_S = 600.0
"""A learner never blocks forever on an engine's full queue (a dead engine surfaces as an error)."""

Bucket = list[tuple[str, Any]]
"""A list of (HF parameter name, CPU tensor)."""


class WeightSyncError(RuntimeError):
    """An engine did not end up serving weight `version`: bad checksum, probe mismatch, error, timeout."""

    def __init__(self, version: int, engine: str, reason: str) -> None:
        super().__init__(f"weight sync to version {version} failed on engine {engine}: {reason}")
        self.version, self.engine, self.reason = version, engine, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeightSyncError, (self.version, self.engine, self.reason))


CHECKSUM_CHUNK = 1 << 20
"""Elements per checksum step (an 8 MiB float64 buffer): larger steps cost less Python per byte."""

_RAMPS: dict[tuple[int, str], Any] = {}


def tensor_checksum(t: Any, chunk: int = CHECKSUM_CHUNK) -> float:
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

    def add(self, name: str, tensor: Any) -> None:
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


@dataclass
class Probe:
    """A fixed token sequence and the sender's log-probabilities of tokens 1..T-1 given their prefix."""

    token_ids: list[int]
    expected: list[float]
    atol: float = 1e-4


class WireBucket:
    """A bucket as it travels through the Ray object store: each tensor as a flat NumPy uint8 view of its
    bytes, which Ray serialises out of band (`ray.put` copies the bytes into the store once) and a reader
    gets back zero-copy, as a read-only view of the store's shared memory. A plain torch tensor would
    instead be pickled through `torch.save` and copied again on both sides."""

    __slots__ = ("items",)

    def __init__(self, bucket: Bucket) -> None:
        import torch

        self.items: list[tuple[str, Any, str, tuple[int, ...]]] = []
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


def unpack_bucket(obj: Any) -> Bucket:
    """A bucket from what `ray.get` returned: a `WireBucket`, or a plain bucket (list of name, tensor)."""
    return obj.unpack() if isinstance(obj, WireBucket) else obj


def put_bucket(bucket: Bucket) -> Any:
    """`ray.put` one bucket in wire form; returns the ObjectRef."""
    import ray

    return ray.put(WireBucket(bucket))


# ------------------------------------------------------------------------------------ the sender side


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


def iter_buckets(named_tensors: Iterable[tuple[str, Any]], bucket_mb: float = 64) -> Iterator[Bucket]:
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
    module: Any, bucket_mb: float = 64, gather: bool | None = None, copy: bool = True
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

    def numel(p: Any) -> int:
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


def put_buckets(buckets: Iterable[Bucket], manifest: SyncManifest | None = None) -> list[Any]:
    """Put each bucket into the Ray object store in wire form (adding its tensors to `manifest`); return
    the refs."""
    refs = []
    for b in buckets:
        if manifest is not None:
            for name, t in b:
                manifest.add(name, t)
        refs.append(put_bucket(b))
    return refs


def learner_weight_buckets(learner: Any, bucket_mb: float = 64) -> tuple[list[Any], SyncManifest] | None:
    """Run inside every learner actor (`learners.run(learner_weight_buckets, mb)`): all ranks take part in
    the ZeRO-3 gathers, rank 0 puts the buckets into the object store and returns (refs, manifest)."""
    zero3 = learner.cfg.learners.zero_stage == 3
    manifest = SyncManifest()
    refs = []
    for bucket in module_state_buckets(learner.engine.module, bucket_mb, gather=zero3, copy=False):
        if learner.rank == 0:
            refs.extend(put_buckets([bucket], manifest))
    return (refs, manifest) if learner.rank == 0 else None


def sync_from_learners(
    learners: Any,
    engines: Any,
    version: int,
    bucket_mb: float = 64,
    probe_ids: list[int] | None = None,
    atol: float = 1e-4,
) -> list[dict[str, Any]]:
    """Learner group -> RolloutGroup: buckets through the object store, checksums checked on every
    engine, and (with `probe_ids`) engine logprobs of that sequence checked against the learners'
    `token_logprobs`. Returns the engines' reports."""
    out = learners.run(learner_weight_buckets, bucket_mb)
    refs, manifest = next(o for o in out if o is not None)
    probe = learner_probe(learners, probe_ids, atol) if probe_ids is not None else None
    return engines.update_weights(version, refs, manifest, probe)


def learner_stream_buckets(learner: Any, queues: list[Any], bucket_mb: float = 64) -> SyncManifest | None:
    """Run inside every learner actor: rank 0 puts each bucket into the object store and its ref into
    every engine's queue as soon as it is gathered (a full queue blocks: at most `maxsize` buckets per
    engine in flight), then `None`; returns the manifest (rank 0)."""
    zero3 = learner.cfg.learners.zero_stage == 3
    manifest = SyncManifest()
    for bucket in module_state_buckets(learner.engine.module, bucket_mb, gather=zero3, copy=False):
        if learner.rank == 0:
            for name, t in bucket:
                manifest.add(name, t)
            ref = put_bucket(bucket)
            del bucket
            for q in queues:
                q.put([ref], block=True, timeout=STREAM_PUT_TIMEOUT_S)
    if learner.rank != 0:
        return None
    for q in queues:
        q.put(None, block=True, timeout=STREAM_PUT_TIMEOUT_S)
    return manifest


def stream_sync_from_learners(
    learners: Any,
    engines: Any,
    version: int,
    bucket_mb: float = 64,
    max_inflight: int = 2,
    probe_ids: list[int] | None = None,
    atol: float = 1e-4,
) -> list[dict[str, Any]]:
    """Pipelined variant of `sync_from_learners`: engines load bucket k while the learners gather bucket
    k+1, with at most `max_inflight` buckets queued per engine (bounded object-store use instead of a
    full copy of the model). Checksums and the probe are checked once the manifest is complete; until
    then the engines refuse to generate. The engines' queues (one small Ray actor each, about a second to
    start) are kept by the group for the next call, and dropped after any failure."""
    queues = engines.stream_queues(max_inflight)
    ok = False
    try:
        pending = engines.start_streamed_update(version, queues)
        out = learners.run(learner_stream_buckets, queues, bucket_mb)
        manifest = next(o for o in out if o is not None)
        probe = learner_probe(learners, probe_ids, atol) if probe_ids is not None else None
        reports = engines.finish_streamed_update(version, pending, manifest, probe)
        ok = True  # every engine read its queue through the end marker: the queues are empty
        return reports
    finally:
        if not ok:
            engines.discard_stream_queues()


PROBE_ATOL = {"float32": 1e-4, "bfloat16": 5e-2}
"""Default probe tolerance per dtype, on top of the kernel difference measured at calibration."""
PROBE_BASELINE_FACTOR = 2.0
"""Later syncs may differ from the learners by up to this × the calibrated difference (+ the atol)."""


def calibrate_probe(learners: Any, engines: Any, probe_ids: list[int], atol: float) -> tuple[float, float]:
    """(baseline, tolerance) of the probe for this run. Call while learners and engines hold the same
    weights (before any update or resume): their probe logprobs then differ only by their kernels (vLLM's
    and HF's bf16 kernels differ by more than any fixed float32 bound). A later sync passes when it
    differs by at most `atol + PROBE_BASELINE_FACTOR × baseline`; the checksums prove the bytes arrived.
    A baseline over 10 × atol means the engines serve another model or dtype: WeightSyncError."""
    expected = learner_probe(learners, probe_ids).expected
    served = engines.workers.call("prompt_logprobs", [probe_ids])
    baseline = max(
        max((abs(a - b) for a, b in zip(got[0], expected, strict=True)), default=0.0) for got in served
    )
    if not baseline <= 10 * atol:  # also catches NaN
        raise WeightSyncError(
            0,
            engines.workers.name,
            f"engines and learners differ by {baseline:.3g} on the same weights (> 10 × probe_atol "
            f"{atol:g}): they do not serve the same model or dtype",
        )
    return baseline, atol + PROBE_BASELINE_FACTOR * baseline


def learner_probe(learners: Any, probe_ids: list[int], atol: float = 1e-4) -> Probe:
    """A Probe whose expected logprobs are the learners' `token_logprobs` of `probe_ids` (all ranks run
    the forward, as ZeRO-3 needs)."""
    import torch

    ids = torch.tensor([probe_ids])
    lp = learners.call("token_logprobs", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
    return Probe(list(probe_ids), [float(x) for x in lp[0]], atol)


def sync_lora_from_learners(
    learners: Any,
    engines: Any,
    version: int,
    root: str,
    probe_ids: list[int] | None = None,
    atol: float = 1e-4,
) -> list[dict[str, Any]]:
    """Adapter-only sync for LoRA learners: the learners export the PEFT adapter to `root/v{version}`
    (a shared filesystem; the folder name makes vLLM load it afresh), engines started with
    `enable_lora=True` switch to it and (with `probe_ids`) prove their logprobs equal the learners'."""
    import os

    path = os.path.join(root, f"v{version}")
    learners.call("export", path, False)
    probe = learner_probe(learners, probe_ids, atol) if probe_ids is not None else None
    return engines.load_lora(version, path, probe)


# ------------------------------------------------------------------------------------------- metrics


def logprob_mismatch(
    engine_logprobs: Sequence[Sequence[float]] | Sequence[float],
    learner_logprobs: Sequence[Sequence[float]] | Sequence[float],
    mask: Sequence[Sequence[bool]] | Sequence[bool] | None = None,
) -> dict[str, float]:
    """Mean and max |engine - learner| over the tokens (flattened over samples; `mask` False skips a
    token, e.g. one the engine forced). Ragged per-sample lists are fine; their lengths must agree."""

    def flat(x: Any) -> list[Any]:
        x = x.tolist() if hasattr(x, "tolist") else list(x)
        x = [v.tolist() if hasattr(v, "tolist") else v for v in x]
        return [v for row in x for v in row] if x and isinstance(x[0], (list, tuple)) else x

    a, b = flat(engine_logprobs), flat(learner_logprobs)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} engine logprobs vs {len(b)} learner logprobs")
    m = flat(mask) if mask is not None else [True] * len(a)
    if len(m) != len(a):
        raise ValueError(f"mask has {len(m)} entries for {len(a)} tokens")
    diffs = [abs(float(x) - float(y)) for x, y, keep in zip(a, b, m, strict=True) if keep]
    if not diffs:
        return {"mean_abs": 0.0, "max_abs": 0.0, "tokens": 0.0}
    return {"mean_abs": sum(diffs) / len(diffs), "max_abs": max(diffs), "tokens": float(len(diffs))}
