"""Chat-template rendering and encoding with assistant-only labels.

A Sample is rendered with the model's own chat template. Labels are the assistant responses located by the
ChatML markers `<|im_start|>assistant\\n` … `<|im_end|>` in the final token ids, so they stay right after
the Qwen3-VL processor expands image pads and with templates that lack `{% generation %}` blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from posttrain.config import DataConfig
from posttrain.data.errors import DataError
from posttrain.data.processing import tokenizer_of
from posttrain.data.rows import Sample

if TYPE_CHECKING:
    import numpy as np

IGNORE_INDEX = -100
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
"""What `enable_thinking=False` appends to the generation prompt: a non-thinking answer's prompt, not its
target, or the model learns to skip thinking by itself in thinking mode."""


@dataclass
class Item:
    """One training row: an encoded sample, or several packed text samples."""

    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T]: input_ids on assistant responses, IGNORE_INDEX elsewhere (unshifted)
    seq_lens: list[int]  # lengths of the samples in this row (one entry unless packed)
    modes: list[str]  # chat mode of each sample
    images: list[Any] = field(default_factory=list)  # PIL images (VL); pixels are made at collate time
    image_grid_thw: list[list[int]] = field(default_factory=list)
    mm_token_type_ids: np.ndarray | None = None

    @property
    def loss_tokens(self) -> int:
        """Tokens that carry loss after the causal shift."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def chat_messages(sample: Sample, is_vl: bool) -> list[dict[str, Any]]:
    """Messages as chat templates read them: part lists for VL prompts and tool answers, strings
    otherwise; assistant turns with their `tool_calls`."""
    out = []
    for m in sample.messages:
        if m["role"] == "assistant":
            reasoning = {"reasoning_content": m["reasoning"]} if m["reasoning"] else {}
            calls = {"tool_calls": m["tool_calls"]} if "tool_calls" in m else {}
            out.append({"role": "assistant", "content": m["text"], **reasoning, **calls})
        elif is_vl:
            out.append({"role": m["role"], "content": m["parts"]})
        elif any(p["type"] == "image" for p in m["parts"]):
            raise DataError(
                f"{sample.origin} row {sample.row} has images but the model is text-only (use Qwen3-VL)"
            )
        else:
            out.append({"role": m["role"], "content": "".join(p["text"] for p in m["parts"])})
    return out


def render(sample: Sample, processing: Any, is_vl: bool, add_generation_prompt: bool = False) -> str:
    """The chat as text, declaring the sample's tools (JSON schemas, `posttrain.rewards.tools`);
    `enable_thinking` follows the sample's mode (it shapes the generation prompt)."""
    return processing.apply_chat_template(
        chat_messages(sample, is_vl),
        tools=sample.tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=sample.mode == "thinking",
    )


def assistant_spans(
    ids: list[int], header: list[int], end_id: int, empty_think: list[int] | None = None
) -> list[tuple[int, int]]:
    """[start, end) of each assistant response: from after `header` (and an `empty_think` block right
    after it) through its end-of-turn token."""
    spans: list[tuple[int, int]] = []
    i = -1
    while True:
        try:
            i = ids.index(header[0], i + 1)
        except ValueError:
            return spans
        if ids[i : i + len(header)] == header:
            start = i + len(header)
            if empty_think and ids[start : start + len(empty_think)] == empty_think:
                start += len(empty_think)
            i = ids.index(end_id, start) if end_id in ids[start:] else len(ids) - 1
            spans.append((start, i + 1))


def _keep_overlong(sample: Sample, length: int, prompt_len: int, max_length: int, policy: str) -> bool:
    """True to truncate the response, False to drop; raises under `error` (and for too-long prompts)."""
    where = f"{sample.origin} row {sample.row}: {length} tokens > data.max_length={max_length}"
    if prompt_len >= max_length:  # truncation would cut the prompt or image tokens: never
        if policy == "error":
            raise DataError(
                f"{where}, and the prompt alone (with image tokens) has {prompt_len}; raise data.max_length"
            )
        return False
    if policy == "error":
        raise DataError(f"{where}; raise data.max_length or set data.overlong to drop or truncate")
    return policy == "truncate"


def encode_sample(
    sample: Sample, processing: Any, is_vl: bool, max_length: int, overlong: str = "error"
) -> tuple[Item | None, str]:
    """(item, status): status is `ok`, `truncated` or `dropped` (then item is None)."""
    import numpy as np

    tok = tokenizer_of(processing)
    text = render(sample, processing, is_vl)
    if is_vl:  # the processor expands each image pad to its grid's token count
        out = processing(text=[text], images=sample.images or None, return_tensors="np")
        ids = out["input_ids"][0].tolist()
    else:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    header = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
    empty_think = tok.encode(EMPTY_THINK, add_special_tokens=False)
    spans = assistant_spans(ids, header, tok.convert_tokens_to_ids(END_OF_TURN), empty_think)
    if not spans:
        raise DataError(
            f"{sample.origin} row {sample.row}: the chat template produced no {ASSISTANT_HEADER!r}…{END_OF_TURN} "
            "span; only ChatML (Qwen) chat templates are supported"
        )
    length, status = spans[-1][1], "ok"  # tokens after the last end-of-turn carry no loss
    if length > max_length:
        if not _keep_overlong(sample, length, spans[-1][0], max_length, overlong):
            return None, "dropped"
        length, status = max_length, "truncated"
    input_ids = np.asarray(ids[:length], dtype=np.int32)
    labels = np.full(length, IGNORE_INDEX, dtype=np.int32)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    item = Item(input_ids, labels, [length], [sample.mode])
    if is_vl:
        item.images = sample.images
        item.image_grid_thw = out["image_grid_thw"].tolist() if sample.images else []
        item.mm_token_type_ids = out["mm_token_type_ids"][0, :length].astype(np.int32)
    return item, status


def _encode_chunk(
    samples: list[Sample], processing: Any, is_vl: bool, max_length: int, overlong: str
) -> list[tuple[Item | None, str]]:
    return [encode_sample(s, processing, is_vl, max_length, overlong) for s in samples]


def encode_all(
    samples: list[Sample], processing: Any, is_vl: bool, cfg: DataConfig
) -> list[tuple[Item | None, str]]:
    """encode_sample over all samples, in order, on `cfg.num_proc` processes."""
    args = (processing, is_vl, cfg.max_length, cfg.overlong)
    if cfg.num_proc == 1 or len(samples) < 2 * cfg.num_proc:
        return _encode_chunk(samples, *args)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    size = math.ceil(len(samples) / cfg.num_proc)
    chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
    # spawn, not fork: forking a process that runs tokenizer / torch threads can deadlock
    with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(_encode_chunk, chunks, *([a] * len(chunks) for a in args))
        return [result for part in parts for result in part]
