"""The GPU smoke script must not rot while no GPU is lent: its `--cpu` run goes through every phase on the CPU,
and each ends ok or skipped (never an error), with sensible figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"ok", "skipped"}


def test_cpu_smoke_run_records_every_phase(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench/gpu_smoke.py"), "--cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads((tmp_path / "gpu_smoke.json").read_text())["phases"]
    assert list(phases) == ["models", "engine", "weight_sync", "weight_sync_ipc", "tampered_sync", "grpo",
                            "grpo_colocated", "flash_packing", "lora_sync", "vl_step"]  # fmt: skip
    assert {name: p["status"] for name, p in phases.items() if p["status"] not in EXPECTED} == {}, proc.stdout
    assert phases["engine"]["tokens_per_s"] > 0 and phases["engine"]["start_seconds"] > 0
    sync = phases["weight_sync"]
    for variant in sync["variants"].values():
        assert variant["bytes"] == sync["param_bytes"] > 0 and variant["gb_s"] > 0
        assert variant["probe_max_abs"] <= sync["probe_atol"]
    assert phases["weight_sync_ipc"] == {
        **phases["weight_sync_ipc"],
        "status": "skipped",
        "reason": "needs CUDA: IPC shares the learner's GPU memory with the engine on the same GPU",
    }
    assert (
        phases["tampered_sync"]["rejected"] is True and phases["tampered_sync"]["version_after_recovery"] == 2
    )
    grpo = phases["grpo"]
    assert [s["step"] for s in grpo["steps"]] == [1, 2] and all(t > 0 for t in grpo["step_seconds"])
    assert 0 < grpo["learner_peak_gib"] < 64  # memory/learner_peak_gib of the run, GiB
    colocated = phases["grpo_colocated"]
    assert colocated["status"] == "ok", colocated
    assert [s["step"] for s in colocated["steps"]] == [1, 2] and set(colocated["phase_seconds"]) == {
        "offload_s", "wake_weights_s", "wake_kv_s", "sleep_s", "reload_s"}  # fmt: skip
    assert colocated["offloaded_gib"] > 0 and 0 < colocated["engine_share"] < 1
    assert phases["flash_packing"] == {
        **phases["flash_packing"],
        "status": "skipped",
        "reason": "needs CUDA and flash-attn",
    }
    assert phases["lora_sync"]["probe_max_abs"] <= phases["lora_sync"]["probe_atol"]
    assert phases["lora_sync"]["adapter_bytes"] > 0
    assert phases["vl_step"]["loss"] > 0 and phases["vl_step"]["step_seconds"] > 0
    assert "phase" in proc.stdout and "vl_step" in proc.stdout  # the table
