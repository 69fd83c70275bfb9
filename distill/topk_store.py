"""Offline teacher top-k log-probabilities on disk: capture the teacher once, then train any number of
students from the files without the teacher in memory.

Layout of a store directory:

- `shard-00000.safetensors`, ...: each holds up to `shard_rows` sequences as flat arrays concatenated over
  its rows, row i being tokens offsets[i]:offsets[i + 1]: `token_ids` int32 [N], `loss_mask` uint8 [N],
  `topk_ids` int32 [N, K], `topk_logp` float32 [N, K] and `offsets` int64 [rows + 1]. Per-row `extra`
  dicts are JSON in the safetensors metadata. A token costs 8 K + 5 bytes; float16 logprobs would save
  2 K of them at ~1e-3 relative precision, and are not offered.
- `manifest.json`, written last: format version, k, row and token counts, the teacher's identity (which
  includes its tokenizer's, see `tokenizer_identity`) and each shard's rows, size and sha256. A directory
  without one is a capture that did not finish.

Alignment follows the unshifted labels of `posttrain.data`: entry j of a row's top-k is the teacher's
distribution over token j given tokens[:j] (what vLLM's prompt_logprobs reports for token j), and
loss_mask[j] = 1 makes token j a target. Entry 0 predicts nothing, so loss_mask[0] must be 0. Student logits
at position t predict token t + 1: compare logits[:, :-1] with topk_*[:, 1:] under loss_mask[:, 1:].

Files are written atomically (temp file, fsync, rename) and only read through safetensors and JSON, never
unpickled. A shard's bytes are hashed whenever it is loaded, before they are parsed.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict

import numpy as np
from numpy.typing import ArrayLike
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from posttrain.checkpoint import publish_file

FORMAT = "posttrain-topk"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TopKRow:
    """One sequence, its arrays copied out of the shard so that holding rows never pins a whole shard."""

    index: int
    token_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # bool [L]
    topk_ids: np.ndarray  # int32 [L, K]
    topk_logp: np.ndarray  # float32 [L, K]
    extra: dict[str, Any]


class HasVocab(Protocol):
    """A tokenizer as far as its identity goes (any Hugging Face tokenizer)."""

    def get_vocab(self) -> dict[str, int]: ...


class TokenizerIdentity(TypedDict):
    """What `tokenizer_identity` returns."""

    name_or_path: str
    vocab_size: int
    vocab_sha256: str
    special_tokens: list[str]


class TeacherIdentity(TypedDict):
    """What `teacher_identity` returns: the manifest's `teacher` entry."""

    name_or_path: str
    config_sha256: str
    dtype: str
    tokenizer: TokenizerIdentity


def _sha256_json(value: object) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_identity(tokenizer: HasVocab) -> TokenizerIdentity:
    """What a top-k id means: the vocabulary's size and hash (token -> id, added tokens included), plus the
    name and special tokens for people reading the manifest. Works on any object with get_vocab()."""
    vocab = tokenizer.get_vocab()
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(vocab),
        "vocab_sha256": _sha256_json(sorted(vocab.items())),
        "special_tokens": sorted(getattr(tokenizer, "all_special_tokens", [])),
    }


def teacher_identity(
    name_or_path: str, config: Mapping[str, object], tokenizer: HasVocab, dtype: str
) -> TeacherIdentity:
    """The `teacher` dict for TopKWriter: path, a hash of the model config (e.g. `config.to_dict()`), the
    dtype it ran in and its tokenizer's identity."""
    return {
        "name_or_path": name_or_path,
        "config_sha256": _sha256_json(dict(config)),
        "dtype": dtype,
        "tokenizer": tokenizer_identity(tokenizer),
    }


def check_same_tokenizer(
    store_or_manifest: TopKStore | Mapping[str, Any], student: Mapping[str, object]
) -> None:
    """Raise ValueError unless the student's tokenizer identity has the teacher's vocabulary: otherwise
    the stored top-k ids name different tokens. Only the vocabulary is compared: a base and an instruct
    model share ids while their special-token roles (eos) differ."""
    manifest = store_or_manifest.manifest if isinstance(store_or_manifest, TopKStore) else store_or_manifest
    teacher = manifest["teacher"]["tokenizer"]
    if (teacher["vocab_size"], teacher["vocab_sha256"]) != (student["vocab_size"], student["vocab_sha256"]):
        raise ValueError(
            f"the student's tokenizer differs from the teacher's, so the stored top-k ids would name other "
            f"tokens: student {dict(student)} vs teacher {teacher}"
        )


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class TopKWriter:
    """Collects sequences with their teacher top-k and writes a shard every `shard_rows` of them; `close`
    writes the rest and the manifest. As a context manager it closes only on success, so a capture that
    raised leaves no manifest and cannot be mistaken for a finished one."""

    def __init__(self, directory: str | Path, *, k: int, teacher: TeacherIdentity, shard_rows: int = 1024):
        if k < 1 or shard_rows < 1:
            raise ValueError(f"k and shard_rows must be >= 1, got k={k}, shard_rows={shard_rows}")
        if "vocab_sha256" not in teacher.get("tokenizer", {}):
            raise ValueError("teacher identity needs a 'tokenizer' entry from tokenizer_identity()")
        self.directory = Path(directory)
        if (self.directory / MANIFEST).exists():
            raise FileExistsError(f"{self.directory} already holds a finished top-k store")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.k, self.shard_rows = k, shard_rows
        self.teacher = json.loads(json.dumps(dict(teacher)))  # a JSON-safe copy, checked now
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]] = []
        self._shards: list[dict[str, Any]] = []
        self._rows = 0
        self._closed = False

    def __enter__(self) -> TopKWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()

    def add(
        self,
        token_ids: ArrayLike,
        topk_ids: ArrayLike,
        topk_logp: ArrayLike,
        *,
        loss_mask: ArrayLike | None = None,
        prompt_len: int | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> int:
        """Append one sequence and return its row index. Give either `loss_mask` [L] (1 on target tokens)
        or `prompt_len` (targets are tokens prompt_len..L-1). topk_ids / topk_logp are [L, K], aligned to
        the tokens (see the module doc); -inf logprobs mark absent entries."""
        if self._closed:
            raise RuntimeError("TopKWriter is closed")
        tokens = np.asarray(token_ids, dtype=np.int32)
        if tokens.ndim != 1:
            raise ValueError(f"token_ids must be one sequence [L], got shape {tokens.shape}")
        mask = _loss_mask(len(tokens), loss_mask, prompt_len)
        ids, logp = _topk_arrays(topk_ids, topk_logp, len(tokens), self.k)
        self._pending.append((tokens, mask, ids, logp, json.loads(json.dumps(dict(extra or {})))))
        self._rows += 1
        if len(self._pending) == self.shard_rows:
            self._flush()
        return self._rows - 1

    def close(self) -> None:
        """Write the last shard and the manifest; the store is complete only after this."""
        if self._closed:
            return
        if self._pending:
            self._flush()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "k": self.k,
            "rows": self._rows,
            "tokens": sum(s["tokens"] for s in self._shards),
            "teacher": self.teacher,
            "shards": self._shards,
        }
        publish_file(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        self._closed = True

    def _flush(self) -> None:
        tokens, masks, ids, logp, extras = zip(*self._pending, strict=True)
        offsets = np.cumsum([0] + [len(t) for t in tokens], dtype=np.int64)
        arrays = {
            "token_ids": np.concatenate(tokens),
            "loss_mask": np.concatenate(masks).astype(np.uint8),
            "topk_ids": np.concatenate(ids),
            "topk_logp": np.concatenate(logp),
            "offsets": offsets,
        }
        data = save_safetensors(arrays, metadata={"format": FORMAT, "extra": json.dumps(extras)})
        name = _shard_name(len(self._shards))
        publish_file(self.directory / name, data)
        self._shards.append(
            {
                "file": name,
                "rows": len(tokens),
                "tokens": int(offsets[-1]),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._pending = []


def _loss_mask(length: int, loss_mask: ArrayLike | None, prompt_len: int | None) -> np.ndarray:
    if (loss_mask is None) == (prompt_len is None):
        raise ValueError("give exactly one of loss_mask and prompt_len")
    if prompt_len is not None:
        if not 1 <= prompt_len <= length:
            raise ValueError(f"prompt_len {prompt_len} must lie in [1, {length}]")
        return np.arange(length) >= prompt_len
    mask = np.asarray(loss_mask).astype(bool)
    if mask.shape != (length,):
        raise ValueError(f"loss_mask has shape {mask.shape}, expected ({length},)")
    if length and mask[0]:
        raise ValueError("loss_mask[0] must be 0: nothing predicts the first token")
    return mask


def _topk_arrays(
    topk_ids: ArrayLike, topk_logp: ArrayLike, length: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    ids, logp = np.asarray(topk_ids), np.asarray(topk_logp, dtype=np.float32)
    if ids.shape != (length, k) or logp.shape != (length, k):
        raise ValueError(f"topk_ids {ids.shape} and topk_logp {logp.shape} must both be ({length}, {k})")
    if not np.issubdtype(ids.dtype, np.integer) or (ids.size and not 0 <= ids.min() <= ids.max() < 2**31):
        raise ValueError("topk_ids must be non-negative int32-range integers")
    if np.isnan(logp).any():
        raise ValueError("topk_logp contains NaN")
    return ids.astype(np.int32), logp


@dataclass
class _Shard:
    index: int
    arrays: dict[str, np.ndarray]
    extras: list[dict[str, Any]]

    def row(self, local: int, index: int) -> TopKRow:
        a, b = self.arrays["offsets"][local : local + 2]
        return TopKRow(
            index=index,
            token_ids=self.arrays["token_ids"][a:b].copy(),
            loss_mask=self.arrays["loss_mask"][a:b].astype(bool),
            topk_ids=self.arrays["topk_ids"][a:b].copy(),
            topk_logp=self.arrays["topk_logp"][a:b].copy(),
            extra=self.extras[local],
        )


class TopKStore:
    """Reads a finished store shard by shard. At most one shard is held (the last one used), so streaming
    with `iter_rows` needs memory for one shard; `row(i)` in random order reloads shards and is meant for
    inspection, not for training. Shard hashes are checked whenever a shard is loaded."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        rows = [s["rows"] for s in self.manifest["shards"]]
        self._starts = np.cumsum([0, *rows]).tolist()  # first row of each shard, then the total
        self._shard: _Shard | None = None

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def teacher(self) -> dict[str, Any]:
        return dict(self.manifest["teacher"])

    def row(self, i: int) -> TopKRow:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a store of {len(self)} rows")
        s = bisect.bisect_right(self._starts, i) - 1
        return self._load(s).row(i - self._starts[s], i)

    def iter_rows(self, start_row: int = 0) -> Iterator[TopKRow]:
        """Rows start_row, start_row + 1, ... to the end, loading each shard once; a run that stopped
        after row r resumes exactly with iter_rows(r + 1), also in the middle of a shard."""
        if not 0 <= start_row <= len(self):
            raise IndexError(f"start_row {start_row} out of range for a store of {len(self)} rows")
        first = bisect.bisect_right(self._starts, start_row) - 1
        for s in range(first, len(self.manifest["shards"])):
            for i in range(max(start_row, self._starts[s]), self._starts[s + 1]):
                yield self._load(s).row(i - self._starts[s], i)

    def _load(self, s: int) -> _Shard:
        if self._shard is None or self._shard.index != s:
            self._shard = None  # let the previous shard go before the next one is read
            self._shard = _read_shard(self.directory, self.manifest["shards"][s], s, self.k)
        return self._shard


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {directory} is not a top-k store, or its capture did not finish "
            f"(TopKWriter.close was never called)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this reader knows {FORMAT!r} version {VERSION}"
        )
    for shard in manifest["shards"]:
        if not (directory / shard["file"]).is_file():
            raise FileNotFoundError(f"shard {shard['file']} listed in {path} is missing")
    return dict(manifest)


def _read_shard(directory: Path, entry: Mapping[str, Any], index: int, k: int) -> _Shard:
    path = directory / entry["file"]
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry["bytes"] or digest != entry["sha256"]:
        raise ValueError(
            f"shard {entry['file']} in {directory} is corrupt: {len(data)} bytes with sha256 {digest}, "
            f"the manifest says {entry['bytes']} bytes with sha256 {entry['sha256']}"
        )
    (header_len,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    arrays = load_safetensors(data)
    extras = json.loads(metadata["extra"])
    rows, tokens = entry["rows"], entry["tokens"]
    if len(arrays["offsets"]) != rows + 1 or len(extras) != rows or arrays["topk_ids"].shape != (tokens, k):
        raise ValueError(f"shard {entry['file']} in {directory} does not match its manifest entry")
    return _Shard(index, arrays, extras)
