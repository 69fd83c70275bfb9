"""crop_region: the zoom shared by tool traces and the crop_zoom tool."""

from __future__ import annotations

import pytest
from PIL import Image

from posttrain.data.images import crop_region


def quadrants(width: int = 400, height: int = 200) -> Image.Image:
    """Left half red, right half blue; the bottom-right quarter green."""
    image = Image.new("RGB", (width, height), "red")
    image.paste("blue", (width // 2, 0, width, height))
    image.paste("green", (width // 2, height // 2, width, height))
    return image


def test_box_in_relative_coordinates_selects_that_region_and_zooms_it() -> None:
    region = crop_region(quadrants(), [500, 500, 1000, 1000])  # bottom-right quarter: 200x100 px
    assert region.size == (200, 100)  # longer side already the image's shorter side (200): not resized
    assert set(region.getdata()) == {(0, 128, 0)}


def test_small_region_is_upscaled_to_the_shorter_side_keeping_its_aspect() -> None:
    region = crop_region(quadrants(), [0, 0, 100, 100])  # 40x20 px of red
    assert region.size == (200, 100)
    assert set(region.getdata()) == {(255, 0, 0)}


def test_box_is_ordered_and_clamped() -> None:
    image = quadrants()
    expected = list(crop_region(image, [500, 0, 1000, 500]).getdata())
    assert list(crop_region(image, [1000, 500, 500, 0]).getdata()) == expected
    assert list(crop_region(image, [500, -300, 2000, 500]).getdata()) == expected


@pytest.mark.parametrize("box", [[1000, 1000, 1000, 1000], [0, 0, 0, 0], [300, 300, 300.4, 300.4]])
def test_degenerate_box_is_at_least_one_pixel(box: list[float]) -> None:
    region = crop_region(quadrants(), box)
    assert region.size == (200, 200)  # 1x1 px, upscaled to the shorter side


def test_box_edges_are_rounded_outwards() -> None:
    image = Image.new("L", (10, 10))
    assert crop_region(image, [150, 150, 250, 250]).size == (10, 10)  # pixels 1..2 (2 px), zoomed 5x
    assert crop_region(image.resize((1000, 10)), [0, 0, 1000, 150]).size == (1000, 2)


@pytest.mark.parametrize("box", [[1, 2, 3], [0, 0, "5", 9], [0, 0, True, 9]])
def test_malformed_box_is_a_value_error(box: list[object]) -> None:
    with pytest.raises(ValueError, match="four numbers"):
        crop_region(quadrants(), box)  # type: ignore[arg-type]
