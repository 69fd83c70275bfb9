"""Loading one dataset split: JSON, JSON Lines or parquet files, a folder of them, a `save_to_disk` folder
or a hub dataset, with the source file of every row so that messages can name it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import DatasetSpec
from posttrain.data.cards import CARD
from posttrain.data.errors import DataError
from posttrain.data.images import undecoded_images
from posttrain.inputs import ensure_dataset

if TYPE_CHECKING:
    from datasets import Dataset

FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
    return Split(undecoded_images(ds), ds.column_names, name, [Source(name, len(ds), base_dir)])


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
    return Split(undecoded_images(ds), ds.column_names, origin, sources)


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
