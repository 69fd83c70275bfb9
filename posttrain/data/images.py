"""Dataset images: left undecoded when a split is loaded, decoded (to RGB) when a row is validated, so a
corrupt image is reported with its row."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.data.errors import RowError

if TYPE_CHECKING:
    from datasets import Dataset


def undecoded_images(ds: Dataset) -> Dataset:
    """Let normalisation decode images itself, so a corrupt one is reported with its row."""
    from datasets import Image, List

    feature = ds.features.get("images")
    if isinstance(feature, Image):
        return ds.cast_column("images", Image(decode=False))
    if isinstance(feature, List) and isinstance(feature.feature, Image):
        return ds.cast_column("images", List(Image(decode=False)))
    return ds


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


def row_images(row: dict[str, Any], messages: list[dict[str, Any]], base_dir: Path | None) -> list[Any]:
    wanted = sum(p["type"] == "image" for m in messages for p in m.get("parts", ()))
    value = row.get("images")
    images = [] if value is None else value if isinstance(value, list) else [value]
    if len(images) != wanted:
        raise RowError(
            "images", f"messages have {wanted} image part(s) but the row has {len(images)} image(s)"
        )
    return [_decode_image(v, base_dir, k) for k, v in enumerate(images)]
