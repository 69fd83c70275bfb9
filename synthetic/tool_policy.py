"""A tiny model that calls tools: a copy of a tiny model overfit on a few tool conversations, so greedy
(or low-temperature) decoding replays their calls. What the tool-episode tests and the multi-turn rollout
benchmark sample from; it learns nothing general."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from posttrain.data.chat import ASSISTANT_HEADER, END_OF_TURN, assistant_spans
from posttrain.synthetic.models import write_atomically


def tool_policy(
    base: Path, out: Path, chats: list[list[dict[str, Any]]], tools: list[dict[str, Any]], steps: int = 150
) -> Path:
    """A copy of the tiny model at `base` overfit (AdamW, full batch) on the assistant turns of `chats`,
    rendered with the tool schemas `tools`, so greedy decoding replays their tool calls: a policy that
    calls tools. Tool-message images come from `{"type": "image", "image": PIL}`
    parts, prompt images likewise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    is_vl = (base / "preprocessor_config.json").is_file()
    processing = (AutoProcessor if is_vl else AutoTokenizer).from_pretrained(base)
    tok = processing.tokenizer if is_vl else processing
    model = (AutoModelForImageTextToText if is_vl else AutoModelForCausalLM).from_pretrained(
        base, dtype=torch.float32
    )
    header = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
    end_id = cast(int, tok.convert_tokens_to_ids(END_OF_TURN))
    rows = []
    for chat in chats:
        text = processing.apply_chat_template(chat, tools=list[Any](tools), tokenize=False)
        images = [
            p["image"]
            for m in chat
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "image"
        ]
        if is_vl:
            inputs = processing(text=[text], images=images or None, return_tensors="pt")
        else:
            inputs = tok([text], return_tensors="pt", add_special_tokens=False)
        ids = inputs["input_ids"][0].tolist()
        labels = torch.full((len(ids),), -100)
        for start, end in assistant_spans(ids, header, end_id):
            labels[start:end] = torch.tensor(ids[start:end])
        rows.append((dict(inputs), labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        for inputs, labels in rows:  # one row at a time: VL rows carry their own pixels
            loss = model(**inputs, labels=labels[None]).loss / len(rows)
            loss.backward()
        optimizer.step()

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        processing.save_pretrained(folder)

    return write_atomically(out, save)
