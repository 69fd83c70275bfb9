"""Synthetic tasks: splits, disjointness, correct answers and traces, images, determinism."""

import re
from pathlib import Path

import pytest

from posttrain.config import DatasetSpec
from posttrain.inputs import ensure_dataset
from posttrain.synthetic.tasks import TinyTask, carries, write_task

ARITH = TinyTask(name="arithmetic", train_size=600, test_size=100, seed=3)
SHAPES = TinyTask(name="shapes", train_size=40, test_size=20, seed=3)


def load(folder: Path) -> dict:
    from datasets import load_dataset

    files = {p.stem: str(p) for p in folder.glob("*.parquet")}
    return load_dataset("parquet", data_files=files)


@pytest.fixture(scope="module")
def arith(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "arith"
    write_task(path, ARITH)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "shapes"
    write_task(path, SHAPES)
    return path


def operands(row: dict) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", row["messages"][0]["content"]))
    return a, b


def check_trace(trace: str, a: int, b: int) -> None:
    """Replay the column additions: each line's sum, written digit and carry must follow from the last."""
    *columns, last = trace.split("\n")
    xs, ys, carry, written = str(a)[::-1], str(b)[::-1], 0, ""
    for i, line in enumerate(c for c in columns if c != "write carry 1"):
        x, y = int(xs[i]), int(ys[i])
        total = x + y + carry
        expected = f"{x}+{y}+{carry}" if carry else f"{x}+{y}"
        carry = total // 10
        assert line == f"{expected}={total} write {total % 10} carry {carry}"
        written = str(total % 10) + written
    assert columns[-1] == "write carry 1" if carry else columns[-1].endswith("carry 0")
    assert last == f"answer {int(str(carry) + written)}"


def test_arithmetic_splits(arith: Path) -> None:
    data = load(arith)
    assert {s: len(d) for s, d in data.items()} == {
        "train": 600,
        "test": 100,
        "test_hard": 100,
        "test_long": 100,
    }
    for split, digits in (
        ("train", {1, 2, 3}),
        ("test", {1, 2, 3}),
        ("test_hard", {3}),
        ("test_long", {4, 5}),
    ):
        assert set(data[split]["difficulty"]) == digits
        for row in data[split]:
            a, b = operands(row)
            user, assistant = row["messages"]
            assert row["solution"] == assistant["content"] == str(eval(f"{a}+{b}"))
            assert len(str(a)) == len(str(b)) == row["difficulty"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            check_trace(assistant["reasoning_content"], a, b)
    train = {operands(r) for r in data["train"]}
    test = [operands(r) for r in data["test"]]
    assert not train & set(test) and len(set(test)) == len(test)
    hard = [operands(r) for r in data["test_hard"]]
    assert not train & set(hard) and all(carries(a, b) >= 2 for a, b in hard)


def test_shapes_images_match_answers(shapes: Path) -> None:
    import numpy as np
    from PIL import Image

    data = load(shapes)
    assert {s: len(d) for s, d in data.items()} == {"train": 40, "test": 20}
    counts = set()
    for row in data["train"]:
        (image,) = row["images"]
        assert isinstance(image, Image.Image) and image.size == (96, 96)
        n = count_blobs(np.asarray(image).min(axis=2) < 250)
        user, assistant = row["messages"]
        assert user["content"][0]["type"] == "image" and user["content"][1]["text"].startswith("How many")
        assert row["solution"] == assistant["content"][0]["text"] == str(n) == str(row["difficulty"])
        assert assistant["reasoning_content"].endswith(f" {n} shape{'s' if n > 1 else ''}.")
        counts.add(n)
    assert counts == {1, 2, 3, 4}
    pixels = lambda split: {r["images"][0].tobytes() for r in data[split]}  # noqa: E731
    assert not pixels("train") & pixels("test")


def count_blobs(mask) -> int:
    """4-connected components of a boolean image."""
    seen, blobs = set(), 0
    for start in zip(*mask.nonzero(), strict=True):
        if start in seen:
            continue
        blobs, stack = blobs + 1, [start]
        seen.add(start)
        while stack:
            y, x = stack.pop()
            for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and q not in seen:
                    seen.add(q)
                    stack.append(q)
    return blobs


def test_deterministic_and_atomic(tmp_path: Path, arith: Path, shapes: Path) -> None:
    again = tmp_path / "again"
    write_task(again, ARITH)
    assert load(again)["train"].to_list() == load(arith)["train"].to_list()
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temp folder left behind
    other = tmp_path / "other"
    write_task(other, SHAPES.model_copy(update={"seed": 4}))
    assert load(other)["test"]["solution"] != load(shapes)["test"]["solution"]


def test_ensure_dataset(tmp_path: Path) -> None:
    spec = DatasetSpec.model_validate(
        {
            "path": str(tmp_path / "d"),
            "build": {"builder": "arithmetic", "args": {"train_size": 5, "test_size": 5}},
        }
    )
    ensure_dataset(spec)
    stamp = (tmp_path / "d" / "train.parquet").stat().st_mtime_ns
    ensure_dataset(spec)  # present: left alone
    assert (tmp_path / "d" / "train.parquet").stat().st_mtime_ns == stamp
    ensure_dataset(DatasetSpec(path=str(tmp_path / "none")))  # nothing to build: no-op
    assert not (tmp_path / "none").exists()


def test_shortcut_rows_keep_the_problems_and_only_their_conclusion() -> None:
    from posttrain.synthetic.tasks import task_splits

    full, short = task_splits(ARITH), task_splits(ARITH.model_copy(update={"shortcut_fraction": 0.7}))
    assert [r["messages"][0] for r in short["train"]] == [r["messages"][0] for r in full["train"]]
    assert short["test"] == full["test"]
    cut = [s for f, s in zip(full["train"], short["train"], strict=True) if f != s]
    assert 0.6 < len(cut) / len(full["train"]) < 0.8
    assert all(r["messages"][1]["reasoning_content"] == f"answer {r['solution']}" for r in cut)
    scenes = task_splits(SHAPES.model_copy(update={"shortcut_fraction": 1.0}))["train"]
    assert {r["messages"][1]["reasoning_content"] for r in scenes} <= {
        "1 shape.",
        "2 shapes.",
        "3 shapes.",
        "4 shapes.",
    }
