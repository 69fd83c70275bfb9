"""The GPU smoke script must not rot while no GPU is lent: its `--cpu` run goes through the phases on the
CPU, and each ends ok or skipped (never an error), with sensible figures. CI runs the phases only this script
exercises (the weight syncs at the 0.6B shape, the tampered sync, the colocated turn-taking, the GPU-only
skips); the phases whose product code the other integration tests run as well (engine start, 2x2 GRPO, LoRA
sync, VL step) run in the long tier, and mypy checks the whole script (pyproject.toml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"ok", "skipped"}
CI_PHASES = ["models", "weight_sync", "weight_sync_ipc", "tampered_sync", "grpo_colocated", "flash_packing"]
LONG_PHASES = ["models", "engine", "grpo", "lora_sync", "vl_step"]


def smoke(tmp_path: Path, phases: list[str]) -> dict[str, Any]:
    """`bench/gpu_smoke.py --cpu --only <phases>`: each phase's record, all ok or skipped, and the table."""
    script = str(ROOT / "bench/gpu_smoke.py")
    cmd = [sys.executable, script, "--cpu", "--out", str(tmp_path), "--only", *phases]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "gpu_smoke.json").read_text())["phases"]
    assert list(records) == phases
    failed = {name: p["status"] for name, p in records.items() if p["status"] not in EXPECTED}
    assert failed == {}, proc.stdout
    assert "phase" in proc.stdout and phases[-1] in proc.stdout  # the table
    return records


def test_cpu_smoke_run_of_the_sync_and_colocation_phases(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as when the script runs: `import common`
    import gpu_smoke

    assert set(CI_PHASES) | set(LONG_PHASES) == {p.name for p in gpu_smoke.PHASES}  # none left unrun
    phases = smoke(tmp_path, CI_PHASES)
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


def test_cpu_smoke_run_of_the_phases_other_tests_cover(tmp_path: Path) -> None:
    phases = smoke(tmp_path, LONG_PHASES)
    assert phases["engine"]["tokens_per_s"] > 0 and phases["engine"]["start_seconds"] > 0
    grpo = phases["grpo"]
    assert [s["step"] for s in grpo["steps"]] == [1, 2] and all(t > 0 for t in grpo["step_seconds"])
    assert 0 < grpo["learner_peak_gib"] < 64  # memory/learner_peak_gib of the run, GiB
    assert phases["lora_sync"]["probe_max_abs"] <= phases["lora_sync"]["probe_atol"]
    assert phases["lora_sync"]["adapter_bytes"] > 0
    assert phases["vl_step"]["loss"] > 0 and phases["vl_step"]["step_seconds"] > 0
