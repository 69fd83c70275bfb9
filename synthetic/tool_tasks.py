"""Synthetic tasks that a tool makes solvable, written as parquet splits with their task card:

- `arithmetic_tools`: additions of 1-3 digits (the tiny models learn them, working column by column) and
  of 4-5 digits (they score ~0 on these without a tool): the `calculator` tool answers them.
- `vl_zoom`: a 512x512 image with one small seven-segment digit; at the tiny Qwen3-VL's 96x96 input the
  digit is a blur of ~2x4 pixels, while `crop_zoom` on a box around it shows it 1:1 or larger.

Splits: `train` (RL prompts: the user turn, `solution`, and what the checks below need), held-out prompt
splits (`test`, and `test_long` for the long additions), and `sft`, a cold-start set of tool-use traces
in TRL's format: the assistant calls the tool (arguments as a JSON string), a `tool` turn holds its answer
(the crop for `vl_zoom`, in the row's `images` after the prompt's), the assistant states the answer in the
task's format (`exact_match` with `solution` after the thinking). Short additions are answered directly,
with their working, so a cold-started model keeps them. Every assistant turn carries reasoning (thinking
mode), so no turn needs the empty think block as its prompt.

Rows carry no `tools` column: the card names the tool (`task.json` `tools`), whose schema SFT declares
as RL does (RL offers the tools of its `tools:` section: name the same one). The same prompts without
tools (RL without `tools:`; a dataset spec's `tools: []` in SFT) are the no-tool baseline. `tool_call_correct` scores whether a completion's first tool
call is the one the traces teach, for measuring a cold start.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from posttrain.config import Strict
from posttrain.data.cards import TaskCard
from posttrain.data.images import BBOX_SCALE, crop_region
from posttrain.synthetic.tasks import Row, addition_rows, addition_trace, held_out, write_splits

CALL_REASONING = {"calculator": "use the calculator", "crop_zoom": "the digit is too small: zoom in"}
"""The thinking before each task's tool call (short: it is the same in every trace)."""
ZOOM_PROMPT = "What digit is written in the image?"
ZOOM_IMAGE = 512  # the 96x96 model input shrinks it 5.3x
CELLS = 3  # the digit sits near the centre of one of 3x3 cells: one merged vision token each at 96x96
DIGIT_SIZE = (10, 16, 3)  # width, height, stroke (px): ~2x3 px at 96x96, unreadable
SEGMENTS = {
    "a": (0, 0, 1, 0),
    "b": (1, 0, 1, 1),
    "c": (1, 1, 1, 2),
    "d": (0, 2, 1, 2),
    "e": (0, 1, 0, 2),
    "f": (0, 0, 0, 1),
    "g": (0, 1, 1, 1),
}
"""Seven-segment strokes as (x0, y0, x1, y1) on a 1x2 grid: drawn with rectangles, so the images are the
same with every Pillow and font setup."""
DIGITS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
RowOf = Callable[[int, int, str], Row]


class ToolTaskArgs(Strict):
    """A tool task builder's arguments (`arithmetic_tools`, `vl_zoom`)."""

    train_size: int = Field(2000, ge=1)
    """Rows in the RL prompt split `train`."""
    test_size: int = Field(200, ge=1)
    """Rows in each held-out prompt split."""
    sft_size: int = Field(500, ge=1)
    """Tool-use traces in the SFT cold-start split `sft`."""
    seed: int = 0
    """Generation seed."""


class ArithmeticToolsArgs(ToolTaskArgs):
    """`arithmetic_tools`: which share of `train` and `sft` are long additions."""

    long_fraction: float = Field(0.5, ge=0, le=1)
    """Share of 4-5 digit additions in `train` and `sft` (the rest have 1-3 digits)."""


# ------------------------------------------------------------------------------------------- arithmetic


def calculator_call(expression: str) -> dict[str, Any]:
    arguments = json.dumps({"expression": expression})
    return {"type": "function", "function": {"name": "calculator", "arguments": arguments}}


def _message(role: str, content: Any, reasoning: str | None = None, **more: Any) -> dict[str, Any]:
    """A message with every key the parquet features have (absent ones null)."""
    return {
        "role": role,
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": None,
        "name": None,
    } | more


def _prompt_row(a: int, b: int, prompt: str) -> Row:
    """An addition as a prompt: the user turn, `solution`, `difficulty` and the `expression` to call with."""
    return {
        "messages": [_message("user", prompt)],
        "solution": str(a + b),
        "difficulty": len(str(a)),
        "expression": f"{a}+{b}",
    }


def _trace_row(a: int, b: int, prompt: str) -> Row:
    """The SFT trace of an addition: long ones call the calculator, short ones are worked directly."""
    row = _prompt_row(a, b, prompt)
    answer = row["solution"]
    if row["difficulty"] <= 3:
        turns = [_message("assistant", answer, addition_trace(a, b))]
    else:
        call = calculator_call(row["expression"])
        turns = [
            _message("assistant", "", CALL_REASONING["calculator"], tool_calls=[call]),
            _message("tool", answer, name="calculator"),
            _message("assistant", answer, f"answer {answer}"),
        ]
    return row | {"messages": row["messages"] + turns}


def _mixed_rows(
    rng: random.Random, n: int, long_fraction: float, keep: Callable[[int, int], bool], row_of: RowOf
) -> list[Row]:
    """`n` additions, a `long_fraction` of them with 4-5 digits, the rest 1-3, shuffled."""
    n_long = round(n * long_fraction)
    rows = addition_rows(rng, n - n_long, (1, 2, 3), keep, False, row_of) if n > n_long else []
    rows += addition_rows(rng, n_long, (4, 5), keep, False, row_of) if n_long else []
    rng.shuffle(rows)
    return rows


def arithmetic_tools_splits(args: ArithmeticToolsArgs) -> dict[str, list[Row]]:
    """train (RL prompts) and sft (traces) mix short and long additions; test (1-3 digits) and test_long
    (4-5 digits) hold problems neither of them has (a stable hash sets them apart)."""
    s = args.seed

    def trained(a: int, b: int) -> bool:
        return not held_out(a, b, s)

    def held(a: int, b: int) -> bool:
        return held_out(a, b, s)

    def rng(split: str) -> random.Random:
        return random.Random(f"{s}:tools:{split}")

    fraction = args.long_fraction
    return {
        "train": _mixed_rows(rng("train"), args.train_size, fraction, trained, _prompt_row),
        "sft": _mixed_rows(rng("sft"), args.sft_size, fraction, trained, _trace_row),
        "test": addition_rows(rng("test"), args.test_size, (1, 2, 3), held, True, _prompt_row),
        "test_long": addition_rows(rng("test_long"), args.test_size, (4, 5), held, True, _prompt_row),
    }


# ---------------------------------------------------------------------------------------------- vl_zoom


def draw_digit(draw: Any, digit: int, left: int, top: int) -> None:
    width, height, stroke = DIGIT_SIZE
    for segment in DIGITS[digit]:
        x0, y0, x1, y1 = SEGMENTS[segment]
        box = (left + x0 * (width - stroke), top + y0 * (height - stroke) // 2)
        end = (left + x1 * (width - stroke) + stroke, top + y1 * (height - stroke) // 2 + stroke)
        draw.rectangle((*box, end[0] - 1, end[1] - 1), fill=(20, 20, 20))


def _relative(box: tuple[float, float, float, float]) -> list[int]:
    """A pixel box of the zoom image in Qwen3-VL's 0..1000 coordinates (clamped)."""
    return [min(BBOX_SCALE, max(0, round(v * BBOX_SCALE / ZOOM_IMAGE))) for v in box]


def zoom_scene(rng: random.Random) -> tuple[Any, int, list[int], list[int]]:
    """(image, digit, the digit's box, a jittered zoom box around it); boxes in 0..1000 coordinates."""
    from PIL import Image, ImageDraw

    width, height, _ = DIGIT_SIZE
    cell = ZOOM_IMAGE / CELLS
    index = rng.randrange(CELLS * CELLS)
    cx = (index % CELLS + 0.5) * cell + rng.uniform(-cell / 6, cell / 6)
    cy = (index // CELLS + 0.5) * cell + rng.uniform(-cell / 6, cell / 6)
    left, top = round(cx - width / 2), round(cy - height / 2)
    digit = rng.randrange(10)
    image = Image.new("RGB", (ZOOM_IMAGE, ZOOM_IMAGE), (255, 255, 255))
    draw_digit(ImageDraw.Draw(image), digit, left, top)
    half = rng.uniform(32, 44)  # the crop shows the digit at 1.1-1.5x the 96x96 input
    zx, zy = cx + rng.uniform(-8, 8), cy + rng.uniform(-8, 8)
    target = _relative((left, top, left + width, top + height))
    return image, digit, target, _relative((zx - half, zy - half, zx + half, zy + half))


def _zoom_rows(rng: random.Random, n: int, traces: bool) -> list[Row]:
    rows = []
    for _ in range(n):
        image, digit, target, box = zoom_scene(rng)
        answer = str(digit)
        messages = [
            _message("user", [{"type": "image", "text": None}, {"type": "text", "text": ZOOM_PROMPT}])
        ]
        images = [image]
        if traces:
            call = {
                "type": "function",
                "function": {"name": "crop_zoom", "arguments": json.dumps({"bbox_2d": box})},
            }
            messages += [
                _message("assistant", [], CALL_REASONING["crop_zoom"], tool_calls=[call]),
                _message("tool", [{"type": "image", "text": None}], name="crop_zoom"),
                _message("assistant", [{"type": "text", "text": answer}], f"the digit is {answer}"),
            ]
            images.append(crop_region(image, box))
        rows.append({"messages": messages, "images": images, "solution": answer, "bbox_2d": target})
    return rows


def vl_zoom_splits(args: ToolTaskArgs) -> dict[str, list[Row]]:
    s = args.seed
    return {
        "train": _zoom_rows(random.Random(f"{s}:zoom:train"), args.train_size, False),
        "sft": _zoom_rows(random.Random(f"{s}:zoom:sft"), args.sft_size, True),
        "test": _zoom_rows(random.Random(f"{s}:zoom:test"), args.test_size, False),
    }


# ---------------------------------------------------------------------------------------------- writing

TOOL_TASKS: dict[str, tuple[Callable[[Any], dict[str, list[Row]]], str]] = {
    "arithmetic_tools": (arithmetic_tools_splits, "calculator"),
    "vl_zoom": (vl_zoom_splits, "crop_zoom"),
}
"""Each tool task's splits and the one tool it is solved with."""


def _features(vl: bool) -> Any:
    from datasets import Features, Image, List, Value

    text = Value("string")
    content = List({"type": text, "text": text}) if vl else text
    call = {"type": text, "function": {"name": text, "arguments": text}}
    message = {
        "role": text,
        "content": content,
        "reasoning_content": text,
        "tool_calls": List(call),
        "name": text,
    }
    columns = {"messages": List(message), "solution": text}
    if vl:
        return Features(columns | {"images": List(Image()), "bbox_2d": List(Value("int32"))})
    return Features(columns | {"difficulty": Value("int32"), "expression": text})


def write_tool_task(path: str | Path, name: str, args: ToolTaskArgs) -> None:
    """Write the splits of tool task `name` and its card (verifier `exact_match`, its tool, its build)."""
    splits, tool = TOOL_TASKS[name]
    card = TaskCard(
        verifier="exact_match", tools=[tool], build={"builder": name, "args": args.model_dump(mode="json")}
    )
    write_splits(path, splits(args), _features(name == "vl_zoom"), card)


# --------------------------------------------------------------------------------------------- checking


def first_tool_call(completion: str) -> dict[str, Any] | None:
    """The first `<tool_call>` JSON object of a completion as {name, arguments}; None if there is none
    or it is malformed."""
    found = TOOL_CALL_RE.search(completion)
    try:
        call = json.loads(found.group(1)) if found else None
    except json.JSONDecodeError:
        return None
    ok = (
        isinstance(call, dict)
        and isinstance(call.get("name"), str)
        and isinstance(call.get("arguments"), dict)
    )
    return call if ok else None


def _box_covers(box: Any, target: list[int]) -> bool:
    """A zoom box (four numbers) that holds the whole target and is at most 400 units on each side (a
    zoom of at least 2.5x)."""
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return False
    x1, x2 = sorted(box[0::2])
    y1, y2 = sorted(box[1::2])
    inside = x1 <= target[0] and y1 <= target[1] and x2 >= target[2] and y2 >= target[3]
    return inside and x2 - x1 <= 400 and y2 - y1 <= 400


def tool_call_correct(completions: list[str], **columns: Any) -> list[float | None]:
    """1.0 when a completion's first tool call is the one the traces teach: `calculator` with the row's
    `expression` (spaces ignored), or `crop_zoom` with a box covering the row's `bbox_2d`. A reward in
    TRL's convention, named `posttrain.synthetic.tool_tasks:tool_call_correct` (as an evaluation
    `verifier`, its accuracy is the share of right calls)."""
    out: list[float | None] = []
    for k, completion in enumerate(completions):
        call = first_tool_call(completion)
        arguments = call["arguments"] if call else {}
        if "expression" in columns:
            wanted = columns["expression"][k]
            right = call is not None and call["name"] == "calculator"
            right = right and str(arguments.get("expression", "")).replace(" ", "") == wanted
        else:
            right = call is not None and call["name"] == "crop_zoom"
            right = right and _box_covers(arguments.get("bbox_2d"), list(columns["bbox_2d"][k]))
        out.append(float(right))
    return out
