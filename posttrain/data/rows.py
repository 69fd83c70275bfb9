"""Row validation: each row becomes a Sample (chat messages with content as parts and reasoning split out,
decoded images, thinking or non-thinking mode), or a RowError naming its column. `load_samples` checks
every row of a split before any training starts."""

from __future__ import annotations

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

ROLES = ("system", "user", "assistant")
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


def _check_messages(raw: Any, column: str) -> list[dict[str, Any]]:
    """Validated messages: {role, parts} plus `reasoning` (str or None) and `text` for assistant turns."""
    if raw is None:
        raise RowError(column, "missing")
    if not isinstance(raw, list):
        raise RowError(column, f"expected a list of messages, got {type(raw).__name__}")
    if not raw:
        raise RowError(column, "no messages")
    out = []
    for k, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise RowError(
                column, f"message {k} is a {type(msg).__name__} (expected a dict with role and content)"
            )
        role = msg.get("role")
        if role not in ROLES:
            raise RowError(column, f"message {k} has role {role!r} (expected system/user/assistant)")
        parts = _parts(msg.get("content"), column, f"message {k}")
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise RowError(column, f"message {k} has non-string reasoning_content")
        if role == "assistant":
            if any(p["type"] == "image" for p in parts):
                raise RowError(column, f"message {k}: images are only allowed in user or system turns")
            inline, text = split_reasoning("".join(p["text"] for p in parts))
            # Whitespace-only reasoning renders as an empty think block, so it counts as none.
            msg = {"role": role, "text": text, "reasoning": (reasoning or inline or "").strip() or None}
        else:
            msg = {"role": role, "parts": parts}
        out.append(msg)
    return out


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
) -> Sample:
    """Validate one row into a Sample; raises RowError. For eval (and RL prompts) the final assistant
    turn is removed; every column of `needs` must have a value."""
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
    extra = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion", "images")}
    return Sample(messages, images, mode, origin, index, extra)


def load_samples(
    spec: DatasetSpec, bad_rows: str = "error", for_eval: bool = False, needs: Needs = NO_NEEDS
) -> tuple[list[Sample], int, list[str]]:
    """Validate every row of `spec`, with the columns of `needs`: (samples, rows read, reasons of skipped rows)."""
    split = load_split(spec)
    fmt = detect_format(split.columns, spec, split.origin, for_eval, needs)
    samples, reasons = [], []
    for i, row in enumerate(split.rows):
        source, index = split.locate(i)
        try:
            samples.append(
                normalise_row(row, fmt, spec, source.name, index, source.base_dir, for_eval, needs)
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
