"""Dataset images: left undecoded when a split is loaded, decoded (to RGB) when a row is validated, so a
corrupt image is reported with its row; `crop_region`, the zoom that tool traces and the `crop_zoom` tool
share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.data.errors import RowError

if TYPE_CHECKING:
    from datasets import Dataset
    from PIL.Image import Image as PILImage

BBOX_SCALE = 1000
"""Qwen3-VL's boxes are relative: 0..1000 spans the image's width (x) and height (y)."""


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


def _pixel_span(a: float, b: float, size: int) -> tuple[int, int]:
    """Relative coordinates a, b (either order, clamped to 0..1000) as a pixel span of at least 1 px."""
    lo, hi = sorted(min(max(float(v), 0.0), BBOX_SCALE) for v in (a, b))
    start = min(math.floor(lo * size / BBOX_SCALE), size - 1)
    return start, max(math.ceil(hi * size / BBOX_SCALE), start + 1)


def crop_region(image: PILImage, bbox_2d: Sequence[float]) -> PILImage:
    """The region `bbox_2d` = [x1, y1, x2, y2] (relative 0..1000 coordinates, clamped and ordered, at least
    1 px each way) of the full-resolution `image`, zoomed in: upscaled (bicubic, aspect ratio kept) so its
    longer side is at least the image's shorter side, so a processor with a pixel budget spends it on the
    region rather than enlarging a few pixels itself; a region already that large is returned as cut (the
    tiny Qwen3-VL processor resizes every image to 96x96 anyway). Raises ValueError for a box that is not
    four numbers (the `crop_zoom` tool reports that to the model)."""
    from PIL import Image

    if len(bbox_2d) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox_2d):
        raise ValueError(f"bbox_2d must be four numbers [x1, y1, x2, y2] in 0..1000, got {list(bbox_2d)!r}")
    x1, y1, x2, y2 = bbox_2d
    left, right = _pixel_span(x1, x2, image.width)
    top, bottom = _pixel_span(y1, y2, image.height)
    region = image.crop((left, top, right, bottom))
    scale = min(image.size) / max(region.size)
    if scale <= 1:
        return region
    zoomed = (max(1, round(region.width * scale)), max(1, round(region.height * scale)))
    return region.resize(zoomed, resample=Image.Resampling.BICUBIC)
