"""The built-in reward table and the plugin loader rewards use: what rewards/builtin.py registers into and
rewards/registry.py resolves from (apart, so neither imports the other's importer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from posttrain import plugins
from posttrain.plugins import PluginLoadError

REQUIRED_COLUMNS = "required_columns"
"""Attribute of a reward function: the dataset columns it needs, e.g. `fn.required_columns = ("solution",)`.
Undeclared: none."""

F = TypeVar("F", bound=Callable[..., Any])


class RewardLoadError(PluginLoadError):
    """A reward could not be found or its plugin could not be imported."""


@dataclass(frozen=True)
class Builtin:
    fn: Callable[..., Any]
    warmup: Callable[[], None] | None = None
    """Run once per worker process before its first timed call (imports, caches)."""


BUILTINS: dict[str, Builtin] = {}


def reward(
    name: str, *, warmup: Callable[[], None] | None = None, requires: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Register a built-in reward under `name`, needing the dataset columns `requires`."""

    def register(fn: F) -> F:
        if name in BUILTINS:
            raise ValueError(f"built-in reward {name!r} is registered twice")
        setattr(fn, REQUIRED_COLUMNS, requires)
        BUILTINS[name] = Builtin(fn, warmup)
        return fn

    return register


def load_object(ref: str) -> Any:
    """The object named by 'module:attr' or 'path/to/file.py:attr'."""
    return plugins.load_object(ref, "reward plugin", RewardLoadError)
