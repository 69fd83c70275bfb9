"""Engine sizing, pure parts: the CPU KV cache is sized in bytes from what an engine runs (never a share
of one NUMA node's RAM), start failures get a hint naming the key to change, and tensor parallelism is
refused in config."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError, validate
from posttrain.rollout.engine import (
    CPU_KV_FLOOR_BYTES,
    cpu_kv_cache,
    kv_bytes_per_token,
    one_line_reason,
    start_hint,
)

QWEN3_06B = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}


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
