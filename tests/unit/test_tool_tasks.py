"""The tool tasks: arithmetic_tools (calculator) and vl_zoom (crop_zoom), their splits, traces and checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posttrain.config import DatasetSpec
from posttrain.data.cards import dataset_tools, dataset_verifier
from posttrain.data.images import crop_region
from posttrain.data.rows import load_samples
from posttrain.rollout.evaluation import declared_schemas
from posttrain.synthetic.tool_tasks import (
    DIGIT_SIZE,
    ZOOM_IMAGE,
    ArithmeticToolsArgs,
    ToolTaskArgs,
    arithmetic_tools_splits,
    tool_call_correct,
    vl_zoom_splits,
    zoom_scene,
)


def question(row: dict) -> str:
    return row["messages"][0]["content"]


def test_arithmetic_splits_mix_lengths_and_hold_problems_out() -> None:
    splits = arithmetic_tools_splits(ArithmeticToolsArgs(train_size=200, test_size=40, sft_size=100))
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "sft": 100, "test": 40, "test_long": 40}
    assert sum(r["difficulty"] >= 4 for r in splits["train"]) == 100
    assert {r["difficulty"] for r in splits["test"]} <= {1, 2, 3}
    assert {r["difficulty"] for r in splits["test_long"]} == {4, 5}
    trained = {r["expression"] for split in ("train", "sft") for r in splits[split]}
    assert not trained & {r["expression"] for split in ("test", "test_long") for r in splits[split]}
    for row in splits["train"] + splits["test_long"]:
        a, b = map(int, row["expression"].split("+"))
        assert len(row["messages"]) == 1 and row["solution"] == str(a + b)
        assert str(a) in question(row) and str(b) in question(row)


def test_arithmetic_traces_call_the_calculator_for_long_additions_only() -> None:
    sft = arithmetic_tools_splits(ArithmeticToolsArgs(train_size=1, test_size=1, sft_size=20))["sft"]
    for row in sft:
        turns = row["messages"][1:]
        if row["difficulty"] <= 3:
            assert [t["role"] for t in turns] == ["assistant"]
            assert turns[0]["reasoning_content"].endswith(f"answer {row['solution']}")
            continue
        assert [t["role"] for t in turns] == ["assistant", "tool", "assistant"]
        (call,) = turns[0]["tool_calls"]
        assert call["function"]["name"] == "calculator"
        assert json.loads(call["function"]["arguments"]) == {"expression": row["expression"]}
        assert turns[1]["content"] == row["solution"] == turns[2]["content"]


def test_zoom_box_covers_the_digit_and_the_crop_makes_it_readable() -> None:
    """At the 96x96 input the digit is ~2x3 px; the crop of the trace's box shows it >= 10 px wide."""
    rng = random.Random(0)
    width, height, _ = DIGIT_SIZE
    for _ in range(50):
        image, _, target, box = zoom_scene(rng)
        assert tool_call_correct([call("crop_zoom", bbox_2d=box)], bbox_2d=[target]) == [1.0]
        ink = image.convert("L").point(lambda v: 255 if v < 128 else 0).getbbox()
        x1, y1, x2, y2 = (t * ZOOM_IMAGE / 1000 for t in target)  # the digit's cell (a 1 inks its right side)
        assert ink is not None and x1 - 1 <= ink[0] < ink[2] <= x2 + 1 and y1 - 1 <= ink[1] < ink[3] <= y2 + 1
        assert (round(x2 - x1), round(y2 - y1)) == (width, height)
        region_width = (box[2] - box[0]) * ZOOM_IMAGE / 1000  # pixels the processor shows at ~96
        assert width * 96 / region_width >= 10 and height * 96 / ZOOM_IMAGE <= 3


def test_zoom_traces_hold_the_crop_after_the_prompt_image() -> None:
    splits = vl_zoom_splits(ToolTaskArgs(train_size=3, test_size=3, sft_size=5))
    assert [len(r["images"]) for r in splits["train"] + splits["test"]] == [1] * 6
    for row in splits["sft"]:
        call = row["messages"][1]["tool_calls"][0]["function"]
        box = json.loads(call["arguments"])["bbox_2d"]
        assert call["name"] == "crop_zoom" and [m["role"] for m in row["messages"]][2] == "tool"
        assert list(row["images"][1].getdata()) == list(crop_region(row["images"][0], box).getdata())
        assert row["messages"][3]["content"] == [{"type": "text", "text": row["solution"]}]


def call(name: str, **arguments: object) -> str:
    return f"<think>\nx\n</think>\n\n<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_tool_call_correct_checks_name_and_arguments() -> None:
    completions = [
        call("calculator", expression="12 + 34"),
        call("calculator", expression="12+35"),
        call("crop_zoom", expression="12+34"),
        "<tool_call>\n{'name': 'calculator'}\n</tool_call>",
        "46",
    ]
    assert tool_call_correct(completions, expression=["12+34"] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    target = [[400, 400, 420, 440]] * 4
    boxes = [[350, 350, 500, 500], [410, 350, 500, 500], [0, 0, 1000, 1000], "350,350,500,500"]
    zooms = [call("crop_zoom", bbox_2d=b) for b in boxes]
    assert tool_call_correct(zooms, bbox_2d=target) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("builder", "splits", "tool"), [("arithmetic_tools", 4, "calculator"), ("vl_zoom", 3, "crop_zoom")]
)
def test_builders_write_loadable_splits_that_name_their_tool(
    tmp_path: Path, builder: str, splits: int, tool: str
) -> None:
    from posttrain.inputs import ensure_dataset
    from posttrain.rewards.tools import load_tools

    args = {"train_size": 4, "test_size": 2, "sft_size": 4}
    build = {"builder": builder, "args": args}
    where = {"path": str(tmp_path / builder), "split": "sft", "thinking": "thinking"}  # every trace reasons
    spec = DatasetSpec.model_validate(where | {"build": build})
    ensure_dataset(spec)
    assert len(list((tmp_path / builder).glob("*.parquet"))) == splits
    assert dataset_tools(spec) == [tool] and dataset_tools(spec.model_copy(update={"tools": []})) == []
    assert declared_schemas(spec) == load_tools([tool]).schemas
    assert declared_schemas(spec.model_copy(update={"tools": []})) is None
    assert dataset_verifier(spec)[0] == "exact_match"
    samples = load_samples(spec, tools=declared_schemas(spec))[0]
    assert [s.tools for s in samples] == [load_tools([tool]).schemas] * 4
    prompts = load_samples(spec.model_copy(update={"split": "train"}), for_eval=True)[0]
    assert [(len(s.messages), s.tools) for s in prompts] == [(1, None)] * 4  # the no-tool baseline
