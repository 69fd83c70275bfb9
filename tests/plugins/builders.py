"""Input builders and a verifier written as plugins (named `path/to/builders.py:attr` in configs)."""

import json
import re
from pathlib import Path

from posttrain.builders import builder
from posttrain.config import Strict

HERE = Path(__file__).resolve()


class SumArgs(Strict):
    rows: int = 2
    """Rows in the `test` split."""
    answer: str = "42"
    """Every row's solution."""


def last_number(completions, solution, **kwargs):
    """Accepts an answer whose last number is the solution ("The answer is 42." for 42): lenient where
    exact match is strict."""
    found = [re.findall(r"-?\d+", c) for c in completions]
    return [float(bool(f) and f[-1] == str(s)) for f, s in zip(found, solution, strict=True)]


last_number.required_columns = ("solution",)


@builder(makes="dataset", args=SumArgs, verifier=f"{HERE}:last_number")
def sums(path: Path, args: SumArgs) -> None:
    """A `test.jsonl` of prompt-only rows, verified by `last_number`."""
    path.mkdir(parents=True)
    rows = [{"prompt": "What is 40+2?", "solution": args.answer} for _ in range(args.rows)]
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@builder(makes="dataset", args=SumArgs)
def forgetful(path: Path, args: SumArgs) -> None:
    """Returns without writing anything."""


def not_a_builder(path: Path, args: object) -> None:
    """A plain function, not declared with @builder."""


def one_score(completions, **kwargs):
    """Returns one score whatever the batch size."""
    return [1.0]


def raises(completions, **kwargs):
    """Fails on every batch."""
    raise ValueError("cannot judge this")
