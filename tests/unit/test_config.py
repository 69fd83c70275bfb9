"""Config loading: every shipped config validates, unknown keys get a suggestion, cross-field rules hold."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.config import ConfigError, load_config, parse_overrides, validate

ROOT = Path(__file__).resolve().parents[2]
# Every config a command reads (configs/ray/ holds Ray's runtime-env files, not posttrain configs).
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "ray" not in p.relative_to(ROOT).parts)
MINIMAL = {"output_dir": "o", "model": {"path": "m"}, "data": {"train": [{"path": "d"}]}}


def stage_of(path: Path) -> str:
    return path.stem.split("_")[0]


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(stage_of(path), path)
    assert cfg.output_dir


def test_shipped_configs_exist() -> None:
    assert {"sft.yaml", "sft_vl.yaml"} <= {p.name for p in SHIPPED}


def test_unknown_key_names_full_path_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("sft", ROOT / "configs/tiny/sft.yaml", ["train.lrr=0.1"])
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in str(err.value)
    with pytest.raises(
        ConfigError, match=r"data\.train\.0\.splt: unknown key; did you mean 'data\.train\.0\.split'"
    ):
        validate("sft", {**MINIMAL, "data": {"train": [{"path": "d", "splt": "x"}]}})


def test_batch_sizes_must_divide() -> None:
    raw = {
        **MINIMAL,
        "train": {"global_batch_size": 10, "micro_batch_size": 4},
        "learners": {"num_learners": 2},
    }
    with pytest.raises(
        ConfigError, match=r"global_batch_size \(10\) must be a multiple of .*\(4 × 2 = 8\).*=8"
    ):
        validate("sft", raw)
    cfg = validate("sft", {**raw, "train": {"global_batch_size": 16, "micro_batch_size": 4}})
    assert cfg.grad_accum_steps == 2


def test_bad_value_names_key() -> None:
    with pytest.raises(ConfigError, match=r"learners\.zero_stage: Input should be 0, 1, 2 or 3"):
        validate("sft", {**MINIMAL, "learners": {"zero_stage": 4}})


def test_overrides_parse_yaml_values() -> None:
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=null", "e=true", "f=x"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": None,
        "e": True,
        "f": "x",
    }
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


def test_overrides_apply(tmp_path: Path) -> None:
    cfg = load_config(
        "sft",
        ROOT / "configs/tiny/sft.yaml",
        ["train.lr=0.5", "learners.zero_stage=2", "data.train.0.split=x"],
    )
    assert cfg.train.lr == 0.5 and cfg.learners.zero_stage == 2 and cfg.data.train[0].split == "x"
    with pytest.raises(ConfigError, match="index 3 is past the end"):
        load_config("sft", ROOT / "configs/tiny/sft.yaml", ["data.train.3.split=x"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("sft", tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("sft", bad)


def test_every_field_has_a_docstring() -> None:
    """Every field of every config model, the stages' and services' included."""
    import importlib

    from pydantic import BaseModel

    from posttrain import config

    modules = ["config", "rl.config", "distill.config", "rollout.config", "rewards.config", "pipeline.config"]
    models = {
        m
        for name in modules
        for m in vars(importlib.import_module(f"posttrain.{name}")).values()
        if isinstance(m, type) and issubclass(m, config.Strict) and m is not config.Strict
    }
    assert len(models) > 30
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name, field in m.model_fields.items()
        if not field.description
        and not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    ]
    assert not missing


def test_config_imports_without_heavy_modules() -> None:
    code = "import sys, posttrain.config, posttrain.cli; print(sorted({'torch','ray','vllm','deepspeed','transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_is_fast() -> None:
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "--help"], capture_output=True, text=True, check=True
    )
    assert time.perf_counter() - began < 1.0
    assert "sft" in out.stdout and "build" in out.stdout


def dry_run(*overrides: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "posttrain",
        "sft",
        str(ROOT / "configs/tiny/sft.yaml"),
        *overrides,
        "--dry-run",
    ]
    return subprocess.run(command, capture_output=True, text=True)


def test_cli_reports_config_errors_cleanly() -> None:
    proc = dry_run("model.pth=x")
    assert proc.returncode == 2
    assert "model.pth: unknown key; did you mean 'model.path'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_dry_run_prints_resolved_config() -> None:
    proc = dry_run("train.lr=0.25")
    assert proc.returncode == 0
    assert "lr: 0.25" in proc.stdout and "zero_stage: 0" in proc.stdout


def test_periodic_actions_are_due_every_n_steps_and_after_the_last() -> None:
    from posttrain.metrics import due

    assert [s for s in range(1, 11) if due(s, 10, 4)] == [4, 8, 10]
    assert [s for s in range(1, 4) if due(s, 3, None)] == [3]


def test_tool_rl_config_chains_its_cold_start_and_drops_tools_with_one_override() -> None:
    """configs/tiny/rl_tools.yaml: its SFT start trains on the same arithmetic_tools build RL prompts come
    from and evaluates on; `tools=null` is the no-tool baseline on the same prompts."""
    cfg = load_config("rl", ROOT / "configs/tiny/rl_tools.yaml")
    assert cfg.tools is not None and cfg.tools.names == ["calculator"]
    assert cfg.data.eval is not None and cfg.data.eval.split == "test_long"
    assert cfg.init_from_sft is not None
    sft = load_config("sft", ROOT / cfg.init_from_sft.config, cfg.init_from_sft.overrides)
    assert Path(cfg.model.path).parent.as_posix() == sft.output_dir
    tool_data = [spec for spec in sft.data.train if spec.path == cfg.data.prompts[0].path]
    assert tool_data and all(spec.build == cfg.data.prompts[0].build for spec in tool_data)
    assert sft.model.build is not None and sft.model.build.args["tools"] is True
    baseline = load_config("rl", ROOT / "configs/tiny/rl_tools.yaml", ["tools=null"])
    assert baseline.tools is None and baseline.response_limit == baseline.rollout.max_tokens
