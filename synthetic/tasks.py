"""Synthetic verifiable tasks written as parquet splits: multi-digit addition and shape counting.

Every row has `messages` (user prompt, assistant answer with `reasoning_content`), `solution` (the exact
answer string) and `difficulty`; shape rows also have `images`. Everything is deterministic from the seed.
Each task names the reward that verifies it (`VERIFIERS`), written beside the splits as the folder's
`task.json`, so evaluation scores the task with its own verifier (the `arithmetic` and `shapes` builders,
see posttrain.synthetic.builders).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from posttrain.config import Strict
from posttrain.data.cards import TaskCard, write_card

TaskName = Literal["arithmetic", "shapes"]
VERIFIERS: dict[str, str] = {"arithmetic": "exact_match", "shapes": "exact_match"}
"""Each task's verifier, a reward name: the answer after the thinking must equal `solution` (up to
whitespace runs), what held-out accuracy has always measured on these tasks."""


class TaskArgs(Strict):
    """A synthetic task builder's arguments (`arithmetic`, `shapes`): sizes, seed and SFT shortcuts."""

    train_size: int = Field(2000, ge=1)
    """Rows in the train split."""
    test_size: int = Field(200, ge=1)
    """Rows in each held-out split."""
    seed: int = 0
    """Generation seed."""
    shortcut_fraction: float = Field(0.0, ge=0, le=1)
    """Fraction of train rows whose reasoning skips the working and keeps only its conclusion (`answer
    N`, `N shapes.`): an SFT set that rarely shows its work, for a weak start that RL can improve."""


class TinyTask(TaskArgs):
    """A synthetic verifiable task: which one, and its builder's arguments."""

    name: TaskName = "arithmetic"
    """`arithmetic`: multi-digit addition with digit-by-digit working; `shapes`: count shapes in an image."""

    def args(self) -> dict[str, Any]:
        """The builder arguments (everything but `name`)."""
        return self.model_dump(mode="json", exclude={"name"})


ADD_PROMPTS = (
    "What is {a}+{b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "{a} + {b} = ?",
)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
COLOURS |= {"purple": (140, 60, 180), "orange": (240, 130, 20), "black": (20, 20, 20)}
SHAPE_KINDS = ("square", "circle")
SHAPES_PROMPT = "How many shapes are in the image?"
IMAGE_SIZE = 96  # multiple of 32 (patch 16 × merge 2): 6×6 patches → 9 image tokens
HELD_OUT_FRACTION = 5  # 1 in 5 addition problems (by hash) may only appear in `test`

Row = dict[str, Any]


def addition_trace(a: int, b: int) -> str:
    """Right-to-left column addition with carries, ending in `answer N`."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        term = f"{x}+{y}+{carry}" if carry else f"{x}+{y}"
        carry = total // 10
        lines.append(f"{term}={total} write {total % 10} carry {carry}")
    if carry:
        lines.append("write carry 1")
    return "\n".join([*lines, f"answer {a + b}"])


def held_out(a: int, b: int, seed: int) -> bool:
    # A stable hash, not a linear rule: a pattern in the operands would bias which columns train sees.
    return zlib.crc32(f"{seed}:{a}+{b}".encode()) % HELD_OUT_FRACTION == 0


def addition_row(a: int, b: int, prompt: str) -> Row:
    """An `arithmetic` row: the prompt, the answer with its column-by-column working."""
    answer = str(a + b)
    messages = [
        {"role": "user", "content": prompt, "reasoning_content": None},
        {"role": "assistant", "content": answer, "reasoning_content": addition_trace(a, b)},
    ]
    return {"messages": messages, "solution": answer, "difficulty": len(str(a))}


def addition_rows(
    rng: random.Random,
    n: int,
    digits: tuple[int, ...],
    keep: Callable[[int, int], bool],
    unique: bool,
    row_of: Callable[[int, int, str], Row] = addition_row,
) -> list[Row]:
    """`n` problems whose operands both have d digits (d drawn from `digits` per attempt), as
    `row_of(a, b, prompt)`."""
    rows: list[Row] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(200 * n):
        d = rng.choice(digits)
        lo, hi = (0 if d == 1 else 10 ** (d - 1)), 10**d - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if not keep(a, b) or (unique and (a, b) in seen):
            continue
        seen.add((a, b))
        rows.append(row_of(a, b, rng.choice(ADD_PROMPTS).format(a=a, b=b)))
        if len(rows) == n:
            return rows
    raise ValueError(f"could not draw {n} distinct {digits}-digit addition problems; lower the split size")


def carries(a: int, b: int) -> int:
    """Columns of a + b that carry."""
    count, carry = 0, 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        count += carry
        a, b = a // 10, b // 10
    return count


def arithmetic_splits(task: TinyTask) -> dict[str, list[Row]]:
    """train/test mix 1–3 digits and share no problem. test_hard: held-out 3-digit problems with at least
    two carries (in the trained range, where working through the columns pays); test_long: 4–5 digits
    (lengths never trained on)."""
    s = task.seed
    return {
        "train": addition_rows(
            random.Random(f"{s}:train"),
            task.train_size,
            (1, 2, 3),
            lambda a, b: not held_out(a, b, s),
            False,
        ),
        "test": addition_rows(
            random.Random(f"{s}:test"), task.test_size, (1, 2, 3), lambda a, b: held_out(a, b, s), True
        ),
        "test_hard": addition_rows(
            random.Random(f"{s}:test_hard"),
            task.test_size,
            (3,),
            lambda a, b: held_out(a, b, s) and carries(a, b) >= 2,
            True,
        ),
        "test_long": addition_rows(
            random.Random(f"{s}:test_long"), task.test_size, (4, 5), lambda a, b: True, True
        ),
    }


Shape = tuple[str, str, tuple[int, int, int, int]]  # (colour, kind, box)


def shape_scene(rng: random.Random) -> list[Shape]:
    """1–4 shapes, each in its own cell of a 3×3 grid, sorted left to right.

    A cell is 32 px, one merged vision token of Qwen3-VL (patch 16 × merge 2), so a tiny random vision
    tower can learn "this token holds a shape" and the language model counts tokens: learnable in
    minutes on a CPU, while still a real image task (positions, sizes, colours and kinds vary)."""
    cell = IMAGE_SIZE // 3
    shapes: list[Shape] = []
    for index in rng.sample(range(9), rng.randint(1, 4)):
        size = rng.randint(cell // 2, cell - 6)
        x = (index % 3) * cell + rng.randint(2, cell - size - 2)
        y = (index // 3) * cell + rng.randint(2, cell - size - 2)
        shapes.append((rng.choice(list(COLOURS)), rng.choice(SHAPE_KINDS), (x, y, x + size, y + size)))
    return sorted(shapes, key=lambda s: (s[2][0], s[2][1]))


def shape_texts(shapes: list[Shape]) -> tuple[str, str]:
    """(reasoning, answer) for a scene."""
    n = len(shapes)
    seen = ", ".join(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {kind}" for colour, kind, _ in shapes)
    return f"I see {seen}. {n} shape{'s' if n > 1 else ''}.", str(n)


def render_shapes(shapes: list[Shape]) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for colour, kind, box in shapes:
        (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def _shape_rows(rng: random.Random, n: int) -> list[Row]:
    rows = []
    for _ in range(n):
        shapes = shape_scene(rng)
        reasoning, answer = shape_texts(shapes)
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "text": None}, {"type": "text", "text": SHAPES_PROMPT}],
                "reasoning_content": None,
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": answer}],
                "reasoning_content": reasoning,
            },
        ]
        rows.append(
            {
                "messages": messages,
                "images": [render_shapes(shapes)],
                "solution": answer,
                "difficulty": len(shapes),
            }
        )
    return rows


def shapes_splits(task: TinyTask) -> dict[str, list[Row]]:
    s = task.seed
    return {
        "train": _shape_rows(random.Random(f"{s}:train"), task.train_size),
        "test": _shape_rows(random.Random(f"{s}:test"), task.test_size),
    }


CONCLUSION: dict[str, Callable[[str], str]] = {
    "arithmetic": lambda trace: trace.splitlines()[-1],  # `answer N`
    "shapes": lambda seen: seen.rsplit(". ", 1)[-1],  # `N shapes.`
}


def task_splits(task: TinyTask) -> dict[str, list[Row]]:
    """The task's splits, with a stable-hash-chosen `task.shortcut_fraction` of the train rows reasoning
    only their conclusion; the problems themselves stay those of the full set."""
    splits = (arithmetic_splits if task.name == "arithmetic" else shapes_splits)(task)
    for i, row in enumerate(splits["train"]):
        if zlib.crc32(f"{task.seed}:shortcut:{i}".encode()) % 10_000 < task.shortcut_fraction * 10_000:
            answer = row["messages"][-1]
            answer["reasoning_content"] = CONCLUSION[task.name](answer["reasoning_content"])
    return splits


def _features(name: str) -> Any:
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    content = List(part) if name == "shapes" else Value("string")
    message = {"role": Value("string"), "content": content, "reasoning_content": Value("string")}
    columns = {"messages": List(message), "solution": Value("string"), "difficulty": Value("int32")}
    return Features(columns | ({"images": List(Image())} if name == "shapes" else {}))


def write_task(path: str | Path, task: TinyTask) -> None:
    """Write `path/<split>.parquet` for every split of `task` and its `task.json` (the verifier, and the
    `build` entry that makes it again); the folder appears only when complete."""
    card = TaskCard(verifier=VERIFIERS[task.name], build={"builder": task.name, "args": task.args()})
    write_splits(path, task_splits(task), _features(task.name), card)


def write_splits(path: str | Path, splits: dict[str, list[Row]], features: Any, card: TaskCard) -> None:
    """`path/<split>.parquet` for every split (with these `features`) and the task card, atomically."""
    from datasets import Dataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal shared folder
    try:
        for split, rows in splits.items():
            Dataset.from_list(rows, features=features).to_parquet(str(tmp / f"{split}.parquet"))
        write_card(tmp, card)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus(seed: int = 0, n: int = 3000) -> Iterator[tuple[str, str, str]]:
    """(prompt, reasoning, answer) texts of both tasks, for training the tiny tokenizer."""
    rng = random.Random(f"{seed}:corpus")
    for row in addition_rows(rng, n, (1, 2, 3, 4, 5), lambda a, b: True, False):
        user, assistant = row["messages"]
        yield user["content"], assistant["reasoning_content"], assistant["content"]
    for _ in range(n // 4):
        yield (SHAPES_PROMPT, *shape_texts(shape_scene(rng)))
