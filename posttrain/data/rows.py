"""Row validation: each row becomes a Sample (chat messages with content as parts and reasoning split out,
decoded images, thinking or non-thinking mode, tool schemas), or a RowError naming its column.
`load_samples` checks every row of a split before any training starts.

Tool use is read in TRL's format: assistant turns may carry `tool_calls` (`{"type": "function",
"function": {"name", "arguments"}}`, or the bare `{"name", "arguments"}`; arguments an object or its JSON
string), `tool` turns answer them (text, or parts with images), and a `tools` column lists the JSON
schemas (a list, or its JSON string) the chat template declares. Null values in arguments and schemas are
dropped: a parquet file stores the arguments of different tools as one struct, filling the keys the others
use with null."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from posttrain.config import DatasetSpec
from posttrain.data.errors import DataError, RowError
from posttrain.data.files import load_split
from posttrain.data.images import row_images

log = logging.getLogger("posttrain.data")

ROLES = ("system", "user", "assistant", "tool")
THINK_RE = re.compile(r"\s*<think>(.*?)</think>", re.S)
MAX_REASONS = 5  # skipped-row reasons kept for the log and stats
Mode = Literal["thinking", "non_thinking"]
Needs = Mapping[str, str]
"""Columns every row must have a value in → who needs each, as errors name it ("reward 'exact_match'")."""
NO_NEEDS: Needs = MappingProxyType({})
EVAL_NEEDS: Needs = MappingProxyType({"solution": "the evaluation (exact match with the answer)"})


@dataclass
class Sample:
    """A validated row: chat messages (content as parts, reasoning split out), decoded images, chosen mode."""

    messages: list[dict[str, Any]]
    images: list[Any]
    mode: Mode
    origin: str
    row: int
    extra: dict[str, Any] = field(default_factory=dict)  # the row's other columns (solution, …) for rewards
    tools: list[dict[str, Any]] | None = None  # JSON schemas the chat template declares


def detect_format(
    columns: list[str], spec: DatasetSpec, origin: str, for_eval: bool = False, needs: Needs = NO_NEEDS
) -> str:
    """`messages` or `prompt_completion`, checking that the columns it and `needs` need exist."""
    fmt = spec.format
    if fmt == "auto":
        fmt = "messages" if "messages" in columns else "prompt_completion"
    needed = ["messages"] if fmt == "messages" else ["prompt"] if for_eval else ["prompt", "completion"]
    needed += [spec.thinking_column] if spec.thinking == "column" else []
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{origin}: missing column {missing[0]!r} (columns: {', '.join(columns)}); rows need `messages` "
            "or `prompt` + `completion`, plus `thinking_column` under thinking: column"
        )
    absent = [c for c in needs if c not in columns]
    if absent:
        raise DataError(
            f"{origin}: missing column {absent[0]!r}, needed by {needs[absent[0]]} (columns: {', '.join(columns)})"
        )
    return fmt


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) from an inline `<think>…</think>` at the start; (None, text) without one."""
    found = THINK_RE.match(text)
    if found is None:
        return None, text
    return found.group(1).strip(), text[found.end() :].lstrip("\n")


def _parts(content: Any, column: str, where: str) -> list[dict[str, str]]:
    """Content as a list of `{"type": "text", "text": …}` / `{"type": "image"}` parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        kind = "missing" if content is None else type(content).__name__
        raise RowError(column, f"{where} has {kind} content (expected a string or a list of parts)")
    parts = []
    for k, part in enumerate(content):
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "image":
            parts.append({"type": "image"})
        elif part_type == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise RowError(column, f"{where} part {k} is not a text or image part: {str(part)[:80]}")
    return parts


def _without_nulls(value: Any) -> Any:
    """`value` with null-valued keys dropped from every object in it (lists keep their items)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _json_object(value: Any, column: str, what: str) -> dict[str, Any]:
    """An object given as a dict or its JSON string, without null values."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(column, f"{what} is not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise RowError(column, f"{what} is a {type(value).__name__} (expected a JSON object)")
    return _without_nulls(value)


def _tool_calls(raw: Any, column: str, where: str) -> list[dict[str, Any]]:
    """TRL tool calls as `{"type": "function", "function": {"name", "arguments": dict}}`."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RowError(column, f"{where} has tool_calls of type {type(raw).__name__} (expected a list)")
    calls = []
    for j, call in enumerate(raw):
        fn: Any = (call.get("function") or call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise RowError(column, f"{where} tool call {j} has no function name: {str(call)[:80]}")
        arguments = _json_object(
            fn.get("arguments") or {}, column, f"{where} tool call {j} ({name}) arguments"
        )
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _assistant_message(msg: dict[str, Any], column: str, where: str) -> dict[str, Any]:
    """{role, text, reasoning} (+ `tool_calls` when it calls tools); content may be empty beside calls."""
    calls = _tool_calls(msg.get("tool_calls"), column, where)
    content = msg.get("content")
    parts = _parts("" if content is None and calls else content, column, where)
    if any(p["type"] == "image" for p in parts):
        raise RowError(column, f"{where}: images are only allowed in user, system or tool turns")
    reasoning = msg.get("reasoning_content")
    inline, text = split_reasoning("".join(p["text"] for p in parts))
    # Whitespace-only reasoning renders as an empty think block, so it counts as none.
    out = {"role": "assistant", "text": text, "reasoning": (reasoning or inline or "").strip() or None}
    return out | ({"tool_calls": calls} if calls else {})


def _check_messages(raw: Any, column: str) -> list[dict[str, Any]]:
    """Validated messages: {role, parts}, or for assistant turns {role, text, reasoning (str or None)} and
    their `tool_calls`; a tool turn must answer an assistant turn's calls."""
    if raw is None:
        raise RowError(column, "missing")
    if not isinstance(raw, list):
        raise RowError(column, f"expected a list of messages, got {type(raw).__name__}")
    if not raw:
        raise RowError(column, "no messages")
    out: list[dict[str, Any]] = []
    for k, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise RowError(
                column, f"message {k} is a {type(msg).__name__} (expected a dict with role and content)"
            )
        role = msg.get("role")
        if role not in ROLES:
            raise RowError(
                column,
                f"message {k} has role {role!r} (expected system/user/assistant), or 'tool' for a tool's answer",
            )
        if msg.get("reasoning_content") is not None and not isinstance(msg["reasoning_content"], str):
            raise RowError(column, f"message {k} has non-string reasoning_content")
        if role == "tool" and not (out and (out[-1]["role"] == "tool" or out[-1].get("tool_calls"))):
            raise RowError(column, f"message {k} is a tool answer but no assistant tool call comes before it")
        if role == "assistant":
            out.append(_assistant_message(msg, column, f"message {k}"))
        else:
            out.append({"role": role, "parts": _parts(msg.get("content"), column, f"message {k}")})
    return out


def _row_tools(row: dict[str, Any], default: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The row's `tools` schemas (a list of objects or JSON strings, or the list's JSON string), else
    `default`."""
    value = row.get("tools")
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError("tools", f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, list):
        raise RowError("tools", f"expected a list of tool schemas, got {type(value).__name__}")
    return [_json_object(schema, "tools", f"tool schema {k}") for k, schema in enumerate(value)]


def _row_messages(row: dict[str, Any], fmt: str, for_eval: bool) -> list[dict[str, Any]]:
    if fmt == "messages":
        return _check_messages(row.get("messages"), "messages")
    prompt, completion = row.get("prompt"), row.get("completion")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = _check_messages(prompt, "prompt")
    if for_eval and completion is None:  # prompt-only eval sets
        return messages
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    messages += _check_messages(completion, "completion")
    reasoning = row.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RowError("reasoning", f"expected a string, got {type(reasoning).__name__}")
    if reasoning and reasoning.strip() and messages[-1]["role"] == "assistant":
        messages[-1]["reasoning"] = reasoning.strip()
    return messages


def _choose_mode(row: dict[str, Any], spec: DatasetSpec, has_reasoning: bool, strict: bool) -> Mode:
    """thinking / non_thinking per `spec.thinking`; `strict` requires reasoning for thinking samples."""
    if spec.thinking == "column":
        want = row.get(spec.thinking_column)
        if not isinstance(want, bool):
            raise RowError(spec.thinking_column, f"expected true or false, got {want!r}")
    else:
        want = {"auto": has_reasoning, "thinking": True, "non_thinking": False}[spec.thinking]
    if want and strict and not has_reasoning:
        raise RowError(
            "messages", "thinking sample without reasoning (no reasoning_content or <think>…</think>)"
        )
    return "thinking" if want else "non_thinking"


def normalise_row(
    row: dict[str, Any],
    fmt: str,
    spec: DatasetSpec,
    origin: str,
    index: int,
    base_dir: Path | None = None,
    for_eval: bool = False,
    needs: Needs = NO_NEEDS,
    tools: list[dict[str, Any]] | None = None,
) -> Sample:
    """Validate one row into a Sample; raises RowError. For eval (and RL prompts) the final assistant
    turn is removed; every column of `needs` must have a value; `tools` are the schemas of a row without
    a `tools` column."""
    messages = _row_messages(row, fmt, for_eval)
    has_reasoning = any(m.get("reasoning") for m in messages)
    column = "messages" if fmt == "messages" else "completion"
    if for_eval:
        messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        if not any(m["role"] == "user" for m in messages):
            raise RowError("messages" if fmt == "messages" else "prompt", "no user message to prompt with")
    elif not any(m["role"] == "assistant" for m in messages):
        raise RowError(column, "no assistant message")
    elif messages[-1]["role"] != "assistant":
        raise RowError(
            column, f"last message is {messages[-1]['role']!r} (expected assistant, the response to train on)"
        )
    for needed, by in needs.items():
        if row.get(needed) is None:
            raise RowError(needed, f"missing (needed by {by})")
    images = row_images(row, messages, base_dir)
    mode = _choose_mode(row, spec, has_reasoning, strict=not for_eval)
    if mode == "non_thinking":
        messages = [{**m, "reasoning": None} if m["role"] == "assistant" else m for m in messages]
    extra = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion", "images", "tools")}
    return Sample(messages, images, mode, origin, index, extra, _row_tools(row, tools))


def load_samples(
    spec: DatasetSpec,
    bad_rows: str = "error",
    for_eval: bool = False,
    needs: Needs = NO_NEEDS,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[Sample], int, list[str]]:
    """Validate every row of `spec`, with the columns of `needs`: (samples, rows read, reasons of skipped
    rows). `tools`: the schemas that rows without a `tools` column declare."""
    split = load_split(spec)
    fmt = detect_format(split.columns, spec, split.origin, for_eval, needs)
    samples, reasons = [], []
    for i, row in enumerate(split.rows):
        source, index = split.locate(i)
        try:
            samples.append(
                normalise_row(row, fmt, spec, source.name, index, source.base_dir, for_eval, needs, tools)
            )
        except RowError as err:
            message = f"{source.name} row {index}, column {err.column!r}: {err}"
            if bad_rows == "error":
                raise DataError(message) from None
            reasons.append(message)
    if reasons:
        log.warning(
            "skipped %d bad rows of %s, e.g. %s",
            len(reasons),
            split.origin,
            "; ".join(reasons[:MAX_REASONS]),
        )
    if not samples:
        raise DataError(f"{split.origin}: no usable rows")
    return samples, len(split.rows), reasons
