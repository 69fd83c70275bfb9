"""Helpers shared by test modules of more than one tier (tests/ is on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from posttrain.config import SFTConfig, validate


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a `posttrain` command line; it must exit 0 (the end of its stderr is the failure message)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def sft_config(tmp_path: Path, model: Path, **model_changes: Any) -> SFTConfig:
    """A one-step SFT config on a generated arithmetic task, two learners, `model` with `model_changes`."""
    task = {
        "path": str(tmp_path / "arithmetic"),
        "build": {"builder": "arithmetic", "args": {"train_size": 24}},
    }
    return validate(
        "sft",
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"path": str(model), **model_changes},
            "data": {"train": [task], "max_length": 200},
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 1},
            "learners": {"num_learners": 2},
        },
    )
