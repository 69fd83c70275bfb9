"""SFT end to end on the real stack (Ray actors, DeepSpeed engines, tiny Qwen3): data-parallel equivalence,
exact resume after a kill, LoRA export, and clean errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from posttrain.config import deep_merge, validate
from posttrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from posttrain.synthetic.tasks import TinyTask, write_task

    path = tmp_path_factory.mktemp("data") / "arithmetic"
    write_task(path, TinyTask(name="arithmetic", train_size=256, test_size=16))
    return path


def sft_config(out: Path, model_dir: Path, dataset: Path, **changes: Any) -> dict[str, Any]:
    raw = {
        "output_dir": str(out),
        "device": "cpu",
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(dataset), "split": "train"}], "max_length": 128},
        "train": {
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "max_steps": 4,
            "lr": 3e-3,
            "warmup_steps": 1,
        },
        "learners": {"num_learners": 1, "zero_stage": 0},
        "logging": {"progress": False},
    }
    return deep_merge(raw, changes)


def run_sft(raw: dict[str, Any]) -> list[dict[str, Any]]:
    from posttrain.sft.driver import run

    run(validate("sft", raw))
    return read_metrics(Path(raw["output_dir"]) / "metrics.jsonl")


def losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def final_weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def test_data_parallel_zero_stages_match_single_learner(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path
) -> None:
    single = losses(run_sft(sft_config(tmp_path / "one", tiny_text_model, arithmetic)))
    for stage in (2, 3):
        two = {"learners": {"num_learners": 2, "zero_stage": stage}}
        split = losses(run_sft(sft_config(tmp_path / f"z{stage}", tiny_text_model, arithmetic, **two)))
        assert len(split) == len(single) == 4
        assert max(abs(a - b) for a, b in zip(single, split, strict=True)) < 1e-5, (stage, single, split)
    assert single[-1] < single[0]


def test_optimizer_offload_matches_adamw_and_bf16_trains(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path
) -> None:
    adamw = losses(run_sft(sft_config(tmp_path / "adamw", tiny_text_model, arithmetic)))
    offload = {"learners": {"zero_stage": 2, "offload_optimizer": True}}
    cpu_adam = losses(run_sft(sft_config(tmp_path / "offload", tiny_text_model, arithmetic, **offload)))
    assert max(abs(a - b) for a, b in zip(adamw, cpu_adam, strict=True)) < 1e-4, (adamw, cpu_adam)
    bf16 = losses(
        run_sft(sft_config(tmp_path / "bf16", tiny_text_model, arithmetic, model={"dtype": "bfloat16"}))
    )
    assert bf16[-1] < bf16[0] and abs(bf16[0] - adamw[0]) < 0.05


def test_outputs_and_loadable_export(tmp_path: Path, tiny_text_model: Path, arithmetic: Path, golden) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    raw = sft_config(
        out, tiny_text_model, arithmetic, data={"eval": {"path": str(arithmetic), "split": "test"}}
    )
    records = run_sft(
        deep_merge(raw, {"eval": {"max_samples": 8, "max_new_tokens": 8}, "logging": {"tensorboard": True}})
    )
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "final", "tensorboard"} <= {
        p.name for p in out.iterdir()
    }
    golden("sft", out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in steps)
    assert "eval/accuracy" in records[-1] and any(r["step"] == 0 and "eval/accuracy" in r for r in records)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert "<think>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    start = AutoModelForCausalLM.from_pretrained(tiny_text_model).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in start.items()}
    assert not list((out / "final").glob("*.bin")) and not list((out / "final").glob("*.pt"))


def _cli(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "posttrain", "sft", str(ROOT / "configs/tiny/sft.yaml"),
        f"output_dir={out}", f"model.path={model}", f"data.train.0.path={data}", "data.eval=null",
        "data.max_length=128", "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=8",
        "learners.cpus_per_learner=1", "checkpoint.every_steps=2", "logging.progress=false", *extra,
    ]  # fmt: skip


def test_resume_after_kill_is_bit_exact(tmp_path: Path, tiny_text_model: Path, arithmetic: Path) -> None:
    """Two ZeRO-2 learners (partitioned optimizer states: the harder case); a single ZeRO-0 learner's
    checkpoints go through the same Learner.save / load, killed and resumed in test_rl's exact-resume run."""
    extra = ["learners.zero_stage=2", "learners.num_learners=2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(_cli(whole, tiny_text_model, arithmetic, *extra), check=True, capture_output=True)
    proc = subprocess.Popen(
        _cli(broken, tiny_text_model, arithmetic, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not (broken / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its 4th step checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray processes, mid-run
    proc.wait()
    assert not (broken / "final").exists()
    resumed = subprocess.run(
        _cli(broken, tiny_text_model, arithmetic, *extra), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(broken / "metrics.jsonl")
    assert [r["step"] for r in b if "loss" in r] == list(range(1, 9))
    assert losses(a) == losses(b)  # bit-exact, not approximately equal
    wa, wb = final_weights(whole), final_weights(broken)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_bad_row_stops_before_training_naming_file_row_column(tmp_path: Path, tiny_text_model: Path) -> None:
    data = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}] * 3
    rows.insert(2, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "sft", str(ROOT / "configs/tiny/sft.yaml"), f"output_dir={tmp_path / 'o'}",
         f"model.path={tiny_text_model}", f"data.train.0.path={data}", "data.train.0.thinking=auto", "data.eval=null"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        "bad.jsonl" in proc.stderr
        and "row 2" in proc.stderr
        and "messages" in proc.stderr
        and "bot" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()
