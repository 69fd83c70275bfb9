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
import shutil
import statistics
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path when run
from common import BETAS, GRAD_CLIP

WARMUP_STEPS = 2
LR = 1e-3
CHECK_ROWS = 8  # rows whose token ids and labels are compared between the two pipelines


@dataclass
class Result:
    """One trainer's figures, in the order of the table's columns."""

    trainer: str
    steps_timed: int
    median_step_s: float
    tokens_per_s: float
    loss_tokens_per_s: float
    padding_fraction: float
    final_loss: float
    peak_gib: float  # the training process's peak resident memory over the timed steps


COLUMNS = ("trainer", "steps", "median s", "tokens/s", "loss tok/s", "padding", "loss", "peak GiB")
FORMATS = ("<10", ">5", ">9.3f", ">9.0f", ">10.0f", ">8.1%", ">7.4f", ">8.2f")


@dataclass
class StepCounts:
    """What one timed optimizer step processed."""

    seconds: float
    real_tokens: int
    positions: int
    loss_tokens: int


def parse_args() -> argparse.Namespace:
    p = common.parser(__doc__)
    common.add_size(p, "tiny")
    common.add_steps(p, 20, WARMUP_STEPS)
    common.add_batches(p, 32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    return common.parse(p)


def summarise(trainer: str, steps: list[StepCounts], final_loss: float, peak_gib: float) -> Result:
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
        peak_gib=peak_gib,
    )


# ----------------------------------------------------------------------------------------------- posttrain


def posttrain_config(args: argparse.Namespace, model: Path, data: Path, threads: int) -> Any:
    from posttrain.config import validate

    return validate(
        "sft",
        {
            **common.posttrain_settings(args.out / f"posttrain-{args.size}", model, threads),
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
            # The driver always saves and exports at the end; nothing is saved in between.
            "checkpoint": {"every_steps": 10**9, "keep_last": 1, "resume": "never"},
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
    timed = records[WARMUP_STEPS:]
    return summarise("posttrain", steps, records[-1]["loss"], common.posttrain_peak_gib(timed))


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
        **common.trl_args(args.out / f"trl-{args.size}", args.steps, LR),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch,
        max_length=args.max_length,
        packing=args.packing,
        packing_strategy="bfd",  # best-fit decreasing with sample boundaries kept, like posttrain's packing
        assistant_only_loss=True,
    )


def make_trl_trainer(args: argparse.Namespace, model_dir: Path, rows: Any) -> Any:
    """An SFTTrainer whose optimizer steps are timed and whose batches are counted."""
    from trl import SFTTrainer

    class CountingTrainer(common.timed_trainer(SFTTrainer)):
        counts: list[int]  # this step's real tokens, positions and loss tokens

        def step_began(self) -> None:
            self.counts = [0, 0, 0]

        def step_record(self, seconds: float) -> StepCounts:
            return StepCounts(seconds, *self.counts)

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            ids = inputs["input_ids"]
            # Padding-free batches (bfd packing) are one flat row without pads; others carry attention_mask.
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            self.counts[0] += real
            self.counts[1] += ids.numel()
            self.counts[2] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, *rest, **kw)

    return CountingTrainer(model_dir, args=trl_config(args), train_dataset=rows)


def check_tokens(trainer: Any, rows: Any, data: Path, max_length: int) -> dict[str, Any]:
    """Encode the first rows with both pipelines (TRL's unpacked dataset preparation) and compare."""
    from posttrain.config import DatasetSpec
    from posttrain.data.chat import encode_sample
    from posttrain.data.rows import load_samples

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
    peak = max(trainer.peak_gib[WARMUP_STEPS:])
    return summarise("TRL", trainer.steps[WARMUP_STEPS:], trainer.losses[-1], peak), check


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = common.use_all_cores()  # TRL's; posttrain's learner sets the same from cpus_per_learner
    model, data = common.bench_model(args.out, args.size, args.layers), common.arithmetic_task(args.out)
    log = common.RunLog(common.load_1m)
    trl, check = log.run("trl", "between", run_trl, args, model, data)
    ours = log.run("posttrain", "after", run_posttrain, args, model, data, threads)
    load = log.load_avg
    ratio = ours.tokens_per_s / trl.tokens_per_s

    print(
        f"\nSFT bench: {common.size_label(args)} model, {args.steps} steps ({WARMUP_STEPS} untimed), global batch "
        f"{args.global_batch}, micro {args.micro_batch}, max_length {args.max_length}, "
        f"packing {'on' if args.packing else 'off'}, {threads} threads; 1-min load average before/between/after "
        f"{load['before']}/{load['between']}/{load['after']} (the run itself adds ~{threads})"
    )
    print(
        f"token check ({check['rows']} rows): ids equal {check['ids_equal']}, labels equal "
        f"{check['labels_equal']}, TRL's extra trailing tokens per sample (no loss): {check['trl_extra_tokens']}"
    )
    common.print_table(COLUMNS, FORMATS, [astuple(ours), astuple(trl)])
    memory = ours.peak_gib / trl.peak_gib
    print(f"ratio posttrain/TRL tokens/s = {ratio:.2f}×, peak memory = {memory:.2f}×")
    summary = {
        "args": common.args_json(args),
        "threads": threads,
        "load_avg_1m": load,
        "wall_seconds": log.wall_seconds,
        "token_check": check,
        "results": [asdict(ours), asdict(trl)],
        "ratio_tokens_per_s": ratio,
        "ratio_peak_memory": memory,
    }
    common.write_json(args.out / "sft_bench.json", summary)


if __name__ == "__main__":
    main()
