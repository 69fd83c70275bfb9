"""VL SFT on the tiny Qwen3-VL: images go through the processor, the vision tower can be frozen, and the
export reloads with its processor."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import validate
from posttrain.metrics import read_metrics

from helpers import assert_only_language_model_trained


def test_vl_sft_freezes_vision_tower_and_exports(tmp_path: Path, tiny_vl_model: Path, golden) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from posttrain.sft.driver import run

    data = tmp_path / "shapes"
    out = tmp_path / "run"
    cfg = validate(
        "sft",
        {
            "output_dir": str(out),
            "device": "cpu",
            "model": {"path": str(tiny_vl_model), "freeze_vision_tower": True},
            "data": {
                "train": [
                    {
                        "path": str(data),
                        "build": {"builder": "shapes", "args": {"train_size": 32, "test_size": 4}},
                    }
                ],
                "eval": {"path": str(data), "split": "test"},
                "max_length": 256,
            },
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 3, "lr": 3e-3},
            "eval": {"max_new_tokens": 4},
            "logging": {"progress": False},
        },
    )
    final = run(cfg)
    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "eval/accuracy" in records[-1]
    golden("sft_vl", out / "metrics.jsonl")

    assert_only_language_model_trained(tiny_vl_model / "model.safetensors", final / "model.safetensors")

    processor = AutoProcessor.from_pretrained(final)
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert processor.image_processor is not None and model.config.model_type == "qwen3_vl"
