"""Learner -> rollout-engine weight sync: the strategies, their proof, and the logprob mismatch metric.

Full weights go through vLLM's weight-transfer API with the backend the engines started with (`shm`, see
posttrain.weight_transfer): the learners' sender drives every engine's update, bucket by bucket, and
returns the manifest of what it sent. One strategy per run, chosen once by `WeightSync.for_run`:

    bulk     sync_from_learners: shared memory holds every bucket, the learners never wait
    stream   stream_sync_from_learners: a ring of `max_inflight` buckets (bounded memory, one more copy)
    adapter  sync_lora_from_learners: LoRA learners export the adapter only

Frozen parameters (a frozen vision tower) are sent with the first push, after a failed one and after a
sleep that dropped the weights (`RolloutGroup.frozen_held`) only; the manifest then names them with their
digests, which each engine must hold from an earlier verified sync.
Each push ends with every engine proving the version: received digests == the learners' manifest, and
the engine's prompt logprobs of the probe sequence == the learners' (within the calibrated tolerance); any
failure or timeout raises WeightSyncError(version, engine, reason), and an engine whose weights were
touched by a failed sync refuses to generate until a sync succeeds."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posttrain.weight_transfer import WeightSyncError  # defined with the sender (core), which raises it too

if TYPE_CHECKING:
    from posttrain.groups import LearnerGroup
    from posttrain.rollout.engine import RolloutGroup, SyncReport

log = logging.getLogger("posttrain.rollout")

SyncStrategy = Literal["bulk", "stream", "adapter"]


@dataclass
class Probe:
    """A fixed token sequence and the sender's log-probabilities of tokens 1..T-1 given their prefix."""

    token_ids: list[int]
    expected: list[float]
    atol: float = 1e-4


def sync_from_learners(
    learners: LearnerGroup,
    engines: RolloutGroup,
    version: int,
    bucket_mb: float = 64,
    probe_ids: list[int] | None = None,
    atol: float = 1e-4,
    slots: int | None = None,
    include_frozen: bool = True,
) -> list[SyncReport]:
    """Learner group -> RolloutGroup through the engines' weight-transfer backend: `slots` buckets in
    flight (None: all), frozen parameters only with `include_frozen`; then every engine checks the
    digests and (with `probe_ids`) its logprobs of that sequence against the learners'. Returns the
    engines' reports."""
    client = engines.transfer_client(version)
    manifest = learners.send_weights(client, bucket_mb, slots, include_frozen)
    probe = learner_probe(learners, probe_ids, atol) if probe_ids is not None else None
    return engines.verify(version, manifest, probe)


def stream_sync_from_learners(
    learners: LearnerGroup,
    engines: RolloutGroup,
    version: int,
    bucket_mb: float = 64,
    max_inflight: int = 2,
    probe_ids: list[int] | None = None,
    atol: float = 1e-4,
    include_frozen: bool = True,
) -> list[SyncReport]:
    """`sync_from_learners` through a ring of `max_inflight` buckets: the engines load bucket k while the
    learners gather and copy bucket k+1, and shared memory holds `max_inflight` buckets, not the model (the
    engines copy each bucket out of its slot, as vLLM may keep a layer's tensors until the update ends)."""
    return sync_from_learners(
        learners, engines, version, bucket_mb, probe_ids, atol, max_inflight, include_frozen
    )


def sync_lora_from_learners(
    learners: LearnerGroup,
    engines: RolloutGroup,
    version: int,
    root: str,
    probe_ids: list[int] | None = None,
    atol: float = 1e-4,
) -> list[SyncReport]:
    """Adapter-only sync for LoRA learners: the learners export the PEFT adapter to `root/v{version}`
    (a shared filesystem; the folder name makes vLLM load it afresh), engines started with
    `enable_lora=True` switch to it and (with `probe_ids`) prove their logprobs equal the learners'."""
    path = str(Path(root) / f"v{version}")
    learners.export(path, merge_lora=False)
    probe = learner_probe(learners, probe_ids, atol) if probe_ids is not None else None
    return engines.load_lora(version, path, probe)


def learner_probe(learners: LearnerGroup, probe_ids: list[int], atol: float = 1e-4) -> Probe:
    """A Probe whose expected logprobs are the learners' of `probe_ids` (all ranks run the forward, as
    ZeRO-3 needs)."""
    return Probe(list(probe_ids), learners.sequence_logprobs(probe_ids), atol)


STREAM_SLOTS = 2
"""`stream`: buckets in flight per sync (one loading while the next is copied)."""
PROBE_ATOL = {"float32": 1e-4, "bfloat16": 5e-2}
"""Default probe tolerance per dtype, on top of the kernel difference measured at calibration."""
PROBE_BASELINE_FACTOR = 2.0
"""Later syncs may differ from the learners by up to this × the calibrated difference (+ the atol)."""
PROBE_TEXT = "The weights changed: 12+34=46, 7+8=15."


def probe_ids(tokenizer: Any) -> list[int]:
    """A fixed text sequence whose logprobs engines and learners must agree on after every sync."""
    ids: list[int] = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return ids


def calibrate_probe(
    learners: LearnerGroup, engines: RolloutGroup, probe_ids: list[int], atol: float
) -> tuple[float, float]:
    """(baseline, tolerance) of the probe for this run. Call while learners and engines hold the same
    weights (before any update or resume): their probe logprobs then differ only by their kernels (vLLM's
    and HF's bf16 kernels differ by more than any fixed float32 bound). A later sync passes when it
    differs by at most `atol + PROBE_BASELINE_FACTOR × baseline`; the checksums prove the bytes arrived.
    A baseline over 10 × atol means the engines serve another model or dtype: WeightSyncError."""
    expected = learners.sequence_logprobs(probe_ids)
    served = engines.prompt_logprobs_each([probe_ids])
    baseline = max(
        max((abs(a - b) for a, b in zip(got[0], expected, strict=True)), default=0.0) for got in served
    )
    if not baseline <= 10 * atol:  # also catches NaN
        raise WeightSyncError(
            0,
            engines.name,
            f"engines and learners differ by {baseline:.3g} on the same weights (> 10 × probe_atol "
            f"{atol:g}): they do not serve the same model or dtype",
        )
    return baseline, atol + PROBE_BASELINE_FACTOR * baseline


@dataclass
class WeightSync:
    """How one run's learners push their weights to its engines: one strategy, chosen once, every push
    proved by checksums and the calibrated probe. `version` is the version the engines serve."""

    learners: LearnerGroup
    engines: RolloutGroup
    strategy: SyncStrategy
    probe_ids: list[int]
    atol: float
    bucket_mb: float = 64
    adapters_dir: Path | None = None  # adapter: where each version's adapter is written
    version: int = 0

    @classmethod
    def for_run(
        cls,
        learners: LearnerGroup,
        engines: RolloutGroup,
        strategy: SyncStrategy,
        tokenizer: Any,
        atol: float,
        bucket_mb: float,
        adapters_dir: Path,
    ) -> WeightSync:
        """Calibrated on the starting weights (call before any update or resume): `atol` is the
        configured probe tolerance, to which the measured learner-vs-engine kernel difference adds."""
        ids = probe_ids(tokenizer)
        baseline, tolerance = calibrate_probe(learners, engines, ids, atol)
        log.info("weight-sync probe: %.3g on the starting weights, tolerance %.3g", baseline, tolerance)
        return cls(learners, engines, strategy, ids, tolerance, bucket_mb, adapters_dir)

    def push(self, version: int) -> dict[str, float]:
        """The learners' weights to every engine as `version`, or WeightSyncError."""
        t0 = time.perf_counter()
        args = (self.learners, self.engines, version)
        if self.strategy == "adapter":
            assert self.adapters_dir is not None
            reports = sync_lora_from_learners(*args, str(self.adapters_dir), self.probe_ids, self.atol)
            _prune_adapters(self.adapters_dir, version)
        else:
            slots = STREAM_SLOTS if self.strategy == "stream" else None
            frozen = not self.engines.frozen_held
            reports = sync_from_learners(
                *args, self.bucket_mb, self.probe_ids, self.atol, slots, include_frozen=frozen
            )
        self.version = version
        return {
            "sync/seconds": time.perf_counter() - t0,
            "sync/version": float(version),
            "sync/probe_max_abs": max(float(r.get("probe_max_abs") or 0.0) for r in reports),
        }


def _prune_adapters(root: Path, version: int) -> None:
    """Engines serve the newest adapter; older folders (but the previous, in case of a retry) go."""
    for folder in root.glob("v*"):
        if folder.name[1:].isdigit() and int(folder.name[1:]) < version - 1:
            shutil.rmtree(folder, ignore_errors=True)


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
