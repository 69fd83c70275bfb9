"""The pure pieces of tool episodes: calls parsed from sampled text, and tool turns whose tokens are the
chat template's own at that position of the conversation."""

import pytest

from posttrain.rewards.tools import ToolAnswer, ToolCall
from posttrain.rollout.tool_turns import cap_answer, parse_tool_calls, tool_turn_ids, tool_turn_text


@pytest.fixture(scope="module")
def tok():
    from posttrain.synthetic.models import build_tokenizer

    return build_tokenizer(0, tools=True)


def test_calls_are_parsed_and_bad_ones_answered() -> None:
    text = (
        '<think>\nsum\n</think>\n\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>\n'
        '<tool_call>\n{not json}\n</tool_call><tool_call>[1]</tool_call><tool_call>\n{"name": "g"'
    )
    parsed = parse_tool_calls(text)
    assert parsed[:2] == [ToolCall("calculator", {"expression": "1+2"}), ToolCall("f", {"x": 1})]
    assert [p.failure for p in parsed[2:]] == ["malformed"] * 3  # type: ignore[union-attr]
    assert "not valid JSON" in parsed[2].parts[0]  # type: ignore[union-attr]
    assert "not closed" in parsed[4].parts[0]  # type: ignore[union-attr]
    assert parse_tool_calls("just an answer") == []


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_turn_is_the_templates_text_between_turns(tok, thinking: bool) -> None:
    answers = [ToolAnswer(("80235",)), ToolAnswer(("Error: boom",), "exception")]
    turn = tool_turn_text(tok, answers, thinking)
    prefix = "" if thinking else "<think>\n\n</think>\n\n"
    assert turn == (
        "\n<|im_start|>user\n<tool_response>\n80235\n</tool_response>\n<tool_response>\nError: boom\n"
        f"</tool_response><|im_end|>\n<|im_start|>assistant\n{prefix}"
    )
    # Concatenated after a sampled turn, the ids are the template's ids of the whole conversation.
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1"}}}
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "80235"},
        {"role": "tool", "content": "Error: boom"},
    ]
    first = tok.apply_chat_template(
        chat[:1], add_generation_prompt=True, enable_thinking=thinking, tokenize=False
    )
    whole = tok.apply_chat_template(
        chat, add_generation_prompt=True, enable_thinking=thinking, tokenize=False
    )
    whole_ids = tok.encode(whole, add_special_tokens=False)
    end = whole.index("<|im_end|>", len(first)) + len("<|im_end|>")
    sampled = tok.encode(whole[len(first) : end], add_special_tokens=False)
    episode = tok.encode(first, add_special_tokens=False) + sampled + tool_turn_ids(tok, answers, thinking)
    assert episode == whole_ids


def test_image_answers_render_image_parts(tok) -> None:
    from PIL import Image

    answer = ToolAnswer(("here:", Image.new("RGB", (8, 8))))
    assert (
        "<tool_response>\nhere:<|vision_start|><|image_pad|><|vision_end|>\n</tool_response>"
        in tool_turn_text(tok, [answer], False)
    )


def test_long_answers_are_capped(tok) -> None:
    long = ToolAnswer((" ".join(["12345"] * 100),))
    capped = cap_answer(tok, long, 10)
    assert capped.parts[0].endswith(" [truncated]")
    assert len(tok.encode(capped.parts[0].removesuffix(" [truncated]"))) <= 10
    assert cap_answer(tok, ToolAnswer(("42",)), 10) == ToolAnswer(("42",))
