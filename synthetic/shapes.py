"""Random models with the published shapes of Qwen3-0.6B and Qwen3-VL-2B-Instruct (the `qwen3_shape`
builder): real memory, speed and vocabulary for benchmarks and scale tests, built locally like the tiny
models (nothing is downloaded; the weights are random and seeded, so they say nothing about quality).

The tokenizer is the tiny models' trained BPE spread over Qwen3's 151,936 ids: its learned tokens at ids
0.., Qwen3's 26 added tokens at their real ids 151643-151668, and a `<|filler_N|>` token at every other id,
so any id a model of that vocabulary samples decodes. Text renders and tokenises exactly as with the tiny
tokenizer (same merges, same chat template); only the ids differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from posttrain.config import Strict
from posttrain.synthetic.models import (
    SPECIAL_TOKENS,
    Kind,
    qwen3_config,
    save_model,
    train_bpe,
    wrap_tokenizer,
    write_atomically,
)

Shape = Literal["qwen3-0.6b", "qwen3-vl-2b"]
Dtype = Literal["bfloat16", "float32"]

QWEN3_VOCAB_SIZE = 151_936
QWEN3_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
"""Qwen3's added tokens in id order from FIRST_ADDED_ID. The first QWEN3_SPECIAL (through <|video_pad|>) are
special, so skip_special_tokens drops them; the tool, fill-in-the-middle and think tokens are not."""
FIRST_ADDED_ID = 151_643
QWEN3_SPECIAL = 14


@dataclass(frozen=True)
class Published:
    """A published architecture: its kind, text-model dims and (Qwen3-VL) vision-tower dims."""

    kind: Kind
    text: dict[str, Any]
    vision: dict[str, Any] = field(default_factory=dict)


SHAPES: dict[str, Published] = {
    "qwen3-0.6b": Published(
        "text",
        {
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
        },
    ),
    "qwen3-vl-2b": Published(
        "vl",
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
        },
        {
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "num_position_embeddings": 2304,
        },
    ),
}
"""Qwen3-0.6B's and Qwen3-VL-2B-Instruct's published dims (both: vocabulary 151,936, tied embeddings)."""


class Qwen3Shape(Strict):
    """The `qwen3_shape` builder's arguments: which published shape to build at `model.path`."""

    shape: Shape
    """`qwen3-0.6b` (text, ~596M parameters) or `qwen3-vl-2b` (Qwen3-VL-2B-Instruct, ~2.1B)."""
    layers: int | None = Field(None, ge=1)
    """Fewer blocks at full width and vocabulary (the decoder's and, for Qwen3-VL, the vision tower's up to its
    24), for tests: e.g. 2 makes a ~0.2B Qwen3-0.6B. None: the published depth."""
    dtype: Dtype = "bfloat16"
    """The weights' dtype on disk (bfloat16: ~1.2 GB for the full Qwen3-0.6B)."""
    seed: int = 0
    """Seed for tokenizer corpus order and weight initialisation."""

    @field_validator("layers")
    @classmethod
    def _within_depth(cls, layers: int | None, info: ValidationInfo) -> int | None:
        shape = info.data.get("shape")  # absent when the shape itself is invalid
        depth = SHAPES[shape].text["num_hidden_layers"] if shape else None
        if layers is not None and depth is not None and layers > depth:
            raise ValueError(f"{layers} is deeper than {shape}'s {depth} layers; choose 1-{depth}")
        return layers


def build_full_tokenizer(seed: int = 0, model_max_length: int = 40960) -> Any:
    """The trained BPE with every one of Qwen3's ids filled (see the module docstring)."""
    from tokenizers import Tokenizer

    spec = json.loads(train_bpe(seed).to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    learned = [token for token, _ in trained if token not in SPECIAL_TOKENS]
    added = dict(enumerate(QWEN3_ADDED_TOKENS, FIRST_ADDED_ID))
    fillers = {i: f"<|filler_{i}|>" for i in range(len(learned), QWEN3_VOCAB_SIZE) if i not in added}
    # The added tokens are in the model's vocabulary too, as the trainer puts special tokens: otherwise
    # they would be numbered after it rather than at their ids.
    tokens = {**dict(enumerate(learned)), **fillers, **added}
    spec["model"]["vocab"] = {token: i for i, token in sorted(tokens.items())}
    spec["added_tokens"] = [
        {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": i < FIRST_ADDED_ID + QWEN3_SPECIAL}
        for i, token in added.items()
    ]  # fmt: skip
    tok = Tokenizer.from_str(json.dumps(spec))
    return wrap_tokenizer(tok, QWEN3_ADDED_TOKENS[1:QWEN3_SPECIAL], model_max_length)


def _deepstack(depth: int) -> list[int]:
    """Vision blocks whose features feed the decoder's first layers: the ends of the first three quarters
    of the tower (Qwen3-VL-2B's published [5, 11, 17] for 24 blocks), fewer when the tower is shallower."""
    return sorted({max(0, depth * quarter // 4 - 1) for quarter in (1, 2, 3)})


def shape_config(args: Qwen3Shape, tokenizer: Any) -> Any:
    """The transformers config of `args.shape` at `args.layers` blocks, with the tokenizer's ids."""
    published = SHAPES[args.shape]
    layers = args.layers or published.text["num_hidden_layers"]
    text = {
        **published.text,
        "num_hidden_layers": layers,
        "vocab_size": len(tokenizer),
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    vision = {}
    if published.vision:
        depth = min(layers, published.vision["depth"])
        vision = {**published.vision, "depth": depth, "deepstack_visual_indexes": _deepstack(depth)}
    return qwen3_config(tokenizer, published.kind, text, vision)


def _write(out: Path, args: Qwen3Shape) -> None:
    tokenizer = build_full_tokenizer(args.seed, SHAPES[args.shape].text["max_position_embeddings"])
    save_model(out, shape_config(args, tokenizer), tokenizer, args.seed, args.dtype)


def build_qwen3_shape(out_dir: str | Path, args: Qwen3Shape) -> Path:
    """Write a complete random model of a published Qwen3 shape at `out_dir`, atomically."""
    return write_atomically(out_dir, lambda tmp: _write(tmp, args))
