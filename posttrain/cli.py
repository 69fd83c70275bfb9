"""`posttrain` command line. Imports only argparse at start so `--help` is instant; each command
imports its stage when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _stage_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 learners.num_learners=2"
    )
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-train Qwen3 / Qwen3-VL into instruct and thinking variants on Ray + vLLM + DeepSpeed.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _stage_parser(sub, "sft", "supervised fine-tuning (thinking and non-thinking formats, LoRA or full)")
    _stage_parser(sub, "distill", "strong-to-weak distillation (offline top-k store, online, on/off-policy)")
    _stage_parser(sub, "rl", "reinforcement learning with verifiable rewards (GRPO, DAPO, GSPO, SAPO, ...)")
    _stage_parser(sub, "pipeline", "SFT → distillation → RL in one file, exporting instruct/ and thinking/")
    tiny = sub.add_parser("make-tiny-model", help="build a tiny random Qwen3 / Qwen3-VL with its tokenizer")
    tiny.add_argument("dir")
    tiny.add_argument("--kind", choices=["text", "vl"], default="text")
    tiny.add_argument("--size", choices=["micro", "tiny", "small"], default="tiny")
    tiny.add_argument("--seed", type=int, default=0)
    task = sub.add_parser("make-task", help="write a synthetic verifiable task (train/test parquet splits)")
    task.add_argument("dir")
    task.add_argument("--name", choices=["arithmetic", "shapes"], default="arithmetic")
    task.add_argument("--train-size", type=int, default=2000)
    task.add_argument("--test-size", type=int, default=200)
    task.add_argument("--seed", type=int, default=0)
    return parser


def run_command(args: argparse.Namespace) -> None:
    if args.command == "make-tiny-model":
        from posttrain.tiny import build_tiny_model

        print(build_tiny_model(args.dir, kind=args.kind, size=args.size, seed=args.seed))
    elif args.command == "make-task":
        from posttrain.config import TinyTask
        from posttrain.tasks import write_task

        write_task(
            args.dir,
            TinyTask(name=args.name, train_size=args.train_size, test_size=args.test_size, seed=args.seed),
        )
        print(args.dir)
    else:
        from posttrain.config import load_config

        cfg = load_config(args.command, args.config, args.overrides)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return
        if args.command == "pipeline":
            from posttrain.pipeline.driver import run

            run(cfg)
        else:
            from posttrain.pipeline.stages import run_stage

            run_stage(args.command, cfg)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options and overrides in any order: argparse ends a `nargs="*"` positional at the first option, so
    overrides after one come back unrecognised and join the others (in order); unknown options fail."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides += rest
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from posttrain.checkpoint import CheckpointError
    from posttrain.config import ConfigError
    from posttrain.data.errors import DataError
    from posttrain.rewards.registry import RewardLoadError

    try:
        run_command(args)
    except (ConfigError, DataError, CheckpointError, RewardLoadError) as err:
        print(f"posttrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # named run failures: WeightSyncError, RewardPluginError, RolloutError, ...
        print(f"posttrain {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0
