"""Tools: schemas in transformers' convention, the built-ins, argument checks, and every failure class
answered (never raised) by the killable pool."""

import time
from pathlib import Path

import pytest

from posttrain.rewards.tools import (
    ToolCall,
    ToolLoadError,
    ToolRuntime,
    argument_problem,
    calculator,
    crop_zoom,
    json_schema,
    load_tools,
)

BAD_TOOLS = Path(__file__).parents[1] / "plugins" / "bad_tools.py"


def test_schemas_match_transformers_get_json_schema() -> None:
    from transformers.utils import get_json_schema

    assert json_schema(calculator) == get_json_schema(calculator)

    def crop_zoom_without_images(bbox_2d: list[int], image_index: int = 0) -> None:
        pass

    crop_zoom_without_images.__doc__ = crop_zoom.__doc__
    expected = get_json_schema(crop_zoom_without_images)["function"]
    expected.pop("return", None)
    assert json_schema(crop_zoom)["function"] == {**expected, "name": "crop_zoom"}  # `images` is context


def test_loading_names_the_problem() -> None:
    assert [s["function"]["name"] for s in load_tools(["calculator", "crop_zoom"]).schemas] == [
        "calculator",
        "crop_zoom",
    ]
    assert load_tools([f"{BAD_TOOLS}:boom"]).schemas[0]["function"]["description"] == "Raises."
    with pytest.raises(ToolLoadError, match="unknown tool 'nope'.*calculator"):
        load_tools(["nope"])

    def undocumented(x: int) -> str:
        """Does things."""
        return ""

    with pytest.raises(ToolLoadError, match="'x' is not described under Args"):
        json_schema(undocumented)


@pytest.mark.parametrize(
    ("expression", "value"),
    [("12345+67890", "80235"), ("(2+3)*-4", "-20"), ("7/2", "3.5"), ("84/4", "21"), (" 1 - 2 - 3 ", "-4")],
)
def test_calculator(expression: str, value: str) -> None:
    assert calculator(expression) == value


@pytest.mark.parametrize("expression", ["2**10", "__import__('os')", "1.5+1", "x+1", "1/0"])
def test_calculator_refuses_what_is_not_integer_arithmetic(expression: str) -> None:
    with pytest.raises((ValueError, ZeroDivisionError, SyntaxError)):
        calculator(expression)


def test_crop_zoom_returns_the_region() -> None:
    from PIL import Image

    image = Image.new("RGB", (100, 100), "white")
    image.paste((255, 0, 0), (50, 50, 100, 100))
    region = crop_zoom([500, 500, 1000, 1000], 0, images=[image])
    assert region.getpixel((1, 1)) == (255, 0, 0)
    with pytest.raises(IndexError, match="image_index 1 is out of range"):
        crop_zoom([0, 0, 10, 10], 1, images=[image])


def test_arguments_are_checked_against_the_schema() -> None:
    params = json_schema(crop_zoom)["function"]["parameters"]
    assert argument_problem(params, {"bbox_2d": [1, 2, 3, 4]}) is None
    assert "missing argument(s) 'bbox_2d'" in str(argument_problem(params, {}))
    assert "unknown argument(s) 'zoom'" in str(argument_problem(params, {"bbox_2d": [1, 2, 3, 4], "zoom": 2}))
    assert "must be of type array" in str(argument_problem(params, {"bbox_2d": "1,2,3,4"}))
    assert "must be of type integer" in str(
        argument_problem(params, {"bbox_2d": [1, 2, 3, 4], "image_index": "0"})
    )


def test_every_failure_is_an_answer_and_costs_at_most_the_timeout() -> None:
    names = ["calculator", *(f"{BAD_TOOLS}:{n}" for n in ("hang", "boom", "crash", "garbage"))]
    calls = {
        None: ToolCall("calculator", {"expression": "6*7"}),
        "timeout": ToolCall("hang", {"x": 1}),
        "exception": ToolCall("boom", {"x": 1}),
        "crash": ToolCall("crash", {"x": 1}),
        "invalid": ToolCall("garbage", {"x": 1}),
        "unknown_tool": ToolCall("search", {"q": "x"}),
        "bad_arguments": ToolCall("calculator", {"expr": "1"}),
    }
    with ToolRuntime(load_tools(names), timeout_s=1.0, pool_size=2) as runtime:
        start = time.monotonic()
        futures = {failure: runtime.call(call) for failure, call in calls.items()}
        answers = {failure: f.result(timeout=30) for failure, f in futures.items()}
        seconds = time.monotonic() - start
        print(
            f"7 calls, one hanging: {seconds:.2f} s; " + "; ".join(f"{a.parts[0]}" for a in answers.values())
        )
        assert seconds < 1.0 + 1.5
        assert {f: a.failure for f, a in answers.items()} == {f: f for f in calls}
        assert answers[None].parts == ("42",)
        assert answers["exception"].parts == ("Error: boom raised RuntimeError: boom 1",)
        assert answers["timeout"].parts == ("Error: hang timed out after 1 s",)
        assert answers["unknown_tool"].parts[0].startswith("Error: unknown tool 'search'")
        assert runtime.call(calls[None]).result(timeout=10).parts == ("42",)  # the pool recovered
