"""`rollout.colocate`: its config rules, the placement of a learner-engine pair and the engine's memory
share (the runs themselves: tests/integration/test_rl.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import ConfigError, load_config
from posttrain.rollout.colocate import (
    ColocationError,
    check_engine_share,
    colocated_bundle,
    engine_memory_share,
)
from posttrain.workers import COLOCATED_GPU_SHARE

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30
COLOCATED = ["rollout.colocate=true", "learners.zero_stage=1"]


def rl(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config("rl", ROOT / "configs/tiny/rl.yaml", list(overrides))


def test_memory_share_is_the_device_minus_the_learner_minus_headroom() -> None:
    # 80 GiB device, 5 GiB resident: headroom 5 % (4 GiB) > 1 GiB → (80 - 5 - 4) / 80 = 0.8875 → 0.887
    assert engine_memory_share(5 * GIB, 80 * GIB) == 0.887
    # 16 GiB device, 2 GiB resident: headroom 1 GiB (5 % is 0.8) → 13 / 16 = 0.8125 → 0.812
    assert engine_memory_share(2 * GIB, 16 * GIB) == 0.812
    assert engine_memory_share(15 * GIB, 16 * GIB) == 0.0


def test_a_learner_that_leaves_no_room_is_refused_naming_the_key() -> None:
    check_engine_share(0.5, 8 * GIB, 16 * GIB)
    with pytest.raises(ColocationError, match=r"rollout\.colocate.*15\.0 of 16\.0 GiB"):
        check_engine_share(engine_memory_share(15 * GIB, 16 * GIB), 15 * GIB, 16 * GIB)


def test_a_pair_shares_one_bundle_and_one_gpu() -> None:
    cfg = rl(*COLOCATED, "learners.cpus_per_learner=2", "rollout.cpus_per_engine=1")
    assert colocated_bundle(cfg, cfg.rollout, "cuda") == {"CPU": 3, "GPU": 1.0}
    assert colocated_bundle(cfg, cfg.rollout, "cpu") == {"CPU": 3}  # CPU bundles: no GPU key
    assert 2 * COLOCATED_GPU_SHARE <= 1  # learner and engine fit the bundle's GPU


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learners.num_learners=2", "train.micro_batch_size=8"], r"rollout\.num_engines \(1\) must equal"),
        (["train.async_rollout=true"], r"train\.async_rollout"),
        (["rollout.gpu_memory_utilization=0.5"], r"rollout\.gpu_memory_utilization is derived"),
        (["algorithm.kl_coef=0.1"], r"algorithm\.kl_coef"),
        (["model.lora={r: 8}", "rollout.sleep_level=2"], r"rollout\.sleep_level: 1 with model\.lora"),
        (["device=cuda", "learners.zero_stage=0"], r"learners\.zero_stage >= 1"),
        (["device=cuda", "model.dtype=bfloat16"], r"learners\.zero_stage >= 2 \(with bfloat16"),
    ],
)
def test_incompatible_settings_are_rejected_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rl(*COLOCATED, *overrides)


def test_valid_colocated_configs() -> None:
    assert rl(*COLOCATED).rollout.colocate
    assert rl("rollout.colocate=true", "learners.zero_stage=0").learners.zero_stage == 0  # CPU: no offload
    assert rl(*COLOCATED, "model.lora={r: 8}", "algorithm.kl_coef=0.1").algorithm.kl_coef == 0.1
    assert rl(
        *COLOCATED, "device=cuda", "model.dtype=bfloat16", "learners.zero_stage=2", "rollout.sleep_level=2"
    )


def test_on_policy_distillation_rejects_colocate() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.colocate is supported by `posttrain rl` only"):
        load_config("distill", ROOT / "configs/tiny/distill.yaml", ["rollout.colocate=true"])


@pytest.mark.parametrize("recipe", ["qwen3/0.6b/rl_grpo_1gpu.yaml", "qwen3-vl/2b/rl_grounding_1gpu.yaml"])
def test_one_gpu_recipes_colocate_one_pair(recipe: str) -> None:
    cfg = load_config("rl", ROOT / "configs" / recipe)
    assert cfg.rollout.colocate and cfg.rollout.num_engines == cfg.learners.num_learners == 1
    assert cfg.device == "auto" and cfg.learners.zero_stage >= 2  # validated for CUDA with bfloat16
