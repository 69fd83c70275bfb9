"""Tools for multi-turn RL and SFT: plain Python functions named like rewards, the JSON schemas the chat
template receives, and calls run in the killable worker pool (`posttrain.rewards.pool`).

    from posttrain.rewards.tools import ToolCall, ToolRuntime, load_tools

    tools = load_tools(["calculator", "crop_zoom"])      # no processes: names checked, schemas made
    tokenizer.apply_chat_template(messages, tools=tools.schemas, ...)
    with ToolRuntime(tools, timeout_s=5) as runtime:     # the pool
        answer = runtime.call(ToolCall("calculator", {"expression": "2+3"})).result()
        answer.parts, answer.failure                     # ("5",), None

Four ways to name a tool, as for rewards: a built-in (`calculator`, `crop_zoom`), an entry point in the group
`posttrain.tools`, `module:function`, or `path/to/file.py:function`. A tool is a function whose type hints
and Google-style docstring give its schema, the convention of transformers' `get_json_schema` and TRL: the
description is the docstring's first part, each argument's under `Args:`. A parameter named `images` is
not in the schema: it receives the episode's images so far (the prompt's, then those tools returned), as
PIL images. A tool returns a string, a PIL image, or a list of them (the parts of its answer).

Nothing a tool or the model does ends an episode: a call that is not valid JSON (`malformed`), names no
loaded tool (`unknown_tool`) or has arguments its schema rejects (`bad_arguments`) is answered with an
error message without running anything; a tool that hangs (`timeout`, at most `timeout_s`), raises
(`exception`), kills its worker (`crash`) or returns something else (`invalid`) is answered the same way.
Importing this module loads neither PIL nor the built-ins' dependencies.
"""

from __future__ import annotations

import ast
import inspect
import operator
import re
import types
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from posttrain import plugins
from posttrain.data.images import crop_region
from posttrain.plugins import FORMS, PluginLoadError
from posttrain.rewards.pool import CRASH, EXCEPTION, INVALID, TIMEOUT, Lost, WorkerPool

ENTRY_POINT_GROUP = "posttrain.tools"
CONTEXT_PARAMS = ("images",)
"""Parameters the runtime fills in (never in the schema, never from the model)."""
MALFORMED, UNKNOWN_TOOL, BAD_ARGUMENTS = "malformed", "unknown_tool", "bad_arguments"
TOOL_FAILURES = (MALFORMED, UNKNOWN_TOOL, BAD_ARGUMENTS, TIMEOUT, EXCEPTION, CRASH, INVALID)
"""Every way a tool call can fail, as counted in `tools/failures/<class>`."""
JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ToolLoadError(PluginLoadError):
    """A tool could not be found, imported, or described (a missing type hint or docstring argument)."""


@dataclass(frozen=True)
class ToolCall:
    """One call as the model wrote it, parsed: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolAnswer:
    """What a call returned (text and PIL image parts, in order), or why it failed: then `parts` is the
    one error message the model reads."""

    parts: tuple[Any, ...]
    failure: str | None = None
    seconds: float = 0.0

    @property
    def images(self) -> list[Any]:
        return [p for p in self.parts if not isinstance(p, str)]


def failed(failure: str, message: str) -> ToolAnswer:
    return ToolAnswer((f"Error: {message}",), failure)


# ------------------------------------------------------------------------------------------- built-ins


def calculator(expression: str) -> str:
    """Evaluate integer arithmetic with + - * / and parentheses.

    Args:
        expression: The expression, e.g. "(12 + 30) * 4".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    value = _arithmetic(ast.parse(expression.strip(), mode="eval").body)
    return str(value.numerator) if value.denominator == 1 else str(float(value))


MAX_EXPRESSION_CHARS = 200
_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _arithmetic(node: ast.AST) -> Any:
    """Exact value (a Fraction) of an integer-arithmetic syntax tree; anything else raises ValueError."""
    from fractions import Fraction

    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _arithmetic(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    raise ValueError(f"only integers, + - * / and parentheses are allowed, not {ast.unparse(node)!r}")


def crop_zoom(bbox_2d: list[int], image_index: int = 0, images: Sequence[Any] = ()) -> Any:
    """Zoom in on a region of an image.

    Args:
        bbox_2d: Region [x1, y1, x2, y2], coordinates 0-1000.
        image_index: Image number: 0 is the first of the prompt's, then tools' images.
    """
    if not 0 <= image_index < len(images):
        raise IndexError(
            f"image_index {image_index} is out of range: the conversation has {len(images)} images"
        )
    return crop_region(images[image_index], bbox_2d)


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator, "crop_zoom": crop_zoom}


# ------------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]
    context: tuple[str, ...]
    """The context parameters it takes (`images`)."""


@dataclass(frozen=True)
class ToolSet:
    """Loaded tools by name (in the order given) and their schemas."""

    tools: dict[str, Tool]
    specs: tuple[str, ...]
    """The names as given (for the workers, which load them again)."""

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """The JSON schemas, as the chat template's `tools=` takes them."""
        return [t.schema for t in self.tools.values()]

    def check(self, call: ToolCall) -> ToolAnswer | None:
        """The error answer for a call that must not run (unknown tool, arguments the schema rejects)."""
        tool = self.tools.get(call.name)
        if tool is None:
            return failed(UNKNOWN_TOOL, f"unknown tool {call.name!r}; the tools are {', '.join(self.tools)}")
        problem = argument_problem(tool.schema["function"]["parameters"], call.arguments)
        return None if problem is None else failed(BAD_ARGUMENTS, f"{call.name}: {problem}")


def available_tools() -> list[str]:
    return sorted({*BUILTIN_TOOLS, *plugins.entry_points(ENTRY_POINT_GROUP)})


def load_tools(names: Sequence[str]) -> ToolSet:
    """Resolve every tool name and make its schema; ToolLoadError names the tool that fails."""
    tools = {}
    for spec in names:
        fn = resolve_tool(spec)
        tool = Tool(fn.__name__, fn, json_schema(fn), tuple(p for p in CONTEXT_PARAMS if p in _params(fn)))
        if tool.name in tools:
            raise ToolLoadError(f"two tools are named {tool.name!r} ({spec})")
        tools[tool.name] = tool
    return ToolSet(tools, tuple(plugins.absolute_name(n) for n in names))


def resolve_tool(name: str) -> Callable[..., Any]:
    if ":" in name:
        fn = plugins.load_object(name, "tool plugin", ToolLoadError)
    elif name in BUILTIN_TOOLS:
        fn = BUILTIN_TOOLS[name]
    else:
        installed = plugins.entry_points(ENTRY_POINT_GROUP)
        if name not in installed:
            raise ToolLoadError(
                f"unknown tool {name!r}. Built-in: {', '.join(BUILTIN_TOOLS)}. Installed (entry-point group "
                f"{ENTRY_POINT_GROUP!r}): {', '.join(sorted(installed)) or 'none'}. A plugin is named as {FORMS}."
            )
        try:
            fn = installed[name].load()
        except Exception as err:
            raise ToolLoadError(
                f"tool entry point {name!r} failed to load: {type(err).__name__}: {err}"
            ) from err
    if not callable(fn) or inspect.iscoroutinefunction(fn):
        raise ToolLoadError(f"tool {name!r} must be a plain function, not {type(fn).__name__}")
    return fn


def _params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


# ------------------------------------------------------------------------------------------------ schemas


def json_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """`fn`'s schema as transformers' `get_json_schema` makes it (context parameters left out; `return`
    only when the return type has a JSON type)."""
    description, arg_docs = parse_docstring(inspect.getdoc(fn) or "", fn.__name__)
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for name, param in _params(fn).items():
        if name in CONTEXT_PARAMS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name not in hints:
            raise ToolLoadError(f"tool {fn.__name__!r}: argument {name!r} has no type hint")
        if name not in arg_docs:
            raise ToolLoadError(f"tool {fn.__name__!r}: argument {name!r} is not described under Args:")
        properties[name] = {**json_type(hints[name], fn.__name__), "description": arg_docs[name]}
        if param.default is param.empty:
            required.append(name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    function: dict[str, Any] = {"name": fn.__name__, "description": description, "parameters": parameters}
    if hints.get("return") in JSON_TYPES:
        function["return"] = {"type": JSON_TYPES[hints["return"]]}
    return {"type": "function", "function": function}


def json_type(hint: Any, tool: str) -> dict[str, Any]:
    """The JSON-schema type of a type hint (str, int, float, bool, list[...], dict, Literal, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in JSON_TYPES:
        return {"type": JSON_TYPES[hint]}
    if origin in (list, tuple, Sequence) or hint is list:
        return {"type": "array", **({"items": json_type(args[0], tool)} if args else {})}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if origin is Literal:
        return {"type": JSON_TYPES[type(args[0])], "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        kinds = [json_type(a, tool) for a in args if a is not type(None)]
        nullable = type(None) in args
        if len(kinds) == 1:
            return {**kinds[0], "nullable": True} if nullable else kinds[0]
        return {"type": [k["type"] for k in kinds] + (["null"] if nullable else [])}
    raise ToolLoadError(f"tool {tool!r}: type hint {hint!r} has no JSON-schema type")


_ARG = re.compile(r"^\s{2,}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


def parse_docstring(doc: str, tool: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) of a Google-style docstring."""
    head, _, rest = doc.partition("\nArgs:\n")
    description = head.split("\nReturns:")[0].split("\nRaises:")[0].strip()
    if not description:
        raise ToolLoadError(f"tool {tool!r} has no docstring description")
    args: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        if line and not line[0].isspace():  # the next section (Returns:, Raises:)
            break
        match = _ARG.match(line)
        if match and (current is None or len(line) - len(line.lstrip()) <= _indent(rest)):
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current is not None and line.strip():
            args[current] = f"{args[current]} {line.strip()}"
    return description, args


def _indent(section: str) -> int:
    first = next((line for line in section.splitlines() if line.strip()), "")
    return len(first) - len(first.lstrip())


def argument_problem(parameters: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """Why `arguments` do not fit the schema's `parameters` (missing, unknown, wrong type), else None."""
    properties = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing argument(s) {', '.join(map(repr, missing))}"
    unknown = [k for k in arguments if k not in properties]
    if unknown:
        return (
            f"unknown argument(s) {', '.join(map(repr, unknown))}; it takes {', '.join(properties) or 'none'}"
        )
    for name, value in arguments.items():
        if not fits(properties[name], value):
            return f"argument {name!r} must be of type {properties[name]['type']}, not {json_name(value)}"
    return None


def fits(schema: dict[str, Any], value: Any) -> bool:
    kinds = schema["type"] if isinstance(schema.get("type"), list) else [schema.get("type")]
    if value is None:
        return bool(schema.get("nullable")) or "null" in kinds
    if "enum" in schema and value not in schema["enum"]:
        return False
    if json_name(value) == "integer" and "number" in kinds:
        return True
    if json_name(value) == "array" and "array" in kinds and "items" in schema:
        return all(fits(schema["items"], v) for v in value)
    return json_name(value) in kinds


def json_name(value: Any) -> str:
    """The JSON type of a parsed JSON value."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ calling


def serve_tools(specs: Sequence[str]) -> Callable[[tuple[str, dict[str, Any], list[Any]]], ToolAnswer]:
    """The pool workers' setup: load the tools; serve (name, arguments, images) calls."""
    tools = load_tools(specs).tools
    if "crop_zoom" in tools:
        import PIL.Image  # noqa: F401  (imported once here, not inside the first timed call)

    def serve(task: tuple[str, dict[str, Any], list[Any]]) -> ToolAnswer:
        name, arguments, images = task
        tool = tools[name]
        context = {"images": images} if "images" in tool.context else {}
        try:
            return answer_of(tool.fn(**arguments, **context))
        except Exception as err:
            return failed(EXCEPTION, f"{name} raised {type(err).__name__}: {err}")

    return serve


def answer_of(raw: Any) -> ToolAnswer:
    """A tool's return value as answer parts: a string, a PIL image, or a list of those; else `invalid`."""
    from PIL.Image import Image

    parts = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not parts or not all(isinstance(p, (str, Image)) for p in parts):
        return failed(INVALID, f"the tool returned {type(raw).__name__}, not text or an image")
    return ToolAnswer(tuple(p if isinstance(p, str) else p.convert("RGB") for p in parts))


class ToolRuntime:
    """Tool calls in the killable worker pool; `call` is thread-safe and returns at once."""

    def __init__(self, tools: ToolSet, *, timeout_s: float = 10.0, pool_size: int = 2) -> None:
        self.tools, self.timeout_s = tools, timeout_s
        self.pool = WorkerPool(
            "posttrain.rewards.tools:serve_tools",
            list(tools.specs),
            size=pool_size,
            timeout_s=timeout_s,
            what="tool",
            load_error=ToolLoadError,
        )

    def __enter__(self) -> ToolRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()

    def call(self, call: ToolCall, images: Sequence[Any] = ()) -> Future[ToolAnswer]:
        """The answer of `call` (given the episode's images so far); never raises for the call's faults."""
        import time

        out: Future[ToolAnswer] = Future()
        refused = self.tools.check(call)
        if refused is not None:
            out.set_result(refused)
            return out
        started = time.monotonic()
        inner = self.pool.submit((call.name, call.arguments, list(images)))

        def done(f: Future[Any]) -> None:
            seconds = time.monotonic() - started
            try:
                answer = f.result()
            except BaseException as err:  # the pool closed or its workers cannot load
                answer = Lost(CRASH, f"{type(err).__name__}: {err}")
            if isinstance(answer, Lost):
                what = (
                    f"timed out after {self.timeout_s:g} s"
                    if answer.failure == TIMEOUT
                    else f"crashed ({answer.message})"
                )
                answer = failed(answer.failure, f"{call.name} {what}")
            out.set_result(ToolAnswer(answer.parts, answer.failure, seconds))

        inner.add_done_callback(done)
        return out
