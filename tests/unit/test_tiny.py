"""Tiny model builder: loadable folders, chat template, loss mask, tokenisation invariants."""

import random
from pathlib import Path

import pytest

from posttrain.config import ModelConfig
from posttrain.inputs import ensure_model
from posttrain.synthetic.models import SPECIAL_TOKENS, THINK_TOKENS, build_tiny_model
from posttrain.synthetic.tasks import SHAPES_PROMPT, render_shapes, shape_scene

SUM = [
    {"role": "user", "content": "What is 5+9?"},
    {
        "role": "assistant",
        "content": "14",
        "reasoning_content": "5+9=14 write 4 carry 1\nwrite carry 1\nanswer 14",
    },
]
THINKING = (
    "<|im_start|>user\nWhat is 5+9?<|im_end|>\n<|im_start|>assistant\n"
    "<think>\n5+9=14 write 4 carry 1\nwrite carry 1\nanswer 14\n</think>\n\n14<|im_end|>\n"
)
NON_THINKING = (
    "<|im_start|>user\nWhat is 5+9?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n14<|im_end|>\n"
)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tok(tiny_text_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_text_model)


def test_text_model_loads_and_runs(tiny_text_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert 500_000 <= n_params(model) <= 2_000_000
    assert model.config.head_dim >= 32 and not model.config.tie_word_embeddings
    assert model.config.max_position_embeddings >= 2048
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()
    gen = GenerationConfig.from_pretrained(tiny_text_model)
    assert (gen.eos_token_id, gen.pad_token_id) == (2, 0)  # <|im_end|>, <|endoftext|>


def test_small_size_is_about_10m(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "small", "text", "small"))
    assert 7_000_000 <= n_params(model) <= 13_000_000


def test_special_tokens_are_single_ids(tok) -> None:
    for token in SPECIAL_TOKENS + THINK_TOKENS:
        assert len(tok(token)["input_ids"]) == 1, token
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert "<think>" in tok.decode(tok("<think>\nx")["input_ids"], skip_special_tokens=True)


def test_digits_are_split(tok) -> None:
    ids = tok("12345+67890=80235")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("12345+67890=80235")


def test_chat_template_renders_qwen3_format(tok) -> None:
    assert tok.apply_chat_template(SUM, tokenize=False) == THINKING
    no_reasoning = [SUM[0], {"role": "assistant", "content": "14"}]
    assert tok.apply_chat_template(no_reasoning, tokenize=False) == NON_THINKING
    prompt = "<|im_start|>user\nWhat is 5+9?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(SUM[:1], tokenize=False, add_generation_prompt=True) == prompt
    closed = tok.apply_chat_template(
        SUM[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert closed == prompt + "<think>\n\n</think>\n\n"
    system = [{"role": "system", "content": "Be brief."}, *SUM]
    assert (
        tok.apply_chat_template(system, tokenize=False)
        == "<|im_start|>system\nBe brief.<|im_end|>\n" + THINKING
    )


def assistant_spans(tok, chat, **kwargs) -> list[str]:
    out = tok.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True, **kwargs)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(tok.decode(ids[start:i]))
            start = None
    return spans


def test_assistant_mask_is_exactly_the_assistant_spans(tok) -> None:
    chat = [*SUM, {"role": "user", "content": "And 1+1?"}, {"role": "assistant", "content": "2"}]
    assert (
        assistant_spans(tok, chat)
        == [
            THINKING.split("assistant\n")[1].removesuffix("\n"),
            "2<|im_end|>",  # a non-thinking answer's empty think block is prompt, as enable_thinking=False makes it
        ]
    )


CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12345+67890?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": "12345+67890"}},
            },
            {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}},
        ],
    },
    {"role": "tool", "name": "calculator", "content": "80235"},
    {"role": "tool", "name": "calculator", "content": "2"},
    {"role": "assistant", "content": "80235"},
]
CALLS = (
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12345+67890"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call><|im_end|>'
)


def test_tool_chats_render_in_qwen3_tool_format(tmp_path: Path) -> None:
    from posttrain.synthetic.models import TOOL_TOKENS, build_tokenizer

    tok = build_tokenizer(0, tools=True)
    assert [len(tok(t)["input_ids"]) for t in TOOL_TOKENS] == [1] * 4
    assert tok.convert_tokens_to_ids(TOOL_TOKENS) == list(range(382, 386))  # after the think tokens
    assert tok.apply_chat_template(TOOL_CHAT, tools=[CALCULATOR], tokenize=False) == (
        '<|im_start|>system\nBe brief.\n\n# Tools\n\n<tools>\n{"type": "function", "function": {"name": '
        '"calculator", "description": "Evaluate an expression.", "parameters": {"type": "object", '
        '"properties": {"expression": {"type": "string"}}}}}\n</tools><|im_end|>\n'
        "<|im_start|>user\nWhat is 12345+67890?<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\n\n</think>\n\n{CALLS}\n"
        "<|im_start|>user\n<tool_response>\n80235\n</tool_response>\n<tool_response>\n2\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n80235<|im_end|>\n"
    )
    # the loss mask covers the calls the model writes, never the tool answers
    assert assistant_spans(tok, TOOL_CHAT, tools=[CALCULATOR]) == [CALLS, "80235<|im_end|>"]


@pytest.mark.parametrize("thinking", [True, False])
def test_prompt_ids_prefix_full_ids(tok, thinking: bool) -> None:
    from posttrain.synthetic.tasks import TinyTask, arithmetic_splits

    rows = arithmetic_splits(TinyTask(train_size=50, test_size=10))["train"]
    for row in rows:
        user, answer = row["messages"]
        if not thinking:
            answer = {**answer, "reasoning_content": None}
        prompt = tok.apply_chat_template(
            [user], add_generation_prompt=True, enable_thinking=thinking, return_dict=True
        )
        full = tok.apply_chat_template([user, answer], return_dict=True)["input_ids"]
        assert full[: len(prompt["input_ids"])] == prompt["input_ids"]


def test_vl_processor_and_forward(tiny_vl_model: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_vl_model)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_model)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert 500_000 <= n_params(model) <= 2_000_000
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHAPES_PROMPT}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many")
    image = render_shapes(shape_scene(random.Random(0)))
    pad = model.config.image_token_id
    for side in (64, 96, 128):  # every square image in range is resized to 96×96 → 9 tokens
        inputs = proc(text=[text], images=[image.resize((side, side))], return_tensors="pt")
        assert (inputs["input_ids"] == pad).sum() == 9
    assert "mm_token_type_ids" in inputs
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert sum(f.shape[0] for f in features) == 9
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_build_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import posttrain.synthetic.models as tiny

    def crash(out: Path, *args: object) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tiny, "_write", crash)
    with pytest.raises(RuntimeError):
        build_tiny_model(tmp_path / "m", "text")
    assert list(tmp_path.iterdir()) == []


def test_build_is_deterministic(tmp_path: Path, tiny_text_model: Path) -> None:
    again, other = build_tiny_model(tmp_path / "a", "text"), build_tiny_model(tmp_path / "b", "text", seed=1)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (tiny_text_model / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_ensure_model(tmp_path: Path, tiny_text_model: Path) -> None:
    assert ensure_model(ModelConfig(path=str(tiny_text_model))) == tiny_text_model
    built = ensure_model(
        ModelConfig.model_validate({"path": str(tmp_path / "new"), "build": {"builder": "tiny_model"}})
    )
    assert (built / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # no temp folder left
    with pytest.raises(FileNotFoundError, match=r"model.path .* set model.build"):
        ensure_model(ModelConfig(path=str(tmp_path / "missing")))
    assert ensure_model(ModelConfig(path="Qwen/Qwen3-0.6B")) == "Qwen/Qwen3-0.6B"
