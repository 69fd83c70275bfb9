"""posttrain.data on the tiny models: loading, validation, thinking modes, labels, VL, overlong, packing, batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from posttrain.config import DataConfig, DatasetSpec
from posttrain.data.chat import IGNORE_INDEX, encode_sample
from posttrain.data.errors import DataError
from posttrain.data.files import load_split
from posttrain.data.processing import load_processing
from posttrain.data.prompts import build_eval_prompts
from posttrain.data.rows import load_samples, split_reasoning
from posttrain.data.sft_dataset import build_sft_dataset, collate, count_loss_tokens, pack

USER = "What is 2+3?"
REASONING = "2+3=5 write 5 carry 0\nanswer 5"
ROW = {
    "messages": [
        {"role": "user", "content": USER},
        {"role": "assistant", "content": "5", "reasoning_content": REASONING},
    ],
    "solution": "5",
    "source": "unit",
}
THINKING_TEXT = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n<think>\n{REASONING}\n</think>\n\n5<|im_end|>"
NON_THINKING_TEXT = (
    f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n5<|im_end|>"
)


@pytest.fixture(scope="module")
def tok(tiny_text_model: Path) -> Any:
    tokenizer, is_vl = load_processing(tiny_text_model)
    assert not is_vl
    return tokenizer


@pytest.fixture(scope="module")
def proc(tiny_vl_model: Path) -> Any:
    processor, is_vl = load_processing(tiny_vl_model)
    assert is_vl
    return processor


def write_images(folder: Path) -> None:
    """The images rows name: img0.png, img1.png (two sizes) and junk.png."""
    from PIL import Image

    for k in range(2):
        Image.new("RGB", (64 + 32 * k, 64 + 32 * k), "red").save(folder / f"img{k}.png")
    (folder / "junk.png").write_text("not an image")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSON lines, with the images they name beside them."""
    write_images(path.parent)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vl_row(n_images: int = 1, answer: str = "2") -> dict[str, Any]:
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": "How many shapes are in the image?"}]
    return {
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": answer, "reasoning_content": "I see two."},
        ],
        "images": [f"img{k}.png" for k in range(n_images)],
        "solution": answer,
    }


def samples_of(tmp_path: Path, rows: list[dict[str, Any]], **spec: Any) -> list[Any]:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    return load_samples(DatasetSpec(path=str(path), **spec))[0]


def decode_labels(tokenizer: Any, labels: Any) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------ loading


def test_load_file_formats_keep_extra_columns(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [ROW, {**ROW, "solution": "6"}, {**ROW, "solution": "7"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "rows.jsonl", rows)
    Dataset.from_list(rows).to_json(str(tmp_path / "lines.json"))  # JSON Lines, despite the name
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:1])
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for path, origin in [
        ("rows.json", "rows.json"),
        ("lines.json", "lines.json"),
        ("rows.jsonl", "rows.jsonl"),
        ("rows.parquet", "rows.parquet"),
        ("folder", "train.jsonl"),
        ("saved", "saved[train]"),
    ]:
        split = load_split(DatasetSpec(path=str(tmp_path / path)))
        assert (len(split.rows), split.origin) == (3, origin)
        assert split.columns == ["messages", "solution", "source"]
        assert split.rows[2]["solution"] == "7" and split.rows[0]["source"] == "unit"
    assert len(load_split(DatasetSpec(path=str(folder), split="test")).rows) == 1
    assert len(load_split(DatasetSpec(path=str(folder), max_rows=2)).rows) == 2
    with pytest.raises(DataError, match="no valid.json|has no valid"):
        load_split(DatasetSpec(path=str(folder), split="valid"))
    with pytest.raises(DataError, match="does not exist"):
        load_split(DatasetSpec(path=str(tmp_path / "missing.jsonl")))


def test_mixed_content_jsonl_loads_exactly_as_written(tmp_path: Path) -> None:
    """The TRL / LLaMA-Factory VL layout: a user turn of parts, string turns, paths in `images`."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
                {"role": "assistant", "content": "3"},
            ],
            "images": ["img0.png"],
        },
        {"messages": [{"role": "user", "content": "[1, 2]"}, {"role": "assistant", "content": '{"n": 3}'}]},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert load_split(DatasetSpec(path=str(path))).rows == rows
    first, second = load_samples(DatasetSpec(path=str(path)))[0]
    assert first.messages == [
        {"role": "user", "parts": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "text": "3", "reasoning": None},
    ]
    assert [im.size for im in first.images] == [(64, 64)]
    assert second.messages == [
        {"role": "user", "parts": [{"type": "text", "text": "[1, 2]"}]},
        {"role": "assistant", "text": '{"n": 3}', "reasoning": None},
    ]
    assert (second.images, second.extra) == ([], {})


MALFORMED = {
    "jsonl_line": ("rows.jsonl", b'{"a": 1}\n\n{"a": }\n', 'rows.jsonl line 3: invalid JSON (Expecting value at column 7)'),
    "jsonl_not_object": ("rows.jsonl", b'{"a": 1}\n[1]\n', "rows.jsonl line 2: expected a JSON object (one row), got list"),
    "json_file": ("rows.json", b'[\n  {"a": 1},\n  {"a" 2}\n]\n', "rows.json line 3: invalid JSON (Expecting ':' delimiter at column 8)"),
    "json_not_object": ("rows.json", b'[{"a": 1}, "b"]', "rows.json row 1: expected a JSON object (one row), got str"),
    "jsonl_utf8": ("rows.jsonl", b'{"a": "x"}\n{"a": "caf\xe9"}\n', "rows.jsonl line 2: not UTF-8 (invalid continuation byte at byte 21); save the file as UTF-8"),
    "json_utf8": ("rows.json", b'[\n{"a": "\xff"}]', "rows.json line 2: not UTF-8 (invalid start byte at byte 9); save the file as UTF-8"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_json_names_file_and_line(tmp_path: Path, kind: str) -> None:
    name, data, message = MALFORMED[kind]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError) as err:
        load_split(DatasetSpec(path=str(tmp_path / name)))
    assert str(err.value) == message


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"type": "text", "text": text}]}


VL_PARTS = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is larger?"}]
DATASET_TYPES = {
    # name: (rows, for_eval, [(normalised messages, mode, extra, image sizes)] of each row)
    "conversational": (
        [{"messages": [{"role": "system", "content": "Be brief."}, *ROW["messages"]], "solution": "5"}],
        False,
        [([{"role": "system", "parts": [{"type": "text", "text": "Be brief."}]}, user(USER), {"role": "assistant", "text": "5", "reasoning": REASONING}], "thinking", {"solution": "5"}, [])],
    ),
    "prompt_completion": (
        [{"prompt": USER, "completion": "5", "reasoning": REASONING}, {"prompt": "Hi", "completion": "Hello", "reasoning": None}],
        False,
        [
            ([user(USER), {"role": "assistant", "text": "5", "reasoning": REASONING}], "thinking", {"reasoning": REASONING}, []),
            ([user("Hi"), {"role": "assistant", "text": "Hello", "reasoning": None}], "non_thinking", {"reasoning": None}, []),
        ],
    ),
    "conversational_prompt_completion": (
        [{"prompt": [{"role": "user", "content": USER}], "completion": [{"role": "assistant", "content": "5"}]}],
        False,
        [([user(USER), {"role": "assistant", "text": "5", "reasoning": None}], "non_thinking", {}, [])],
    ),
    "prompt_only": (
        [{"prompt": USER, "solution": "5"}],
        True,
        [([user(USER)], "non_thinking", {"solution": "5"}, [])],
    ),
    "conversational_prompt_only": (
        [{"prompt": [{"role": "user", "content": USER}], "solution": "5"}],
        True,
        [([user(USER)], "non_thinking", {"solution": "5"}, [])],
    ),
    "vision": (
        [{"messages": [{"role": "user", "content": VL_PARTS}, {"role": "assistant", "content": [{"type": "text", "text": "2"}]}], "images": ["img0.png", "img1.png"]}],
        False,
        [([{"role": "user", "parts": VL_PARTS}, {"role": "assistant", "text": "2", "reasoning": None}], "non_thinking", {}, [(64, 64), (96, 96)])],
    ),
}  # fmt: skip


def write_source(tmp_path: Path, kind: str, rows: list[dict[str, Any]]) -> tuple[Path, str]:
    """`rows` as a dataset of `kind` with the images they name beside it, and the name samples carry."""
    from datasets import Dataset, DatasetDict

    write_images(tmp_path)
    if kind == "json":
        (tmp_path / "rows.json").write_text(json.dumps(rows))
        return tmp_path / "rows.json", "rows.json"
    if kind == "jsonl":
        return write_jsonl(tmp_path / "rows.jsonl", rows), "rows.jsonl"
    if kind == "parquet":
        Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
        return tmp_path / "rows.parquet", "rows.parquet"
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "folder":
        write_jsonl(folder / "train.jsonl", rows)
        write_jsonl(folder / "test.jsonl", [ROW])
        return folder, "train.jsonl"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder))
    write_images(folder)
    return folder, f"{kind}[train]"


@pytest.mark.parametrize("source", ["json", "jsonl", "parquet", "folder", "saved"])
@pytest.mark.parametrize("dataset_type", sorted(DATASET_TYPES))
def test_dataset_types_load_alike_from_every_source(tmp_path: Path, dataset_type: str, source: str) -> None:
    rows, for_eval, expected = DATASET_TYPES[dataset_type]
    path, origin = write_source(tmp_path, source, rows)
    samples = load_samples(DatasetSpec(path=str(path)), for_eval=for_eval)[0]
    assert [(s.messages, s.mode, s.extra, [im.size for im in s.images]) for s in samples] == expected
    assert [(s.origin, s.row) for s in samples] == [(origin, k) for k in range(len(rows))]


def png(size: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), "blue").save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("source", ["parquet", "saved"])
@pytest.mark.parametrize("value", ["bytes", "bytes_dicts", "image_feature"])
def test_images_as_bytes_or_image_features(tmp_path: Path, value: str, source: str) -> None:
    from datasets import Dataset, DatasetDict, Image, List

    images = [png(64), png(96)]
    row = {**DATASET_TYPES["vision"][0][0], "images": images}
    if value == "bytes_dicts":
        row["images"] = [{"bytes": b, "path": None} for b in images]
    ds = Dataset.from_list([row])
    ds = ds.cast_column("images", List(Image())) if value == "image_feature" else ds
    path = tmp_path / "rows.parquet" if source == "parquet" else tmp_path / "saved"
    if source == "parquet":
        ds.to_parquet(str(path))
    else:
        DatasetDict({"train": ds}).save_to_disk(str(path))
    (sample,) = load_samples(DatasetSpec(path=str(path)))[0]
    assert [(im.mode, im.size, im.getpixel((0, 0))) for im in sample.images] == [
        ("RGB", (64, 64), (0, 0, 255)),
        ("RGB", (96, 96), (0, 0, 255)),
    ]


def test_bad_row_names_its_own_file_and_row(tmp_path: Path) -> None:
    """A split of several files: rows and relative image paths belong to the file they are in."""
    data = tmp_path / "folder" / "data"
    data.mkdir(parents=True)
    write_jsonl(data / "train-00000-of-00002.jsonl", [ROW, vl_row(1)])
    bad = {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}
    write_jsonl(data / "train-00001-of-00002.jsonl", [vl_row(2), bad])
    spec = DatasetSpec(path=str(tmp_path / "folder"))
    with pytest.raises(DataError) as err:
        load_samples(spec)
    assert str(err.value) == (
        "train-00001-of-00002.jsonl row 1, column 'messages': message 0 has int content "
        "(expected a string or a list of parts)"
    )
    samples = load_samples(spec.model_copy(update={"max_rows": 3}))[0]
    assert [(s.origin, s.row, len(s.images)) for s in samples] == [
        ("train-00000-of-00002.jsonl", 0, 0),
        ("train-00000-of-00002.jsonl", 1, 1),
        ("train-00001-of-00002.jsonl", 0, 2),
    ]
    (tmp_path / "rows.json").write_text(json.dumps([ROW, {"messages": []}]))
    with pytest.raises(DataError, match=r"^rows.json row 1, column 'messages': no messages$"):
        load_samples(DatasetSpec(path=str(tmp_path / "rows.json")))


def test_prompt_completion_format(tmp_path: Path, tok: Any) -> None:
    rows = [{"prompt": USER, "completion": "5", "reasoning": REASONING}, {"prompt": USER, "completion": "5"}]
    thinking, plain = samples_of(tmp_path, rows)
    assert (thinking.mode, plain.mode) == ("thinking", "non_thinking")
    for sample, text in [(thinking, THINKING_TEXT), (plain, NON_THINKING_TEXT)]:
        item, status = encode_sample(sample, tok, False, 256)
        assert status == "ok" and tok.decode(item.input_ids) == text


def test_inline_think_is_parsed(tmp_path: Path, tok: Any) -> None:
    assert split_reasoning("<think>\nr\n</think>\n\nanswer") == ("r", "answer")
    assert split_reasoning("no think here </think>") == (None, "no think here </think>")
    inline = {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n5"}
    (sample,) = samples_of(tmp_path, [{"messages": [ROW["messages"][0], inline]}])
    assert sample.mode == "thinking" and sample.messages[-1]["reasoning"] == REASONING
    assert tok.decode(encode_sample(sample, tok, False, 256)[0].input_ids) == THINKING_TEXT


def test_thinking_and_non_thinking_from_one_row(tmp_path: Path, tok: Any) -> None:
    texts = {}
    for mode in ("auto", "thinking", "non_thinking"):
        (sample,) = samples_of(tmp_path, [ROW], thinking=mode)
        texts[mode] = (sample.mode, tok.decode(encode_sample(sample, tok, False, 256)[0].input_ids))
    assert texts["auto"] == texts["thinking"] == ("thinking", THINKING_TEXT)
    assert texts["non_thinking"] == ("non_thinking", NON_THINKING_TEXT)
    rows = [{**ROW, "think": True}, {**ROW, "think": False}]
    assert [s.mode for s in samples_of(tmp_path, rows, thinking="column", thinking_column="think")] == [
        "thinking",
        "non_thinking",
    ]
    no_reasoning = {"messages": [ROW["messages"][0], {"role": "assistant", "content": "5"}]}
    with pytest.raises(DataError, match="row 0, column 'messages': thinking sample without reasoning"):
        samples_of(tmp_path, [no_reasoning], thinking="thinking")


def test_labels_cover_only_assistant_responses(tmp_path: Path, tok: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "one and one"},
        {"role": "user", "content": USER},
        {"role": "assistant", "content": "5"},
    ]
    (sample,) = samples_of(tmp_path, [{"messages": messages}])
    item, _ = encode_sample(sample, tok, False, 256)
    assert decode_labels(tok, item.labels) == (
        "<think>\none and one\n</think>\n\n2<|im_end|>5<|im_end|>"  # an empty think block is prompt
    )
    # Same mask as the template's own {% generation %} blocks (which also cover nothing after <|im_end|>).
    reference = tok.apply_chat_template(
        messages[:2] + [{**messages[2], "reasoning_content": "one and one"}] + messages[3:],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert reference["input_ids"][: len(item.input_ids)] == item.input_ids.tolist()
    assert reference["assistant_masks"][: len(item.labels)] == (item.labels != IGNORE_INDEX).tolist()


# --------------------------------------------------------------------------------------------- validation

BAD_ROWS = {
    "role": ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages", "message 0 has role 'bot' (expected system/user/assistant)"),
    "missing": ({"solution": "1"}, "messages", "missing"),
    "empty": ({"messages": []}, "messages", "no messages"),
    "content": ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}, "messages", "message 0 has int content"),
    "last_user": ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}]}, "messages", "last message is 'user'"),
    "no_assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    "image_count": ({**vl_row(1), "images": []}, "images", "1 image part(s) but the row has 0 image(s)"),
    "image_file": ({**vl_row(1), "images": ["junk.png"]}, "images", "image 0 cannot be decoded"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_and_column(tmp_path: Path, kind: str) -> None:
    bad, column, reason = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "train.jsonl", [ROW, ROW, bad, ROW])
    with pytest.raises(DataError) as err:
        load_samples(DatasetSpec(path=str(path)))
    assert str(err.value).startswith(f"train.jsonl row 2, column '{column}': ")
    assert reason in str(err.value)


def test_skip_mode_counts_bad_rows(tmp_path: Path, tok: Any) -> None:
    bad = [BAD_ROWS[k][0] for k in ("role", "content", "last_user")]
    path = write_jsonl(tmp_path / "train.jsonl", [ROW, *bad, ROW])
    data = build_sft_dataset(DataConfig(train=[DatasetSpec(path=str(path))], bad_rows="skip"), tok, False)
    assert (data.stats.rows, data.stats.skipped, data.stats.samples) == (5, 3, 2)
    assert data.stats.skip_reasons[0].startswith("train.jsonl row 1, column 'messages': message 0 has role")


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"train.jsonl: missing column 'prompt'"):
        load_samples(DatasetSpec(path=str(path)))
    with pytest.raises(DataError, match=r"rows.jsonl: missing column 'enable_thinking'"):
        load_samples(DatasetSpec(path=str(write_jsonl(tmp_path / "rows.jsonl", [ROW])), thinking="column"))


# ------------------------------------------------------------------------------------------------------ VL


def test_vl_encoding_expands_pads_and_masks_response(tmp_path: Path, proc: Any) -> None:
    (sample,) = samples_of(tmp_path, [vl_row(2)])
    item, _ = encode_sample(sample, proc, True, 512)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = proc.image_processor.merge_size
    assert len(item.image_grid_thw) == 2
    expected = sum(t * h * w for t, h, w in item.image_grid_thw) // merge**2
    assert int((item.input_ids == pad).sum()) == expected > 2
    assert ((item.input_ids == pad) == (item.mm_token_type_ids == 1)).all()
    assert decode_labels(proc.tokenizer, item.labels) == "<think>\nI see two.\n</think>\n\n2<|im_end|>"
    messages = [
        {"role": "user", "content": [{"type": "image", "image": im} for im in sample.images] + sample.messages[0]["parts"][2:]},
        {"role": "assistant", "content": "2", "reasoning_content": "I see two."},
    ]  # fmt: skip
    reference = proc.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    n = len(item.input_ids)
    assert reference["input_ids"][0][:n] == item.input_ids.tolist()
    assert reference["assistant_masks"][0][:n] == (item.labels != IGNORE_INDEX).tolist()


def test_vl_batch_matches_single_forward(tmp_path: Path, proc: Any, tiny_vl_model: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    rows = [
        vl_row(1, "1"),
        {
            **vl_row(2),
            "messages": vl_row(2)["messages"][:1] + [{"role": "assistant", "content": "two shapes"}],
        },
    ]
    items = [encode_sample(s, proc, True, 512)[0] for s in samples_of(tmp_path, rows)]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_model, dtype=torch.float32).eval()
    batch = collate(items, proc.tokenizer.pad_token_id, proc.image_processor)
    assert set(batch) == {
        "input_ids",
        "labels",
        "attention_mask",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
    }
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for b, item in enumerate(items):
            alone = collate([item], proc.tokenizer.pad_token_id, proc.image_processor)
            logits = model(**{k: v for k, v in alone.items() if k != "labels"}, use_cache=False).logits[0]
            torch.testing.assert_close(together[b, : len(item.input_ids)], logits, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- overlong


def test_overlong_policies(tmp_path: Path, tok: Any) -> None:
    long_row = {**ROW, "messages": [ROW["messages"][0], {**ROW["messages"][1], "content": "5 " * 40}]}
    path = write_jsonl(tmp_path / "train.jsonl", [ROW, long_row, ROW])
    full = encode_sample(load_samples(DatasetSpec(path=str(path)))[0][1], tok, False, 10_000)[0]

    def build(overlong: str, max_length: int = 64) -> Any:
        cfg = DataConfig(
            train=[DatasetSpec(path=str(path))], max_length=max_length, overlong=overlong, packing=False
        )
        return build_sft_dataset(cfg, tok, False)

    with pytest.raises(
        DataError, match=rf"train.jsonl row 1: {len(full.input_ids)} tokens > data.max_length=64"
    ):
        build("error")
    dropped = build("drop")
    assert (dropped.stats.samples, dropped.stats.dropped) == (2, 1)
    truncated = build("truncate")
    assert (truncated.stats.samples, truncated.stats.truncated) == (3, 1)
    cut = max(truncated.items, key=lambda it: len(it.input_ids))
    assert len(cut.input_ids) == 64 and (cut.input_ids == full.input_ids[:64]).all()
    assert (cut.labels == full.labels[:64]).all() and decode_labels(tok, cut.labels).startswith("<think>")
    # A prompt longer than max_length is never cut: an error, or a drop even under truncate.
    with pytest.raises(DataError, match="row 0: .* the prompt alone"):
        build("error", 8)
    with pytest.raises(DataError, match="no training samples left"):
        build("truncate", 8)


def test_truncate_keeps_image_tokens(tmp_path: Path, proc: Any) -> None:
    (sample,) = samples_of(tmp_path, [vl_row(1, "3 " * 30)])
    full, _ = encode_sample(sample, proc, True, 4096)
    prompt_len = int((full.labels == IGNORE_INDEX).sum())  # one response, so all unlabelled tokens are prompt
    item, status = encode_sample(sample, proc, True, prompt_len + 3, "truncate")
    assert status == "truncated" and len(item.input_ids) == prompt_len + 3
    assert (item.input_ids == full.input_ids[: prompt_len + 3]).all()
    assert int((item.mm_token_type_ids == 1).sum()) == int((full.mm_token_type_ids == 1).sum()) == 9
    assert int((item.labels != IGNORE_INDEX).sum()) == 3
    assert encode_sample(sample, proc, True, prompt_len, "truncate") == (None, "dropped")
    with pytest.raises(DataError, match="train.jsonl row 0: .* prompt alone"):
        encode_sample(sample, proc, True, prompt_len - 1, "error")


# --------------------------------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory: pytest.TempPathFactory) -> DatasetSpec:
    path = tmp_path_factory.mktemp("tasks") / "arithmetic"
    return DatasetSpec.model_validate(
        {"path": str(path), "build": {"builder": "arithmetic", "args": {"train_size": 24, "test_size": 6}}}
    )


def test_packing_positions_and_coverage(arithmetic: DatasetSpec, tok: Any) -> None:
    cfg = DataConfig(train=[arithmetic], max_length=200)
    packed = build_sft_dataset(cfg, tok, False)
    plain = build_sft_dataset(cfg.model_copy(update={"packing": False}), tok, False)
    assert packed.stats.samples == plain.stats.samples == len(plain) == 24
    assert len(packed) < 24 and all(len(it.input_ids) <= 200 for it in packed.items)
    assert packed.stats.modes == {"thinking": 24, "non_thinking": 0}
    seqs = sorted(tuple(it.input_ids.tolist()) for it in plain.items)
    split = [
        tuple(it.input_ids[sum(it.seq_lens[:k]) : sum(it.seq_lens[: k + 1])].tolist())
        for it in packed.items
        for k in range(len(it.seq_lens))
    ]
    assert sorted(split) == seqs
    assert pack(plain.items, 200)[0].seq_lens == packed.items[0].seq_lens  # deterministic
    batch = packed.collate([0, len(packed) - 1])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    row, width = packed.items[-1], batch["input_ids"].shape[1]
    expected = [p for n in [*row.seq_lens, width - len(row.input_ids)] for p in range(n)]
    assert batch["position_ids"][1].tolist() == expected
    assert (batch["labels"][1, len(row.input_ids) :] == IGNORE_INDEX).all()
    assert count_loss_tokens(batch) == packed.loss_tokens([0, len(packed) - 1])
    assert packed.stats.loss_tokens == sum(it.loss_tokens for it in packed.items)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_match_separate(
    arithmetic: DatasetSpec, tok: Any, tiny_text_model: Path, attn: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    data = build_sft_dataset(DataConfig(train=[arithmetic], max_length=200), tok, False)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_text_model, attn_implementation=attn, dtype=torch.float32
    )
    model.eval()
    rows = [0, len(data) - 1]  # the longest and the shortest row: the second gets a padded tail
    assert len(data.items[rows[0]].seq_lens) > 1
    with torch.no_grad():
        for flatten in (False, True):
            batch = data.collate(rows, flatten=flatten)
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            segments = [(b if not flatten else 0, it) for b, it in enumerate(data.items[i] for i in rows)]
            offset = 0
            for b, item in segments:
                start = 0 if not flatten else offset
                for n in item.seq_lens:
                    ids = batch["input_ids"][b, start : start + n]
                    alone = model(input_ids=ids[None], use_cache=False).logits[0]
                    torch.testing.assert_close(logits[b, start : start + n], alone, atol=1e-5, rtol=0)
                    start += n
                offset = start


def test_batches_are_a_pure_function_of_seed_and_step(arithmetic: DatasetSpec, tok: Any) -> None:
    cfg = DataConfig(train=[arithmetic], packing=False)
    data, again = build_sft_dataset(cfg, tok, False), build_sft_dataset(cfg, tok, False)
    n, g = len(data), 5
    assert data.num_steps(g, 1) == 5 and data.num_steps(g, 2.0) == 10
    order = [i for step in range(10) for i in data.batches(step, g, seed=3)]
    assert order == [i for step in range(10) for i in again.batches(step, g, seed=3)]
    assert data.batches(7, g, 3) == again.batches(7, g, 3) == order[35:40]
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n : 2 * n]) == list(range(n))
    assert order[:n] != order[n : 2 * n] and data.batches(0, g, 4) != data.batches(0, g, 3)
    assert 0 <= data.padding_fraction(4, seed=3) < 1


# ------------------------------------------------------------------------------------------------------ eval


def test_eval_prompts(arithmetic: DatasetSpec, tok: Any, tmp_path: Path, proc: Any) -> None:
    spec = arithmetic.model_copy(update={"split": "test"})
    thinking = build_eval_prompts(spec, tok, None, max_samples=4)
    plain = build_eval_prompts(spec, tok, False, max_samples=4)
    assert len(thinking) == 4 and {p.mode for p in thinking} == {"thinking"}
    assert thinking[0].prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert plain[0].prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(thinking[0].prompt_ids) == thinking[0].prompt_text
    assert thinking[0].solution == thinking[0].extra["solution"] and thinking[0].solution.isdigit()
    path = write_jsonl(tmp_path / "test.jsonl", [vl_row(1)])
    (vl,) = build_eval_prompts(DatasetSpec(path=str(path)), proc, True)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert vl.prompt_ids.count(pad) == int(vl.vision["image_grid_thw"].prod()) // 4
    assert vl.prompt_text.count("<|image_pad|>") == 1 and len(vl.images) == 1 and vl.solution == "2"


def test_num_proc_matches_serial(arithmetic: DatasetSpec, tok: Any) -> None:
    cfg = DataConfig(train=[arithmetic], packing=False)
    serial = build_sft_dataset(cfg, tok, False)
    parallel = build_sft_dataset(cfg.model_copy(update={"num_proc": 2}), tok, False)
    assert [it.input_ids.tolist() for it in serial.items] == [it.input_ids.tolist() for it in parallel.items]
    assert [it.labels.tolist() for it in serial.items] == [it.labels.tolist() for it in parallel.items]
