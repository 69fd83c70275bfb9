"""Engine sizing and start: the CPU KV cache is sized in bytes from what an engine runs (never a share of
one NUMA node's RAM), an engine that cannot start ends the run with one named error, and a placement the
cluster can never satisfy fails at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.config import ConfigError, validate
from posttrain.rollout.engine import (
    CPU_KV_FLOOR_BYTES,
    cpu_kv_cache,
    kv_bytes_per_token,
    one_line_reason,
    start_hint,
)

ROOT = Path(__file__).resolve().parents[1]
QWEN3_06B = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}


# ----------------------------------------------------------------------------------------- pure parts


def test_kv_bytes_per_token_of_real_and_tiny_shapes() -> None:
    assert kv_bytes_per_token(QWEN3_06B, "bfloat16") == 2 * 28 * 8 * 128 * 2 == 114_688
    assert kv_bytes_per_token(QWEN3_06B, "float32") == 229_376
    vl = {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 128}}
    assert kv_bytes_per_token(vl, "float32") == 2 * 2 * 4 * 32 * 4  # no kv heads / head_dim: derived


def test_cpu_kv_cache_sized_by_sequences_not_ram() -> None:
    # 256 sequences of 300 tokens hold 3 blocks of 128 tokens each, at 2 KiB a token
    assert cpu_kv_cache(2048, 300, 256) == (256 * 384 * 2048, 256)
    assert cpu_kv_cache(2048, 128, 1) == (CPU_KV_FLOOR_BYTES, 1)  # the floor
    # an explicit budget shrinks the sequences at once to what fits, so vLLM never preempts
    assert cpu_kv_cache(2048, 256, 256, kv_cache_gib=0.25) == (1 << 28, 256)
    assert cpu_kv_cache(2048, 256, 256, kv_cache_gib=1 / 1024) == (1 << 20, 2)
    with pytest.raises(ValueError, match="less than one sequence of max_model_len=1024"):
        cpu_kv_cache(229_376, 1024, 8, kv_cache_gib=0.1)


def test_start_hints_name_the_key_to_change() -> None:
    memory = "ValueError: Available memory on node 0 (1.0/11.8 GiB) on kv cache allocation is less than"
    assert start_hint(memory, "teacher", "teacher.path") == (
        "lower teacher.max_num_seqs or teacher.max_model_len, or set teacher.kv_cache_gib"
    )
    assert "head_dim 32, 64" in start_hint(
        "ValueError: head_dim 16 is not supported", "rollout", "model.path"
    )
    assert start_hint("FileNotFoundError: x is not a local folder", "rollout", "model.path").startswith(
        "check model.path"
    )
    try:
        try:
            raise ValueError("the root\ncause")
        except ValueError as e:
            raise RuntimeError("Engine core initialization failed") from e
    except RuntimeError as wrapped:
        assert one_line_reason(wrapped) == "ValueError: the root cause"


def test_tensor_parallel_engines_rejected_in_config() -> None:
    raw = {
        "output_dir": "x",
        "model": {"path": "m"},
        "data": {"prompts": [{"path": "p"}]},
        "rewards": {"rewards": ["think_format"]},
    }
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 is not supported yet"):
        validate("rl", {**raw, "rollout": {"tensor_parallel_size": 2}})
    cfg = validate("rl", {**raw, "rollout": {"kv_cache_gib": 0.5, "max_num_seqs": 32}})
    assert cfg.rollout.group_kwargs() == {
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": None,
        "kv_cache_gib": 0.5,
        "max_num_seqs": 32,
        "start_timeout_s": 600,
    }


# ---------------------------------------------------------------------------------- real engines (Ray)


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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_impossible_placement_fails_at_once(ray_cluster) -> None:
    from posttrain.workers import PlacementError, WorkerGroup

    t0 = time.perf_counter()
    with pytest.raises(PlacementError, match=r"needs 2 GPU but the Ray cluster has 0 GPU; lower the rollout"):
        WorkerGroup(object, 2, num_cpus=0.5, num_gpus=1, name="rollout", config_key="rollout")
    assert time.perf_counter() - t0 < 5


@pytest.mark.integration
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
