"""Finding plugin objects by name: `module:attr`, `path/to/file.py:attr`, or an entry point of a group.

One loader for every kind of plugin (rewards, input builders); each kind passes its own error class and
the word its messages use ("reward plugin", "builder plugin"), so an error names the kind, the module or
file, and the attribute. Imports nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any

FORMS = "'module:function' or 'path/to/file.py:function'"


class PluginLoadError(ValueError):
    """A plugin could not be found or its module could not be imported."""


def is_file(target: str) -> bool:
    """Whether the part before the colon names a file (`x.py`, `dir/x`) rather than a module."""
    return target.endswith(".py") or "/" in target


def absolute_name(name: str) -> str:
    """`name` with a plugin file's path made absolute (for processes that may run elsewhere)."""
    target, _, attr = name.rpartition(":")
    return f"{Path(target).resolve()}:{attr}" if target and is_file(target) else name


def entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}


def load_object(ref: str, what: str = "plugin", error: type[PluginLoadError] = PluginLoadError) -> Any:
    """The object named by 'module:attr' or 'path/to/file.py:attr' (a relative path is from the working
    directory)."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise error(f"{ref!r} is not of the form {FORMS}")
    if is_file(target):
        module = _import_file(Path(target), what, error)
    else:
        module = _import_module(target, what, error)
    if not hasattr(module, attr):
        raise error(f"{what} {target} has no attribute {attr!r}")
    return getattr(module, attr)


def _import_module(name: str, what: str, error: type[PluginLoadError]) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise error(f"{what} module {name!r} failed to import: {type(err).__name__}: {err}") from err


def _import_file(path: Path, what: str, error: type[PluginLoadError]) -> Any:
    path = path.resolve()
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    # One module per file path (whichever kind of plugin it serves), registered before running it so
    # pickling and dataclasses work inside.
    name = f"posttrain_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[name]
        raise error(f"{what} file {path} failed to import: {type(err).__name__}: {err}") from err
    return module
