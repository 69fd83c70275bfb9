"""The optimizer wrapper DeepSpeed picks for bf16, checked on CPU with a real one-rank learner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import sft_config

BF16_LEARNER = """
import json, os, sys
import torch
from posttrain.config import validate
from posttrain.learner import Learner
from posttrain.objectives import NLL, Norms

cfg = validate("sft", json.loads(sys.argv[1]))
learner = Learner("sft", cfg.model_dump(mode="json"), cfg.model.path, False, 1)
opt = learner.engine.optimizer
batch = {"input_ids": torch.arange(32).view(2, 16) % 300, "labels": torch.arange(32).view(2, 16) % 300}
stats = learner.step([batch, batch], Norms(tokens=60), NLL())
print(json.dumps({
    "wrapper": type(opt).__name__,
    "zero_stage": learner.engine.zero_optimization_stage(),
    "accumulation": [str(learner.engine.get_data_types()[1]), str(opt.grad_acc_dtype)],
    "buffers": sorted({str(b.dtype) for b in opt.fp32_groups_gradients_flat}),
    "grad_norm": stats.grad_norm,
}))
sys.stdout.flush()
os._exit(0)  # skip torch's gloo teardown (see shared notes)
"""


def test_bf16_without_zero_accumulates_gradients_in_fp32(tmp_path: Path, tiny_text_model: Path) -> None:
    """DeepSpeed 0.19.8 would wrap a bf16 ZeRO-0 torch optimizer in FP16_UnfusedOptimizer (bf16
    accumulation); the learner asks for ZeRO-1 with fp32 accumulation, which one rank runs as BF16_Optimizer."""
    cfg = sft_config(tmp_path, tiny_text_model, dtype="bfloat16")
    raw = cfg.model_dump(mode="json") | {"learners": {"num_learners": 1, "zero_stage": 0}}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
    env |= {"MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    out = subprocess.run(
        [sys.executable, "-c", BF16_LEARNER, json.dumps(raw)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    chosen = json.loads(out.stdout.strip().splitlines()[-1])
    assert chosen["wrapper"] == "BF16_Optimizer" and chosen["zero_stage"] == 1
    assert chosen["accumulation"] == ["torch.float32", "torch.float32"]
    assert chosen["buffers"] == ["torch.float32"] and chosen["grad_norm"] > 0
