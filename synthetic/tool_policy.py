"""A tiny model that calls tools: a copy of a tiny model overfit on a few tool conversations, so greedy
(or low-temperature) decoding replays their calls. What the tool-episode tests and the multi-turn rollout
benchmark sample from; it learns nothing general."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from posttrain.data.chat import ASSISTANT_HEADER, END_OF_TURN, assistant_spans
from posttrain.synthetic.models import write_atomically


def tool_policy(
    base: Path,
    out: Path,
    chats: list[list[dict[str, Any]]],
    tools: list[Any] | None,
    steps: int = 120,
    lr: float = 1e-2,
) -> Path:
    """A copy of the tiny model at `base` overfit (AdamW, one full batch per step) on the assistant turns
    of `chats` rendered with the tool schemas `tools` (None: no tools turn), so greedy decoding replays
    their tool calls. Images are `{"type": "image", "image": PIL}` parts, in prompts and tool messages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    is_vl = "vision_config" in json.loads((base / "config.json").read_text())
    processing = (AutoProcessor if is_vl else AutoTokenizer).from_pretrained(base)
    tok = processing.tokenizer if is_vl else processing
    model = (AutoModelForImageTextToText if is_vl else AutoModelForCausalLM).from_pretrained(
        base, dtype=torch.float32
    )
    texts = [processing.apply_chat_template(chat, tools=tools, tokenize=False) for chat in chats]
    if is_vl:
        images = [
            p["image"]
            for chat in chats
            for m in chat
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "image"
        ]
        inputs = processing(text=texts, images=images or None, padding=True, return_tensors="pt")
    else:
        inputs = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    inputs = dict(inputs)
    inputs["labels"] = assistant_labels(inputs["input_ids"], tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        processing.save_pretrained(folder)

    return write_atomically(out, save)


def assistant_labels(input_ids: Any, tok: Any) -> Any:
    """Labels on the assistant turns of each (right-padded) row, -100 elsewhere."""
    import torch

    header = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
    end_id = cast(int, tok.convert_tokens_to_ids(END_OF_TURN))
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids.tolist()):
        for start, end in assistant_spans(ids, header, end_id):
            labels[row, start:end] = input_ids[row, start:end]
    return labels
