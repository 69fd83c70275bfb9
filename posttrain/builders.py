"""Input builders: plugins that write a missing model folder or dataset, named like rewards are.

A config's `build: {builder: NAME, args: {...}}` (under `model` or a dataset spec) names one. Four ways to
name a builder: a built-in (the synthetic home's `tiny_model`, `qwen3_shape`, `arithmetic`, `shapes`), an
entry point in the group `posttrain.builders`, `module:attr`, or `path/to/file.py:attr`, where the
attribute is a `Builder` made with the decorator:

    class MyArgs(Strict):
        rows: int = 100  # (a docstring under each field, as in posttrain.config)

    @builder(makes="dataset", args=MyArgs, verifier="exact_match")
    def my_task(path: Path, args: MyArgs) -> None:
        ...  # write the dataset at `path` (ideally into a temporary folder renamed into place)

A builder declares what it makes (`model` or `dataset`), the pydantic model its arguments are checked
against when the config is read (errors name `<key>.build.args.<field>`), and, for a task, the reward
that verifies its answers (the dataset's own verifier in evaluation, see posttrain.inputs).

Imports only pydantic and the standard library: configs resolve builders while they validate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from posttrain import plugins
from posttrain.plugins import FORMS, PluginLoadError

ENTRY_POINT_GROUP = "posttrain.builders"
BUILTIN_MODULES = ("posttrain.synthetic.builders",)
"""Modules whose `@builder(name=...)` declarations are the built-in builders, imported on first lookup."""

Makes = Literal["model", "dataset"]


class BuilderLoadError(PluginLoadError):
    """A builder could not be found, its plugin could not be imported, or it is not a `Builder`."""


class BuildError(RuntimeError):
    """A builder ran but did not leave its input at the path."""


@dataclass(frozen=True)
class Builder:
    """A declared builder: `fn(path, args)` writes the input at `path` from arguments of type `args`."""

    name: str
    makes: Makes
    args: type[BaseModel]
    fn: Callable[[Path, Any], None]
    verifier: str | None = None
    """A dataset builder's task: the reward that verifies an answer (a reward name, as in `rewards:`)."""

    def check_args(self, raw: dict[str, Any]) -> BaseModel:
        """`raw` validated as this builder's arguments (pydantic's ValidationError when they are wrong)."""
        return self.args.model_validate(raw)

    def __call__(self, path: Path, args: BaseModel) -> None:
        self.fn(path, args)


_BUILTINS: dict[str, Builder] = {}


def builder(
    name: str | None = None, *, makes: Makes, args: type[BaseModel], verifier: str | None = None
) -> Callable[[Callable[[Path, Any], None]], Builder]:
    """Declare a builder. With `name` it is also registered as a built-in under that name (for the
    modules of `BUILTIN_MODULES`); plugins named as `module:attr` leave it out."""

    def declare(fn: Callable[[Path, Any], None]) -> Builder:
        declared = Builder(name or fn.__name__, makes, args, fn, verifier)
        if name is not None:
            if name in _BUILTINS:
                raise ValueError(f"built-in builder {name!r} is registered twice")
            _BUILTINS[name] = declared
        return declared

    return declare


def builtins() -> dict[str, Builder]:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)  # registers on import
    return dict(_BUILTINS)


def entry_points() -> dict[str, Any]:
    return plugins.entry_points(ENTRY_POINT_GROUP)


def available_builders() -> list[str]:
    """Built-in and installed (entry-point) builder names."""
    return sorted({*builtins(), *entry_points()})


def resolve_builder(name: str) -> Builder:
    """The builder behind a name in any of the four forms."""
    found = _resolve(name)
    if not isinstance(found, Builder):
        raise BuilderLoadError(
            f"builder {name!r} is a {type(found).__name__}, not a Builder: declare it with "
            "@posttrain.builders.builder(makes=..., args=...)"
        )
    return found


def _resolve(name: str) -> Any:
    if ":" in name:
        return plugins.load_object(name, "builder plugin", BuilderLoadError)
    known = builtins()
    if name in known:
        return known[name]
    installed = entry_points()
    if name in installed:
        try:
            return installed[name].load()
        except Exception as err:
            raise BuilderLoadError(
                f"builder entry point {name!r} ({installed[name].value}) failed to load: "
                f"{type(err).__name__}: {err}"
            ) from err
    raise BuilderLoadError(
        f"unknown builder {name!r}. Built-in: {', '.join(sorted(known))}. "
        f"Installed (entry-point group {ENTRY_POINT_GROUP!r}): {', '.join(sorted(installed)) or 'none'}. "
        f"A plugin is named as {FORMS}."
    )
