"""SFT throughput: posttrain (a DeepSpeed learner on Ray) against TRL's SFTTrainer, measured in one run.

    python bench/sft_bench.py [--size tiny|small] [--steps 20] [--global-batch 32] [--micro-batch 32]
                              [--max-length 256] [--packing | --no-packing] [--out runs/bench]

Both trainers get the same random tiny Qwen3 (loaded fresh from disk), the same arithmetic rows rendered with
the same chat template in thinking mode, the same max length, global batch (samples or packed rows per
optimizer step) and micro-batch, fp32 AdamW with the same hyper-parameters, gradient clipping, a constant
learning rate, loss on assistant tokens only, and the same number of CPU threads. TRL runs first, in this
process; posttrain then runs its driver in-process, its learner a Ray actor (a child of this process tree).
Each optimizer step is timed (the first `WARMUP_STEPS` are skipped); tokens are real (non-pad) tokens.
Prints a table and the posttrain/TRL ratio, and writes `OUT/sft_bench.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WARMUP_STEPS = 2
TRAIN_ROWS = 4000  # ≈ 1300 packed rows of 256 tokens: more than the default run consumes
LR = 1e-3
BETAS = (0.9, 0.95)  # posttrain's default; TRL's adam_beta2 is set to match
GRAD_CLIP = 1.0
CHECK_ROWS = 8  # rows whose token ids and labels are compared between the two pipelines


@dataclass
class Result:
    trainer: str
    steps_timed: int
    median_step_s: float
    tokens_per_s: float
    loss_tokens_per_s: float
    padding_fraction: float
    final_loss: float


@dataclass
class StepCounts:
    """What one timed optimizer step processed."""

    seconds: float
    real_tokens: int
    positions: int
    loss_tokens: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "small"], default="tiny")
    p.add_argument(
        "--steps", type=int, default=20, help=f"optimizer steps per trainer ({WARMUP_STEPS} untimed)"
    )
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = p.parse_args()
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    if args.global_batch % args.micro_batch:
        p.error("--global-batch must be a multiple of --micro-batch")
    return args


def prepare(out: Path, size: str) -> tuple[Path, Path]:
    """The tiny model and the arithmetic task under `out`, built once."""
    from posttrain.synthetic.models import build_tiny_model
    from posttrain.synthetic.tasks import TinyTask, write_task

    model, data = out / f"model-{size}", out / "arithmetic"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "text", size)
    if not data.is_dir():
        write_task(data, TinyTask(name="arithmetic", train_size=TRAIN_ROWS, test_size=1))
    return model, data


def summarise(trainer: str, steps: list[StepCounts], final_loss: float) -> Result:
    seconds = sum(s.seconds for s in steps)
    real, positions = sum(s.real_tokens for s in steps), sum(s.positions for s in steps)
    return Result(
        trainer=trainer,
        steps_timed=len(steps),
        median_step_s=statistics.median(s.seconds for s in steps),
        tokens_per_s=real / seconds,
        loss_tokens_per_s=sum(s.loss_tokens for s in steps) / seconds,
        padding_fraction=1 - real / positions,
        final_loss=final_loss,
    )


# ----------------------------------------------------------------------------------------------- posttrain


def posttrain_config(args: argparse.Namespace, model: Path, data: Path, threads: int) -> Any:
    from posttrain.config import validate

    return validate(
        "sft",
        {
            "output_dir": str(args.out / f"posttrain-{args.size}"),
            "model": {"path": str(model), "dtype": "float32", "attn_implementation": "sdpa"},
            "data": {
                "train": [{"path": str(data), "split": "train", "thinking": "thinking"}],
                "max_length": args.max_length,
                "overlong": "truncate",  # TRL truncates too
                "packing": args.packing,
            },
            "train": {
                "global_batch_size": args.global_batch,
                "micro_batch_size": args.micro_batch,
                "max_steps": args.steps,
                "lr": LR,
                "lr_scheduler": "constant",
                "betas": list(BETAS),
                "weight_decay": 0.0,
                "grad_clip": GRAD_CLIP,
            },
            "learners": {"num_learners": 1, "zero_stage": 0, "device": "cpu", "cpus_per_learner": threads},
            # The driver always saves and exports at the end; nothing is saved in between.
            "checkpoint": {"every_steps": 10**9, "keep_last": 1, "resume": "never"},
            "logging": {"progress": False},
        },
    )


def run_posttrain(args: argparse.Namespace, model: Path, data: Path, threads: int) -> Result:
    from posttrain.metrics import read_metrics
    from posttrain.sft.driver import run

    cfg = posttrain_config(args, model, data, threads)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    run(cfg)
    records = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if "step_seconds" in r]
    steps = []
    for r in records[WARMUP_STEPS:]:
        real = round(r["tokens_per_s"] * r["step_seconds"])
        steps.append(
            StepCounts(r["step_seconds"], real, round(real / (1 - r["padding_fraction"])), r["loss_tokens"])
        )
    return summarise("posttrain", steps, records[-1]["loss"])


# ----------------------------------------------------------------------------------------------------- TRL


def trl_rows(data: Path) -> Any:
    """The same train rows as a conversational dataset; the template renders the assistant's reasoning."""
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(data / "train.parquet"), split="train")
    ds = ds.select_columns(["messages"])
    return ds.map(lambda _: {"chat_template_kwargs": {"enable_thinking": True}})


def trl_config(args: argparse.Namespace) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(args.out / f"trl-{args.size}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",  # TRL's default is the fused AdamW; posttrain uses the plain torch one
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        weight_decay=0.0,
        max_grad_norm=GRAD_CLIP,
        bf16=False,
        gradient_checkpointing=False,  # TRL turns it on by default; posttrain's default is off
        use_cpu=True,
        max_length=args.max_length,
        packing=args.packing,
        packing_strategy="bfd",  # best-fit decreasing with sample boundaries kept, like posttrain's packing
        assistant_only_loss=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def make_trl_trainer(args: argparse.Namespace, model_dir: Path, rows: Any) -> Any:
    """An SFTTrainer whose optimizer steps are timed and whose batches are counted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    class CountingTrainer(SFTTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            ids = inputs["input_ids"]
            # Padding-free batches (bfd packing) are one flat row without pads; others carry attention_mask.
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            self.counts[0] += real
            self.counts[1] += ids.numel()
            self.counts[2] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, *rest, **kw)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            trainer.counts = [0, 0, 0]
            self.began = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            trainer.steps.append(StepCounts(time.perf_counter() - self.began, *trainer.counts))

        def on_log(self, *_: Any, logs: dict[str, float] | None = None, **__: Any) -> None:
            if logs and "loss" in logs:
                trainer.losses.append(logs["loss"])

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = CountingTrainer(
        model=model,
        args=trl_config(args),
        train_dataset=rows,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.steps, trainer.losses, trainer.counts = [], [], [0, 0, 0]
    return trainer


def check_tokens(trainer: Any, rows: Any, data: Path, max_length: int) -> dict[str, Any]:
    """Encode the first rows with both pipelines (TRL's unpacked dataset preparation) and compare."""
    from posttrain.config import DatasetSpec
    from posttrain.data import encode_sample, load_samples

    spec = DatasetSpec(path=str(data), split="train", thinking="thinking", max_rows=CHECK_ROWS)
    samples, _, _ = load_samples(spec)
    ours = [encode_sample(s, trainer.processing_class, False, max_length, "truncate")[0] for s in samples]
    theirs = trainer._prepare_dataset(  # TRL's own tokenisation and label masking, without packing
        rows.select(range(CHECK_ROWS)), trainer.processing_class, trainer.args, False, None, "check"
    )
    ids_equal = labels_equal = True
    extra: set[int] = set()
    for item, row in zip(ours, theirs, strict=True):
        n = len(item.input_ids)
        ids_equal &= row["input_ids"][:n] == item.input_ids.tolist()
        labels_equal &= row["labels"][:n] == item.labels.tolist() and set(row["labels"][n:]) <= {-100}
        extra.add(len(row["input_ids"]) - n)
    return {
        "rows": CHECK_ROWS,
        "ids_equal": ids_equal,
        "labels_equal": labels_equal,
        "trl_extra_tokens": sorted(extra),
    }


def run_trl(args: argparse.Namespace, model: Path, data: Path) -> tuple[Result, dict[str, Any]]:
    rows = trl_rows(data)
    trainer = make_trl_trainer(args, model, rows)
    check = check_tokens(trainer, rows, data, args.max_length)
    trainer.train()
    result = summarise("TRL", trainer.steps[WARMUP_STEPS:], trainer.losses[-1])
    del trainer
    gc.collect()
    return result, check


# ---------------------------------------------------------------------------------------------------- main


def report(results: list[Result], ratio: float) -> None:
    print(
        f"{'trainer':<10} {'steps':>5} {'median s':>9} {'tokens/s':>9} {'loss tok/s':>10} {'padding':>8} {'loss':>7}"
    )
    for r in results:
        print(
            f"{r.trainer:<10} {r.steps_timed:>5} {r.median_step_s:>9.3f} {r.tokens_per_s:>9.0f} "
            f"{r.loss_tokens_per_s:>10.0f} {r.padding_fraction:>8.1%} {r.final_loss:>7.4f}"
        )
    print(f"ratio posttrain/TRL tokens/s = {ratio:.2f}×")


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    import torch

    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # TRL's threads; posttrain's learner sets the same from cpus_per_learner
    model, data = prepare(args.out, args.size)
    load = {"before": load_1m()}
    trl, check = run_trl(args, model, data)
    load["between"] = load_1m()
    ours = run_posttrain(args, model, data, threads)
    load["after"] = load_1m()
    ratio = ours.tokens_per_s / trl.tokens_per_s

    print(
        f"\nSFT bench: {args.size} model, {args.steps} steps ({WARMUP_STEPS} untimed), global batch "
        f"{args.global_batch}, micro {args.micro_batch}, max_length {args.max_length}, "
        f"packing {'on' if args.packing else 'off'}, {threads} threads; 1-min load average before/between/after "
        f"{load['before']}/{load['between']}/{load['after']} (the run itself adds ~{threads})"
    )
    print(
        f"token check ({check['rows']} rows): ids equal {check['ids_equal']}, labels equal "
        f"{check['labels_equal']}, TRL's extra trailing tokens per sample (no loss): {check['trl_extra_tokens']}"
    )
    report([ours, trl], ratio)
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threads": threads,
        "load_avg_1m": load,
        "token_check": check,
        "results": [asdict(ours), asdict(trl)],
        "ratio_tokens_per_s": ratio,
    }
    (args.out / "sft_bench.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
