"""SFT data: load splits, normalise rows to chat messages, validate every row, encode, pack, batch.

Rows become Qwen-style chats (`messages`, or `prompt`/`completion`) in a thinking or non-thinking form,
are checked before any training starts (errors name file, row and column), and are encoded with the
model's own chat template. Labels are the assistant responses located by the ChatML markers
`<|im_start|>assistant\\n` … `<|im_end|>` in the final token ids, so they stay right after the Qwen3-VL
processor expands image pads and with templates that lack `{% generation %}` blocks.

Packed text rows carry `position_ids` that restart at 0 per sample and no `attention_mask`: transformers
(5.19, sdpa/eager) then derives a block-diagonal causal mask from the position ids, but only when the
forward also gets `use_cache=False` (an empty DynamicCache disables the detection). flash_attention_2
detects packing only for batch size 1, hence `collate(..., flatten=True)`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from posttrain.config import DataConfig, DatasetSpec, Strict
from posttrain.inputs import ensure_dataset
from posttrain.plugins import is_file

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
"""What `enable_thinking=False` appends to the generation prompt: a non-thinking answer's prompt, not its
target, or the model learns to skip thinking by itself in thinking mode."""
VL_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
THINK_RE = re.compile(r"\s*<think>(.*?)</think>", re.S)
MAX_REASONS = 5  # skipped-row reasons kept for the log and stats
Mode = Literal["thinking", "non_thinking"]
Needs = Mapping[str, str]
"""Columns every row must have a value in → who needs each, as errors name it ("reward 'exact_match'")."""
NO_NEEDS: Needs = MappingProxyType({})
EVAL_NEEDS: Needs = MappingProxyType({"solution": "the evaluation (exact match with the answer)"})


class DataError(ValueError):
    """A data problem, phrased so the user knows which file, row and column to fix."""


class RowError(ValueError):
    """A bad row; the caller adds file and row to the message."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column


@dataclass
class Sample:
    """A validated row: chat messages (content as parts, reasoning split out), decoded images, chosen mode."""

    messages: list[dict[str, Any]]
    images: list[Any]
    mode: Mode
    origin: str
    row: int
    extra: dict[str, Any] = field(default_factory=dict)  # the row's other columns (solution, …) for rewards


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


@dataclass
class DataStats:
    rows: int = 0
    skipped: int = 0
    dropped: int = 0
    truncated: int = 0
    samples: int = 0
    items: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    modes: dict[str, int] = field(default_factory=lambda: {"thinking": 0, "non_thinking": 0})
    skip_reasons: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class Source:
    """One file (or a saved or hub split) of a split: its name in messages, its rows, and the folder that
    relative image paths start from."""

    name: str
    rows: int
    base_dir: Path | None


@dataclass
class Split:
    """The rows of one dataset split. JSON files give a list of dicts holding every value exactly as
    written; parquet, saved and hub datasets a Dataset whose images are left undecoded."""

    rows: list[dict[str, Any]] | Dataset
    columns: list[str]
    origin: str  # names the whole split in messages
    sources: list[Source]

    def locate(self, index: int) -> tuple[Source, int]:
        """The source of row `index` and the row's 0-based index in it."""
        for source in self.sources:
            if index < source.rows:
                return source, index
            index -= source.rows
        raise IndexError(f"{self.origin} has no row {index}")


# ------------------------------------------------------------------------------------------ task cards
# A dataset folder may hold a `task.json` card, `{"verifier": "exact_match", "build": {...}}`: `verifier` is
# a reward name (built-in, entry point, `module:function`, or `path/to/file.py:function` relative to the
# folder) and `build` the entry that makes the folder again. Synthetic tasks write one; any dataset folder
# can carry one by hand.


CARD = "task.json"
"""A dataset folder's task card (never read as a split)."""
DEFAULT_VERIFIER = "exact_match"


class TaskCard(Strict):
    """What a dataset folder says about itself (`task.json`)."""

    verifier: str
    """The reward that scores an answer in evaluation (1.0: correct), named as in `rewards:`."""
    build: dict[str, Any] | None = None
    """The `build` entry (`{builder, args}`) that makes this folder again, when a builder wrote it."""


def write_card(folder: Path, card: TaskCard) -> None:
    (folder / CARD).write_text(json.dumps(card.model_dump(mode="json", exclude_none=True), indent=1) + "\n")


def read_card(path: str | Path) -> TaskCard | None:
    """The task card of the dataset folder `path` (None: not a folder, or it has none)."""
    file = Path(path).expanduser() / CARD
    if not file.is_file():
        return None
    try:
        return TaskCard.model_validate_json(file.read_bytes())
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
        raise DataError(f"task card {file} is not valid: {problems}") from None


def dataset_verifier(spec: DatasetSpec) -> tuple[str, str]:
    """(reward name, where it was chosen) of the verifier that scores answers on `spec`: its `verifier`,
    else its folder's task card, else its builder's declared one, else exact match with `solution`."""
    if spec.verifier is not None:
        return spec.verifier, f"`verifier` of dataset {spec.path}"
    card = read_card(spec.path)
    if card is not None:
        folder = Path(spec.path).expanduser()
        target, sep, attr = card.verifier.rpartition(":")
        name = card.verifier
        if sep and is_file(target) and not Path(target).expanduser().is_absolute():
            name = f"{(folder / target).resolve()}:{attr}"  # a card's plugin file sits beside it
        return name, str(folder / CARD)
    if spec.build is not None and (declared := spec.build.declaration()).verifier is not None:
        return declared.verifier, f"builder {spec.build.builder!r} of dataset {spec.path}"
    return DEFAULT_VERIFIER, "the default"


def load_split(spec: DatasetSpec) -> Split:
    """The rows of `spec` (first `max_rows`)."""
    import datasets

    ensure_dataset(spec)
    path = Path(spec.path).expanduser()
    if path.is_file() and path.suffix not in FILE_TYPES:
        raise DataError(f"dataset file {spec.path} is not .json, .jsonl or .parquet")
    if path.is_file():
        split = _load_files([path], path.name)
    elif path.is_dir():
        split = _load_folder(path, spec.split)
    elif (
        path.suffix in FILE_TYPES
        or spec.path.startswith((".", "/", "~"))
        or str(path.parent) != "."
        and path.parent.is_dir()
    ):
        raise DataError(
            f"dataset path {spec.path} does not exist (set its `build` to build a dataset there, e.g. "
            "`build: {builder: arithmetic}` for a synthetic task)"
        )
    else:
        hub = datasets.load_dataset(spec.path, split=spec.split)
        split = _hf_split(hub, f"{spec.path}[{spec.split}]", None)
    if spec.max_rows is not None and len(split.rows) > spec.max_rows:
        rows = split.rows
        split.rows = rows[: spec.max_rows] if isinstance(rows, list) else rows.select(range(spec.max_rows))
    return split


def _hf_split(ds: Dataset, name: str, base_dir: Path | None) -> Split:
    return Split(_undecoded_images(ds), ds.column_names, name, [Source(name, len(ds), base_dir)])


def _load_files(files: list[Path], origin: str) -> Split:
    kinds = {FILE_TYPES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise DataError(f"mixed file types for one split: {', '.join(f.name for f in files)}")
    if kinds == {"parquet"}:
        return _load_parquet(files, origin)
    rows, sources = [], []
    for f in files:
        found = _read_json_rows(f)
        rows += found
        sources.append(Source(f.name, len(found), f.parent))
    return Split(rows, list(dict.fromkeys(k for row in rows for k in row)), origin, sources)


def _load_parquet(files: list[Path], origin: str) -> Split:
    import datasets
    import pyarrow.parquet as pq

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    sources = [Source(f.name, pq.read_metadata(f).num_rows, f.parent) for f in files]
    return Split(_undecoded_images(ds), ds.column_names, origin, sources)


def _load_folder(path: Path, split: str) -> Split:
    """A save_to_disk folder, or the files named `<split>.<ext>` / `<split>-*.<ext>` (also under data/)."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if split not in saved:
            raise DataError(f"{path} has no split {split!r} (splits: {', '.join(saved)})")
        return _hf_split(saved[split], f"{path.name}[{split}]", path)
    if (path / "state.json").is_file():
        return _hf_split(datasets.load_from_disk(str(path)), path.name, path)
    files = sorted(
        f
        for folder in (path, path / "data")
        for f in folder.glob(f"{split}*")
        if f.suffix in FILE_TYPES and (f.stem == split or f.stem.startswith(f"{split}-")) and f.name != CARD
    )
    if not files:
        found = sorted({f.stem for f in path.iterdir() if f.suffix in FILE_TYPES and f.name != CARD})
        raise DataError(
            f"{path} has no {split}.json/.jsonl/.parquet (found: {', '.join(found) or 'nothing'})"
        )
    return _load_files(files, files[0].name if len(files) == 1 else f"{path.name}/{split}-*")


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON array, a single object, or JSON Lines (what `Dataset.to_json` writes, also to .json).
    Read with the json module, not `datasets`: its `Json` feature re-parses strings (`"3"` becomes 3)."""
    text = _read_utf8(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # more than one value: JSON Lines
                raise _invalid_json(f"{path.name} line {err.lineno}", err) from None
        else:
            rows = data if isinstance(data, list) else [data]
            return [_json_row(row, f"{path.name} row {k}") for k, row in enumerate(rows)]
    return [
        _parse_row(line, f"{path.name} line {n}")
        for n, line in enumerate(text.split("\n"), 1)  # not splitlines: U+2028 may stand inside strings
        if line.strip()
    ]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path.name} line {line}: not UTF-8 ({err.reason} at byte {err.start}); save the file as UTF-8"
        ) from None


def _parse_row(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _invalid_json(where, err) from None
    return _json_row(row, where)


def _invalid_json(where: str, err: json.JSONDecodeError) -> DataError:
    return DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})")


def _json_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (one row), got {type(row).__name__}")
    return row


def _undecoded_images(ds: Dataset) -> Dataset:
    """Let normalisation decode images itself, so a corrupt one is reported with its row."""
    from datasets import Image, List

    feature = ds.features.get("images")
    if isinstance(feature, Image):
        return ds.cast_column("images", Image(decode=False))
    if isinstance(feature, List) and isinstance(feature.feature, Image):
        return ds.cast_column("images", List(Image(decode=False)))
    return ds


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


# ------------------------------------------------------------------------------------------ normalisation


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


def _decode_image(value: Any, base_dir: Path | None, k: int) -> Any:
    """An RGB PIL image from a PIL image, `{"bytes", "path"}` dict, raw bytes or a (relative) path."""
    import io

    from PIL import Image

    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            value = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            value = Image.open(base_dir / value if base_dir is not None else value)
        if not isinstance(value, Image.Image):
            raise TypeError(f"unsupported image value of type {type(value).__name__}")
        value.load()
        return value.convert("RGB")
    except Exception as err:  # PIL raises many types for undecodable data
        raise RowError("images", f"image {k} cannot be decoded: {err}") from None


def _row_images(row: dict[str, Any], messages: list[dict[str, Any]], base_dir: Path | None) -> list[Any]:
    wanted = sum(p["type"] == "image" for m in messages for p in m.get("parts", ()))
    value = row.get("images")
    images = [] if value is None else value if isinstance(value, list) else [value]
    if len(images) != wanted:
        raise RowError(
            "images", f"messages have {wanted} image part(s) but the row has {len(images)} image(s)"
        )
    return [_decode_image(v, base_dir, k) for k, v in enumerate(images)]


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
    images = _row_images(row, messages, base_dir)
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


# ----------------------------------------------------------------------------------------------- encoding


def tokenizer_of(processing: Any) -> Any:
    """The tokenizer of a processor (VL), or the tokenizer itself (text)."""
    return getattr(processing, "tokenizer", processing)


def chat_messages(sample: Sample, is_vl: bool) -> list[dict[str, Any]]:
    """Messages as chat templates read them: part lists for VL prompts, strings otherwise."""
    out = []
    for m in sample.messages:
        if m["role"] == "assistant":
            reasoning = {"reasoning_content": m["reasoning"]} if m["reasoning"] else {}
            out.append({"role": "assistant", "content": m["text"], **reasoning})
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
    """The chat as text; `enable_thinking` follows the sample's mode (it shapes the generation prompt)."""
    return processing.apply_chat_template(
        chat_messages(sample, is_vl),
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


# ------------------------------------------------------------------------------------- packing, batching


def concat(items: list[Item]) -> Item:
    """Text items side by side in one row (their positions restart, so they do not attend to each other)."""
    import numpy as np

    return Item(
        np.concatenate([it.input_ids for it in items]),
        np.concatenate([it.labels for it in items]),
        [n for it in items for n in it.seq_lens],
        [m for it in items for m in it.modes],
    )


def pack(items: list[Item], max_length: int) -> list[Item]:
    """Best-fit-decreasing into rows of at most `max_length` tokens; deterministic (ties by index)."""
    import bisect

    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted so bisect finds the tightest fit
    for i in order:
        n = len(items[i].input_ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (space - n, row))
    return [concat([items[i] for i in row]) for row in rows]


def positions(seq_lens: list[int], width: int) -> np.ndarray:
    """0..n-1 per sample, then 0..k-1 over the padding so it is a segment of its own."""
    import numpy as np

    return np.concatenate([np.arange(n) for n in [*seq_lens, width - sum(seq_lens)]])


def collate(
    items: list[Item], pad_id: int, image_processor: Any = None, flatten: bool = False
) -> dict[str, torch.Tensor]:
    """A right-padded micro-batch. Text: input_ids, labels, position_ids (no attention_mask: see module
    doc). VL: input_ids, labels, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw.
    `flatten` puts a text micro-batch in one unpadded row (what flash_attention_2 needs to see packing)."""
    import numpy as np
    import torch

    if flatten:
        if image_processor is not None:
            raise ValueError("flatten is for text batches; VL rows rely on their attention_mask")
        items = [concat(items)]
    width = max(len(it.input_ids) for it in items)
    input_ids = np.full((len(items), width), pad_id, dtype=np.int64)
    labels = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
    for b, it in enumerate(items):
        input_ids[b, : len(it.input_ids)] = it.input_ids
        labels[b, : len(it.labels)] = it.labels
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    if image_processor is None:
        batch["position_ids"] = torch.from_numpy(np.stack([positions(it.seq_lens, width) for it in items]))
        return batch
    return batch | _vision_inputs(items, width, image_processor)


def _vision_inputs(items: list[Item], width: int, image_processor: Any) -> dict[str, torch.Tensor]:
    import numpy as np
    import torch

    lengths = np.array([len(it.input_ids) for it in items])
    mm_token_type_ids = np.zeros((len(items), width), dtype=np.int64)
    for b, it in enumerate(items):
        assert it.mm_token_type_ids is not None, "VL items come from encode_sample(is_vl=True)"
        mm_token_type_ids[b, : lengths[b]] = it.mm_token_type_ids
    out = {
        "attention_mask": torch.from_numpy((np.arange(width)[None] < lengths[:, None]).astype(np.int64)),
        "mm_token_type_ids": torch.from_numpy(mm_token_type_ids),
    }
    images = [image for it in items for image in it.images]
    if images:  # pixels are made here, not stored: a few KB per image instead of a float tensor
        pixels = image_processor(images=images, return_tensors="pt")
        if pixels["image_grid_thw"].tolist() != [g for it in items for g in it.image_grid_thw]:
            raise RuntimeError("image grids differ from those used to expand the image tokens")
        out |= {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
    return out


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens that carry loss after the causal shift (the learner normalises by their global sum)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of `n` items used in `epoch`: a pure function of (seed, epoch)."""
    import numpy as np

    return np.random.default_rng([seed % 2**64, epoch]).permutation(n)


@dataclass
class SFTData:
    """Encoded (and packed) training rows, their stats, and deterministic batching."""

    items: list[Item]
    stats: DataStats
    pad_id: int
    image_processor: Any = None  # set for VL: pixels are computed at collate time

    def __len__(self) -> int:
        return len(self.items)

    def num_steps(self, global_batch_size: int, epochs: float = 1.0) -> int:
        """Optimizer steps for `epochs` passes (the last step may reach into the next epoch)."""
        return max(1, math.ceil(len(self.items) * epochs / global_batch_size))

    def batches(self, step: int, global_batch_size: int, seed: int) -> list[int]:
        """Item indices of optimizer step `step`: positions [step·G, (step+1)·G) of the epoch orders laid end
        to end. A pure function of (seed, step), so resuming at a step needs no data state."""
        n = len(self.items)
        start = step * global_batch_size
        return [
            int(epoch_order(n, seed, pos // n)[pos % n]) for pos in range(start, start + global_batch_size)
        ]

    def collate(self, indices: list[int], flatten: bool = False) -> dict[str, torch.Tensor]:
        return collate([self.items[i] for i in indices], self.pad_id, self.image_processor, flatten)

    def loss_tokens(self, indices: list[int]) -> int:
        """Loss tokens of these items, equal to count_loss_tokens of their collated batch."""
        return sum(self.items[i].loss_tokens for i in indices)

    def padding_fraction(self, micro_batch_size: int, seed: int = 0) -> float:
        """Share of padding in collated micro-batches over epoch 0 (an estimate of later epochs)."""
        lengths = [len(self.items[i].input_ids) for i in epoch_order(len(self.items), seed, 0)]
        chunks = [lengths[i : i + micro_batch_size] for i in range(0, len(lengths), micro_batch_size)]
        return 1 - sum(lengths) / sum(max(c) * len(c) for c in chunks)


def build_sft_dataset(data_cfg: DataConfig, processing: Any, is_vl: bool) -> SFTData:
    """Validate every row of every training set, then encode, then pack text samples."""
    stats, samples = DataStats(), []
    for spec in data_cfg.train:
        found, rows, reasons = load_samples(spec, data_cfg.bad_rows)
        samples += found
        stats.rows, stats.skipped = stats.rows + rows, stats.skipped + len(reasons)
        stats.skip_reasons += reasons[: MAX_REASONS - len(stats.skip_reasons)]
    items = []
    for item, status in encode_all(samples, processing, is_vl, data_cfg):
        stats.dropped += status == "dropped"
        stats.truncated += status == "truncated"
        items += [item] if item is not None else []
    if stats.dropped or stats.truncated:
        log.warning(
            "%d samples dropped, %d truncated (data.max_length=%d)",
            stats.dropped,
            stats.truncated,
            data_cfg.max_length,
        )
    if not items:
        raise DataError(f"no training samples left: all {stats.dropped} were longer than data.max_length")
    stats.samples, stats.tokens = len(items), sum(len(it.input_ids) for it in items)
    stats.loss_tokens = sum(it.loss_tokens for it in items)
    stats.modes |= Counter(m for it in items for m in it.modes)
    if data_cfg.packing and is_vl:
        log.info("data.packing applies to text models; VL samples are padded per micro-batch")
    elif data_cfg.packing:
        items = pack(items, data_cfg.max_length)
    stats.items = len(items)
    tok = tokenizer_of(processing)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return SFTData(items, stats, pad_id, processing.image_processor if is_vl else None)


# --------------------------------------------------------------------------------------------------- eval


@dataclass
class EvalPrompt:
    prompt_ids: list[int]  # with image pads expanded (VL)
    prompt_text: str  # one image pad per image, as vLLM expects with `multi_modal_data`
    solution: str
    mode: Mode
    row: int
    images: list[Any] = field(default_factory=list)
    vision: dict[str, torch.Tensor] | None = (
        None  # pixel_values, image_grid_thw, mm_token_type_ids (HF generate)
    )
    extra: dict[str, Any] = field(default_factory=dict)


def build_eval_prompts(
    spec: DatasetSpec,
    processing: Any,
    thinking: bool | None = None,
    max_samples: int | None = None,
    needs: Needs = EVAL_NEEDS,
) -> list[EvalPrompt]:
    """Generation prompts of the first `max_samples` rows; `thinking` None keeps the dataset's own choice.
    Also the RL prompt set, whose `needs` are its rewards'."""
    is_vl = hasattr(processing, "image_processor")
    if max_samples is not None:
        spec = spec.model_copy(update={"max_rows": min(max_samples, spec.max_rows or max_samples)})
    samples, _, _ = load_samples(spec, for_eval=True, needs=needs)
    prompts = []
    for s in samples:
        if thinking is not None:
            s.mode = "thinking" if thinking else "non_thinking"
        text = render(s, processing, is_vl, add_generation_prompt=True)
        vision = None
        if is_vl:
            out = processing(text=[text], images=s.images or None, return_tensors="pt")
            ids = out["input_ids"][0].tolist()
            vision = {k: out[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in out}
        else:
            ids = tokenizer_of(processing)(text, add_special_tokens=False)["input_ids"]
        solution = str(s.extra.get("solution", ""))
        prompts.append(EvalPrompt(ids, text, solution, s.mode, s.row, s.images, vision, s.extra))
    return prompts


# ------------------------------------------------------------------------------------------------- models


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
