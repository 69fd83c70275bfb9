"""`posttrain` command line. Imports only configs and error types at start (no torch, Ray or vLLM), so
`--help` is instant; the stages are imported when a command runs them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from posttrain.checkpoint import CheckpointError
from posttrain.config import BuildSpec, ConfigError, format_validation_error, load_config, parse_overrides
from posttrain.data.errors import DataError
from posttrain.inputs import build_input
from posttrain.plugins import PluginLoadError


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
    build_help = (
        "run a builder (as a config's `build:` names it) to write a model folder or a dataset at PATH"
    )
    build = sub.add_parser(
        "build",
        help=build_help,
        description=f"{build_help}, e.g. `posttrain build tiny_model runs/models/tiny-vl kind=vl`, "
        "`posttrain build qwen3_shape runs/models/qwen3-0.6b-2layer shape=qwen3-0.6b layers=2` or "
        "`posttrain build arithmetic runs/data/arithmetic train_size=8000`.",
    )
    build.add_argument("builder", help="a built-in builder, an entry point, module:attr or file.py:attr")
    build.add_argument("path", help="where to write (must not exist yet)")
    build.add_argument(
        "overrides", nargs="*", metavar="ARG=VALUE", help="the builder's arguments (YAML values)"
    )
    return parser


RENAMED = {
    "make-tiny-model": "posttrain build tiny_model DIR [kind=text|vl] [size=micro|tiny|small] [seed=N]",
    "make-task": "posttrain build arithmetic|shapes DIR [train_size=N] [test_size=N] [seed=N]",
}
"""Commands that became `posttrain build`: their new spelling."""


def run_build(builder: str, path: str, overrides: list[str]) -> None:
    from pathlib import Path

    from pydantic import ValidationError

    raw = {"builder": builder, "args": parse_overrides(overrides)}
    try:
        spec = BuildSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, BuildSpec, f"for builder {builder!r}")) from None
    if Path(path).exists():
        raise ConfigError(f"{path} already exists; remove it or choose another path")
    print(build_input(spec, Path(path), f"builder {builder!r}"))


def run_command(args: argparse.Namespace) -> None:
    if args.command == "build":
        run_build(args.builder, args.path, args.overrides)
    else:
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RENAMED:
        print(f"posttrain: error: `posttrain {argv[0]}` is now `{RENAMED[argv[0]]}`", file=sys.stderr)
        return 2
    args = parse_args(argv)

    try:
        run_command(args)
    except (ConfigError, DataError, CheckpointError, PluginLoadError) as err:  # rewards', builders' plugins
        print(f"posttrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # named run failures: WeightSyncError, RewardPluginError, RolloutError, ...
        print(f"posttrain {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0
