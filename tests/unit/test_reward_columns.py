"""Rewards declare the dataset columns they need (built-ins by `@reward(requires=...)`, plugins by a
`required_columns` attribute, verl functions their `ground_truth`); an RL prompt set is checked against the
configured rewards before any engine starts, and the error names the reward and the column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from posttrain.cli import main
from posttrain.config import DatasetSpec
from posttrain.data.errors import DataError
from posttrain.data.processing import load_processing
from posttrain.data.prompts import build_eval_prompts
from posttrain.rewards import RewardLoadError, RewardsConfig
from posttrain.rewards.registry import required_columns
from posttrain.rollout.episodes import build_prompts

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path(__file__).parents[1] / "plugins"
ANSWER_MATCH = f"{PLUGINS / 'trl_style.py'}:answer_match"
PROMPTS = [
    {"messages": [{"role": "user", "content": "What is 2+3?"}], "answer": "5"},
    {"messages": [{"role": "user", "content": "What is 4+4?"}], "answer": None},
]


def needs(*rewards: str | dict[str, Any]) -> dict[str, str]:
    return required_columns(RewardsConfig(rewards=list(rewards)).rewards)


def write_prompts(tmp_path: Path) -> DatasetSpec:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return DatasetSpec(path=str(path))


@pytest.fixture(scope="module")
def tok(tiny_text_model: Path) -> Any:
    return load_processing(tiny_text_model)[0]


def test_builtins_declare_their_columns() -> None:
    assert needs("think_format", "length_penalty", "answer_present", "model_judge") == {}
    graders = ("math_accuracy", "exact_match", "digit_match", "choice_match", "grounding_iou")
    assert needs(*graders) == {"solution": "reward 'math_accuracy'"}  # the first reward needing it


def test_plugins_declare_columns_by_attribute(tmp_path: Path) -> None:
    undeclared = f"{PLUGINS / 'trl_style.py'}:my_reward"  # takes `solution` but declares nothing
    assert needs(undeclared, ANSWER_MATCH) == {"answer": "reward 'answer_match'"}
    verl = {"name": f"{PLUGINS / 'verl_style.py'}:compute_score", "ground_truth": "answer", "label": "v"}
    assert needs(verl) == {"answer": "reward 'v'"}
    plugin = tmp_path / "bad.py"
    plugin.write_text(
        "def f(completions, **kw):\n    return [1.0] * len(completions)\nf.required_columns = 'x'\n"
    )
    with pytest.raises(RewardLoadError, match=r"reward '.*bad.py:f': `required_columns` must be a tuple"):
        needs(f"{plugin}:f")


def test_rl_prompts_need_solution_only_for_a_reward_that_needs_it(tmp_path: Path, tok: Any) -> None:
    spec = write_prompts(tmp_path)
    assert len(build_prompts([spec], tok, False, 64, needs("think_format"))) == 2
    with pytest.raises(
        DataError, match=r"prompts.jsonl: missing column 'solution', needed by reward 'math_accuracy'"
    ):
        build_prompts([spec], tok, False, 64, needs("think_format", "math_accuracy"))
    with pytest.raises(DataError, match=r"missing column 'solution', needed by the evaluation"):
        build_eval_prompts(spec, tok)


def test_a_plugin_declared_column_is_checked_on_every_row(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(
        DataError, match=r"prompts.jsonl row 1, column 'answer': missing \(needed by reward 'answer_match'\)"
    ):
        build_prompts([write_prompts(tmp_path)], tok, False, 64, needs(ANSWER_MATCH))


def test_rl_run_stops_before_engines_naming_reward_and_column(
    tmp_path: Path, tiny_text_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_prompts(tmp_path)
    argv = ["rl", str(ROOT / "configs/tiny/rl.yaml"), f"output_dir={tmp_path / 'run'}", "init_from_sft=null",
            f"model.path={tiny_text_model}", f"data.prompts.0.path={spec.path}", "data.prompts.0.build=null",
            "data.eval=null", "rewards.rewards=[think_format, exact_match]"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "missing column 'solution', needed by reward 'exact_match'" in err, err
