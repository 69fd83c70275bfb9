"""What the benchmarks share: their common options, the tiny model and task they build (and its prompts as
token ids), the load average and wall time around each measured run, child runs (logged, or time-limited), the settings both sides of a comparison are pinned to (posttrain's run,
TRL's trainer arguments and model loading), TRL's step timer, and the table and JSON they report.

The benchmarks run as scripts, so bench/ is on sys.path and they `import common`. Heavy imports (torch,
transformers, trl, posttrain's model code) stay inside the functions that need them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BETAS = (0.9, 0.95)  # posttrain's default; TRL's adam_beta2 is set to match
GRAD_CLIP = 1.0
TRAIN_ROWS = 4000  # ≈ 1300 packed rows of 256 tokens: more than sft_bench's default run consumes
LOG_TAIL_LINES = 40  # of a failed child run's log, shown on exit
REAL_SHAPE = "qwen3-0.6b"

# ------------------------------------------------------------------------------------------------ options


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def add_size(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--size",
        choices=["tiny", "small", REAL_SHAPE],
        default=default,
        help=f"tiny (~1M parameters), small (~10M) or {REAL_SHAPE}: Qwen3-0.6B's widths and 151,936-token "
        "vocabulary, random, fp32",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"{REAL_SHAPE} only: fewer blocks than its 28 (the same width and vocabulary)",
    )


def add_steps(p: argparse.ArgumentParser, default: int, warmup: int, unit: str = "optimizer steps") -> None:
    """`--steps`: per trainer, more than the `warmup` untimed ones."""

    def steps(text: str) -> int:
        n = int(text)
        if n <= warmup:
            raise argparse.ArgumentTypeError(f"must exceed the {warmup} warm-up step(s)")
        return n

    p.add_argument("--steps", type=steps, default=default, help=f"{unit} per trainer ({warmup} untimed)")


def add_batches(p: argparse.ArgumentParser, default: int) -> None:
    """`--global-batch` (per optimizer step) and `--micro-batch` (per forward/backward)."""
    p.add_argument("--global-batch", type=int, default=default)
    p.add_argument("--micro-batch", type=int, default=default)


def parse(p: argparse.ArgumentParser, out: Path = Path("runs/bench")) -> argparse.Namespace:
    """Adds `--out` (default `out`), parses, and checks that a global batch (where there is one) is whole
    micro-batches."""
    p.add_argument("--out", type=Path, default=out)
    args = p.parse_args()
    if "global_batch" in args and args.global_batch % args.micro_batch:
        p.error("--global-batch must be a multiple of --micro-batch")
    if "size" in args and args.layers is not None and args.size != REAL_SHAPE:
        p.error(f"--layers goes with --size {REAL_SHAPE}")
    return args


# ------------------------------------------------------------------------------------------ model and task


def bench_model(out: Path, size: str, layers: int | None = None) -> Path:
    """posttrain's random text Qwen3 of `size` under `out` (a tiny one, or the real shape in fp32 with
    `layers` blocks), built on first use: nothing is downloaded."""
    from posttrain.synthetic.models import build_tiny_model
    from posttrain.synthetic.shapes import Qwen3Shape, build_qwen3_shape

    model = out / f"model-{size}{'' if layers is None else f'-{layers}l'}"
    if (model / "config.json").is_file():
        return model
    if size == REAL_SHAPE:
        build_qwen3_shape(model, Qwen3Shape(shape=REAL_SHAPE, layers=layers, dtype="float32"))
    else:
        build_tiny_model(model, "text", size)  # type: ignore[arg-type]  # argparse checked the choice
    return model


def arithmetic_task(out: Path) -> Path:
    """The arithmetic task (`TRAIN_ROWS` rows with thinking traces) under `out`, built on first use; benches
    run with the same `--out` share it."""
    from posttrain.synthetic.tasks import TinyTask, write_task

    data = out / "arithmetic"
    if not data.is_dir():
        write_task(data, TinyTask(name="arithmetic", train_size=TRAIN_ROWS, test_size=1))
    return data


def arithmetic_prompt_ids(model: Path, count: int) -> list[list[int]]:
    """`count` arithmetic prompts as `model`'s chat template renders them for generation (thinking mode)."""
    from transformers import AutoTokenizer

    from posttrain.synthetic.tasks import TinyTask, arithmetic_splits

    tok = AutoTokenizer.from_pretrained(model)
    rows = arithmetic_splits(TinyTask(name="arithmetic", train_size=count, test_size=1))["train"]
    out = []
    for row in rows:
        chat = [{"role": "user", "content": row["messages"][0]["content"]}]
        enc: Any = tok.apply_chat_template(
            chat, add_generation_prompt=True, enable_thinking=True, return_dict=True
        )
        out.append(list(enc["input_ids"]))
    return out


# ---------------------------------------------------------------------------------------- the machine


def use_all_cores() -> int:
    """Gives this process's torch (the in-process TRL side) every core it may run on; returns their count."""
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def load_avg() -> list[float]:
    """The 1/5/15-minute load average: timings only mean something on an otherwise idle machine."""
    return [round(x, 2) for x in os.getloadavg()]


def load_1m() -> float:
    return load_avg()[0]


class RunLog:
    """The load average before the first measured run and after each one, and each run's wall time
    (start-up included)."""

    def __init__(self, load: Callable[[], Any] = load_avg) -> None:
        self._load = load
        self.load_avg: dict[str, Any] = {"before": load()}
        self.wall_seconds: dict[str, float] = {}

    def run(self, name: str, load_key: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, timed as `name`; the load average after it is kept as `load_key`."""
        began = time.perf_counter()
        out = fn(*args)
        gc.collect()  # a finished trainer (callbacks make reference cycles) is freed before the next run
        self.wall_seconds[name] = time.perf_counter() - began
        self.load_avg[load_key] = self._load()
        return out


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """Runs `cmd` as a child process, its output in `log`; on failure, exits with the log's last lines."""
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        sys.exit(f"{what} failed ({done.returncode}); last lines of {log}:\n" + "\n".join(log_tail(log)))


def run_limited(cmd: list[str], log: Path, limit_s: float) -> int | None:
    """Runs `cmd` in its own session, its output in `log`; its exit code, or None when it ran past `limit_s`
    and was killed with everything it started (a hung Ray call or engine costs only its limit)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a child run's log."""
    return log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []


# ------------------------------------------------------------------------------------ both sides pinned


def posttrain_settings(output_dir: Path, model: Path, cpus: int) -> dict[str, Any]:
    """The part of a posttrain config every bench pins: the fp32 SDPA model (as TRL loads it), on the CPU,
    one ZeRO-0 learner with `cpus` threads, no progress bar."""
    return {
        "output_dir": str(output_dir),
        "model": {"path": str(model), "dtype": "float32", "attn_implementation": "sdpa"},
        "device": "cpu",
        "learners": {"num_learners": 1, "zero_stage": 0, "cpus_per_learner": cpus},
        "logging": {"progress": False},
    }


def trl_args(output_dir: Path, steps: int, lr: float) -> dict[str, Any]:
    """TRL trainer arguments every bench sets alike: the optimizer posttrain's side runs (AdamW, constant
    learning rate, posttrain's betas and clipping), fp32 on the CPU, each step's loss logged, nothing saved."""
    return {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",  # TRL's default is the fused AdamW; posttrain uses the plain torch one
        "adam_beta1": BETAS[0],
        "adam_beta2": BETAS[1],
        "weight_decay": 0.0,
        "max_grad_norm": GRAD_CLIP,
        "bf16": False,
        "gradient_checkpointing": False,  # TRL turns it on by default; posttrain's default is off
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def load_model(path: str | Path) -> Any:
    """A model fresh from disk for TRL's side: fp32 with SDPA attention, as posttrain's side runs it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def timed_trainer(base: type) -> type:
    """`base` (a transformers Trainer) with each optimizer step timed. A subclass defines `step_began()`,
    called before each step, and `step_record(seconds)`, whose result is appended to `steps` after it;
    every logged training loss is appended to `losses` and each step's peak resident memory (GiB, as
    posttrain's `memory/learner_peak_gib` reads its learner's) to `peak_gib`. Construct it with `model_dir`:
    the model is loaded by `load_model`, the tokenizer from the same folder."""
    from transformers import AutoTokenizer, TrainerCallback

    from posttrain.memory import PeakMemory

    class StepTimer(TrainerCallback):
        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.trainer.step_began()
            self.memory = PeakMemory("cpu").__enter__()
            self.began = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            seconds = time.perf_counter() - self.began
            self.memory.__exit__(None, None, None)
            self.trainer.peak_gib.append(self.memory.peak_gib)
            self.trainer.steps.append(self.trainer.step_record(seconds))

        def on_log(self, *_: Any, logs: dict[str, float] | None = None, **__: Any) -> None:
            if logs and "loss" in logs:
                self.trainer.losses.append(logs["loss"])

    class TimedTrainer(base):
        def __init__(self, model_dir: str | Path, **kw: Any) -> None:
            self.steps: list[Any] = []
            self.losses: list[float] = []
            self.peak_gib: list[float] = []
            model, tokenizer = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
            super().__init__(model=model, processing_class=tokenizer, callbacks=[StepTimer(self)], **kw)

    return TimedTrainer


# ------------------------------------------------------------------------------------------------- report


def print_table(titles: Sequence[str], formats: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A fixed-width table: a title and a format spec (">9.3f") per column; titles take the specs' alignment
    and width."""
    print(" ".join(format(title, spec.split(".")[0]) for title, spec in zip(titles, formats, strict=True)))
    for row in rows:
        print(" ".join(format(value, spec) for value, spec in zip(row, formats, strict=True)))


def posttrain_peak_gib(records: list[dict[str, Any]]) -> float:
    """The highest `memory/learner_peak_gib` of a posttrain run's step records (its learner's peak)."""
    return max(r["memory/learner_peak_gib"] for r in records)


def size_label(args: argparse.Namespace) -> str:
    return args.size if args.layers is None else f"{args.size} ({args.layers} layers)"


def args_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
