"""Finding reward functions by name and calling them in the TRL or verl convention.

Four ways to name a reward: a built-in registered with `@reward`, an entry point in the group
`posttrain.rewards`, `module:function`, or `path/to/file.py:function`. The TRL signature is native:
`f(completions, **kwargs) -> list[float | None]` with `prompts`, `completion_ids` and every dataset column
as keyword arguments; a verl `compute_score(data_source, solution_str, ground_truth, extra_info)` runs
per sample through an adapter. Both may be `async`. A function names the dataset columns it cannot score
without in a `required_columns` attribute (verl functions need their `ground_truth` column), so a prompt set
is checked before a run starts.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain import plugins
from posttrain.plugins import FORMS
from posttrain.plugins import absolute_name as absolute_name  # re-exported for posttrain.rewards.runtime
from posttrain.rewards import builtin as _registers_builtins  # noqa: F401  (the built-ins register on import)
from posttrain.rewards.config import RewardSpec
from posttrain.rewards.table import (
    BUILTINS,
    REQUIRED_COLUMNS,
    Builtin,
    RewardLoadError,
    load_object,
)

ENTRY_POINT_GROUP = "posttrain.rewards"


def builtins() -> dict[str, Builtin]:
    return dict(BUILTINS)


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return plugins.entry_points(ENTRY_POINT_GROUP)


def available_rewards() -> list[str]:
    """Built-in and installed (entry-point) reward names."""
    return sorted({*builtins(), *entry_points()})


def resolve_reward(name: str) -> Callable[..., Any]:
    """The function behind a reward name in any of the four forms."""
    fn = _resolve(name)
    if not callable(fn):
        raise RewardLoadError(f"reward {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _resolve(name: str) -> Any:
    if ":" in name:
        return load_object(name)
    known = builtins()
    if name in known:
        return known[name].fn
    installed = entry_points()
    if name in installed:
        try:
            return installed[name].load()
        except Exception as err:
            raise RewardLoadError(
                f"reward entry point {name!r} ({installed[name].value}) failed to load: "
                f"{type(err).__name__}: {err}"
            ) from err
    raise RewardLoadError(
        f"unknown reward {name!r}. Built-in: {', '.join(sorted(known))}. "
        f"Installed (entry-point group {ENTRY_POINT_GROUP!r}): {', '.join(sorted(installed)) or 'none'}. "
        f"A plugin is named as {FORMS}."
    )


# ---------------------------------------------------------------------------------------------- calling


@dataclass(frozen=True)
class Batch:
    """What a reward sees: the completions and, aligned with them, prompts, token ids and columns."""

    completions: list[str]
    prompts: list[str]
    completion_ids: list[list[int]]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completions)

    def subset(self, indices: list[int]) -> Batch:
        return Batch(
            [self.completions[i] for i in indices],
            [self.prompts[i] for i in indices],
            [self.completion_ids[i] for i in indices],
            {k: [v[i] for i in indices] for k, v in self.columns.items()},
        )


@dataclass(frozen=True)
class LoadedReward:
    fn: Callable[..., Any]
    kind: Literal["trl", "verl"]
    params: dict[str, Any]
    ground_truth: str
    accepted: frozenset[str] | None
    """Keyword arguments the function takes; None when it takes **kwargs."""
    warmup: Callable[[], None] | None
    required: tuple[str, ...]
    """Dataset columns it cannot score without."""


def load_reward(
    name: str,
    kind: Literal["auto", "trl", "verl"] = "auto",
    params: dict[str, Any] | None = None,
    ground_truth: str = "solution",
) -> LoadedReward:
    """Resolve `name` and fix its calling convention (`auto` detects verl by its parameter names)."""
    fn = resolve_reward(name)
    signature = inspect.signature(fn)
    names = set(signature.parameters)
    if kind == "auto":
        kind = "verl" if {"solution_str", "ground_truth"} <= names else "trl"
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    builtin = BUILTINS.get(name)
    accepted = None if takes_any else frozenset(names)
    required = _declared_columns(name, fn) + ((ground_truth,) if kind == "verl" else ())
    return LoadedReward(
        fn,
        kind,
        dict(params or {}),
        ground_truth,
        accepted,
        builtin.warmup if builtin else None,
        tuple(dict.fromkeys(required)),
    )


def _declared_columns(name: str, fn: Callable[..., Any]) -> tuple[str, ...]:
    declared = getattr(fn, REQUIRED_COLUMNS, ())
    if not isinstance(declared, (list, tuple)) or not all(isinstance(c, str) for c in declared):
        raise RewardLoadError(
            f"reward {name!r}: `{REQUIRED_COLUMNS}` must be a tuple of column names, not {declared!r}"
        )
    return tuple(declared)


def required_columns(specs: Sequence[RewardSpec]) -> dict[str, str]:
    """Each dataset column the rewards of `specs` need → the first reward needing it ("reward 'key'"), the
    form data loading takes to check a prompt set. Resolves every reward, so a bad name fails here."""
    needs: dict[str, str] = {}
    for spec in specs:
        for column in load_reward(spec.name, spec.kind, spec.params, spec.ground_truth).required:
            needs.setdefault(column, f"reward {spec.key!r}")
    return needs


def call_reward(reward: LoadedReward, batch: Batch) -> list[Any]:
    """Raw per-sample outputs of `reward` on `batch` (validated by the caller); plugin errors propagate."""
    if reward.kind == "verl":
        return _call_verl(reward, batch)
    kwargs = {
        **batch.columns,
        **reward.params,
        "prompts": batch.prompts,
        "completion_ids": batch.completion_ids,
    }
    out = reward.fn(completions=batch.completions, **_accepted(reward, kwargs))
    return _run(out) if inspect.isawaitable(out) else out


def _call_verl(reward: LoadedReward, batch: Batch) -> list[Any]:
    if reward.ground_truth not in batch.columns:
        raise ValueError(
            f"verl-style reward needs the ground-truth column {reward.ground_truth!r}; "
            f"columns are {sorted(batch.columns)} (set `ground_truth` in the reward spec)"
        )
    outs = []
    for i, completion in enumerate(batch.completions):
        row = {k: v[i] for k, v in batch.columns.items()}
        kwargs = {
            "data_source": row.get("data_source"),
            "solution_str": completion,
            "ground_truth": row[reward.ground_truth],
            "extra_info": row.get("extra_info", row),  # verl datasets carry one; else the whole row
            **reward.params,
        }
        outs.append(reward.fn(**_accepted(reward, kwargs)))
    if any(inspect.isawaitable(o) for o in outs):
        outs = _run(_gather(outs))
    # verl allows a dict result whose "score" is the reward (the rest are extra metrics).
    return [o["score"] if isinstance(o, dict) and "score" in o else o for o in outs]


def _accepted(reward: LoadedReward, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop keyword arguments a function without **kwargs would reject (e.g. unused columns)."""
    if reward.accepted is None:
        return kwargs
    return {k: v for k, v in kwargs.items() if k in reward.accepted}


def _run(awaitable: Awaitable[Any]) -> Any:
    async def wait() -> Any:
        return await awaitable

    return asyncio.run(wait())


async def _gather(items: list[Any]) -> list[Any]:
    async def one(item: Any) -> Any:
        return await item if inspect.isawaitable(item) else item

    return list(await asyncio.gather(*map(one, items)))
