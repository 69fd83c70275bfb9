"""The shipped tiny configs learn: held-out accuracy measured by generation before and after training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from posttrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


ENDS_ONLY = ("eval.every_steps=null", "checkpoint.every_steps=null")
"""Evaluation at step 0 and after the last only: greedy evaluation does not change training, and the
tests read just those two points (saves about a minute per run on 2 cores)."""


def run_config(config: str, tmp_path: Path, *overrides: str) -> list[dict]:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "sft", str(ROOT / config), f"output_dir={out}",
         f"model.path={tmp_path / 'model'}", f"data.train.0.path={tmp_path / 'data'}",
         f"data.eval.path={tmp_path / 'data'}", "logging.progress=false", *ENDS_ONLY, *overrides],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(out / "metrics.jsonl")


def accuracies(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}


def test_tiny_sft_learns_arithmetic(tmp_path: Path) -> None:
    """4 of the shipped 6 epochs (CI's 40-minute budget): measured on 2 cores, 0 → 0.74 held out in 244
    steps (4.0 min); 6 epochs reach 0.985 in 366 steps, 3 epochs 0.435."""
    acc = accuracies(run_config("configs/tiny/sft.yaml", tmp_path, "train.epochs=4"))
    print("eval/accuracy by step:", acc)
    assert acc[0] <= 0.05
    assert acc[max(acc)] >= 0.65


def test_tiny_vl_sft_learns_to_count_shapes(tmp_path: Path) -> None:
    records = run_config("configs/tiny/sft_vl.yaml", tmp_path)
    acc = accuracies(records)
    losses = [r["loss"] for r in records if "loss" in r]
    print("eval/accuracy by step:", acc, "loss first/last:", losses[0], losses[-1])
    assert losses[-1] < 0.5 * losses[0]
    assert acc[max(acc)] >= 0.4  # chance is 0.25 (1-4 shapes)


def run_rl(config: str, tmp_path: Path, *overrides: str) -> dict[int, float]:
    """An RL config as shipped (its weak SFT start is built first, on the same data), outputs under tmp_path."""
    import yaml

    out, data = tmp_path / "rl", tmp_path / "data"
    init = yaml.safe_load((ROOT / config).read_text())["init_from_sft"]["overrides"]
    init += [f"data.train.0.path={data}", f"data.eval.path={data}", "logging.progress=false", *ENDS_ONLY]
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "rl", str(ROOT / config), f"output_dir={out}",
         f"model.path={tmp_path / 'sft' / 'final'}", f"data.prompts.0.path={tmp_path / 'data'}",
         f"data.eval.path={tmp_path / 'data'}", "logging.progress=false", f"init_from_sft.overrides={init}",
         *ENDS_ONLY, *overrides],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return accuracies(read_metrics(out / "metrics.jsonl"))


def test_tiny_rl_improves_a_weak_sft_checkpoint(tmp_path: Path) -> None:
    """The gain at step 20 depends on the SFT start, which changes with the order of floating-point
    sums over its 300 steps (equal to 1e-6 for the first 20): measured on 2 cores, a start at 0.13 gained
    0.315 (0.445 @20), the start of the chunked loss path (0.12) 0.24, 0.255 and 0.225 with train.seed 0,
    1, 2, and earlier starts up to 0.385; 0.67 @40 as shipped. An unchanged model keeps its 0.12 (greedy
    evaluation), so 0.15 is learning with room for another start."""
    acc = run_rl("configs/tiny/rl.yaml", tmp_path, "train.max_steps=20")
    print("eval/accuracy by step:", acc)
    assert acc[20] - acc[0] >= 0.15


def test_tiny_vl_rl_improves_a_weak_sft_checkpoint(tmp_path: Path) -> None:
    """Measured on 2 cores: 0.61 → 0.80 @10, 0.845 @20 as shipped. The margin is below that: the SFT start
    and the RL trajectory differ with the CPU's floating-point paths."""
    acc = run_rl("configs/tiny/rl_vl.yaml", tmp_path, "train.max_steps=20")
    print("eval/accuracy by step:", acc)
    assert acc[20] - acc[0] >= 0.15
