"""Offline teacher top-k store: exact round trips, mid-shard resume, integrity checks, one shard in memory,
and the tokenizer check (numpy + safetensors; one tiny locally trained tokenizer)."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from posttrain.distill.topk_store import (
    TopKRow,
    TopKStore,
    TopKWriter,
    check_same_tokenizer,
    teacher_identity,
    tokenizer_identity,
)

K = 4


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


TEACHER = {
    "name_or_path": "teacher",
    "dtype": "bfloat16",
    "tokenizer": tokenizer_identity(FakeTokenizer({"a": 0})),
}


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sequences of 3-9 tokens; even rows give prompt_len, odd ones a loss mask; some -inf logprobs."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(3, 10))
        logp = np.sort(np.log(rng.dirichlet(np.ones(K + 2), size=length)[:, :K]), axis=-1)[:, ::-1]
        logp[0] = -math.inf  # nothing predicts the first token
        row: dict[str, Any] = {
            "token_ids": rng.integers(0, 500, size=length).tolist(),
            "topk_ids": rng.integers(0, 500, size=(length, K)),
            "topk_logp": logp.astype(np.float32),
            "extra": {"sample": i, "source": "demo"},
        }
        if i % 2:
            row["loss_mask"] = np.r_[0, rng.integers(0, 2, size=length - 1)]
        else:
            row["prompt_len"] = int(rng.integers(1, length))
        rows.append(row)
    return rows


def write_store(directory: Path, rows: list[dict[str, Any]], shard_rows: int = 3) -> None:
    with TopKWriter(directory, k=K, teacher=TEACHER, shard_rows=shard_rows) as writer:
        for i, row in enumerate(rows):
            assert writer.add(**row) == i


def expected_mask(row: dict[str, Any]) -> np.ndarray:
    if "prompt_len" in row:
        return np.arange(len(row["token_ids"])) >= row["prompt_len"]
    return np.asarray(row["loss_mask"], dtype=bool)


def assert_row(got: TopKRow, want: dict[str, Any]) -> None:
    assert got.token_ids.dtype == np.int32 and got.token_ids.tolist() == want["token_ids"]
    assert got.loss_mask.dtype == np.bool_ and np.array_equal(got.loss_mask, expected_mask(want))
    assert got.topk_ids.dtype == np.int32 and np.array_equal(got.topk_ids, want["topk_ids"])
    assert got.topk_logp.dtype == np.float32 and np.array_equal(got.topk_logp, want["topk_logp"])
    assert got.extra == want["extra"]


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return make_rows(10)


@pytest.fixture
def store_dir(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    write_store(tmp_path / "store", rows)  # shards of 3, 3, 3 and 1 rows
    return tmp_path / "store"


def test_round_trip_across_shards(store_dir: Path, rows: list[dict[str, Any]]) -> None:
    store = TopKStore(store_dir)
    assert len(store) == 10 and store.k == K and store.teacher == TEACHER
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert manifest["tokens"] == sum(len(r["token_ids"]) for r in rows)
    streamed = list(store.iter_rows())
    assert [r.index for r in streamed] == list(range(10))
    for i, want in enumerate(rows):
        assert_row(streamed[i], want)
        assert_row(store.row(i), want)
    with pytest.raises(IndexError):
        store.row(10)


@pytest.mark.parametrize("start", [1, 4, 5, 6, 9, 10])
def test_resume_in_the_middle_of_a_shard(store_dir: Path, rows: list[dict[str, Any]], start: int) -> None:
    resumed = list(TopKStore(store_dir).iter_rows(start))
    assert [r.index for r in resumed] == list(range(start, 10))
    for got, want in zip(resumed, rows[start:], strict=True):
        assert_row(got, want)


def test_iteration_holds_one_shard_at_a_time(store_dir: Path) -> None:
    store = TopKStore(store_dir)
    loaded: list[weakref.ref[Any]] = []
    kept = []  # rows are copies: holding them must not pin their shards
    for row in store.iter_rows():
        kept.append(row)
        if not loaded or loaded[-1]() is not store._shard:
            loaded.append(weakref.ref(store._shard))
        assert sum(ref() is not None for ref in loaded) == 1
    assert len(loaded) == 4  # each shard read once


def test_a_corrupted_shard_is_named(store_dir: Path, rows: list[dict[str, Any]]) -> None:
    path = store_dir / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit in the tensor data
    path.write_bytes(bytes(data))
    store = TopKStore(store_dir)  # shards are checked when they are loaded
    rows_read: list[TopKRow] = []
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors .* corrupt"):
        rows_read.extend(store.iter_rows())
    assert len(rows_read) == 3  # shard 0 was fine
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors .* corrupt"):
        store.row(4)


def test_an_unfinished_capture_is_detected(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    writer = TopKWriter(tmp_path / "killed", k=K, teacher=TEACHER, shard_rows=2)
    for row in rows[:5]:
        writer.add(**row)  # two shards are already on disk
    assert (tmp_path / "killed" / "shard-00001.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TopKStore(tmp_path / "killed")
    with (
        pytest.raises(RuntimeError, match="teacher died"),
        TopKWriter(tmp_path / "failed", k=K, teacher=TEACHER) as w,
    ):
        w.add(**rows[0])
        raise RuntimeError("teacher died")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TopKStore(tmp_path / "failed")


def test_a_finished_store_is_not_overwritten_and_a_missing_shard_is_named(store_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        TopKWriter(store_dir, k=K, teacher=TEACHER)
    (store_dir / "shard-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00002\.safetensors"):
        TopKStore(store_dir)


def test_an_empty_store(tmp_path: Path) -> None:
    TopKWriter(tmp_path / "empty", k=K, teacher=TEACHER).close()
    store = TopKStore(tmp_path / "empty")
    assert len(store) == 0 and list(store.iter_rows()) == []


def test_the_writer_rejects_malformed_rows(tmp_path: Path) -> None:
    writer = TopKWriter(tmp_path / "store", k=K, teacher=TEACHER)
    ids, logp = np.zeros((3, K), dtype=np.int64), np.full((3, K), -1.0)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"prompt_len": 1, "loss_mask": [0, 1, 1]}, "exactly one"),
        ({}, "exactly one"),
        ({"prompt_len": 0}, "prompt_len"),
        ({"loss_mask": [1, 1, 1]}, r"loss_mask\[0\]"),
        ({"loss_mask": [0, 1]}, "shape"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            writer.add([1, 2, 3], ids, logp, **kwargs)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        writer.add([1, 2, 3], ids[:, :2], logp[:, :2], prompt_len=1)
    with pytest.raises(ValueError, match="NaN"):
        writer.add([1, 2, 3], ids, np.full((3, K), math.nan), prompt_len=1)
    with pytest.raises(ValueError, match="non-negative"):
        writer.add([1, 2, 3], ids - 1, logp, prompt_len=1)
    with pytest.raises(ValueError, match="tokenizer"):
        TopKWriter(tmp_path / "other", k=K, teacher={"name_or_path": "teacher"})


def test_tokenizer_identity_and_mismatch(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from posttrain.synthetic.models import build_tokenizer

    teacher_tokenizer = build_tokenizer(seed=0)
    teacher_tokenizer.save_pretrained(tmp_path / "teacher")
    teacher = teacher_identity(str(tmp_path / "teacher"), {"hidden_size": 8}, teacher_tokenizer, "bfloat16")
    assert teacher["tokenizer"]["vocab_size"] == len(teacher_tokenizer)
    assert "<|im_end|>" in teacher["tokenizer"]["special_tokens"]
    TopKWriter(tmp_path / "store", k=K, teacher=teacher).close()
    store = TopKStore(tmp_path / "store")

    same = tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path / "teacher"))  # as the student loads it
    check_same_tokenizer(store, same)
    check_same_tokenizer(store.manifest, same)

    other = tokenizer_identity(build_tokenizer(seed=1))
    vocabularies = rf"{other['vocab_sha256']}.*{teacher['tokenizer']['vocab_sha256']}"
    with pytest.raises(ValueError, match=vocabularies):
        check_same_tokenizer(store, other)
    renamed = tokenizer_identity(FakeTokenizer({"b": 0}))
    with pytest.raises(ValueError, match="student .* vs teacher"):
        check_same_tokenizer({"teacher": TEACHER}, renamed)
