"""SFT on tool-use traces end to end: a tiny Qwen3-VL with tool tokens trains on vl_zoom traces (a tool turn
holding the crop, its pixels batched with the prompt image's), the task card's crop_zoom schema declared
from posttrain.rewards.tools, evaluated by the first call's correctness."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import validate
from posttrain.metrics import read_metrics


def test_vl_sft_on_zoom_traces(tmp_path: Path) -> None:
    from posttrain.sft.driver import run

    data, out = tmp_path / "vl-zoom", tmp_path / "run"
    cfg = validate(
        "sft",
        {
            "output_dir": str(out),
            "device": "cpu",
            "model": {
                "path": str(tmp_path / "model"),
                "build": {"builder": "tiny_model", "args": {"kind": "vl", "tools": True}},
            },
            "data": {
                "train": [
                    {
                        "path": str(data),
                        "split": "sft",
                        "thinking": "thinking",
                        "build": {
                            "builder": "vl_zoom",
                            "args": {"train_size": 4, "test_size": 4, "sft_size": 8},
                        },
                    }
                ],
                "eval": {
                    "path": str(data),
                    "split": "test",
                    "thinking": "thinking",
                    "verifier": "posttrain.synthetic.tool_tasks:tool_call_correct",
                },
                "max_length": 768,
            },
            "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "lr": 3e-3},
            "eval": {"max_new_tokens": 8, "max_samples": 4},
            "logging": {"progress": False},
        },
    )
    run(cfg)
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["data/samples"] == 8 and records[0]["data/samples_thinking"] == 8
    # ~118 per trace: the call turn (thinking, the box's JSON) and the answer turn, no prompt or tool tokens
    assert 8 * 80 < records[0]["data/loss_tokens"] < 8 * 160
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert "eval/accuracy" in records[-1]  # the verifier read the task's bbox_2d column
