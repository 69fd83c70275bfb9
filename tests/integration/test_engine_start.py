"""Engine start on Ray: an engine starts with a tiny node share, an engine that cannot start ends the run
with one named error, and a placement the cluster can never satisfy fails at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.rollout.engine import (
    CPU_KV_FLOOR_BYTES,
    kv_bytes_per_token,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from posttrain.workers import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def _group(model: Path, **kwargs):
    from posttrain.rollout import RolloutGroup

    return RolloutGroup(str(model), 1, num_cpus=0.5, max_model_len=256, seed=0, **kwargs)


def test_engine_starts_with_a_tiny_node_share(ray_cluster, tiny_text_model: Path) -> None:
    """0.001 of a node (~24 MB) is below the engine's own RSS: vLLM's share-based sizing would refuse,
    as it did on two 12 GB NUMA nodes at 0.05. The byte budget makes the fraction irrelevant on CPU."""
    from posttrain.rollout import RolloutRequest

    group = _group(tiny_text_model, gpu_memory_utilization=0.001, max_num_seqs=64)
    try:
        info = group.infos[0]
        per_token = kv_bytes_per_token(json.loads((tiny_text_model / "config.json").read_text()), "float32")
        assert (info["kv_cache_bytes"], info["max_num_seqs"]) == (
            max(CPU_KV_FLOOR_BYTES, 64 * 256 * per_token),
            64,
        )
        out = group.generate([RolloutRequest([1, 2, 3], n=4, max_tokens=8, seed=0, ignore_eos=True)])
        assert [len(s.token_ids) for s in out[0].samples] == [8] * 4
    finally:
        group.shutdown()


def _head_dim_16(model: Path, tmp_path: Path) -> Path:
    """The tiny model rebuilt with head_dim 16 (random weights, same tokenizer): vLLM's CPU attention
    refuses it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    bad = tmp_path / "head16"
    shutil.copytree(model, bad)
    config = AutoConfig.from_pretrained(bad)
    config.head_dim = 16
    AutoModelForCausalLM.from_config(config).save_pretrained(bad)
    return bad


def test_engine_start_failures_are_one_named_error(
    ray_cluster, tiny_text_model: Path, tmp_path: Path
) -> None:
    import ray

    from posttrain.rollout import EngineStartError

    cases = [
        (tmp_path / "missing", {}, "not a local folder", "check teacher.path"),
        (tiny_text_model, {"kv_cache_gib": 4096.0}, "Available memory on node", "set teacher.kv_cache_gib"),
        (
            _head_dim_16(tiny_text_model, tmp_path),
            {},
            "head_dim 16 is not supported",
            "takes head_dim 32, 64",
        ),
        (tiny_text_model, {"start_timeout_s": 0.5}, "not started within 0.5 s", "teacher.start_timeout_s"),
    ]
    for model, options, reason, hint in cases:
        t0 = time.perf_counter()
        with pytest.raises(EngineStartError) as err:
            _group(model, name="teacher", config_key="teacher", model_key="teacher.path", **options)
        message = str(err.value)
        assert message.startswith(f"teacher engines (model {model}) could not start: "), message
        assert reason in message and hint in message and "\n" not in message, message
        assert time.perf_counter() - t0 < 120
        assert not ray.util.placement_group_table() or all(
            pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
        )


def test_impossible_placement_fails_at_once(ray_cluster) -> None:
    from posttrain.workers import PlacementError, WorkerGroup

    t0 = time.perf_counter()
    with pytest.raises(PlacementError, match=r"needs 2 GPU but the Ray cluster has 0 GPU; lower the rollout"):
        WorkerGroup(object, 2, num_cpus=0.5, num_gpus=1, name="rollout", config_key="rollout")
    assert time.perf_counter() - t0 < 5


def test_cli_engine_failure_exits_2_without_a_traceback(tiny_text_model: Path, tmp_path: Path) -> None:
    from posttrain.synthetic.tasks import TinyTask, write_task

    data = tmp_path / "arithmetic"
    write_task(data, TinyTask(train_size=16, test_size=4))
    cmd = [sys.executable, "-m", "posttrain", "rl", str(ROOT / "configs/tiny/rl.yaml"), f"output_dir={tmp_path / 'out'}",
           f"model.path={tiny_text_model}", "init_from_sft=null", f"data.prompts.0.path={data}", "data.eval=null",
           "rollout.kv_cache_gib=4096", "logging.progress=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("posttrain rl: error: rollout engines (model "), last
    assert "rollout.kv_cache_gib" in last and "Traceback" not in proc.stderr, proc.stderr[-3000:]
