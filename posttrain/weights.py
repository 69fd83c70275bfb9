"""Model weights as buckets of whole tensors with HF names, and the digests that prove a weight sync.

A (possibly ZeRO-3 partitioned, possibly DeepSpeed- or PEFT-wrapped) module becomes buckets of about
`bucket_mb` (a larger tensor is a bucket of its own; q/k/v and gate/up stay together), gathering one
bucket's parameters at a time. Each tensor's digest goes into a `SyncManifest` the receiver compares
against: xxh3-64 of its bytes for buckets in host memory (shm), `device_digest_parts` for buckets that stay
on the GPU (ipc, nccl), computed with torch integer ops on the tensor's own device, equal on CPU and CUDA.
How buckets travel: posttrain.weight_transfer; the receiving side (engines, probes, strategies):
posttrain.rollout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

Bucket = list[tuple[str, "torch.Tensor"]]
"""A list of (HF parameter name, tensor): on the CPU, or on the learner's device for ipc / nccl."""
DIGEST_PRIME = 2**31 - 1
DIGEST_ROW = 2**15
"""Values summed per row: 16-bit values × weights below DIGEST_PRIME, 2**15 of them, stay below 2**62, so
no int64 ever overflows and every device computes the same integers."""
DIGEST_SLICE_ROWS = 128
"""Rows per pass over a large tensor: bounds the int64 temporaries (4M values × 2 weight sequences)."""
DIGEST_MULTIPLIERS = (48271, 39373)
"""Two position-weight sequences, w_i = 1 + (i × m + 1) mod (P - 1): distinct nonzero weights within a row
(m is coprime to P - 1), so a flipped bit or two swapped values always change a row's sum mod P."""
GOLDEN_64 = 0x9E3779B97F4A7C15  # mixes the byte count into the digest


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 array (shared memory, no copy)."""
    import torch

    return t.detach().reshape(-1).view(torch.uint8).numpy()


def tensor_digest(t: torch.Tensor) -> int:
    """xxh3-64 of a contiguous CPU tensor's bytes: ~14 GB/s on one core, and it releases the GIL, so a
    second thread computes it while the first copies."""
    import xxhash

    return int(xxhash.xxh3_64_intdigest(tensor_bytes(t).data))


def bucket_digests(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [tensor_digest(t) for t in tensors]


def _digest_weights(device: torch.device) -> torch.Tensor:
    """[DIGEST_ROW, 2] int64: the two position-weight sequences."""
    import torch

    i = torch.arange(DIGEST_ROW, dtype=torch.int64, device=device).unsqueeze(1)
    m = torch.tensor(DIGEST_MULTIPLIERS, dtype=torch.int64, device=device)
    return 1 + (i * m + 1) % (DIGEST_PRIME - 1)


def _fold(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[n] or [n, 2] values in [0, 2**16) -> [ceil(n / DIGEST_ROW), 2] weighted row sums mod DIGEST_PRIME
    (a [n] input feeds both sequences)."""
    import torch

    pad = -values.shape[0] % DIGEST_ROW
    if pad:
        values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    rows = values.view(-1, DIGEST_ROW, *values.shape[1:])
    if rows.dim() == 2:
        rows = rows.unsqueeze(-1)
    return (rows * weights).sum(1) % DIGEST_PRIME


def _halves(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as 16-bit words (int16; an odd byte count gets a zero byte)."""
    import torch

    flat = t.detach().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # a strided view (even of one element) cannot be reinterpreted
        flat = flat.clone(memory_format=torch.contiguous_format)
    raw = flat.view(torch.uint8)
    if raw.numel() % 2:
        raw = torch.cat([raw, raw.new_zeros(1)])
    if raw.storage_offset() % 2:  # a view at an odd byte offset cannot be reinterpreted as int16
        raw = raw.clone()
    return raw.view(torch.int16)


def device_digest_parts(t: torch.Tensor) -> torch.Tensor:
    """Two 31-bit checksums of `t`'s bytes as an int64 [2] on `t`'s device, without a host sync (queue a
    bucket's, then read them together with `device_digests`). Each level folds 16-bit words into weighted
    row sums mod a prime; the sums (split into 16-bit halves) are folded again until one row remains.
    Exact integer arithmetic: the same on every device and in any reduction order."""
    import torch

    weights = _digest_weights(t.device)
    words = _halves(t)
    size = DIGEST_ROW * DIGEST_SLICE_ROWS
    sums = [
        _fold(words[i : i + size].to(torch.int64) & 0xFFFF, weights) for i in range(0, words.numel(), size)
    ]
    if not sums:
        return torch.zeros(2, dtype=torch.int64, device=t.device)
    level = torch.cat(sums)
    while level.shape[0] > 1:
        level = _fold(torch.stack([level & 0xFFFF, level >> 16], 1).reshape(-1, 2), weights)
    return level[0]


def device_digests(parts: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[int]:
    """The 64-bit digests of tensors of `sizes` bytes whose `device_digest_parts` are `parts` (one host
    sync for all of them)."""
    import torch

    if not parts:
        return []
    pairs = torch.stack(list(parts)).tolist()
    return [((a << 31) | b) ^ (n * GOLDEN_64 % 2**64) for (a, b), n in zip(pairs, sizes, strict=True)]


def device_digest(t: torch.Tensor) -> int:
    return device_digests([device_digest_parts(t)], [nbytes(t)])[0]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class SyncManifest:
    """What the sender holds: per tensor sent, its digest; per tensor not sent (frozen), the digest the
    engine must already hold from an earlier verified sync; and the bytes sent."""

    checksums: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0

    def add(self, name: str, digest: int, size: int) -> None:
        self.checksums[name] = digest
        self.nbytes += size

    @property
    def checksum(self) -> int:
        """One number for the whole sync (sum of the digests, mod 2**64)."""
        return sum(self.checksums.values()) % 2**64

    def compare(self, received: dict[str, int], held: dict[str, int] | None = None) -> str | None:
        """None when `received` (name -> digest of what arrived) is exactly what was sent and `held` (what
        the engine verified earlier) has every unsent tensor's digest, else the first problems."""
        missing = sorted(set(self.checksums) - set(received))
        extra = sorted(set(received) - set(self.checksums))
        bad = [n for n, c in self.checksums.items() if n in received and received[n] != c]
        have = held or {}
        stale = [n for n, c in self.held.items() if have.get(n) != c]
        parts = []
        if bad:
            n = bad[0]
            parts.append(
                f"checksum mismatch on {len(bad)} tensor(s), e.g. {n}: {received[n]:#x} != {self.checksums[n]:#x}"
            )
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if stale:
            parts.append(
                f"{len(stale)} unsent (frozen) tensor(s) not held from an earlier verified sync, e.g. {stale[0]}"
            )
        return "; ".join(parts) or None


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


def plan_buckets(names: list[str], sizes: list[int], bucket_mb: float) -> list[list[int]]:
    """Indices of (name, size in bytes) chunked into buckets of about `bucket_mb` MB, whole groups each."""
    limit = bucket_mb * 2**20
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for group in _param_groups(names):
        gbytes = sum(sizes[i] for i in group)
        if current and size + gbytes > limit:
            buckets.append(current)
            current, size = [], 0
        current.extend(group)
        size += gbytes
    if current:
        buckets.append(current)
    return buckets


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: float = 64
) -> Iterator[Bucket]:
    """Chunk (name, tensor) pairs into buckets of about `bucket_mb` MB (contiguous CPU tensors, detached)."""
    pairs = [(n, t.detach().to("cpu").contiguous()) for n, t in named_tensors]
    for idx in plan_buckets([n for n, _ in pairs], [nbytes(t) for _, t in pairs], bucket_mb):
        yield [pairs[i] for i in idx]


def _hf_name(name: str) -> str:
    """A PEFT-wrapped or DeepSpeed-wrapped name back to the plain HF one."""
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


@dataclass
class ModuleBuckets:
    """A module's weights as a bucket plan: the HF names in order, the byte size of each bucket's tensors
    (known before any is gathered), and the buckets themselves when iterated. Frozen parameters (requires_grad False) are left out unless
    `include_frozen`; `frozen` names them either way."""

    module: torch.nn.Module
    bucket_mb: float
    gather: bool
    include_frozen: bool = True
    on_device: bool = False
    """Buckets stay where the parameters live (ipc / nccl send from the GPU); else they are CPU tensors."""
    names: list[str] = field(init=False)
    frozen: set[str] = field(init=False)
    plan: list[list[int]] = field(init=False)
    sizes: list[list[int]] = field(init=False)
    _params: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        named = list(self.module.named_parameters(remove_duplicate=False))
        if any(".lora_" in n for n, _ in named):
            raise ValueError(
                "module has LoRA adapters: sync the adapter with sync_lora_from_learners (engines with "
                "enable_lora=True), or merge it first; base weights alone would serve the wrong policy"
            )
        self.frozen = {_hf_name(n) for n, p in named if not p.requires_grad}
        kept = [(n, p) for n, p in named if self.include_frozen or p.requires_grad]
        self.names = [_hf_name(n) for n, _ in kept]
        self._params = [p for _, p in kept]
        sizes = [int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in self._params]
        self.plan = plan_buckets(self.names, sizes, self.bucket_mb)
        self.sizes = [[sizes[i] for i in idx] for idx in self.plan]

    def metadata(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, full shape) of every tensor iteration yields, in order, without gathering."""
        return [
            (n, p.dtype, tuple(getattr(p, "ds_shape", p.shape)))
            for n, p in zip(self.names, self._params, strict=True)
        ]

    def __iter__(self) -> Iterator[Bucket]:
        """Each bucket's tensors, gathered under ZeRO-3 (`gather`: every rank must iterate, the gathers are
        collective) and released before the next, so peak memory is one bucket, not the model. Tensors that
        are already whole contiguous tensors where they go are views of the live parameters (use each
        bucket before the parameters change); gathered CPU ones are copies, gathered device ones hold the
        gathered storage until dropped. Tied parameters are listed under each name (vLLM needs
        `lm_head.weight` with tied embeddings)."""
        import contextlib

        import torch

        for idx in self.plan:
            params = [self._params[i] for i in idx]
            if self.gather:
                import deepspeed

                ctx: Any = deepspeed.zero.GatheredParameters(params, enabled=True)
            else:
                ctx = contextlib.nullcontext()
            with ctx, torch.no_grad():
                yield [(self.names[i], self._tensor(p)) for i, p in zip(idx, params, strict=True)]

    def _tensor(self, p: torch.Tensor) -> torch.Tensor:
        t = p.detach()
        return t.contiguous() if self.on_device else t.to("cpu", copy=self.gather).contiguous()
