"""Colocated RL (`rollout.colocate`): learner rank i and engine i take turns on device i.

    colocation = start_colocated(cfg, cfg.rollout, run, model_path, is_vl, total_steps, "rollout")
    ...generate...                         # engines awake, learners' optimizer states in host memory
    turns = colocation.to_train()          # engines sleep → learners reload their optimizer states
    ...train...
    sync = colocation.to_generate(push)    # learners offload → wake weights → push (proved) → wake KV cache

Placement: one placement group with one bundle per pair (the learner's and the engine's CPUs, one GPU), each
actor asking for a fraction of the GPU, so Ray puts rank i and engine i on the same device.

Start order: the learners start and offload first, so the engines start in the memory state of every later
wake and their share is measured, not guessed (vLLM sizes its KV cache once, at start):

    share = (total - learner_used - headroom) / total,   headroom = max(1 GiB, 5 % of total)

`learner_used` is the device's used memory after the offload (weights, CUDA context, what the allocator
keeps); the headroom covers the engine process's own CUDA context (outside vLLM's accounting), the weight
sync's transient buffers and fragmentation. The share becomes vLLM's `gpu_memory_utilization`.

On the CPU the same calls run: DeepSpeed's `offload_states` moves host tensors to host memory (a no-op
copy) under ZeRO >= 1 and nothing under ZeRO-0, vLLM's CPU worker ignores sleep / wake while its scheduler
pauses and resumes, and the share is computed from the learner's RSS but unused (CPU KV caches are sized in
bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from posttrain.config import ConfigError, TrainingStage
from posttrain.groups import LearnerGroup
from posttrain.learner import ResidentMemory
from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.engine import GIB, RolloutGroup
from posttrain.rollout.episodes import start_policy_engines
from posttrain.stage import StageRun
from posttrain.workers import SharedPlacement, resolve_device

HEADROOM_MIN_BYTES = GIB
HEADROOM_FRACTION = 0.05
MIN_ENGINE_SHARE = 0.05
"""Below this share of the device an engine holds its weights and hardly any KV cache: refuse to start."""


class ColocationError(ConfigError):
    """The learner leaves too little of the device for its colocated engine."""


def engine_memory_share(learner_used: int, total: int) -> float:
    """The engine's share of a device of `total` bytes on which the learner keeps `learner_used` bytes
    while the engine is awake (see the module docstring), rounded down to 0.001."""
    headroom = max(HEADROOM_MIN_BYTES, HEADROOM_FRACTION * total)
    return int(1000 * (total - learner_used - headroom) / total) / 1000


def check_engine_share(share: float, learner_used: int, total: int) -> None:
    if share < MIN_ENGINE_SHARE:
        raise ColocationError(
            f"rollout.colocate: the learner keeps {learner_used / GIB:.1f} of {total / GIB:.1f} GiB resident "
            f"with its optimizer states offloaded, leaving the engine a share of {share:g} (< "
            f"{MIN_ENGINE_SHARE:g}): use learners.zero_stage 3 with more learners, model.lora, or a larger device"
        )


def colocated_bundle(cfg: TrainingStage, rollout: RolloutConfig, device: str) -> dict[str, float]:
    """The bundle of one learner-engine pair: both actors' CPUs and, on CUDA, one GPU (each actor asks
    for COLOCATED_GPU_SHARE of it)."""
    gpu = {"GPU": 1.0} if device == "cuda" else {}
    return {"CPU": cfg.learners.cpus_per_learner + rollout.cpus_per_engine, **gpu}


def colocated_placement(cfg: TrainingStage, rollout: RolloutConfig) -> SharedPlacement:
    bundle = colocated_bundle(cfg, rollout, resolve_device(cfg.device))
    return SharedPlacement("colocated", cfg.learners.num_learners, bundle, "rollout.colocate")


@dataclass
class Colocation:
    """The turns of colocated learners and engines: `to_train`, `to_generate`; each returns its phases'
    seconds and the learners' memory as `colocate/*` metrics."""

    learners: LearnerGroup
    engines: RolloutGroup
    sleep_level: int
    engine_share: float  # what start_colocated derived (vLLM ignores it on the CPU)

    def to_train(self) -> dict[str, float]:
        """Engines sleep (KV cache dropped, weights moved out or dropped), then learners reload."""
        sleep_s = self.engines.sleep(self.sleep_level)
        reloaded = self.learners.reload_states()
        return {
            "colocate/engine_share": self.engine_share,
            "colocate/sleep_s": sleep_s,
            "colocate/reload_s": max(r.seconds for r in reloaded),
            "colocate/learner_training_gib": _used_gib(reloaded),
        }

    def to_generate(self, sync: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Learners offload, engines wake their weights, `sync` pushes and proves the new version (its
        probe's prefill wakes the KV cache right after the load), then the KV cache wakes (if the probe
        has not): the sync's transient buffers never meet the KV cache on the device."""
        offloaded = self.learners.offload_states()
        wake_weights_s = self.engines.wake_up("weights")
        synced = sync()
        wake_kv_s = self.engines.wake_up("kv_cache")
        return {
            **synced,
            **offload_metrics(offloaded),
            "colocate/wake_weights_s": wake_weights_s,
            "colocate/wake_kv_s": wake_kv_s,
        }


def offload_metrics(offloaded: list[ResidentMemory]) -> dict[str, float]:
    return {
        "colocate/offload_s": max(r.seconds for r in offloaded),
        "colocate/offloaded_gib": sum(r.moved_bytes for r in offloaded) / GIB,
        "colocate/learner_resident_gib": _used_gib(offloaded),
    }


def _used_gib(memory: list[ResidentMemory]) -> float:
    return max(r.used_bytes for r in memory) / GIB


def start_colocated(
    cfg: TrainingStage,
    rollout: RolloutConfig,
    run: StageRun,
    model_path: str,
    is_vl: bool,
    total_steps: int,
    name: str,
) -> Colocation:
    """Placement, then the learners (offloaded at once), then the engines with the share the learners
    leave them, awake: the first generation follows. Everything is owned by `run`, the placement group
    removed last."""
    placement = run.own(colocated_placement(cfg, rollout))
    learners = run.learners(model_path, is_vl, total_steps, placement)
    offloaded = learners.offload_states()
    used, total = max(r.used_bytes for r in offloaded), min(r.total_bytes for r in offloaded)
    share = engine_memory_share(used, total)
    gpu = resolve_device(cfg.device) == "cuda"
    if gpu:
        check_engine_share(share, used, total)
    engines = run.own(
        start_policy_engines(
            cfg, rollout, model_path, is_vl, name, placement=placement, memory_share=share if gpu else None
        )
    )
    return Colocation(learners, engines, rollout.sleep_level, share)
