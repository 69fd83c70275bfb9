"""The model's tokenizer (text models) or processor (Qwen3-VL), and the tokenizer inside a processor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VL_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


def load_processing(model_path: str | Path, trust_remote_code: bool = False) -> tuple[Any, bool]:
    """(tokenizer, False) for text models, (processor, True) for Qwen3-VL, detected from config.json."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text()).get("model_type")
    else:
        model_type = AutoConfig.from_pretrained(
            str(model_path), trust_remote_code=trust_remote_code
        ).model_type
    is_vl = model_type in VL_MODEL_TYPES
    loader = AutoProcessor if is_vl else AutoTokenizer
    return loader.from_pretrained(str(model_path), trust_remote_code=trust_remote_code), is_vl


def tokenizer_of(processing: Any) -> Any:
    """The tokenizer of a processor (VL), or the tokenizer itself (text)."""
    return getattr(processing, "tokenizer", processing)


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end of sequence."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)
