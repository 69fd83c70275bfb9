"""Tool-use conversations in TRL's format: loading (JSONL, parquet), validation, loss masks, tool images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from posttrain.config import DatasetSpec
from posttrain.data.chat import IGNORE_INDEX, encode_sample
from posttrain.data.errors import DataError
from posttrain.data.processing import load_processing
from posttrain.data.rows import load_samples
from posttrain.data.sft_dataset import collate

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an integer expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
CROP_ZOOM = {
    "type": "function",
    "function": {
        "name": "crop_zoom",
        "description": "Zoom into a box of an image.",
        "parameters": {
            "type": "object",
            "properties": {"bbox_2d": {"type": "array", "items": {"type": "integer"}}, "image_index": {"type": "integer"}},
            "required": ["bbox_2d"],
        },
    },
}  # fmt: skip
QUESTION = "What is 12345+67890?"


def calc_call(expression: str, as_json: bool = False) -> dict[str, Any]:
    arguments = {"expression": expression}
    function = {"name": "calculator", "arguments": json.dumps(arguments) if as_json else arguments}
    return {"type": "function", "function": function}


def tool_row(as_json: bool = False) -> dict[str, Any]:
    """A TRL tool-use row: two calls in one turn, two grouped answers, a final answer; tools declared."""
    return {
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "", "tool_calls": [calc_call("12345+67890", as_json), calc_call("1+1", as_json)]},
            {"role": "tool", "name": "calculator", "content": "80235"},
            {"role": "tool", "name": "calculator", "content": "2"},
            {"role": "assistant", "content": "80235"},
        ],
        "tools": json.dumps([CALCULATOR, CROP_ZOOM]) if as_json else [CALCULATOR, CROP_ZOOM],
        "solution": "80235",
    }  # fmt: skip


CALLS = (
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12345+67890"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call><|im_end|>'
)


@pytest.fixture(scope="module")
def tok() -> Any:
    from posttrain.synthetic.models import build_tokenizer

    return build_tokenizer(0, tools=True)


@pytest.fixture(scope="module")
def proc(tiny_vl_model: Path) -> Any:
    return load_processing(tiny_vl_model)[0]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> DatasetSpec:
    if path.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DatasetSpec(path=str(path))


def labelled_text(tokenizer: Any, labels: Any) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_trl_tool_rows_load_alike_as_objects_or_json_strings(tmp_path: Path, suffix: str) -> None:
    """`tools` and `arguments` as objects or JSON strings give one sample; parquet's null-filled struct keys
    (the two schemas' union) are dropped."""
    (first,), (second,) = (
        load_samples(write_rows(tmp_path / f"{name}{suffix}", [tool_row(as_json)]))[0]
        for name, as_json in (("objects", False), ("strings", True))
    )  # one file each: a parquet column holds either structs or strings
    assert (first.messages, first.tools) == (second.messages, second.tools)
    assert first.tools == [CALCULATOR, CROP_ZOOM]
    assert first.messages[1] == {
        "role": "assistant",
        "text": "",
        "reasoning": None,
        "tool_calls": [calc_call("12345+67890"), calc_call("1+1")],
    }
    assert first.messages[2] == {"role": "tool", "parts": [{"type": "text", "text": "80235"}]}
    assert "tools" not in first.extra and first.extra["solution"] == "80235"


def test_loss_mask_covers_calls_and_answers_never_tool_turns(tmp_path: Path, tok: Any) -> None:
    (sample,) = load_samples(write_rows(tmp_path / "train.jsonl", [tool_row()]))[0]
    item, _ = encode_sample(sample, tok, False, 1024)
    text = tok.decode(item.input_ids)
    assert text.startswith(
        '<|im_start|>system\n# Tools\n\n<tools>\n{"type": "function", "function": {"name": "calculator"'
    )
    assert "<tool_response>\n80235\n</tool_response>\n<tool_response>\n2\n</tool_response>" in text
    assert labelled_text(tok, item.labels) == CALLS + "80235<|im_end|>"
    messages = [{k: v for k, v in m.items() if k != "name"} for m in tool_row()["messages"]]
    reference = tok.apply_chat_template(
        messages, tools=[CALCULATOR, CROP_ZOOM], return_dict=True, return_assistant_tokens_mask=True
    )  # the template's {% generation %} block, an independent account of the assistant spans
    n = len(item.input_ids)  # the encoding stops after the last <|im_end|>
    assert reference["input_ids"][:n] == item.input_ids.tolist()
    assert reference["assistant_masks"][:n] == (item.labels != IGNORE_INDEX).tolist()


def test_stage_tools_apply_to_rows_without_a_tools_column(tmp_path: Path) -> None:
    rows = [tool_row(), {k: v for k, v in tool_row().items() if k != "tools"}]
    spec = write_rows(tmp_path / "train.jsonl", rows)
    declared, bare = load_samples(spec, tools=[CALCULATOR])[0]
    assert (declared.tools, bare.tools) == ([CALCULATOR, CROP_ZOOM], [CALCULATOR])
    assert load_samples(spec)[0][1].tools is None


def test_tool_images_follow_user_images_with_pixels_for_each(tmp_path: Path, proc: Any) -> None:
    from PIL import Image

    for k, size in enumerate((128, 72)):
        Image.new("RGB", (size, size), "red").save(tmp_path / f"img{k}.png")
    call = {"type": "function", "function": {"name": "crop_zoom", "arguments": {"bbox_2d": [0, 0, 500, 500]}}}
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": [{"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
        ],
        "images": ["img0.png", "img1.png"],
        "tools": [CROP_ZOOM],
    }
    (sample,) = load_samples(write_rows(tmp_path / "train.jsonl", [row]))[0]
    assert [im.size for im in sample.images] == [(128, 128), (72, 72)]  # user image, then the tool's
    item, _ = encode_sample(sample, proc, True, 1024)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert item.image_grid_thw == [[1, 6, 6], [1, 6, 6]]
    assert int((item.input_ids == pad).sum()) == 2 * 9 == int(item.mm_token_type_ids.sum())
    text = proc.tokenizer.decode(item.input_ids)
    assert (
        "<tool_response>\n<|vision_start|>" + "<|image_pad|>" * 9 + "<|vision_end|>\n</tool_response>" in text
    )
    assert labelled_text(proc.tokenizer, item.labels) == (
        '<tool_call>\n{"name": "crop_zoom", "arguments": {"bbox_2d": [0, 0, 500, 500]}}\n</tool_call><|im_end|>'
        "7<|im_end|>"
    )
    batch = collate([item], 0, proc.image_processor)
    assert batch["image_grid_thw"].tolist() == item.image_grid_thw
    assert batch["pixel_values"].shape[0] == 2 * 36  # 6x6 patches per image


def messages_with(**changes: Any) -> dict[str, Any]:
    """tool_row() with message `index` replaced (or removed when `message` is None)."""
    row = tool_row()
    row["messages"][changes["index"]] = changes["message"]
    row["messages"] = [m for m in row["messages"] if m is not None]
    return row


BAD_TOOL_ROWS = {
    "no_name": (messages_with(index=1, message={"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}), "messages", "message 1 tool call 0 has no function name"),
    "role": (messages_with(index=2, message={"role": "function", "content": "80235"}), "messages", "message 2 has role 'function' (expected system/user/assistant), or 'tool' for a tool's answer"),
    "orphan_tool": (messages_with(index=1, message=None), "messages", "message 1 is a tool answer but no assistant tool call comes before it"),
    "bad_json": (messages_with(index=1, message={"role": "assistant", "tool_calls": [{"function": {"name": "calculator", "arguments": "{expression: 1}"}}]}), "messages", "message 1 tool call 0 (calculator) arguments is not valid JSON"),
    "list_arguments": (messages_with(index=1, message={"role": "assistant", "tool_calls": [{"name": "calculator", "arguments": [1]}]}), "messages", "arguments is a list (expected a JSON object)"),
    "calls_not_list": (messages_with(index=1, message={"role": "assistant", "tool_calls": {"name": "calculator"}}), "messages", "message 1 has tool_calls of type dict (expected a list)"),
    "no_content": (messages_with(index=4, message={"role": "assistant"}), "messages", "message 4 has missing content"),
    "tools_type": ({**tool_row(), "tools": {"name": "calculator"}}, "tools", "expected a list of tool schemas, got dict"),
    "tools_json": ({**tool_row(), "tools": "[{"}, "tools", "not valid JSON"),
    "tool_schema": ({**tool_row(), "tools": ["calculator"]}, "tools", "tool schema 0 is not valid JSON"),
    "tool_image_count": (messages_with(index=2, message={"role": "tool", "content": [{"type": "image"}]}), "images", "messages have 1 image part(s) but the row has 0 image(s)"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BAD_TOOL_ROWS))
def test_malformed_tool_rows_name_file_row_and_column(tmp_path: Path, kind: str) -> None:
    bad, column, reason = BAD_TOOL_ROWS[kind]
    spec = write_rows(tmp_path / "train.jsonl", [tool_row(), bad])
    with pytest.raises(DataError) as err:
        load_samples(spec)
    assert str(err.value).startswith(f"train.jsonl row 1, column '{column}': ")
    assert reason in str(err.value)
