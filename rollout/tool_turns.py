"""The pure pieces of a multi-turn tool episode: tool calls parsed from a sampled assistant turn, and the
exact tokens of the chat template's tool turn that follow it.

The model's own tokens are never re-tokenised: an episode is its prompt ids, then per turn the ids the
engine sampled (through `<|im_end|>`), then the ids of

    \\n<|im_start|>user\\n<tool_response>\\n{answer}\\n</tool_response>…<|im_end|>\\n<|im_start|>assistant\\n{think prefix}

rendered by the model's chat template from the tool messages (`tool_turn_ids`: the text the template adds
after an assistant turn, up to the next generation prompt in the prompt's chat mode). `<|im_end|>` is a
special token, so tokenisation restarts there: the ids equal the template's at that position of the whole
conversation, byte for byte, with no merge across the boundary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.rewards.tools import MALFORMED, ToolAnswer, ToolCall, failed

END_OF_TURN = "<|im_end|>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)
TRUNCATED = " [truncated]"


@dataclass(frozen=True)
class CallRecord:
    """One tool call of an episode, for metrics: the tool (empty for a malformed call), how it failed (a
    `rewards.tools.TOOL_FAILURES` class, None if it answered) and its seconds in the pool."""

    name: str
    failure: str | None = None
    seconds: float = 0.0


def parse_tool_calls(turn_text: str) -> list[ToolCall | ToolAnswer]:
    """Every `<tool_call>` block of an assistant turn (the decoded sampled text, special tokens kept), as
    a call or, for one that is unclosed, not JSON, or not `{"name": str, "arguments": object}`, as the
    `malformed` answer the model gets back."""
    return [_parse_one(m.group(0), m.group(1)) for m in _CALL.finditer(turn_text)]


def _parse_one(block: str, body: str) -> ToolCall | ToolAnswer:
    if not block.endswith(CALL_CLOSE):
        return failed(MALFORMED, f"a {CALL_OPEN} is not closed by {CALL_CLOSE}")
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return failed(MALFORMED, f"the tool call is not valid JSON ({err})")
    arguments = call.get("arguments", {}) if isinstance(call, dict) else None
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI's API does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
        return failed(MALFORMED, 'a tool call must be {"name": "...", "arguments": {...}}')
    return ToolCall(call["name"], arguments)


def tool_message(answer: ToolAnswer) -> dict[str, Any]:
    """The chat message of one answer: a string, or text and image parts in order when it has images."""
    if not answer.images:
        return {"role": "tool", "content": "".join(answer.parts)}
    parts = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in answer.parts]
    return {"role": "tool", "content": parts}


def tool_turn_text(tokenizer: Any, answers: Sequence[ToolAnswer], thinking: bool) -> str:
    """What the chat template renders after an assistant turn's `<|im_end|>` when `answers` follow it,
    through the next generation prompt in the chat mode `thinking`."""
    before = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}]
    base = tokenizer.apply_chat_template(before, tokenize=False)
    full = tokenizer.apply_chat_template(
        before + [tool_message(a) for a in answers],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=thinking,
    )
    cut = base.rindex(END_OF_TURN) + len(END_OF_TURN)
    if full[:cut] != base[:cut]:
        raise ValueError("the chat template renders an assistant turn differently when tool turns follow it")
    return str(full[cut:])


def tool_turn_ids(tokenizer: Any, answers: Sequence[ToolAnswer], thinking: bool) -> list[int]:
    """The ids of `tool_turn_text` (one image pad per image, as vLLM takes a prompt with images)."""
    return list(tokenizer.encode(tool_turn_text(tokenizer, answers, thinking), add_special_tokens=False))


def cap_answer(tokenizer: Any, answer: ToolAnswer, max_tokens: int) -> ToolAnswer:
    """`answer` with its text cut to `max_tokens` tokens in all (marked `[truncated]`); images kept."""
    parts, left = [], max_tokens
    for part in answer.parts:
        if not isinstance(part, str):
            parts.append(part)
            continue
        ids = tokenizer.encode(part, add_special_tokens=False)
        if len(ids) > left:
            part = tokenizer.decode(ids[: max(0, left)]) + TRUNCATED
        left -= len(ids)
        parts.append(part)
    return ToolAnswer(tuple(parts), answer.failure, answer.seconds)
