"""Distillation learns: a student distilled from the hybrid SFT teacher beats SFT-only at equal steps."""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain.metrics import read_metrics

from helpers import run_ok

ROOT = Path(__file__).resolve().parents[2]


def _teacher(tmp_path: Path) -> list[str]:
    """`make demo`'s hybrid SFT teacher when it exists, else one built here by init_from_sft with 300 steps
    (about 4 minutes more; its wrong answers are filtered out)."""
    demo = ROOT / "runs/tiny-pipeline/sft/final"
    if (demo / "model.safetensors").is_file():
        return [f"teacher.path={demo}", "teacher.init_from_sft=null"]
    quick = (
        "[train.max_steps=300, eval.every_steps=null, checkpoint.every_steps=null, logging.progress=false]"
    )
    return [f"teacher.path={tmp_path / 'teacher' / 'final'}", f"teacher.init_from_sft.overrides={quick}"]


def test_distilled_student_beats_sft_only_at_equal_steps(tmp_path: Path) -> None:
    """configs/tiny/distill.yaml as shipped: the hybrid teacher answers the training prompts in both modes
    (kept when exact-match correct) and the micro student is SFT'd on those answers; the SFT-only student
    (same micro model, seed, prompts, steps and optimizer) trains on the dataset's own answers in both
    modes. Both are evaluated on the same held-out problems in thinking mode. Measured at 500 steps: distilled
    0.97, SFT-only 0.82 (5,264 of 8,000 teacher answers kept)."""
    from posttrain.synthetic.tasks import TinyTask, write_task

    data, steps = tmp_path / "data", 500
    write_task(data, TinyTask(train_size=4000, test_size=200))
    sft = [
        f"train.max_steps={steps}",
        "eval.every_steps=null",
        "checkpoint.every_steps=null",
        "logging.progress=false",
    ]
    distilled = tmp_path / "distilled"
    run_ok([sys.executable, "-m", "posttrain", "distill", str(ROOT / "configs/tiny/distill.yaml"),
          f"output_dir={distilled}", f"model.path={tmp_path / 'student'}", f"data.train.0.path={data}",
          f"data.eval.path={data}", "logging.progress=false", f"off_policy.then_sft.overrides={sft}",
          *_teacher(tmp_path)])  # fmt: skip
    baseline = tmp_path / "sft_only"
    run_ok([sys.executable, "-m", "posttrain", "sft", str(ROOT / "configs/tiny/sft_hybrid.yaml"),
          f"output_dir={baseline}", f"model.path={tmp_path / 'student'}", f"data.train.0.path={data}",
          f"data.train.1.path={data}", f"data.eval.path={data}", *sft])  # fmt: skip
    import pyarrow.parquet as pq

    kept = pq.read_metadata(distilled / "data" / "train.parquet").num_rows
    ours = [r for r in read_metrics(distilled / "sft" / "metrics.jsonl") if "eval/accuracy" in r][-1]
    theirs = [r for r in read_metrics(baseline / "metrics.jsonl") if "eval/accuracy" in r][-1]
    print(f"teacher answers kept: {kept}/8000; eval/accuracy at step {steps}: distilled "
          f"{ours['eval/accuracy']}, SFT-only {theirs['eval/accuracy']}")  # fmt: skip
    assert ours["step"] == theirs["step"] == steps
    assert ours["eval/accuracy"] > theirs["eval/accuracy"] + 0.1
