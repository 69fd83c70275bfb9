"""bench/memory_bench.py must not rot: the model's own pass and the objectives that the real-width test
does not run go through the chunked loss head at the real vocabulary on a narrow model (hidden 128, 32
tokens; its figures mean nothing at this size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OBJECTIVES = ["rl_entropy", "distill_topk16", "distill_sampled"]


def test_memory_bench_measures_every_objective(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench/memory_bench.py"), "--hidden", "128", "--seq-len", "32",
           "--batch", "1", "--objectives", *OBJECTIVES, "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "memory_bench.json").read_text())["results"]
    assert [r["objective"] for r in results] == ["model", *OBJECTIVES]
    assert all(r["peak_above_baseline_bytes"] > 0 and r["seconds"] > 0 for r in results)
