"""`posttrain` command line: options and dotted overrides in any order, unknown options rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

CONFIG = str(Path(__file__).resolve().parents[2] / "configs/tiny/rl.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        [CONFIG, "--dry-run", "train.lr=0.5"],
        ["--dry-run", CONFIG, "train.lr=0.5"],
        [CONFIG, "train.lr=0.5", "--dry-run"],
        [CONFIG, "train.lr=0.1", "--dry-run", "train.lr=0.5"],  # the later override wins
    ],
)
def test_options_and_overrides_in_any_order(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rl", *argv, "train.max_steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.5 and printed["train"]["max_steps"] == 7


@pytest.mark.parametrize(
    "argv", [["rl", CONFIG, "--dryrun", "train.lr=0.5"], ["build", "arithmetic", "--force", "out"]]
)
def test_unknown_arguments_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {argv[2]}" in capsys.readouterr().err
