"""Published Qwen3 shapes: the configs carry the published dims (parameters counted on the meta device,
nothing allocated), the 151,936-id tokenizer decodes every id and renders chats as the tiny one does, and
the builder's arguments are checked."""

from __future__ import annotations

import random

import pytest

from posttrain.synthetic.models import build_tokenizer
from posttrain.synthetic.shapes import (
    FIRST_ADDED_ID,
    QWEN3_ADDED_TOKENS,
    QWEN3_VOCAB_SIZE,
    Qwen3Shape,
    build_full_tokenizer,
    shape_config,
)

REAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<think>": 151667,
    "</think>": 151668,
}
QWEN3_06B = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151_936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
}
VL_2B = {"tie_word_embeddings": True, "image_token_id": 151655, "video_token_id": 151656}
VL_2B_TEXT = {**QWEN3_06B, "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 262144}
VL_2B_VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "out_hidden_size": 2048,
    "deepstack_visual_indexes": [5, 11, 17],
}
"""Qwen3-0.6B's and Qwen3-VL-2B-Instruct's published config values."""
CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 5+9?"},
        {"role": "assistant", "content": "14", "reasoning_content": "5+9=14 write 4 carry 1\nanswer 14"},
    ],
    [{"role": "user", "content": "What is 5+9?"}, {"role": "assistant", "content": "14"}],
]


@pytest.fixture(scope="module")
def tok():
    return build_full_tokenizer()


def fields(config, expected: dict) -> dict:
    return {name: getattr(config, name) for name in expected}


def n_params(args: Qwen3Shape, tokenizer) -> int:
    """Parameters of the shape's model, built on the meta device (no memory); tied weights count once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = shape_config(args, tokenizer)
    auto = AutoModelForImageTextToText if "vision_config" in config.to_dict() else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_qwen3_06b_has_the_published_shape(tok) -> None:
    config = shape_config(Qwen3Shape(shape="qwen3-0.6b"), tok)
    assert type(config).__name__ == "Qwen3Config"
    assert fields(config, QWEN3_06B) == QWEN3_06B
    assert config.rope_parameters["rope_theta"] == 1e6
    assert abs(n_params(Qwen3Shape(shape="qwen3-0.6b"), tok) - 596_049_920) < 0.02 * 596e6


def test_qwen3_vl_2b_has_the_published_shape(tok) -> None:
    config = shape_config(Qwen3Shape(shape="qwen3-vl-2b"), tok)
    assert type(config).__name__ == "Qwen3VLConfig"
    assert fields(config, VL_2B) == VL_2B
    assert fields(config.text_config, VL_2B_TEXT) == VL_2B_TEXT
    assert fields(config.vision_config, VL_2B_VISION) == VL_2B_VISION
    assert config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert 2.0e9 < n_params(Qwen3Shape(shape="qwen3-vl-2b"), tok) < 2.2e9


@pytest.mark.parametrize("shape", ["qwen3-0.6b", "qwen3-vl-2b"])
def test_reduced_depth_keeps_width_and_vocabulary(tok, shape: str) -> None:
    full, cut = (shape_config(Qwen3Shape(shape=shape, layers=n), tok).to_dict() for n in (None, 2))
    full_text, text = (config.get("text_config", config) for config in (full, cut))
    assert text["num_hidden_layers"] == 2
    depth = {"num_hidden_layers", "layer_types"}
    assert {k: v for k, v in text.items() if k not in depth} == {
        k: v for k, v in full_text.items() if k not in depth
    }
    if shape == "qwen3-vl-2b":
        assert (cut["vision_config"]["depth"], cut["vision_config"]["deepstack_visual_indexes"]) == (2, [0])
    else:
        assert 0.18e9 < n_params(Qwen3Shape(shape=shape, layers=2), tok) < 0.19e9


def test_arguments_are_checked_with_the_full_key() -> None:
    from posttrain.config import ConfigError, validate

    def error_of(args: dict) -> str:
        build = {"builder": "qwen3_shape", "args": args}
        raw = {"output_dir": "o", "model": {"path": "m", "build": build}, "data": {"train": [{"path": "d"}]}}
        with pytest.raises(ConfigError) as err:
            validate("sft", raw)
        return str(err.value)

    assert "model.build.args.layers: 29 is deeper than qwen3-0.6b's 28 layers; choose 1-28" in (
        error_of({"shape": "qwen3-0.6b", "layers": 29})
    )
    assert "model.build.args.layers: Input should be greater than or equal to 1" in error_of(
        {"shape": "qwen3-vl-2b", "layers": 0}
    )
    assert "model.build.args.shape: Input should be 'qwen3-0.6b' or 'qwen3-vl-2b'" in error_of({"shape": "x"})
    assert "model.build.args.shape: Field required" in error_of({})


def test_tokenizer_covers_the_vocabulary_and_decodes_every_id(tok) -> None:
    assert len(tok) == QWEN3_VOCAB_SIZE
    assert {t: tok.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS
    assert tok.convert_tokens_to_ids(QWEN3_ADDED_TOKENS) == list(range(FIRST_ADDED_ID, 151669))
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)
    sampled = random.Random(0).sample(range(QWEN3_VOCAB_SIZE), 2000)
    ids = [*sampled, *tok.all_special_ids, 0, QWEN3_VOCAB_SIZE - 1]
    tokens = tok.convert_ids_to_tokens(ids)
    assert None not in tokens and all(tok.decode([i]) for i in ids)
    assert tok.decode([151700, 151667]) == "<|filler_151700|><think>"
    assert tok.decode([151644, 151667], skip_special_tokens=True) == "<think>"  # think tokens are not special


def test_tokenizer_renders_and_splits_chats_as_the_tiny_one(tok) -> None:
    tiny = build_tokenizer()
    for chat in CHATS:
        assert tok.apply_chat_template(chat, tokenize=False) == tiny.apply_chat_template(chat, tokenize=False)
        ids = tok.apply_chat_template(chat, return_dict=True)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == tiny.convert_ids_to_tokens(
            tiny.apply_chat_template(chat, return_dict=True)["input_ids"]
        )
    user = CHATS[1][:1]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
